"""Regenerates the notebooks from the cells below (keeps them reviewable), then runs them.

    python notebooks/make_notebooks.py            # write and execute every notebook
    python notebooks/make_notebooks.py --no-run   # write the cells only

Every notebook opens with the same Colab cell: on Colab (where `google.colab` imports)
it pip-installs the package from `REPO_URL`, the one place the repository's address is
set (README: "Notebooks"); elsewhere it does nothing, and the package comes from
`pip install -e ".[dev]"`.
"""

import os
import sys

import nbformat as nbf

REPO_URL = "https://github.com/ensembling-dev/ensembling"  # the repository's address

COLAB = f'''import importlib.util, subprocess, sys
if importlib.util.find_spec("google.colab") is not None:  # on Colab: install the package
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+{REPO_URL}"], check=True)'''

QUICKSTART = [
    ("md", """# ensembling quickstart: a deep ensemble on digits

Trains 4 MLPs at once (`jax.vmap` over a leading member axis), then compares each member
with the probability-averaged ensemble. Everything is a pure function on pytrees."""),
    ("code", COLAB),
    ("code", """import jax, jax.numpy as jnp, numpy as np
from ensembling import data, members, models, optim, report, train

splits = data.load({"name": "digits"}, seed=0)   # scikit-learn's bundled digits
print(splits.describe())"""),
    ("code", """K, EPOCHS, BATCH = 4, 8, 32
model = models.MLP(widths=(64, 64), num_classes=splits.num_classes, dropout=0.1)
variables = members.init_members(jax.random.key(0), model, splits.x_train[:1], K)
batch_fn, steps_per_epoch = train.make_batch_fn(splits.x_train, splits.y_train, seed=0,
                                                batch_size=BATCH, num_members=K)
tx = optim.make_optimizer(learning_rate=0.05, momentum=0.9)
state = members.init_states(variables, tx)
step = members.ensemble_step(model=model, tx=tx, num_members=K)
print({k: v.shape for k, v in variables["params"]["Dense_0"].items()})"""),
    ("code", """keys = members.member_keys(jax.random.key(1), K)
for t in range(EPOCHS * steps_per_epoch):
    state, m = step(state, batch_fn(t), members.step_keys(keys, t))
print("final train loss per member:", np.round(np.asarray(m["loss"]), 3))"""),
    ("code", """logits = members.predict(model, state, splits.x_test)
rep = report.ensemble_report(logits, splits.y_test)
print(report.markdown_table(report.ensemble_rows(rep)))
assert rep["ensemble"]["nll"] <= rep["mean_member"]["nll"]"""),
]

OWN_MODEL = [
    ("md", """# Bring your own model: Linen and NNX

Two models written the way their authors would write them, with BatchNorm and dropout:
a Flax Linen module returning plain logits (with a `train` argument) and an NNX module.
Each is trained as a 4-member ensemble (one vmapped step), checked against a per-member
loop, then turned into a greedy soup (fine-tuned ingredients) and an SWA average, with
the ensemble metrics printed. Nothing here is specific to our own models."""),
    ("code", COLAB),
    ("code", """import functools
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from ensembling import averaging, data, members, metrics, models, optim, report, soups
from ensembling import train, trajectory, tree

splits = data.load({"name": "digits"}, seed=0)
flat = lambda x: x.reshape(len(x), -1)
x_train, x_val, x_test = flat(splits.x_train), flat(splits.x_val), flat(splits.x_test)
y_train, y_val, y_test = splits.y_train, splits.y_val, splits.y_test


class LinenNet(nn.Module):           # plain logits, a `train` flag, BatchNorm, dropout
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(64)(x)))
        return nn.Dense(10)(nn.Dropout(0.2, deterministic=not train)(h))


class NNXNet(nnx.Module):             # the NNX way: layers built from `rngs`
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(64, 64, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.dense(x)))))


MODELS = {"linen": LinenNet(), "nnx": models.from_nnx(lambda rngs: NNXNet(rngs))}"""),
    ("md", """## A 4-member ensemble of each, and the per-member loop it must equal"""),
    ("code", """K = 4
tx = optim.make_optimizer(learning_rate=0.05, momentum=0.9)
ensembles = {}
for name, model in MODELS.items():
    # The same members trained one at a time for an epoch: same init, batches, dropout keys.
    # (Over many steps float summation order makes the two drift apart by ~1e-3.)
    one_epoch = train.train_members(model, x_train, y_train, num_members=K, tx=tx, epochs=1,
                                    batch_size=32, seed=0, progress=False)
    batch_fn, spe = train.make_batch_fn(x_train, y_train, seed=0, batch_size=32, num_members=K)
    init = members.init_members(jax.random.key(0), model, x_train[:1], K)
    keys = members.member_keys(jax.random.key(1), K)
    one = jax.jit(functools.partial(members.train_step, model=model, tx=tx))
    for k in range(K):
        s = members.init_state(tree.index(init, k), tx)
        for t in range(spe):
            s, _ = one(s, tree.index(batch_fn(t), k), members.step_keys(keys, t)[k])
        for a, b in zip(jax.tree.leaves(tree.index(one_epoch.state["params"], k)),
                        jax.tree.leaves(s["params"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print(f"{name}: vmapped members == per-member loop")
    res = train.train_members(model, x_train, y_train, num_members=K, tx=tx, epochs=6,
                              batch_size=32, seed=0, progress=False)
    ensembles[name] = res.state
    rep = report.ensemble_report(members.predict(model, res.state, x_test), y_test)
    print(report.markdown_table(report.ensemble_rows(rep)))"""),
    ("md", """## A greedy soup of fine-tuned ingredients

Soups average weights, so the ingredients share one starting point: member 0 of the
ensemble, fine-tuned four times with different learning rates and data orders. The
held-out score recomputes BatchNorm statistics for every candidate soup."""),
    ("code", """def val_accuracy(model, stats, stats_batches):
    m = models.as_model(model)
    def score(params):
        v = averaging.recompute_batch_stats(model, {"params": params, "batch_stats": stats},
                                            stats_batches)
        return float(np.mean(np.argmax(m.apply(v, x_val)[0].logits, -1) == y_val))
    return score

for name, model in MODELS.items():
    start = tree.broadcast(tree.index(members.variables_of(ensembles[name]), 0), K)
    stats = tree.index(start["batch_stats"], 0)
    ft = train.train_members(model, x_train, y_train, num_members=K, tx=tx, epochs=2,
                             batch_size=32, seed=1, lr_scale=[0.2, 0.5, 1.0, 2.0],
                             init_variables=start, progress=False)
    soup = soups.greedy_soup(ft.state["params"], val_accuracy(model, stats, [x_train[:512]]),
                             evaluation="python")
    print(f"{name}: ingredients' val accuracy {np.round(soup.individual_scores, 4)}, "
          f"greedy soup of {list(soup.indices)}: {soup.score:.4f}")"""),
    ("md", """## An SWA average, its BatchNorm statistics recomputed"""),
    ("code", """spe = data.num_steps_per_epoch(len(x_train), 32)
plan = trajectory.swa_plan(base_lr=0.05, total_steps=8 * spe, pretrain_steps=4 * spe,
                           swa_lr=0.01, anneal_steps=spe, every=spe // 2)
for name, model in MODELS.items():
    run = trajectory.fit(model, plan, x_train, y_train, num_runs=2, batch_size=32, seed=0,
                         optimizer=lambda lr: optim.make_optimizer(learning_rate=lr),
                         progress=False)
    swa = trajectory.recalibrate(model, run.average, x_train, batch_size=32)
    for label, v in (("end point", run.state), ("SWA, recalibrated", swa)):
        acc = [metrics.accuracy(p, y_test) for p in
               jax.nn.softmax(members.predict(model, v, x_test), -1)]
        print(f"{name} {label}: test accuracy per run {np.round(acc, 4)}")"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "own_model.ipynb": OWN_MODEL}


def build(cells) -> nbf.NotebookNode:
  nb = nbf.v4.new_notebook()
  nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
              for kind, src in cells]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return nb


def main(run: bool = True) -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  for name, cells in NOTEBOOKS.items():
    nb = build(cells)
    if run:  # store the outputs in the file, as a reader (or Colab) first sees them
      import nbclient
      nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                              resources={"metadata": {"path": os.path.dirname(here)}}).execute()
    nbf.write(nb, os.path.join(here, name))


if __name__ == "__main__":
  main(run="--no-run" not in sys.argv)

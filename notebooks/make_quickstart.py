"""Regenerates quickstart.ipynb from the cells below (keeps the notebook reviewable)."""

import os

import nbformat as nbf

CELLS = [
    ("md", """# ensembling quickstart: a deep ensemble on digits

Trains 4 MLPs at once (`jax.vmap` over a leading member axis), then compares each member
with the probability-averaged ensemble. Everything is a pure function on pytrees.

In Colab: `!pip install -q "git+<this repository's URL>"` first. Locally:
`pip install -e ".[dev]"` from the repository root."""),
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
step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=K, strategy="vmap")
print({k: v.shape for k, v in variables["params"]["Dense_0"].items()})"""),
    ("code", """keys = members.member_keys(jax.random.key(1), K)
for t in range(EPOCHS * steps_per_epoch):
    state, m = step(state, batch_fn(t), members.step_keys(keys, t))
print("final train loss per member:", np.round(np.asarray(m["loss"]), 3))"""),
    ("code", """logits = members.predict(model.apply, members.variables_of(state), splits.x_test)
rep = report.ensemble_report(logits, splits.y_test)
print(report.markdown_table(report.ensemble_rows(rep)))
assert rep["ensemble"]["nll"] <= rep["mean_member"]["nll"]"""),
]


def build() -> nbf.NotebookNode:
  nb = nbf.v4.new_notebook()
  nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
              for kind, src in CELLS]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return nb


if __name__ == "__main__":
  nbf.write(build(), os.path.join(os.path.dirname(__file__), "quickstart.ipynb"))

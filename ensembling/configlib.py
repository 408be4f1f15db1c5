"""Helpers for `configs/*.py`: the shared base config and `:arg` parsing.

A config file is `get_config(arg=None)`; users pick variants on the command line with
`--config=configs/x.py:fashion_mnist,members=4,runlocal` and override any field with
`--config.optim.learning_rate=0.1`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

MODEL_DEFAULTS = {
    "mlp": dict(widths=(512, 512), dropout=0.0),
    "partitioned_mlp": dict(widths=(240, 560, 560), parts=4, dropout=0.1),
    "cnn": dict(stages=(32, 64, 128), dropouts=(0.2, 0.3, 0.4), batch_norm=True),
    "resnet": dict(blocks_per_stage=3, widths=(16, 32, 64), width_multiplier=1),
}
DATA_DIRS = {"fashion_mnist": "../shared/data/fashion-mnist",
             "20newsgroups": "../shared/data/20newsgroups"}


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses "a,b=2,c=x" against defaults `spec` (types follow the defaults).

  A bare name sets a bool default to True, or, for the special key `preset`
  (when given in `spec`), picks the preset. Unknown names are errors.
  """
  out = dict(spec)
  for token in filter(None, (arg or "").split(",")):
    name, eq, value = token.partition("=")
    name = name.strip()
    if not eq:
      if isinstance(spec.get(name), bool):
        out[name] = True
        continue
      if "preset" in spec:
        out["preset"] = name
        continue
      raise ValueError(f"Unknown config arg {name!r}; known: {sorted(spec)}.")
    if name not in spec:
      raise ValueError(f"Unknown config arg {name!r}; known: {sorted(spec)}.")
    default = spec[name]
    if isinstance(default, bool):
      out[name] = value.lower() in ("1", "true", "yes", "y")
    elif isinstance(default, (int, float)):
      out[name] = type(default)(value)
    else:
      out[name] = value
  return ml_collections.ConfigDict(out)


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `config.model` block for model `name` with its default attributes."""
  if name not in MODEL_DEFAULTS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODEL_DEFAULTS)}.")
  block = {"name": name, **MODEL_DEFAULTS[name]}
  unknown = sorted(set(overrides) - set(block))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for model {name!r}.")
  block.update(overrides)
  return ml_collections.ConfigDict(block)


def fashion_mnist_data(*, validation_size: int = 5000) -> ml_collections.ConfigDict:
  """`config.data` for Fashion-MNIST from ../shared/data: 55,000 / 5,000 / 10,000."""
  d = base_config().data
  d.name = "fashion_mnist"
  d.dir = DATA_DIRS["fashion_mnist"]
  d.validation_size = validation_size
  return d


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment shares; each line says what it does."""
  c = ml_collections.ConfigDict()
  c.experiment = "deep_ensemble"  # module in experiments/ whose run(config, workdir) is called
  c.seed = 0                      # init, data order and dropout all derive from it
  c.members = 8                   # K: members trained at once
  c.members_strategy = "auto"     # auto | vmap | unroll | map | loop (see members.py)
  c.epochs = 10
  c.batch_size = 128              # per member
  c.eval_every_steps = 0          # 0: once per epoch
  c.checkpoint_every_steps = 0    # 0: once per epoch
  c.eval_batch_size = 1000
  c.progress = True               # tqdm bars
  c.data = ml_collections.ConfigDict(dict(
      name="digits",              # digits | fashion_mnist | mnist | a tfds name
      source="",                  # "" (by name) | builtin | idx | tfds
      dir="",                     # directory with the files (IDX, tfds data_dir)
      validation_size=0.1,        # count, or fraction of train
      limit_train=0,              # keep only the first N train examples (0: all)
  ))
  c.model = model_config("mlp")
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd",                 # sgd | adam | adamw
      learning_rate=0.05,
      momentum=0.9,
      nesterov=False,
      weight_decay=5e-4,          # L2 (sgd/adam) or decoupled (adamw); float or per member list
      lr_scale=1.0,               # multiplies the schedule; float or per member list
      schedule="cosine",          # constant | cosine
      warmup_steps=0,
      grad_clip_norm=0.0,         # 0: off
  ), type_safe=False)             # so that weight_decay / lr_scale may become per-member lists
  return c

"""Configs -> library calls: the only module of `ensembling` that knows ml_collections.

A config file is `get_config(arg=None)`; users pick variants on the command line with
`--config=configs/x.py:fashion_mnist,members=4,runlocal` and override any field with
`--config.optim.learning_rate=0.1`. This module holds the shared base config, `:arg`
parsing, the project's data folder, and the translations from config blocks to the
keyword arguments the library takes (`model_from_config`, `optimizer_from_config`,
`train_members_from_config`, `trajectory_plan`, ...).
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
import json
import os
from typing import Any

import jax
import ml_collections
import optax

from ensembling import checks, data, models, optim, schedules, train, trajectory
from ensembling import workdir as workdir_lib

SHARED_DATA = "../shared/data"   # the project's data folder, beside the repository
MODEL_DEFAULTS = {
    "mlp": dict(widths=(512, 512), dropout=0.0),
    "partitioned_mlp": dict(widths=(240, 560, 560), parts=4, dropout=0.1),
    "cnn": dict(stages=(32, 64, 128), dropouts=(0.2, 0.3, 0.4), batch_norm=True),
    "resnet": dict(blocks_per_stage=3, widths=(16, 32, 64), width_multiplier=1),
}
DATA_DIRS = {"fashion_mnist": f"{SHARED_DATA}/fashion-mnist",
             "20newsgroups": f"{SHARED_DATA}/20newsgroups"}


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses "a,b=2,c=x" against defaults `spec` (types follow the defaults).

  A bare name sets a bool default to True, or, for the special key `preset`
  (when given in `spec`), picks the preset. Unknown names are errors.
  """
  if arg == LIST_ARGS:
    raise ArgsRequested(spec)
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


def model_sizes(model_block) -> tuple:
  """The layer sizes of a `config.model` block: a CNN's `stages`, else its `widths`."""
  return tuple(model_block.get("stages", model_block.get("widths", ())))


def fashion_mnist_data(*, validation_size: int = 5000) -> ml_collections.ConfigDict:
  """`config.data` for Fashion-MNIST from the shared data folder: 55,000 / 5,000 / 10,000."""
  d = base_config().data
  d.name = "fashion_mnist"
  d.dir = DATA_DIRS["fashion_mnist"]
  d.validation_size = validation_size
  return d


def fashion_mnist_preset(c: ml_collections.ConfigDict, *, epochs: int) -> None:
  """Fashion-MNIST (55,000 / 5,000 / 10,000) with the MLP runs' SGD recipe: `epochs`
  epochs of batch 128, rate 0.05 (the base config's cosine schedule), L2 5e-4."""
  c.data = fashion_mnist_data()
  c.epochs = epochs
  c.batch_size = 128
  c.optim.learning_rate = 0.05
  c.optim.weight_decay = 5e-4


def newsgroups_preset(c: ml_collections.ConfigDict) -> None:
  """20 Newsgroups TF-IDF (20k terms, 1,000 validation posts) with Adam, as the thesis."""
  c.data.name = "20newsgroups"
  c.data.dir = DATA_DIRS["20newsgroups"]
  c.data.validation_size = 1000
  c.data.max_features = 20000
  c.batch_size = 64
  c.eval_batch_size = 250
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.0


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
  c.progress = True               # tqdm bars (on a terminal only)
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator="",             # host:port of process 0 (unset: a single process)
      num_processes=1,            # N processes form one jax.distributed runtime
      process_id=0,               # this process, in [0, N)
      timeout=60,                 # seconds to wait for the others, then an error
  ))
  c.data = ml_collections.ConfigDict(dict(
      name="digits",              # digits | fashion_mnist | mnist | a tfds name
      source="",                  # "" (by name) | builtin | idx | tfds
      dir="",                     # directory with the files (IDX, tfds data_dir)
      validation_size=0.1,        # count, or fraction of train
      limit_train=0,              # keep only the first N train examples (0: all)
      split_seed=-1,              # seed of the validation split (-1: config.seed), so that
                                  # runs of other seeds can share one split (members_from)
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


# --------------------------------------------------------------------------- config -> kwargs

def start_processes(config) -> None:
  """`distributed.initialize` from `config.distributed` (nothing for a single process).

  After it, the member count must divide over every process's devices.
  """
  import jax
  from ensembling import distributed
  d = config.get("distributed")
  if d is None or int(d.num_processes) == 1:
    return
  distributed.initialize(coordinator=d.coordinator, num_processes=int(d.num_processes),
                         process_id=int(d.process_id), timeout=int(d.timeout))
  if int(config.members) % jax.device_count():
    raise ValueError(f"members={config.members} do not divide over the {jax.device_count()} "
                     f"devices of {d.num_processes} processes; use a multiple of "
                     f"{jax.device_count()}.")


def load_data(config) -> data.Splits:
  """The `config.data` splits (seeded by `config.seed`)."""
  return data.load(config.data.to_dict(), seed=int(config.seed))


def model_from_config(model_block, *, num_classes: int):
  """The Linen model that `config.model` names."""
  return models.make_model(**_plain(model_block), num_classes=num_classes)


def schedule_from_config(optim_block, *, total_steps: int):
  """The learning-rate schedule of `config.optim` ('constant' | 'cosine')."""
  name = optim_block.get("schedule", "cosine")
  lr = float(optim_block["learning_rate"])
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "cosine":
    return schedules.warmup_cosine(lr, total_steps,
                                   warmup_steps=int(optim_block.get("warmup_steps", 0)))
  raise ValueError(f"Unknown optim.schedule {name!r}; choose constant or cosine.")


def optimizer_from_config(optim_block, *, schedule):
  """`optim.make_optimizer` from `config.optim` (per-member lists set later, in the state)."""
  wd = optim_block.get("weight_decay", 0.0)
  return optim.make_optimizer(
      name=optim_block.get("name", "sgd"), learning_rate=schedule,
      momentum=optim_block.get("momentum", 0.9), nesterov=optim_block.get("nesterov", False),
      weight_decay=float(wd) if not isinstance(wd, (list, tuple)) else 0.0,
      grad_clip_norm=optim_block.get("grad_clip_norm", 0.0))


def fit_kwargs(config, *, eval_data=None, eval_split: str = "val") -> dict:
  """The `train.fit_members` keyword arguments that `config` sets."""
  return dict(strategy=config.members_strategy, eval_data=eval_data, eval_split=eval_split,
              eval_every=int(config.eval_every_steps),
              checkpoint_every=int(config.checkpoint_every_steps),
              eval_batch_size=int(config.eval_batch_size), progress=bool(config.progress))


def train_members_from_config(config, splits: data.Splits, workdir: str | None, *,
                              desc: str = "members", eval_every_epoch: bool = True,
                              model=None, init_variables=None):
  """The deep ensemble `config` describes: (model, `train.TrainResult`).

  K = `config.members` members of `config.model` (or `model`, starting from the stacked
  `init_variables` if given), `config.optim` with its schedule over `config.epochs`,
  per-member `optim.lr_scale` / `optim.weight_decay` lists, validation metrics every
  epoch (`eval_every_epoch`).

  With `config.members_from` set (workdirs of finished runs, comma-separated; see
  `member_sources`), nothing is trained: each source's final checkpoint is verified and
  loaded (`train.fit_members(..., read_only=True)`, nothing written there), and the
  members are joined in the order given (`tree.concat`); `workdir/members_from.json`
  records each source's path, fields' SHA-256, member range and state SHA-256.
  """
  model = model or model_from_config(config.model, num_classes=splits.num_classes)
  if config.get("members_from"):
    return model, _members_from(config, splits, workdir, model)
  return model, _train_members(config, splits, workdir, model, desc=desc,
                               eval_every_epoch=eval_every_epoch,
                               init_variables=init_variables)


def _train_members(config, splits, workdir, model, *, desc="members", eval_every_epoch=True,
                   init_variables=None, read_only=False) -> train.TrainResult:
  spe = data.num_steps_per_epoch(len(splits.x_train), int(config.batch_size))
  schedule = schedule_from_config(config.optim, total_steps=spe * int(config.epochs))
  tx = optimizer_from_config(config.optim, schedule=schedule)
  res = train.train_members(
      model, splits.x_train, splits.y_train, num_members=int(config.members), tx=tx,
      epochs=int(config.epochs), batch_size=int(config.batch_size), seed=int(config.seed),
      lr_scale=_plain(config.optim.get("lr_scale", 1.0)),
      weight_decay=_plain(config.optim.get("weight_decay", 0.0)), workdir=workdir,
      desc=desc, schedule=schedule, init_variables=init_variables, read_only=read_only,
      **fit_kwargs(config, eval_data=(splits.x_val, splits.y_val) if eval_every_epoch else None))
  return res


# Experiments whose workdir holds `train_members_from_config`'s members in checkpoints/.
MEMBER_SOURCE_EXPERIMENTS = ("deep_ensemble", "supernet")
# What a member's training depends on besides its seed and the member count.
MEMBER_FIELDS = ("model", "data", "optim", "epochs", "batch_size")


def _member_recipe(fields: dict) -> dict:
  """`MEMBER_FIELDS` of stored or current fields, the split seed resolved."""
  out = {k: fields.get(k) for k in MEMBER_FIELDS}
  d = dict(out["data"] or {})
  if d.get("split_seed", -1) < 0:
    d["split_seed"] = fields.get("seed")
  out["data"] = d
  return json_safe(out)


def member_sources(config) -> list[tuple[str, dict]]:
  """The workdirs `config.members_from` names, with their stored fields, checked.

  Each must hold a run of `MEMBER_SOURCE_EXPERIMENTS` (its `run.json`) that trained its
  own members with this config's `MEMBER_FIELDS` (model, data with the same validation
  split, optimizer, epochs, batch size); seeds and member counts may differ, and the
  counts must add up to `config.members`. Two sources with the same seed and count would
  hold the same members and are refused. A ValueError lists every problem; nothing is
  read but the `run.json` files.
  """
  paths = [p.strip() for p in str(config.members_from).split(",") if p.strip()]
  if not paths:
    raise ValueError(f"members_from names no workdir: {config.members_from!r}.")
  problems, sources, seen = [], [], {}
  want = _member_recipe(result_fields(config))
  for path in paths:
    try:
      fields = workdir_lib.stored_fields(path)
    except workdir_lib.WorkdirError as e:
      problems.append(str(e))
      continue
    holder = workdir_lib.holder(path)
    if holder:
      problems.append(f"{path} is in use by {holder}; wait for it to finish")
      continue
    if fields.get("experiment") not in MEMBER_SOURCE_EXPERIMENTS:
      problems.append(f"{path} holds a {fields.get('experiment')!r} run; members come from "
                      f"{MEMBER_SOURCE_EXPERIMENTS} runs")
      continue
    if fields.get("members_from"):
      problems.append(f"{path} took its own members from {fields['members_from']!r}; name "
                      "those workdirs instead")
      continue
    diff = workdir_lib.differences(_member_recipe(fields), want)
    if diff:
      hint = ("; runs of several seeds share one validation split through data.split_seed"
              if any(d.startswith("data.split_seed") for d in diff) else "")
      problems.append(f"{path} trained its members differently (stored -> this config): "
                      + "; ".join(diff) + hint)
    key = (fields.get("seed"), fields.get("members"))
    if key in seen:
      problems.append(f"{seen[key]} and {path} hold the same members (seed {key[0]}, "
                      f"{key[1]} members)")
    seen.setdefault(key, path)
    sources.append((path, fields))
  if not problems:
    total = sum(int(f["members"]) for _, f in sources)
    if total != int(config.members):
      problems.append(f"members={config.members} but the sources hold {total} ("
                      + ", ".join(f"{p}: {f['members']}" for p, f in sources) + ")")
  if problems:
    raise ValueError("members_from:\n    " + "\n    ".join(problems))
  return sources


def _members_from(config, splits, workdir, model) -> train.TrainResult:
  from ensembling import checkpoint, distributed, members, tree
  sources = member_sources(config)
  if workdir and any(os.path.abspath(p) == os.path.abspath(workdir) for p, _ in sources):
    raise ValueError(f"members_from names this run's own workdir {workdir}.")
  states, history, record, offset = [], [], [], 0
  for path, fields in sources:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.seed, sub.members, sub.members_from = int(fields["seed"]), int(fields["members"]), ""
    res = _train_members(sub, splits, path, model, desc=f"members from {path}", read_only=True)
    states.append(res.state)
    history += [{**h, "member": h["member"] + offset} if "member" in h else h
                for h in res.history]
    record.append({"path": os.path.abspath(path), "seed": sub.seed,
                   "members": [offset, offset + sub.members],
                   "fields_sha256": workdir_lib.fingerprint(fields),
                   "state_sha256": checkpoint.checksum(res.state)})
    offset += sub.members
  state = tree.concat(states)
  if workdir and distributed.is_primary():
    with open(os.path.join(workdir, "members_from.json"), "w") as f:
      json.dump(record, f, indent=2)
  strategy = members.resolve_strategy(config.members_strategy, state["params"])
  return train.TrainResult(state, strategy, 0.0, history)



def head_optimizer_from_config(supernet_block, *, num_examples: int):
  """The SuperNet head's optimizer that `config.supernet` describes, for `num_examples`."""
  from ensembling import supernet
  sn = supernet_block
  return supernet.head_optimizer(
      sn.head_optimizer, sn.head_lr, schedule=sn.head_schedule,
      steps=int(sn.head_epochs) * (int(num_examples) // int(sn.head_batch_size)))


def supernet_cache_from_config(config, splits: data.Splits, model, variables, *,
                               strategy: str) -> dict:
  """`supernet.cache_features` of the stacked members `variables` on the train / val / test
  splits (`config.eval_batch_size` per batch), each split with its labels ("y") added."""
  from ensembling import supernet
  cache = supernet.cache_features(model, variables, {n: splits.split(n)[0] for n in (
      "train", "val", "test")}, batch_size=config.eval_batch_size, strategy=strategy)
  for name in cache:
    cache[name]["y"] = splits.split(name)[1]
  return cache


def train_head_from_config(config, cache: dict, heads: tuple, *, num_members: int, init: str,
                           l2: float, scale: float | None, best_by: str | None = None,
                           head_seed: int | None = None):
  """`supernet.train_head` over the first `num_members` members with `config.supernet`'s
  optimizer, epochs, batch size and dropout; `head_seed` (default
  `config.supernet.head_seed`) is added to `config.seed` for the data order and dropout."""
  from ensembling import supernet
  sn = config.supernet
  head_seed = int(sn.head_seed) if head_seed is None else int(head_seed)
  tx = head_optimizer_from_config(sn, num_examples=len(cache["train"]["y"]))
  return supernet.train_head(
      cache, heads, num_members=num_members, init=init, tx=tx, epochs=int(sn.head_epochs),
      batch_size=int(sn.head_batch_size), seed=config.seed + head_seed,
      key=jax.random.key(config.seed + 7), l2=float(l2), scale=scale or None,
      dropout=float(sn.head_dropout), best_by=best_by)


def trajectory_plan(method: str, config, steps_per_epoch: int) -> trajectory.Plan:
  """The `trajectory` plan of `method` at the budget `config.epochs` (`config.traj`)."""
  t = config.traj
  lr = float(config.optim.learning_rate)
  total = steps_per_epoch * int(config.epochs)
  if method == "sgd":
    return trajectory.sgd_plan(base_lr=lr, total_steps=total)
  if method == "snapshot":
    return trajectory.sse_plan(base_lr=float(t.sse_lr), total_steps=total,
                               num_cycles=int(t.num_cycles))
  if method == "starsse":
    return trajectory.starsse_plan(base_lr=float(t.sse_lr), total_steps=total,
                                   num_cycles=int(t.num_cycles))
  pre = int(round(float(t.pretrain_frac) * int(config.epochs))) * steps_per_epoch
  if method == "fge":
    return trajectory.fge_plan(base_lr=lr, total_steps=total, pretrain_steps=pre,
                               cycle_steps=int(t.fge_cycle_epochs) * steps_per_epoch,
                               lr_1=float(t.fge_lr_1), lr_2=float(t.fge_lr_2))
  if method == "swa":
    return trajectory.swa_plan(
        base_lr=lr, total_steps=total, pretrain_steps=pre, swa_lr=float(t.swa_lr),
        anneal_steps=int(t.swa_anneal_epochs) * steps_per_epoch,
        every=max(1, int(round(float(t.swa_every_epochs) * steps_per_epoch))))
  raise ValueError(f"Unknown method {method!r}; choose from {trajectory.METHODS}.")


def trajectory_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The trajectory experiments' config; `method` is what `configs/<method>.py` compares.

  Args (after ':' on the command line): preset (fashion_mnist | digits), arch
  (mlp | cnn), epochs, seeds, methods ('+'-separated, or 'all'), limit_train, runlocal.
  """
  a = parse_arg(arg, preset="fashion_mnist", arch="mlp", epochs=0, seeds=3, methods="",
                limit_train=0, runlocal=False)
  c = base_config()
  c.experiment = "trajectory"
  chosen = a.methods or f"sgd+{method}"
  c.methods = trajectory.METHODS if chosen == "all" else tuple(chosen.split("+"))
  bad = sorted(set(c.methods) - set(trajectory.METHODS))
  if bad:
    raise ValueError(f"Unknown method(s) {bad}; choose from {trajectory.METHODS}.")
  c.members = a.seeds              # independent trajectory runs, trained in one vmapped step
  c.eval_per_epoch = 2             # test-accuracy points per epoch for the training curves
  c.recalibration_examples = 0     # BN recalibration pass: 0 = the whole training split
  if a.preset == "fashion_mnist":
    fashion_mnist_preset(c, epochs=8)  # shared 2-core CPU: 8 epochs x 5 methods x 3 seeds ~ 20 min
  elif a.preset == "digits":
    c.epochs = 24
    c.batch_size = 32
    c.optim.learning_rate = 0.05
    c.optim.weight_decay = 1e-4
  else:
    raise ValueError(f"Unknown preset {a.preset!r}; use fashion_mnist or digits.")
  if a.arch == "mlp":
    c.model = model_config("mlp", widths=(256, 256), dropout=0.0)
    c.model.batch_norm = True      # SWA's BatchNorm problem needs BatchNorm
  elif a.arch == "cnn":
    c.model = model_config("cnn")  # thesis CNN: ELU + BN, dropout .2/.3/.4
    c.optim.weight_decay = 1e-4
  else:
    raise ValueError(f"Unknown arch {a.arch!r}; use mlp or cnn.")
  c.optim.schedule = "cosine"      # the SGD baseline: cosine decay over the whole budget
  c.traj = ml_collections.ConfigDict(dict(
      num_cycles=4,                # SSE / StarSSE: M cycles = M snapshots (M | epochs)
      sse_lr=0.1,                  # SSE / StarSSE: α0 at every restart
      pretrain_frac=0.5,           # FGE / SWA: share of the budget before cycling / averaging
      fge_cycle_epochs=1,          # FGE: cycle length c (epochs)
      fge_lr_1=0.02,               # FGE: cycle start / end rate
      fge_lr_2=0.0005,             # FGE: midpoint rate (snapshots)
      swa_lr=0.01,                 # SWA: constant rate while averaging
      swa_anneal_epochs=1,         # SWA: cosine anneal from learning_rate to swa_lr
      swa_every_epochs=0.5,        # SWA: average every half epoch after annealing
      star_reset_optimizer=False,  # StarSSE: fresh optimizer state for every star cycle
      recalibrate_snapshots=True,  # BN models: also report the snapshot ensemble with every
                                   # snapshot's BN statistics recomputed (one pass each)
  ))
  if a.epochs:
    c.epochs = a.epochs
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.runlocal:
    c.members, c.epochs = 2, 4
    c.data.limit_train = 512
    c.traj.num_cycles = 2
    c.traj.fge_cycle_epochs = 1
    c.progress = False
  return c


def _plain(value):
  """ConfigDict / FieldReference / list values as plain Python (dicts, tuples, numbers)."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


# --------------------------------------------------------------------------- validation

NON_RESULT_FIELDS = (      # may differ between a run and its resumption: they cannot change results
    "progress",            # progress bars
    "eval_batch_size",     # inference chunk size
    "distributed",         # how many processes share the work (each has its own process_id)
)
PER_MEMBER_FIELDS = ("optim.lr_scale", "optim.weight_decay")  # a number or one per member


def result_fields(config) -> dict:
  """The config's fields that can change results (all but `NON_RESULT_FIELDS`)."""
  d = config.to_dict()
  for name in NON_RESULT_FIELDS:
    d.pop(name, None)
  return json_safe(d)


def json_safe(value):
  """Tuples as lists, recursively: what the config looks like after a JSON round trip."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def validate(config) -> None:
  """Checks the shared fields' types and ranges; a ValueError lists every problem.

  Run before a workdir is created or changed. Experiment-specific fields are checked by
  the experiment module's own `validate(config)`, when it has one.
  """
  problems = []

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  def integer(name, low):
    v = config.get(name)
    if v is not None:
      try:
        checks.integer(v, name=name, low=low)
      except ValueError as e:
        problems.append(str(e).rstrip("."))

  for name, low in (("members", 1), ("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1),
                    ("seed", 0), ("eval_every_steps", 0), ("checkpoint_every_steps", 0)):
    integer(name, low)
  from ensembling import members as members_lib
  if "members_strategy" in config:
    need(config.members_strategy in members_lib.STRATEGIES,
         f"members_strategy must be one of {members_lib.STRATEGIES}, got "
         f"{config.members_strategy!r}")
  k = config.get("members")
  if "optim" in config:
    o = config.optim
    need(o.get("name", "sgd") in optim.OPTIMIZERS,
         f"optim.name must be one of {optim.OPTIMIZERS}, got {o.get('name')!r}")
    lr = o.get("learning_rate")
    need(isinstance(lr, (int, float)) and lr > 0,
         f"optim.learning_rate must be a number > 0, got {lr!r}")
    if "momentum" in o:
      need(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum!r}")
    if "schedule" in o:
      need(o.schedule in ("constant", "cosine"),
           f"optim.schedule must be constant or cosine, got {o.schedule!r}")
    for name in ("warmup_steps", "grad_clip_norm"):
      if name in o:
        need(o[name] >= 0, f"optim.{name} must be >= 0, got {o[name]!r}")
    for field in PER_MEMBER_FIELDS:
      name = field.split(".")[1]
      if name not in o:
        continue
      v = _plain(o[name])
      vals = list(v) if isinstance(v, tuple) else [v]
      need(all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
               for x in vals), f"{field} must be numbers >= 0, got {v!r}")
      if isinstance(v, tuple) and isinstance(k, int):
        need(len(v) == k, f"{field} has {len(v)} values for {k} members; give one value or "
                          "one per member")
  if "distributed" in config:
    from ensembling import distributed
    d = config.distributed
    try:
      distributed.check_settings(coordinator=d.coordinator, num_processes=d.num_processes,
                                 process_id=d.process_id)
    except ValueError as e:
      problems.append(str(e))
  if "data" in config:
    try:
      data.check_data_config(config.data.to_dict())
    except ValueError as e:
      problems.append(str(e))
  if config.get("members_from"):
    if "distributed" in config and int(config.distributed.num_processes) > 1:
      problems.append("members_from loads finished members in one process; unset "
                      "distributed.num_processes")
    try:
      member_sources(config)
    except ValueError as e:
      problems.append(str(e))
  if "model" in config and "name" in config.model and config.model.name in models.registry.MODELS:
    try:
      model_from_config(config.model, num_classes=2)
    except (ValueError, TypeError) as e:
      problems.append(str(e))
  if problems:
    raise ValueError("Invalid config:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- listing args

class ArgsRequested(Exception):
  """Raised by `parse_arg` for `LIST_ARGS`: carries the config's `:arg` spec."""

  def __init__(self, spec):
    super().__init__("config args requested")
    self.spec = spec


LIST_ARGS = "?"


def config_args(module) -> dict[str, Any]:
  """The `:args` a config file's `get_config` takes, with their defaults."""
  try:
    module.get_config(LIST_ARGS)
  except ArgsRequested as e:
    return dict(e.spec)
  return {}


# --------------------------------------------------------------------------- command line

class UsageError(ValueError):
  """A command-line mistake, reported in one line."""



def load_config_file(path: str):
  """The module of a config file (`get_config` inside), loaded from its path."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  if spec is None or not os.path.exists(path):
    raise UsageError(f"No config file {path!r}; see --list.")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def list_configs(directory: str, *, root: str = ".") -> str:
  """Every config file in `directory`: its first docstring line, `:args` and fields."""
  lines = []
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    mod = load_config_file(path)
    if not hasattr(mod, "get_config"):
      continue
    rel = os.path.relpath(path, root)
    lines.append(f"{rel}: {(mod.__doc__ or '').strip().splitlines()[0]}")
    args = config_args(mod)
    if args:
      lines.append("  :args  " + ", ".join(f"{k}={v!r}" for k, v in args.items()))
    lines.append("  fields " + ", ".join(sorted(mod.get_config().keys())))
  return "\n".join(lines)


def _field_names(config, prefix=""):
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items") and hasattr(v, "to_dict"):
      out += _field_names(v, prefix + k + ".")
  return out


def _parse_list(text: str):
  text = text.strip()
  try:
    value = json.loads(text) if text.startswith("[") else [float(t) for t in text.split(",")]
  except ValueError:
    raise UsageError(f"Cannot read {text!r} as numbers (use 1.0,0.5 or [1.0, 0.5]).") from None
  return tuple(float(v) for v in value)


def check_overrides(argv: list[str]) -> tuple[list[str], dict]:
  """Checks the `--config.x=...` overrides before absl does; pulls out per-member lists.

  Returns (argv for absl, {field: tuple} of per-member lists to set after parsing).
  Raises UsageError for an unknown field (with the closest names) or a bad config arg.
  """
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return argv, {}
  path, _, arg = config_arg.partition(":")
  try:
    config = load_config_file(path).get_config(arg or None)
  except ValueError as e:
    raise UsageError(f"{config_arg}: {e}") from None
  names = _field_names(config)
  out, lists, i = [], {}, 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config.") and not a.startswith("--config=") :
      key, eq, value = a[len("--config."):].partition("=")
      if not eq and i + 1 < len(argv):
        value, i = argv[i + 1], i + 1
      if key not in names:
        close = difflib.get_close_matches(key, names, n=2)
        raise UsageError(f"Unknown config field {key!r}"
                         + (f"; did you mean {' or '.join(map(repr, close))}?" if close else
                            "; see --list."))
      if key in PER_MEMBER_FIELDS and ("," in value or value.strip().startswith("[")):
        lists[key] = _parse_list(value)
        i += 1
        continue
      a = f"--config.{key}={value}"
    out.append(a)
    i += 1
  return out, lists

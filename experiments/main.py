"""Launches an experiment: flags -> `experiments.<config.experiment>.run(config, workdir)`.

    python -m experiments.main --config=configs/default.py --workdir=runs/default
    python -m experiments.main --config=configs/deep_ensemble.py:fashion_mnist
        --config.members=4 --config.optim.lr_scale=1.0,0.5,0.5,0.25 --workdir=runs/de4
    python -m experiments.main --list          # the configs, their :args and fields

The preamble and epilogue of every run live here, once: the config is validated before
the workdir is touched; the workdir is locked for this process and fingerprinted with
the config's result-relevant fields (a rerun with other fields is refused, naming them;
`--restart` starts it afresh); `config.json`, `results.json` and `results.md` are written
from what `run` returns. An experiment's `run(config, workdir)` returns
`(results, markdown)` and writes only its own plots and logs.
"""

import contextlib
import difflib
import glob
import importlib
import importlib.util
import json
import logging
import os
import sys

from ensembling import configlib, distributed, report, workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class UsageError(ValueError):
  """A command-line mistake, reported in one line."""


def experiment_module(name: str):
  """`experiments.<name>`, or a ValueError listing the known experiments."""
  try:
    return importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{name}":
      raise
    known = sorted(f[:-3] for f in os.listdir(HERE)
                   if f.endswith(".py") and f not in ("__init__.py", "main.py"))
    raise ValueError(f"Unknown experiment {name!r}; known: {known}.") from None


def run_experiment(config, workdir: str, *, restart: bool = False) -> dict:
  """Validates `config`, claims `workdir` for it, runs it, writes its outputs.

  With `config.distributed` set, every process runs this; process 0 holds the workdir's
  lock and fingerprint and writes its files, the others compute alongside it.
  """
  module = experiment_module(config.experiment)
  configlib.validate(config)
  if hasattr(module, "validate"):
    module.validate(config)
  configlib.start_processes(config)
  primary = distributed.is_primary()
  claim = (workdir_lib.claim(workdir, fields=configlib.result_fields(config), restart=restart)
           if primary else contextlib.nullcontext(workdir))
  with claim:
    distributed.barrier("workdir claimed")
    if primary:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    results, markdown = module.run(config, workdir)
    if primary:
      report.write_json(os.path.join(workdir, "results.json"), results)
      with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
  logging.info("Results (%s):\n%s", workdir, markdown)
  return results


# --------------------------------------------------------------------------- command line

def _load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  if spec is None or not os.path.exists(path):
    raise UsageError(f"No config file {path!r}; see --list.")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def list_configs() -> str:
  """Every config file: its first docstring line, its `:args` and its top-level fields."""
  lines = []
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    mod = _load_config_module(path)
    if not hasattr(mod, "get_config"):
      continue
    rel = os.path.relpath(path, REPO)
    lines.append(f"{rel}: {(mod.__doc__ or '').strip().splitlines()[0]}")
    args = configlib.config_args(mod)
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


def preprocess(argv: list[str]) -> tuple[list[str], dict]:
  """Checks the `--config.x=...` overrides before absl does; pulls out per-member lists.

  Returns (argv for absl, {field: tuple} of per-member lists to set after parsing).
  Raises UsageError for an unknown field (with the closest names) or a bad config arg.
  """
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return argv, {}
  path, _, arg = config_arg.partition(":")
  try:
    config = _load_config_module(path).get_config(arg or None)
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
      if key in configlib.PER_MEMBER_FIELDS and ("," in value or value.strip().startswith("[")):
        lists[key] = _parse_list(value)
        i += 1
        continue
      a = f"--config.{key}={value}"
    out.append(a)
    i += 1
  return out, lists


def _quiet_logs():
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  # CPU-only hosts: jax probes for a TPU and logs a warning when there is none.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if "--list" in argv or "--help" in argv or "-h" in argv:
    print(__doc__.strip() + "\n\nConfigs:\n" + list_configs())
    return 0
  restart = "--restart" in argv
  argv = [a for a in argv if a != "--restart"]
  try:
    argv, lists = preprocess(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from absl import app, flags
  from ml_collections import config_flags
  sys.argv = argv  # config_flags reads the overrides from sys.argv when the flag is defined
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
  flags.mark_flags_as_required(["config", "workdir"])
  status = {"code": 0}

  def run(_):
    _quiet_logs()
    config = flags.FLAGS.config
    with config.unlocked():
      for key, value in lists.items():
        block, name = key.split(".")
        config[block][name] = value
    try:
      run_experiment(config, flags.FLAGS.workdir, restart=restart)
    except (workdir_lib.WorkdirError, distributed.DistributedError, ValueError) as e:
      # the user's to fix: no traceback
      if os.environ.get("ENSEMBLING_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      status["code"] = 1

  try:
    app.run(run, argv=argv)
  except SystemExit as e:
    return int(e.code or 0) or status["code"]
  return status["code"]


if __name__ == "__main__":
  sys.exit(main())

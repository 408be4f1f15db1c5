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
import importlib
import logging
import os
import sys

from ensembling import checkpoint, configlib, distributed, report, workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


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

def _quiet_logs():
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  # CPU-only hosts: jax probes for a TPU and logs a warning when there is none.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if "--list" in argv or "--help" in argv or "-h" in argv:
    print(__doc__.strip() + "\n\nConfigs:\n"
          + configlib.list_configs(os.path.join(REPO, "configs"), root=REPO))
    return 0
  restart = "--restart" in argv
  argv = [a for a in argv if a != "--restart"]
  try:
    argv, lists = configlib.check_overrides(argv)
  except configlib.UsageError as e:
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
    except (workdir_lib.WorkdirError, distributed.DistributedError, checkpoint.CheckpointError,
            ValueError) as e:
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

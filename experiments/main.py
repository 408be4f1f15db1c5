"""Launches an experiment: flags -> `experiments.<config.experiment>.run(config, workdir)`.

    python -m experiments.main --config=configs/default.py --workdir=runs/default
    python -m experiments.main --config=configs/deep_ensemble.py:fashion_mnist \
        --config.members=4 --workdir=runs/de4

The preamble and epilogue of every run live here, once: the workdir, `config.json`, and
the `results.json` / `results.md` that `run` returns. An experiment's `run(config,
workdir)` returns `(results, markdown)` and writes only its own plots and logs.
"""

import importlib
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from ensembling import report

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])


def experiment_module(name: str):
  """`experiments.<name>`, or a ValueError listing the known experiments."""
  try:
    return importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{name}":
      raise
    here = os.path.dirname(__file__)
    known = sorted(f[:-3] for f in os.listdir(here)
                   if f.endswith(".py") and f not in ("__init__.py", "main.py"))
    raise ValueError(f"Unknown experiment {name!r}; known: {known}.") from None


def run_experiment(config, workdir: str) -> dict:
  """Runs `config` in `workdir`; writes config.json, results.json and results.md."""
  module = experiment_module(config.experiment)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  results, markdown = module.run(config, workdir)
  report.write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown)
  logging.info("Results (%s):\n%s", workdir, markdown)
  return results


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  run_experiment(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

"""Launches an experiment: flags -> `experiments.<config.experiment>.run(config, workdir)`.

    python -m experiments.main --config=configs/default.py --workdir=runs/default
    python -m experiments.main --config=configs/deep_ensemble.py:fashion_mnist \
        --config.members=4 --workdir=runs/de4
"""

import importlib
import logging
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])


def run_experiment(config, workdir: str):
  """Imports `experiments.<config.experiment>` and calls its `run`."""
  name = config.experiment
  try:
    module = importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{name}":
      raise
    here = os.path.dirname(__file__)
    known = sorted(f[:-3] for f in os.listdir(here)
                   if f.endswith(".py") and f not in ("__init__.py", "main.py"))
    raise ValueError(f"Unknown experiment {name!r}; known: {known}.") from None
  return module.run(config, workdir)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  run_experiment(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

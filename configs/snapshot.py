"""Snapshot Ensembles (Huang et al., 2017): M cosine cycles with restarts, one snapshot per cycle.

Compared with the SGD end point at the same budget (8 epochs), 3 seeds trained at once
(mean ± std), Fashion-MNIST, MLP 784-256(BN)-256(BN)-10:

    python -m experiments.main --config=configs/snapshot.py --workdir=runs/trajectory

All five methods in one table (each method resumes from its own checkpoints in
runs/trajectory/<method>/, so configs sharing a workdir reuse finished methods):

    python -m experiments.main --config=configs/snapshot.py:methods=all --workdir=runs/trajectory

Thesis CNN instead of the MLP: `configs/snapshot.py:arch=cnn` (slow on CPU; add
`limit_train=N` for a subset). Seconds-long smoke run: `configs/snapshot.py:runlocal`.
Measured (test, 3 seeds; 8 / 16 / 32 epochs): SGD end point 0.8966 / 0.9008 / 0.9025
accuracy, NLL 0.2935 / 0.3035 / 0.3548; SSE ensemble of 4 snapshots 0.8908 / 0.8985 /
0.9038, NLL 0.3007 / 0.2817 / 0.2764. SSE wins once its cycles are 8 epochs long
(`:methods=all,epochs=32`, the main table); cycles of 2-4 epochs are too short.
All numbers and commands: docs/results_trajectory.md.
"""

from ensembling import configlib


def get_config(arg=None):
  return configlib.trajectory_config("snapshot", arg)

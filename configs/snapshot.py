"""Snapshot Ensembles (Huang et al., 2017): M cosine cycles with restarts, one snapshot per cycle.

Compared with the SGD end point at the same budget (8 epochs), 3 seeds trained at once
(mean ± std), Fashion-MNIST, MLP 784-256(BN)-256(BN)-10:

    python -m experiments.main --config=configs/snapshot.py --workdir=runs/trajectory

All five methods in one table (each method resumes from its own checkpoints in
runs/trajectory/<method>/, so configs sharing a workdir reuse finished methods):

    python -m experiments.main --config=configs/snapshot.py:methods=all --workdir=runs/trajectory

Thesis CNN instead of the MLP: `configs/snapshot.py:arch=cnn` (slow on CPU; add
`limit_train=N` for a subset). Seconds-long smoke run: `configs/snapshot.py:runlocal`.
Measured numbers: docs/results_trajectory.md.
"""

from experiments import trajectory


def get_config(arg=None):
  return trajectory.make_config("snapshot", arg)

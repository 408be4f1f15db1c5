"""Stochastic Weight Averaging (Izmailov et al., 2018) with and without BatchNorm recalibration.

Compared with the SGD end point at the same budget (8 epochs), 3 seeds trained at once
(mean ± std), Fashion-MNIST, MLP 784-256(BN)-256(BN)-10:

    python -m experiments.main --config=configs/swa.py --workdir=runs/trajectory

All five methods in one table (each method resumes from its own checkpoints in
runs/trajectory/<method>/, so configs sharing a workdir reuse finished methods):

    python -m experiments.main --config=configs/swa.py:methods=all --workdir=runs/trajectory

Thesis CNN instead of the MLP: `configs/swa.py:arch=cnn` (slow on CPU; add
`limit_train=N` for a subset). Seconds-long smoke run: `configs/swa.py:runlocal`.
Measured (test, 3 seeds; 8 / 16 / 32 epochs): SGD end point 0.8966 / 0.9008 / 0.9025
accuracy, NLL 0.2935 / 0.3035 / 0.3548; SWA with BN recalibration 0.8966 / 0.9025 /
0.9047, NLL 0.2904 / 0.2898 / 0.3088; without recalibration (last iterate's BN stats)
0.8951 / 0.8950 / 0.8931, NLL 0.3095 / 0.3526 / 0.4192. The main table is
`:methods=all,epochs=32`; all numbers and commands: docs/results_trajectory.md.
"""

from ensembling import configlib


def get_config(arg=None):
  return configlib.trajectory_config("swa", arg)

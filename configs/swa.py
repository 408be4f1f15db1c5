"""Stochastic Weight Averaging (Izmailov et al., 2018) with and without BatchNorm recalibration.

Compared with the SGD end point at the same budget (8 epochs), 3 seeds trained at once
(mean ± std), Fashion-MNIST, MLP 784-256(BN)-256(BN)-10:

    python -m experiments.main --config=configs/swa.py --workdir=runs/trajectory

All five methods in one table (each method resumes from its own checkpoints in
runs/trajectory/<method>/, so configs sharing a workdir reuse finished methods):

    python -m experiments.main --config=configs/swa.py:methods=all --workdir=runs/trajectory

Thesis CNN instead of the MLP: `configs/swa.py:arch=cnn` (slow on CPU; add
`limit_train=N` for a subset). Seconds-long smoke run: `configs/swa.py:runlocal`.
Measured (test, 3 seeds; 8 / 16 epochs): SGD end point 0.8966 / 0.9008 accuracy,
NLL 0.2935 / 0.3035; SWA with BN recalibration 0.8966 / 0.9025, NLL 0.2904 / 0.2898;
without recalibration (last iterate's BN stats) 0.8951 / 0.8950, NLL 0.3095 / 0.3526.
All numbers and the 16-epoch command (`:methods=all,epochs=16`): docs/results_trajectory.md.
"""

from experiments import trajectory


def get_config(arg=None):
  return trajectory.make_config("swa", arg)

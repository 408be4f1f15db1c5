"""Fast Geometric Ensembling (Garipov et al., 2018): pre-train, then short linear cycles lr_1 -> lr_2 -> lr_1, snapshots at lr_2.

Compared with the SGD end point at the same budget (8 epochs), 3 seeds trained at once
(mean ± std), Fashion-MNIST, MLP 784-256(BN)-256(BN)-10:

    python -m experiments.main --config=configs/fge.py --workdir=runs/trajectory

All five methods in one table (each method resumes from its own checkpoints in
runs/trajectory/<method>/, so configs sharing a workdir reuse finished methods):

    python -m experiments.main --config=configs/fge.py:methods=all --workdir=runs/trajectory

Thesis CNN instead of the MLP: `configs/fge.py:arch=cnn` (slow on CPU; add
`limit_train=N` for a subset). Seconds-long smoke run: `configs/fge.py:runlocal`.
Measured (test, 3 seeds; 8 / 16 / 32 epochs): SGD end point 0.8966 / 0.9008 / 0.9025
accuracy, NLL 0.2935 / 0.3035 / 0.3548; FGE ensemble of 4 / 8 / 16 snapshots 0.8937 /
0.9018 / 0.9047, NLL 0.2956 / 0.2845 / 0.2912; snapshot disagreement 0.031 / 0.035 /
0.040 vs 0.039 / 0.047 / 0.054 between independent seeds. The main table is
`:methods=all,epochs=32`; all numbers and commands: docs/results_trajectory.md.
"""

from ensembling import configlib


def get_config(arg=None):
  return configlib.trajectory_config("fge", arg)

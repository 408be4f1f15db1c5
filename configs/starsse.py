"""StarSSE (Sadrtdinov et al., 2023): every cycle restarts from the first cycle's end point, in parallel.

Compared with the SGD end point at the same budget (8 epochs), 3 seeds trained at once
(mean ± std), Fashion-MNIST, MLP 784-256(BN)-256(BN)-10:

    python -m experiments.main --config=configs/starsse.py --workdir=runs/trajectory

All five methods in one table (each method resumes from its own checkpoints in
runs/trajectory/<method>/, so configs sharing a workdir reuse finished methods):

    python -m experiments.main --config=configs/starsse.py:methods=all --workdir=runs/trajectory

Thesis CNN instead of the MLP: `configs/starsse.py:arch=cnn` (slow on CPU; add
`limit_train=N` for a subset). Seconds-long smoke run: `configs/starsse.py:runlocal`.
Measured (test, 3 seeds; 8 / 16 / 32 epochs): SGD end point 0.8966 / 0.9008 / 0.9025
accuracy; StarSSE ensemble of 4 0.8872 / 0.8956 / 0.9027 (NLL 0.3120 / 0.2888 / 0.2777),
uniform soup with BN recalibration 0.8861 / 0.8945 / 0.9019, without it (cycle-1 BN
stats) 0.8734 / 0.8252 / 0.8585. The main table is `:methods=all,epochs=32`; all numbers
and commands: docs/results_trajectory.md.
"""

from ensembling import configlib


def get_config(arg=None):
  return configlib.trajectory_config("starsse", arg)

"""Low-precision ensembling (Nam & Lee 2024, "Ex Uno Pluria") of one trained Fashion-MNIST CNN.

One CNN (the thesis CNN with BatchNorm, reduced for the shared 2-core CPU: stages
(16, 32), 10,000 training images, 3 epochs) is trained in FP32; then, without any training, we
compare the FP32 model, round-to-nearest (RTN) at each bit width b, single Bernoulli
stochastic rounding (BSR) draws, and LPE-BSR ensembles of M in {2, 4, 8, 16} BSR draws of
the same model (evaluated in one member-parallel pass): accuracy, NLL, ECE, ambiguity
(mean member NLL minus ensemble NLL) and memory per member. Plot `low_precision.png`.

    python -m experiments.main --config=configs/low_precision.py --workdir=runs/low_precision

Seconds-long smoke run: `:runlocal` (digits). Measured numbers and what they show:
docs/results_curves.md ("Low-precision ensembling").
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, epochs=0, limit_train=10000, runlocal=False)
  c = configlib.base_config()
  c.experiment = "low_precision"
  c.members = 1                    # one FP32 model: every low-precision member comes from it
  c.data = configlib.fashion_mnist_data()
  c.data.limit_train = a.limit_train
  c.model = configlib.model_config("cnn", stages=(16, 32), dropouts=(0.2, 0.3))
  c.batch_size = 128
  c.epochs = a.epochs or 3
  c.members_strategy = "vmap"     # one compiled program for the 16 members (compiles fast)
  c.optim.learning_rate = 0.05
  c.optim.weight_decay = 1e-4
  c.lpe = ml_collections.ConfigDict(dict(
      bits=(3, 4, 5, 6, 8),        # b of the symmetric per-output-channel grid
      ensemble_sizes=(2, 4, 8, 16),  # M of the LPE-BSR ensembles (prefixes of one draw of 16)
      keep=("(^|/)bias$", "(^|/)scale$"),  # leaves kept in FP32: biases, BatchNorm scales
      seed=0,                      # the BSR draws
  ))
  if a.runlocal:                   # an MLP on digits: seconds
    c.data = configlib.base_config().data
    c.data.validation_size = 0.2
    c.data.limit_train = 320
    c.model = configlib.model_config("mlp", widths=(16,), dropout=0.0)
    c.batch_size, c.epochs = 32, 1
    c.lpe.bits, c.lpe.ensemble_sizes = (3, 8), (2, 4)
    c.progress = False
  return c

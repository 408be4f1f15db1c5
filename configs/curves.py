"""Mode-connecting curves between two independently trained Fashion-MNIST models (Garipov et al. 2018).

Two networks trained from different seeds are joined by four paths, each evaluated on a
grid of t with BatchNorm statistics recomputed at every point: the straight line, the
straight line after weight matching the second network to the first (Git Re-Basin), a
quadratic Bezier curve and a PolyChain whose bend is trained (end points frozen, a
fresh t ~ U(0, 1) per batch). Plot `curves.png` (test loss and accuracy against t) and
a table of each path's barrier (max loss along the path minus the mean of the ends) and
of its best point's accuracy.

    python -m experiments.main --config=configs/curves.py --workdir=runs/curves_mlp
    python -m experiments.main --config=configs/curves.py:arch=cnn --workdir=runs/curves_cnn

`:arch=mlp` is the MLP 784-512-512-10 on all 55,000 training images; `:arch=cnn` the
thesis CNN with BatchNorm, reduced to stages (16, 32), no dropout, 10,000 training images and 4
epochs (end points and curves) for the 2-core CPU. Seconds-long smoke run: `:runlocal` (digits). Measured numbers and what they
show: docs/results_curves.md.
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, arch="mlp", epochs=0, curve_epochs=0, runlocal=False)
  c = configlib.base_config()
  c.experiment = "curves"
  c.members = 2                    # the two end points, trained at once from different inits
  c.data = configlib.fashion_mnist_data()
  c.batch_size = 128
  c.epochs = 10                    # end points: SGD momentum, cosine over these epochs
  c.optim.learning_rate = 0.05
  c.optim.weight_decay = 5e-4
  c.curve = ml_collections.ConfigDict(dict(
      kinds=("bezier", "polychain"),  # the trained curves
      epochs=10,                   # bend training: SGD momentum 0.9, cosine from learning_rate
      learning_rate=0.05,
      weight_decay=5e-4,           # on the bend only (the end points are frozen)
      num_points=21,               # the t grid of the evaluation, 0..1
      bn_examples=10000,           # training images for the BatchNorm recomputation at each t
      bn_batch_size=500,
      match_iters=100,             # weight matching iterations (the matched straight line)
  ))
  if a.arch == "mlp":
    c.model = configlib.model_config("mlp", widths=(512, 512), dropout=0.0)
  elif a.arch == "cnn":
    c.model = configlib.model_config("cnn", stages=(16, 32), dropouts=(0.0, 0.0))
    c.data.limit_train = 10000
    c.epochs, c.curve.epochs = 4, 4
    c.optim.weight_decay = c.curve.weight_decay = 1e-4
    c.curve.num_points, c.curve.bn_examples = 11, 2000
  else:
    raise ValueError(f"Unknown arch {a.arch!r}; use mlp or cnn.")
  if a.epochs:
    c.epochs = a.epochs
  if a.curve_epochs:
    c.curve.epochs = a.curve_epochs
  if a.runlocal:
    c.data = configlib.base_config().data  # digits
    c.data.validation_size = 0.2
    c.data.limit_train = 320
    c.batch_size = 32
    c.model = configlib.model_config("mlp", widths=(16,), dropout=0.0)
    c.model.batch_norm = True      # exercises the per-t BatchNorm recomputation
    c.epochs, c.curve.epochs = 1, 1
    c.curve.num_points, c.curve.bn_examples, c.curve.bn_batch_size = 3, 64, 32
    c.curve.match_iters = 5
    c.progress = False
  return c

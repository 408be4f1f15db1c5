"""Deep ensemble: K independently initialised members, each with its own data order.

Fashion-MNIST, 8 MLP members (784-512-512-10), 20 epochs:

    python -m experiments.main --config=configs/deep_ensemble.py:fashion_mnist \
        --workdir=runs/deep_ensemble_fmnist

Thesis CNN instead of the MLP: `configs/deep_ensemble.py:fashion_mnist,arch=cnn`.
Digits (default), tiny: `configs/deep_ensemble.py:runlocal`.
See docs/results.md for measured numbers.
"""

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, preset="digits", arch="mlp", members=8, epochs=0,
                          runlocal=False)
  c = configlib.base_config()
  c.members = a.members
  c.members_from = ""  # finished runs' workdirs, comma-separated: their members, not trained
  if a.preset == "fashion_mnist":
    configlib.fashion_mnist_preset(c, epochs=20)
  elif a.preset == "digits":
    c.epochs = 30
    c.batch_size = 32
  else:
    raise ValueError(f"Unknown preset {a.preset!r}; use digits or fashion_mnist.")
  if a.arch == "mlp":
    c.model = configlib.model_config("mlp", widths=(512, 512), dropout=0.0)
  else:
    c.model = configlib.model_config(a.arch)
    c.optim.weight_decay = 1e-4 if a.arch == "cnn" else 5e-4
  if a.epochs:
    c.epochs = a.epochs
  if a.runlocal:
    c.members, c.epochs = 2, 1
    c.data.limit_train = 512
  return c

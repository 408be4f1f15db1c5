"""Wall-clock time to 90% validation accuracy: single MLP vs SuperNet (seed 003, Table 10).

Fashion-MNIST. Single network: MLP 512-512 (dropout 0.2); SuperNet: 3 sub-networks of
170-170 (about the same neurons per layer, split three ways), trained at once, merged after
every epoch by a head (copy_scaled init, 2 epochs on cached features). SGD with a
constant learning rate; each arm stops at the first epoch reaching the highest target:

    nice -n 5 python -m experiments.main --config=configs/supernet_time.py:fashion_mnist \
        --workdir=runs/supernet_time_fmnist

20 Newsgroups, targets 82% / 84% (Table 11; MLP 60-60 vs 3 x 20-20, Adam):
`configs/supernet_time.py:newsgroups`.
The thesis CNN (Table 2) instead of the MLPs, on Fashion-MNIST:
`configs/supernet_time.py:fashion_mnist,arch=cnn`: single CNN 32-64-128 vs SuperNet of
3 CNNs 16-32-64 (half the channels: each a quarter of the parameters), Adam 1e-3.
Tiny: `configs/supernet_time.py:runlocal`.

Measured (fashion_mnist,max_epochs=12,targets=0.87-0.88-0.89-0.90): val 0.89 reached by
the SuperNet in 54 s (epoch 8) vs 93 s (epoch 11) for the single net; 0.90 by neither.
With max_epochs=40,targets=0.88-0.89-0.90, 3 seeds: 0.90 reached by the SuperNet first
with every seed, 1.09x-1.70x sooner (mean 47 s vs 69 s). arch=cnn, 3 seeds: SuperNet
0.901 after one epoch, 431 s, vs the single CNN's 1,064 s (epoch 3): 2.47x (seed 0);
570 s (epoch 2) vs 658 s (epoch 3): 1.15x (seed 1); 279 s vs 574 s: 2.06x (seed 2).
TNG: both reach 0.84 at epoch 2 (single 78 s, SuperNet 131 s). docs/results.md.
"""

import ml_collections

from configs.supernet import supernet_block, thesis_cnn_training
from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, preset="digits", max_epochs=0, limit_train=0, targets="",
                          arch="mlp", runlocal=False)
  c = configlib.base_config()
  c.experiment = "supernet_time"
  c.supernet = supernet_block(head_epochs=2)
  c.optim.schedule = "constant"
  c.timing = ml_collections.ConfigDict(dict(
      single=configlib.model_config("mlp", widths=(512, 512), dropout=0.2),
      sub=configlib.model_config("mlp", widths=(170, 170), dropout=0.2),
      sub_members=3,
      max_epochs=20,
      targets=(0.88, 0.89, 0.90),
  ))
  if a.preset == "fashion_mnist":
    c.data = configlib.fashion_mnist_data()
    c.batch_size = 128
    c.optim.learning_rate = 0.02
    c.optim.weight_decay = 5e-4
  elif a.preset == "newsgroups":
    configlib.newsgroups_preset(c)
    c.timing.single = configlib.model_config("mlp", widths=(60, 60), dropout=0.5)
    c.timing.sub = configlib.model_config("mlp", widths=(20, 20), dropout=0.5)
    c.timing.max_epochs = 6
    c.timing.targets = (0.82, 0.84)
  elif a.preset == "digits":
    c.batch_size = 32
    c.timing.single = configlib.model_config("mlp", widths=(64, 64), dropout=0.1)
    c.timing.sub = configlib.model_config("mlp", widths=(21, 21), dropout=0.1)
    c.timing.targets = (0.9, 0.95)
  else:
    raise ValueError(f"Unknown preset {a.preset!r}; use digits, fashion_mnist or newsgroups.")
  if a.arch == "cnn":
    c.timing.single = configlib.model_config("cnn")
    c.timing.sub = configlib.model_config("cnn", stages=(16, 32, 64))
    thesis_cnn_training(c)
  elif a.arch != "mlp":
    raise ValueError(f"Unknown arch {a.arch!r}; use mlp or cnn.")
  if a.max_epochs:
    c.timing.max_epochs = a.max_epochs
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.targets:  # e.g. targets=0.86-0.88
    c.timing.targets = tuple(float(t) for t in a.targets.split("-"))
  if a.runlocal:
    c.timing.max_epochs = 2
    c.data.limit_train = 128
    if a.arch == "cnn":
      c.timing.single = configlib.model_config("cnn", stages=(8, 8, 8))
      c.timing.sub = configlib.model_config("cnn", stages=(4, 4, 4))
    else:
      c.timing.single = configlib.model_config("mlp", widths=(16,), dropout=0.0)
      c.timing.sub = configlib.model_config("mlp", widths=(8,), dropout=0.0)
    c.timing.sub_members = 2
    c.supernet.head_epochs = 1
    c.progress = False
  return c

"""Partitioned MLPs vs classical MLPs (seed 003, Tables 4 and 8; Table 9 on TNG).

Fashion-MNIST, an MLP of 180-420-420 neurons (half the thesis's "small network" of
Table 4; the same divisibility by 1, 2, 3, 4, 6) cut into P = 1, 2, 3, 4, 6
independent sub-networks, 8 epochs each, SuperNet head on cached features; plus the
partitioned network trained whole and a dense MLP with the SuperModel's parameter
count:

    nice -n 5 python -m experiments.main \
        --config=configs/supernet_partition.py:fashion_mnist \
        --workdir=runs/supernet_partition_fmnist

20 Newsgroups (TF-IDF, 20k terms, MLP 60-60 cut into 1, 2, 3, 6 parts, Adam, 4 epochs;
thesis TNG sub-models were 30-30 neurons): `configs/supernet_partition.py:newsgroups`. Tiny: `configs/supernet_partition.py:runlocal`.
Measured (fashion_mnist,limit_train=10000,epochs=5; test): SuperModel 0.8485 / 0.8433 /
0.8428 / 0.8379 for P=2/3/4/6 vs the dense equal-params MLP 0.8408 / 0.8371 / 0.8389 /
0.8366; TNG: SuperModel 0.7853-0.7975 vs dense 60-60 0.7847. Tables in
docs/results_supernet.md.
"""

import ml_collections

from configs.supernet import supernet_block
from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, preset="digits", epochs=0, widths="", parts="",
                          limit_train=0, runlocal=False)
  c = configlib.base_config()
  c.experiment = "supernet_partition"
  c.supernet = supernet_block(head_epochs=5)
  c.partition = ml_collections.ConfigDict(dict(
      widths=(180, 420, 420),   # total neurons per hidden layer
      parts=(1, 2, 3, 4, 6),    # P sub-networks (each gets widths / P)
      dropout_single=0.3,       # thesis: 0.3 for the single network
      dropout_sub=0.2,          # thesis: 0.2 for sub-networks
      whole_trained=True,       # also train PartitionedMLP end to end (Table 8 row 3)
      equal_params=True,        # also train a dense MLP of the SuperModel's size (Table 8)
  ))
  c.model = configlib.model_config("mlp")
  if a.preset == "fashion_mnist":
    configlib.fashion_mnist_preset(c, epochs=8)
  elif a.preset == "newsgroups":
    configlib.newsgroups_preset(c)
    c.epochs = 4
    c.partition.widths = (60, 60)
    c.partition.parts = (1, 2, 3, 6)
    c.partition.dropout_single = 0.5
    c.partition.dropout_sub = 0.5
    c.partition.whole_trained = False
  elif a.preset == "digits":
    c.epochs = 20
    c.batch_size = 32
    c.partition.widths = (48, 48)
  else:
    raise ValueError(f"Unknown preset {a.preset!r}; use digits, fashion_mnist or newsgroups.")
  if a.epochs:
    c.epochs = a.epochs
  if a.widths:
    c.partition.widths = tuple(int(w) for w in a.widths.split("-"))
  if a.parts:
    c.partition.parts = tuple(int(p) for p in a.parts.split("-"))
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.runlocal:
    c.epochs = 1
    c.data.limit_train = 256
    c.partition.widths = (12, 12)
    c.partition.parts = (1, 2)
    c.supernet.head_epochs = 1
    c.progress = False
  return c

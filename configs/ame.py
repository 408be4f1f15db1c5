"""Amortized Model Ensembling on class-skewed Fashion-MNIST shards (seed 001, Lee & Ngo 2025).

One MLP is pre-trained briefly on a small balanced subset of the training split (the
experts' shared initialisation); K experts are fine-tuned from it, in one vmapped run,
each on its own disjoint shard of the rest, 80% of a shard from its two dominant
classes. Merged without data: AME (`ensembling.ame`, SGD / momentum / Nesterov / Adam,
a sweep of step counts), against every expert, the uniform and greedy soups (greedy
selected on the validation split) and the output ensemble, on the test split and on
shifted copies of it (rotated, Gaussian noise, lowered contrast). K = 4 and 8, two seeds.

    python -m experiments.main --config=configs/ame.py --workdir=runs/ame

Only K = 8: `:experts=8`; one seed: `:seeds=1`. Seconds-long smoke run (digits):
`:runlocal`. Measured numbers and what they show: docs/results_ame.md.
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, experts="4+8", seeds=2, limit_train=0, runlocal=False)
  c = configlib.base_config()
  c.experiment = "ame"
  c.members_strategy = "vmap"
  c.experts = tuple(int(k) for k in str(a.experts).split("+"))  # K experts per comparison
  c.members = max(c.experts)       # the largest K (what validate checks)
  c.seeds = a.seeds                # the whole comparison repeated for seed, seed + 1, ...
  c.data = configlib.fashion_mnist_data()
  c.model = configlib.model_config("mlp", widths=(256, 256), dropout=0.0)
  c.batch_size = 128
  c.epochs = 3                     # fine-tuning epochs of every expert on its shard
  c.optim.learning_rate = 0.05     # experts: SGD momentum 0.9, cosine over their epochs
  c.optim.weight_decay = 5e-4
  c.pretrain = ml_collections.ConfigDict(dict(
      examples=2000,               # balanced random subset of train, kept out of the shards
      epochs=2,                    # the shared initialisation: SGD momentum, cosine
      learning_rate=0.05,
  ))
  c.shards = ml_collections.ConfigDict(dict(
      dominant_per_shard=2,        # classes that dominate each shard (shard k: 2k, 2k + 1 mod 10)
      dominant_fraction=0.8,       # share of a shard from its dominant classes
      shard_size=0,                # examples per shard (0: the largest the pool allows)
  ))
  c.ame = ml_collections.ConfigDict(dict(
      # (optimizer, learning rate) pairs, each run from the shared initialisation
      runs=("sgd:1.0", "sgd:0.5", "momentum:0.5", "momentum:0.1", "nesterov:0.5",
            "adam:0.0003", "adam:0.001", "adam:0.003",   # |soup - base| ~ 0.002 per weight
            "adam:0.0003:cyclic", "adam:0.001:cyclic"),  # one expert per step (the paper's
                                                         # online reading of the soup)
      momentum=0.9,                # heavy-ball / Nesterov coefficient
      steps=(1, 2, 3, 5, 10, 20, 50),  # step counts reported (one scan to the largest)
  ))
  c.shifts = ml_collections.ConfigDict(dict(
      rotate=30.0,                 # degrees
      noise_std=0.3,               # Gaussian noise on [0, 1] pixels, clipped to [0, 1]
      contrast=0.3,                # contrast factor (1 = unchanged)
      examples=5000,               # shifted copies of the first N test images (0: all)
  ))
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.runlocal:
    c.data = configlib.base_config().data  # digits, 8 x 8
    c.data.validation_size = 0.2
    c.model.widths = (32,)
    c.batch_size = 16
    c.experts, c.members, c.seeds = (2,), 2, 1
    c.epochs = 1
    c.pretrain.examples, c.pretrain.epochs = 200, 1
    c.ame.runs = ("sgd:1.0", "adam:0.003:cyclic")
    c.ame.steps = (1, 3)
    c.progress = False
  return c

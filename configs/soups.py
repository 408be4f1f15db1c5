"""Model soups on Fashion-MNIST (seed 002), and soups of from-scratch models with alignment.

Part 1 (`finetune`): pre-train one MLP, then fine-tune K=16 ingredients from it in one
vmapped run, each with its own random learning rate, weight decay, number of epochs
(a per-member cosine schedule that reaches 0 after its epochs) and augmentation
(random shifts of up to 0-2 pixels, horizontal flips on/off, its own random stream).
Table: best individual, uniform, greedy (random/sorted), pruned (random/sorted),
learned (global/per-layer) soups, selected on the validation split, reported on test.

Part 2 (`scratch`): K independently initialised MLPs trained from scratch; the uniform
soup collapses, and recovers after weight matching every member to one reference
(`ensembling.align`); barrier plots along the interpolation path, naive vs aligned.

MLPs (784-512-512-10) because the CPU is small; see docs/results_soups.md:

    python -m experiments.main --config=configs/soups.py:fashion_mnist \
        --workdir=runs/soups_fmnist

Measured (runs as in docs/results_soups.md: the two parts run separately, the scratch
part with `--config.scratch.epochs=3`): fine-tuned, best individual 88.70 val / 88.27
test; greedy (sorted) 88.90 / 88.36 with 2 ingredients; pruned (sorted) 88.86 / 88.18
with 6; learned per layer 88.88 / 88.49. From scratch (8 MLPs, 3 epochs): uniform soup
10.00% test, after weight matching 83.75% (individuals 88.3%); loss barrier between
two members 1.009 naive, 0.065 aligned.

Tiny smoke run (digits, seconds): `--config=configs/soups.py:runlocal`.
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, preset="fashion_mnist", parts="finetune+scratch",
                          ingredients=16, runlocal=False)
  c = configlib.base_config()
  c.experiment = "soups"
  c.members_strategy = "vmap"
  c.parts = a.parts                 # "finetune", "scratch" or "finetune+scratch"
  c.data = configlib.fashion_mnist_data()  # held-out split used to select / learn soups
  c.model = configlib.model_config("mlp", widths=(512, 512), dropout=0.0)
  c.batch_size = 128
  c.pretrain = ml_collections.ConfigDict(dict(
      epochs=2,                     # one model, SGD momentum, cosine schedule
      learning_rate=0.05,
      weight_decay=5e-4,
  ))
  c.finetune = ml_collections.ConfigDict(dict(
      ingredients=a.ingredients,    # K fine-tuned ingredients, trained in one vmapped run
      max_epochs=3,                 # each member draws its epochs from 1..max_epochs
      lr_range=(0.003, 0.15),       # log-uniform peak learning rate (SGD momentum 0.9)
      wd_range=(1e-5, 3e-3),        # log-uniform L2 weight decay
      max_shift=2,                  # each member draws a shift bound from 0..max_shift
      hyper_seed=0,                 # seed of the hyperparameter draws
  ))
  c.soups = ml_collections.ConfigDict(dict(
      random_orders=5,              # greedy/pruned (random) are averaged over this many orders
      passes=3,                     # pruned soup passes
      learned_steps=300,            # learned soup: Adam steps on held-out batches
      learned_lr=0.05,
      learned_batch=1000,
      eval_batch_size=0,            # candidates evaluated at once (0: all of a pass)
  ))
  c.scratch = ml_collections.ConfigDict(dict(
      members=8,                    # from-scratch models (different init and data order)
      epochs=4,
      learning_rate=0.05,
      weight_decay=5e-4,
      max_iter=100,                 # weight matching iterations
      alphas=11,                    # points on the interpolation path
  ))
  if a.preset == "digits" or a.runlocal:
    c.data.name, c.data.dir, c.data.validation_size = "digits", "", 0.2
    c.model.widths = (64, 64)
    c.batch_size = 32
  elif a.preset != "fashion_mnist":
    raise ValueError(f"Unknown preset {a.preset!r}; use fashion_mnist or digits.")
  if a.runlocal:
    c.progress = False
    c.pretrain.epochs = 1
    c.finetune.ingredients, c.finetune.max_epochs = 4, 2
    c.data.limit_train = 480
    c.soups.random_orders, c.soups.passes, c.soups.learned_steps = 1, 2, 10
    c.scratch.members, c.scratch.epochs, c.scratch.alphas = 3, 2, 5
  return c

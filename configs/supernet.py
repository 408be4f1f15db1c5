"""SuperNet (seed 003): 6 MLP members merged by a retrained softmax layer.

Fashion-MNIST, 6 members of the thesis's Table 5/6 sub-model (784-200-466-466-10,
dropout 0.2), 15 epochs of SGD each, then SuperNet heads on cached features
(Tables 12, 5, 6) and the layer-by-layer boost of every member (Table 3):

    nice -n 5 python -m experiments.main --config=configs/supernet.py:fashion_mnist \
        --workdir=runs/supernet_fmnist

Thesis CNN (Table 2) on a 10k training subset instead of the MLP:
`configs/supernet.py:fashion_mnist,arch=cnn,limit_train=10000,epochs=3`; on all the data,
`configs/supernet.py:fashion_mnist,arch=cnn,epochs=6,noboost` (1 h 45 min on 2 CPU cores).
Tiny (seconds): `configs/supernet.py:runlocal`.

Measured (test, 6 members; heads rerun on the trained members with `,noboost`): best
member 0.8943, softmax voting 0.8966, SuperNet 0.8992 (0.8988 / 0.8988 for head seeds
1 / 2), and SuperNet > voting at every K from 2 to 6. Thesis CNN (the reduced command
above, `,noboost`): best member 0.8616, voting 0.8628, SuperNet 0.8973; on all the data,
6 epochs: 0.9244, 0.9249, 0.9356; one member alone for 20 epochs (`members=1,epochs=20`):
0.9383; two members for 20 epochs: 0.9375, voting 0.9407, SuperNet 0.9400 (no lead);
four (two such runs joined by `members_from`): 0.9400, voting 0.9432, SuperNet 0.9413;
six (three runs joined): 0.9400, voting 0.9431, SuperNet 0.9419 (the untrained head, the
logit average, 0.9439).
Full tables in docs/results_supernet.md and docs/results.md.
"""

import ml_collections

from ensembling import configlib


def supernet_block(**overrides) -> ml_collections.ConfigDict:
  """`config.supernet`: how the head is built and trained."""
  sn = ml_collections.ConfigDict(dict(
      heads=True,                   # Tables 12, 5, 6 (False: only the boost, Table 3)
      head_init="copy_scaled",      # random | copy | copy_scaled
      head_scale=0.0,               # copy_scaled factor; 0 means 1/K
      head_l2=0.0,                  # L2 (Keras style, weights and bias) on the head
      head_epochs=10,               # passes over the cached training features
      head_batch_size=128,
      head_optimizer="adam",        # adam | sgd (a fresh optimizer, as in the thesis)
      head_lr=1e-3,
      head_schedule="constant",     # constant | cosine (decay to 0 over the head epochs)
      head_seed=0,                  # added to config.seed for the head's data order / dropout
      head_dropout=0.0,             # feature dropout while training the head (the members'
                                    # last Dropout, active as in Keras's frozen sub-models)
      head_select="last",           # last | val: the head of the best validation epoch
      grid_inits=("random", "copy", "copy_scaled"),  # Table 6 columns
      grid_l2=(0.0, 1e-2, 1e-3),    # Table 6 rows
      grid_scale=0.0,               # copy_scaled factor in the grid; 0 means 1/K
      boost_stages=(("^head/", 3), ("^Dense_2/", 3), ("^Dense_1/", 3), ("^Dense_0/", 4)),
      boost_lr=3e-4,                # Adam, cosine-decayed within each stage
      boost_members=0,              # boost only the first N members (0: all)
  ))
  sn.update(overrides)
  return sn


def thesis_cnn_training(c):
  """How the thesis CNN members (and their SuperNet head) train: Adam 1e-3, L2 1e-4."""
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-4
  c.supernet.head_dropout = 0.4   # the CNN's dropout after its last pooling


def get_config(arg=None):
  a = configlib.parse_arg(arg, preset="digits", arch="mlp", members=6, epochs=0,
                          limit_train=0, boost_epochs=0, boost_members=0, head_epochs=0,
                          noboost=False, noheads=False, select="", runlocal=False)
  c = configlib.base_config()
  c.experiment = "supernet"
  c.members = a.members
  c.members_from = ""  # finished runs' workdirs, comma-separated: their members, not trained
  c.supernet = supernet_block()
  if a.preset == "fashion_mnist":
    configlib.fashion_mnist_preset(c, epochs=15)
  elif a.preset == "digits":
    c.epochs = 20
    c.batch_size = 32
  else:
    raise ValueError(f"Unknown preset {a.preset!r}; use digits or fashion_mnist.")
  # A constant-rate Adam head ends wherever its last batches leave it (test accuracy
  # moves +-0.3 points from epoch to epoch); decaying the rate makes the end point stable.
  c.supernet.head_schedule = "cosine"
  c.supernet.head_epochs = 20
  if a.arch == "mlp":
    c.model = configlib.model_config("mlp", widths=(200, 466, 466), dropout=0.2)
    c.supernet.head_dropout = 0.2
  elif a.arch == "cnn":
    c.model = configlib.model_config("cnn")
    thesis_cnn_training(c)
    c.supernet.boost_stages = (("^head/", 3), ("^conv2_1/", 3), ("^conv2_0/", 3),
                               ("^conv1_1/", 4))
  else:
    raise ValueError(f"Unknown arch {a.arch!r}; use mlp or cnn.")
  if a.epochs:
    c.epochs = a.epochs
  if a.boost_epochs:  # the same number of epochs for every boost stage
    c.supernet.boost_stages = tuple((p, a.boost_epochs) for p, _ in c.supernet.boost_stages)
  c.supernet.boost_members = a.boost_members
  c.supernet.heads = not a.noheads
  if a.noboost:
    c.supernet.boost_stages = ()
  if a.head_epochs:
    c.supernet.head_epochs = a.head_epochs
  if a.select:
    c.supernet.head_select = a.select
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.runlocal:
    c.members, c.epochs = 2, 1
    c.data.limit_train = 256
    c.model = configlib.model_config("mlp", widths=(16, 8), dropout=0.2)
    c.supernet.head_epochs = 2
    c.supernet.grid_l2 = (0.0, 1e-2)
    c.supernet.boost_stages = (("^head/", 1), ("^Dense_1/", 1))
    c.progress = False
  return c

"""Weight merging (issue 17): multi-task merging of fine-tuned MLPs; aligned merging of ResNets.

Part 1 (`multitask`): one MLP pre-trained on all of Fashion-MNIST is fine-tuned on T
tasks (the images rotated by 90, 180, 270 degrees, and with Gaussian noise; each task
keeps the 10 labels), one model per task, then merged with every method of
`ensembling.merging` and the uniform soup. Scaling coefficients (task arithmetic, TIES,
DARE) are picked from `scales` by the mean normalised validation accuracy; the table
reports per-task test accuracy and its mean normalised by each task's own fine-tuned
model (as the TIES and DARE papers do).

Part 2 (`scratch`): K = 4 ResNet-20s trained from different seeds (reduced for the shared
CPU: widths 8/16/32 instead of 16/32/64, 6,000 training images resized to 14 x 14, 3
epochs), merged naively, by weight matching to member 0, by activation matching to member
0 and by MergeMany (`ensembling.align`); BatchNorm statistics of every merged or
interpolated model recomputed on training data. Loss barrier between members 0 and 1
along the (aligned) path, and accuracy of the K = 4 merged model (2,000 test images).

    python -m experiments.main --config=configs/merging.py --workdir=runs/merging

Measured: see docs/results_merging.md (2 CPU cores shared with other jobs).

Tiny smoke run (digits, seconds): `--config=configs/merging.py:runlocal`.
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, preset="fashion_mnist", parts="multitask+scratch",
                          runlocal=False)
  c = configlib.base_config()
  c.experiment = "merging"
  c.members_strategy = "loop"      # XLA:CPU compiles a vmapped ResNet step for minutes
  c.parts = a.parts                 # "multitask", "scratch" or "multitask+scratch"
  c.data = configlib.fashion_mnist_data()  # validation split: picks the merge coefficients
  c.model = configlib.model_config("mlp", widths=(256, 256), dropout=0.0)  # part 1's model
  c.batch_size = 128
  c.multitask = ml_collections.ConfigDict(dict(
      tasks="rotate90+rotate180+rotate270+noise1.0",  # rotate<degrees> | noise<std>
      pretrain_epochs=2,            # on the untouched training split; SGD momentum, cosine
      pretrain_lr=0.05,
      finetune_epochs=1,            # per task, on the task's transformed training split
      finetune_lr=0.02,
      finetune_examples=20000,      # first N training examples per task (0: all)
      weight_decay=5e-4,
      scales=(0.1, 0.15, 0.2, 0.3, 0.5, 1.0),  # lambda grid of the summed task vectors (task
                                    # arithmetic, DARE), picked on val
      mean_scales=(0.1, 0.2, 0.3, 0.4, 0.6, 1.0, 1.5),  # lambda grid of TIES's disjoint mean (TIES,
                                    # DARE + TIES election), picked on val
      ties_density=0.2,             # TIES: fraction of each task vector kept (paper: 0.2)
      dare_density=0.3,             # DARE: keep probability (1 - drop rate)
      dare_seed=0,
      stats_examples=512,           # per task: examples for Fishers and Gram matrices
      stats_batch=64,
      fisher_labels="expected",     # diagonal_fisher's labels: true | sampled | expected
      regmean_alpha=0.9,            # RegMean's off-diagonal scale (paper: tuned < 1)
  ))
  c.scratch = ml_collections.ConfigDict(dict(
      model=configlib.model_config("resnet", blocks_per_stage=3, widths=(8, 16, 32)),
      members=4,                    # K models from different seeds (one vmapped run)
      image_size=14,                # images resized to 14 x 14 (0: as they are)
      train_examples=6000,          # first N training examples (0: all)
      epochs=3,
      learning_rate=0.05,           # SGD momentum 0.9, cosine to 0
      weight_decay=5e-4,
      max_iter=100,                 # weight matching / MergeMany iterations
      act_examples=256,             # training examples for activation matching
      bn_examples=512,              # training examples for BatchNorm recomputation
      test_examples=2000,           # first N test examples for the curves and table (0: all)
      alphas=5,                     # points on the path between members 0 and 1
  ))
  if a.preset == "digits" or a.runlocal:
    c.data.name, c.data.dir, c.data.validation_size = "digits", "", 0.2
    c.model.widths = (32, 32)
    c.batch_size = 32
  elif a.preset != "fashion_mnist":
    raise ValueError(f"Unknown preset {a.preset!r}; use fashion_mnist or digits.")
  if a.runlocal:
    c.progress = False
    c.data.limit_train = 320
    mt = c.multitask
    mt.pretrain_epochs, mt.finetune_examples, mt.scales = 1, 0, (0.5, 1.0)
    mt.mean_scales = (1.0, 1.5)
    mt.tasks, mt.stats_examples, mt.stats_batch = "rotate90+noise1.0", 64, 32
    sc = c.scratch
    sc.model.blocks_per_stage, sc.model.widths = 1, (4, 8)
    sc.members, sc.train_examples, sc.epochs, sc.max_iter, sc.image_size = 3, 0, 1, 5, 0
    sc.act_examples, sc.bn_examples, sc.test_examples, sc.alphas = 32, 64, 128, 3
  return c

"""Uncertainty baselines on Fashion-MNIST (issue 18): one table, eleven methods, OOD AUROC.

Single model, MC dropout, deep ensemble, SWA, SWAG, BatchEnsemble, MIMO, Packed-Ensemble,
SSE, FGE and a student distilled from the deep ensemble, all on the MLP 784-256-256-10
at the same epoch budget; accuracy, NLL, ECE, Brier on the test split, OOD AUROC
(predictive entropy) against digits upsampled to 28x28 and the test split rotated, noised
and with lowered contrast, and training / inference cost:

    python -m experiments.main --config=configs/uncertainty.py --workdir=runs/uncertainty

Reduced for a 2-core CPU: the first 20,000 training images, 20 epochs (the reference
tables train on all data for hundreds of epochs), MLP only (no BatchEnsemble or Packed
CNN model exists; the thesis CNN for eleven methods does not fit the CPU budget). All
55,000 images: `--config.data.limit_train=0`. Any IDX
directory as an extra OOD set: `--config.ood.dir=../shared/data/mnist
--config.ood.name=mnist`. Seconds-long smoke run: `configs/uncertainty.py:runlocal`.
Measured (test, 9 min on the shared 2-core CPU): single model 0.881 accuracy / NLL 0.383 /
ECE 0.047; deep ensemble 0.884 / 0.357 / 0.038 (digits AUROC 0.954 vs 0.922); SSE and MC
dropout lower NLL (0.347, 0.349), Packed lowest ECE (0.014); BatchEnsemble, MIMO, Packed
below the single model in accuracy; the student keeps 72% of the ensemble's NLL gain.
Full table, commands and orderings: docs/results_uncertainty.md.
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, epochs=0, limit_train=0, runlocal=False)
  c = configlib.base_config()
  c.experiment = "uncertainty"
  c.data = configlib.fashion_mnist_data()
  c.data.limit_train = 20000       # reduced for the CPU (0: all 55,000)
  c.epochs = 20
  c.batch_size = 128
  c.members = 4                    # deep ensemble size K (uncertainty-baselines' table: 4)
  c.model = configlib.model_config("mlp", widths=(256, 256), dropout=0.0)
  c.optim.learning_rate = 0.05
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "cosine"      # single model, MC dropout, ensembles, student
  c.uq = ml_collections.ConfigDict(dict(
      mc_dropout=0.1,              # MC dropout: rate after each hidden layer
      mc_samples=20,               # MC dropout: stochastic forward passes at test time
      swag_rank=20,                # SWAG: deviation columns (the paper's K = 20)
      swag_samples=30,             # SWAG: weight samples at test time (the paper's S = 30)
      swag_scale=0.5,              # SWAG: covariance scale (the paper's 1/2)
      be_members=4,                # BatchEnsemble: members (each on its own batch)
      mimo_members=3,              # MIMO: heads / input slots (the paper's 3)
      mimo_repeat_prob=0.0,        # MIMO: input repetition rho
      mimo_batch_repetitions=1,    # MIMO: batch repetitions R
      packed_estimators=4,         # Packed-Ensemble: M
      packed_alpha=2,              # Packed-Ensemble: width factor alpha
      packed_gamma=1,              # Packed-Ensemble: groups per estimator
      distill_temperature=1.0,     # distillation: T (teacher: the deep ensemble); T = 2, 4
                                   # gave a worse student here (docs/results_uncertainty.md)
  ))
  c.traj = ml_collections.ConfigDict(dict(   # as configs/swa.py (configlib.trajectory_plan)
      num_cycles=4,                # SSE: cycles = snapshots
      sse_lr=0.1,                  # SSE: rate at every restart
      pretrain_frac=0.5,           # FGE / SWA / SWAG: share of the budget before collecting
      fge_cycle_epochs=1,          # FGE: cycle length (epochs)
      fge_lr_1=0.02,               # FGE: cycle start / end rate
      fge_lr_2=0.0005,             # FGE: midpoint rate (snapshots)
      swa_lr=0.01,                 # SWA / SWAG: constant rate while collecting
      swa_anneal_epochs=1,         # SWA / SWAG: cosine anneal to swa_lr
      swa_every_epochs=0.2,        # SWA / SWAG: collect 5 times per epoch (>= swag_rank in all)
  ))
  c.ood = ml_collections.ConfigDict(dict(
      name="",                     # name of the extra OOD set in ood.dir ("": the folder's)
      dir="",                      # an IDX directory whose test images are an extra OOD set
      digits_border=4,             # scikit-learn digits at 20x20 inside a 28x28 frame
      rotate=60.0,                 # test split rotated by this many degrees
      noise_std=0.4,               # test split + N(0, std^2) noise, clipped to [0, 1]
      contrast=0.2,                # test split with its contrast scaled by this factor
      limit=0,                     # first N examples of the test split and of each OOD set
  ))
  if a.epochs:
    c.epochs = a.epochs
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.runlocal:
    c.epochs, c.batch_size, c.members = 4, 64, 2
    c.data.limit_train = 512
    c.model.widths = (32,)
    c.uq.update(dict(mc_samples=3, swag_rank=2, swag_samples=3, be_members=2, mimo_members=2,
                     packed_estimators=2))
    c.traj.num_cycles = 2
    c.ood.limit = 200
    c.checkpoint_every_steps = 32  # = all steps: one checkpoint per method
    c.progress = False
  return c

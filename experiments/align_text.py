"""The shared head with many classes: truncated MiniLM encoders on 20 Newsgroups (seed 000).

Frozen encoders (MiniLM's first 2 / 4 / 6 layers), an ArcFace MLP each, alignment to the
best one's frozen head (`shared_head.align_group`); configs/align_text.py.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import optax

from ensembling import configlib, data, losses, members, models, report, shared_head, text, train
from ensembling import tree as tree_lib
from ensembling.data import newsgroups
from ensembling.models import bert


def _posts(config):
  """(texts, labels) per split: train / val (carved from train) / test, 20 classes."""
  arc = newsgroups.read_archive(config.posts.dir)
  names = sorted(set(arc["train"][1]))
  rng = np.random.default_rng(int(config.seed))
  out = {}
  for split in ("train", "test"):
    texts, groups = arc[split]
    idx = rng.permutation(len(texts))[:int(config.posts.limit) or len(texts)]
    out[split] = ([texts[i] for i in idx], np.array([names.index(groups[i]) for i in idx]))
  (tr, ytr), (va, yva) = data.core.carve_validation(
      np.arange(len(out["train"][0])), out["train"][1], size=config.posts.validation_size,
      seed=int(config.seed))
  texts = out["train"][0]
  out["train"], out["val"] = ([texts[i] for i in tr], ytr), ([texts[i] for i in va], yva)
  return out, len(names)


def _features(config, posts, workdir):
  """{depth: {split: (N, D)}}, computed once and kept in workdir/features.npz."""
  path = os.path.join(workdir, "features.npz")
  depths = tuple(int(d) for d in config.encoder.depths)
  if os.path.exists(path):
    saved = np.load(path)
    return {d: {s: saved[f"{d}_{s}"] for s in posts} for d in depths}
  enc = config.encoder
  folder = bert.encoder_folder(enc.path, scratch_dir=workdir, sentences=posts["train"][0],
                               num_layers=max(depths), seed=int(config.seed))
  cfg, tok = bert.bert_config_from_dir(folder), bert.load_tokenizer(folder)
  params = bert.load_pretrained_params(folder, cfg)["params"]
  feats = {d: {} for d in depths}
  for split, (texts, _) in posts.items():
    for d, e in text.encode_depths(params, cfg, tok, texts, depths=depths,
                                   max_length=int(enc.max_length),
                                   batch_size=int(enc.batch_size)).items():
      feats[d][split] = e
  np.savez(path, **{f"{d}_{s}": v for d, fs in feats.items() for s, v in fs.items()})
  return feats


def run(config, workdir: str):
  posts, num_classes = _posts(config)
  feats = _features(config, posts, workdir)
  labels = {s: y for s, (_, y) in posts.items()}
  af = config.arcface
  loss = functools.partial(losses.arcface_loss_from_logits, scale=af.scale, margin=af.margin)
  trained, inputs, names = [], [], []
  for i, (d, f) in enumerate(feats.items()):
    model = models.with_arcface(configlib.model_from_config(config.model, num_classes=1),
                                num_classes=num_classes, embedding_dim=int(af.embedding_dim),
                                scale=float(af.scale))
    res = train.train_members(
        model, f["train"], labels["train"], num_members=1, tx=optax.adam(config.optim.learning_rate),
        epochs=int(config.epochs), batch_size=int(config.batch_size), seed=int(config.seed) + i,
        loss_fn=loss, workdir=os.path.join(workdir, f"L{d}"),
        **configlib.fit_kwargs(config, eval_data=(f["val"], labels["val"])))
    trained.append((model, tree_lib.index(members.variables_of(res.state), 0)))
    inputs.append({"train": f["train"], "val": f["val"], "fit": f["train"], "test": f["test"],
                   "index": f["train"]})
    names.append(f"MiniLM-L{d}" if config.encoder.path != "tiny_random" else f"L{d}")
  roles = {"train": "train", "val": "val", "fit": "train", "test": "test", "index": "train"}
  res = shared_head.align_group(
      trained, inputs, labels={r: labels[s] for r, s in roles.items()}, names=names,
      epochs=int(config.align.epochs), learning_rate=float(config.align.learning_rate),
      batch_size=int(config.batch_size), scale=float(af.scale), margin=float(af.margin),
      k=int(config.align.k), seed=int(config.seed))
  k = int(config.align.k)
  cols = (f"mP@{k}", "Acc@1", "Acc@5")
  rows = [(f"{kind}: {n}", m) for kind in ("traditional", "ours")
          for n, m in res["rows"][kind].items()]
  mp = lambda kind, n: res["rows"][kind][n][f"mP@{k}"]
  val = np.round(res["val_mP"], 4).tolist()
  markdown = (f"# Shared head with {num_classes} classes, D = {af.embedding_dim}: truncated "
              f"encoders on 20 Newsgroups (test posts vs training posts)\n\n"
              + report.markdown_table(rows, cols)
              + f"\nShared head: {res['best']} (validation mP@{k} {val}). Naive mean "
              f"{mp('traditional', 'mean'):.4f}, aligned mean {mp('ours', 'mean'):.4f}, best "
              f"single {max(mp('traditional', n) for n in names):.4f}. Frozen leaves "
              f"bit-identical after alignment: {res['frozen_leaves_unchanged']}.\n")
  return {**res, "num_classes": num_classes,
          "posts": {s: len(t) for s, (t, _) in posts.items()}}, markdown

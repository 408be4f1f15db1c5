"""Ensembles of small language models (Tyagi et al.): MiniLM truncations on 20NG / SICK.

Frozen MiniLM features after L layers (cached in workdir/features.npz), K MLP members per
depth trained on the member axis, then `lm_ensembles.compare_ensembles` for every group
of `config.groups`; configs/lm_ensembles.py.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax

from ensembling import configlib, data, lm_ensembles, members, report, text
from ensembling.data import newsgroups, sick
from ensembling.models import bert


def _splits(config):
  """{split: (texts_N or (a_N, b_N), labels_N)} for train / stack / test, and C."""
  rng = np.random.default_rng(int(config.seed))
  lim = config.limits
  take = lambda n, limit: rng.permutation(n)[:int(limit) or n]
  if config.task == "newsgroups":
    arc = newsgroups.read_archive(os.path.join(config.data_dir, "20newsgroups"))
    names = sorted(set(arc["train"][1]))
    pick = lambda split, idx: ([arc[split][0][i] for i in idx],
                               np.array([names.index(arc[split][1][i]) for i in idx]))
    idx = rng.permutation(len(arc["train"][0]))
    n_train = int(lim.train) or len(idx) - int(lim.stack or 1000)
    stack = idx[n_train:n_train + (int(lim.stack) or 1000)]
    test = take(len(arc["test"][0]), lim.test)
    return {"train": pick("train", idx[:n_train]), "stack": pick("train", stack),
            "test": pick("test", test)}, len(names)
  out = {}
  for name, split, limit in (("train", "train", lim.train), ("stack", "trial", lim.stack),
                             ("test", "test", lim.test)):
    p = sick.read_sick_entailment(split, root=config.data_dir)
    idx = take(len(p), limit)
    out[name] = (([p.sentences_a[i] for i in idx], [p.sentences_b[i] for i in idx]),
                 p.labels[idx])
  return out, len(sick.LABELS)


def _features(config, splits, workdir):
  """{depth: {split: (N, F)}}, token lengths (N, texts per example) per split, and cfg."""
  enc, depths = config.encoder, tuple(int(d) for d in config.encoder.depths)
  path = os.path.join(workdir, "features.npz")
  texts = lambda x: list(x) if config.task == "newsgroups" else list(x[0]) + list(x[1])
  folder = bert.resolve_model_path(enc.path) if enc.path != "tiny_random" else \
      os.path.join(workdir, "tiny_bert")
  if enc.path == "tiny_random" and not os.path.exists(folder):
    bert.write_random_bert(folder, bert.most_common_words(texts(splits["train"][0]), 400),
                           num_layers=max(depths), seed=int(config.seed))
  cfg, tok = bert.bert_config_from_dir(folder), bert.load_tokenizer(folder)
  if os.path.exists(path):
    saved = np.load(path)
    return ({d: {s: saved[f"{d}_{s}"] for s in splits} for d in depths},
            {s: saved[f"len_{s}"] for s in splits}, cfg)
  params = bert.load_pretrained_params(folder, cfg)["params"]
  unique = sorted({t for x, _ in splits.values() for t in texts(x)})
  row = {t: i for i, t in enumerate(unique)}
  emb = text.encode_depths(params, cfg, tok, unique, depths=depths,
                           max_length=int(enc.max_length), batch_size=int(enc.batch_size))
  length = (bert.tokenize(tok, unique, max_length=int(enc.max_length)) != cfg.pad_token_id).sum(1)
  feats, lens = {d: {} for d in depths}, {}
  for s, (x, _) in splits.items():
    cols = [x] if config.task == "newsgroups" else [x[0], x[1]]
    rows = [np.array([row[t] for t in c]) for c in cols]
    lens[s] = np.stack([length[r] for r in rows], 1)
    for d in depths:
      e = [emb[d][r] for r in rows]
      feats[d][s] = e[0] if len(e) == 1 else lm_ensembles.pair_features(*e)
  np.savez(path, **{f"{d}_{s}": v for d, fs in feats.items() for s, v in fs.items()},
           **{f"len_{s}": v for s, v in lens.items()})
  return feats, lens, cfg


def _gflops(config, cfg, lens_NxP, depth, in_dim, num_classes):
  enc = np.mean([sum(lm_ensembles.encoder_flops(cfg, num_layers=depth, seq_len=l) for l in r)
                 for r in lens_NxP])
  head = lm_ensembles.mlp_flops(in_dim, tuple(config.model.widths), num_classes=num_classes)
  return enc / 1e9, head / 1e9


def run(config, workdir: str):
  splits, num_classes = _splits(config)
  feats, lens, cfg = _features(config, splits, workdir)
  labels = {s: y for s, (_, y) in splits.items()}
  outs, cost = {}, {}
  for d, f in feats.items():
    sp = data.Splits(f["train"], labels["train"], f["stack"], labels["stack"], f["test"],
                     labels["test"], num_classes, name=f"L{d}")
    model, res = configlib.train_members_from_config(
        config, sp, os.path.join(workdir, f"L{d}"), desc=f"L{d} members",
        model=configlib.model_from_config(config.model, num_classes=num_classes))
    for s in ("stack", "test"):
      logits, emb = members.predict(model, res.state, f[s], with_features=True)
      for k in range(int(config.members)):
        outs.setdefault(f"{d}.{k}", {})[s] = (np.asarray(jax.nn.softmax(logits[k], -1),
                                                         np.float64), emb[k])
    for k in range(int(config.members)):
      cost[f"{d}.{k}"] = (d, *_gflops(config, cfg, lens["test"], d, f["train"].shape[1],
                                      num_classes))
  rows, cb = {}, config.combine
  for name, o in outs.items():
    rows[f"L{name.replace('.', '#')}"] = {
        **lm_ensembles.scores(o["test"][0], labels["test"]), "depth": cost[name][0],
        "GFLOPs (own encoders)": sum(cost[name][1:]), "GFLOPs (shared trunk)": sum(cost[name][1:])}
  width = int(config.model.widths[-1])
  for g, spec in config.groups.items():
    names = spec.split()
    if any(n not in outs for n in names):
      raise ValueError(f"Group {g!r} names unknown members in {names}; have {sorted(outs)}.")
    part = lambda s: {"probs": np.stack([outs[n][s][0] for n in names]),
                      "emb": np.stack([outs[n][s][1] for n in names]), "labels": labels[s]}
    res = lm_ensembles.compare_ensembles(
        part("stack"), part("test"), num_classes=num_classes,
        semi_tx=optax.adam(cb.semi_lr), semi_epochs=int(cb.semi_epochs),
        gate_tx=optax.adam(cb.gate_lr), gate_steps=int(cb.gate_steps),
        batch_size=int(cb.batch_size), gate_hidden=int(cb.gate_hidden),
        entropy=float(cb.entropy), seed=int(config.seed))
    own = sum(sum(cost[n][1:]) for n in names)
    shared = max(cost[n][1] for n in names) + sum(cost[n][2] for n in names)
    extra = {"semi": 2 * len(names) * width * num_classes / 1e9,
             "deep": lm_ensembles.mlp_flops(len(names) * width, (int(cb.gate_hidden),),
                                            num_classes=len(names)) / 1e9}
    for m in lm_ensembles.METHODS:
      rows[f"{g} {m}"] = {**res[m], "depth": max(cost[n][0] for n in names),
                          "GFLOPs (own encoders)": own + extra.get(m, 0.0),
                          "GFLOPs (shared trunk)": shared + extra.get(m, 0.0)}
    rows[f"{g} deep"]["gate_weights"] = res["gate_weights"]
  cols = ("accuracy", "macro_f1", "nll", "ece", "GFLOPs (own encoders)", "GFLOPs (shared trunk)")
  base = rows[f"L{config.baseline.replace('.', '#')}"]
  small = {n: r for n, r in rows.items() if r["depth"] < max(feats)}
  best = max(small, key=lambda n: small[n]["accuracy"])
  beats = [n for n, r in small.items() if r["accuracy"] > base["accuracy"]]
  md = (f"# Ensembles of small language models: {config.task} ({num_classes} classes; "
        + ", ".join(f"{s} {len(y)}" for s, y in labels.items()) + ")\n\n"
        + report.cells_table(["", *cols], [[n, *(r.get(c) for c in cols)]
                                           for n, r in rows.items()])
        + f"\nSingle full model L{config.baseline}: accuracy {base['accuracy']:.4f}. Best "
        f"predictor without a {max(feats)}-layer member: {best} ({small[best]['accuracy']:.4f}). "
        f"Predictors without one that are more accurate than the single full model: "
        f"{beats or 'none'}.\n")
  return {"rows": rows, "baseline": config.baseline, "best_small": best,
          "small_beating_baseline": beats, "sizes": {s: len(y) for s, y in labels.items()}}, md

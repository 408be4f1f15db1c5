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

from ensembling import configlib, data, lm_ensembles, members, report
from ensembling.models import bert


def _encoder(config, splits, workdir):
  """The pretrained encoder's folder (a tiny random BERT for `tiny_random`), cfg, tokenizer."""
  folder = bert.encoder_folder(
      config.encoder.path, scratch_dir=workdir, num_layers=max(config.encoder.depths),
      sentences=lm_ensembles.task_sentences(config.task, splits["train"][0]),
      seed=int(config.seed))
  return folder, bert.bert_config_from_dir(folder), bert.load_tokenizer(folder)


def _ids(config, splits, tok, cfg):
  """Token ids per split (SICK: the pair as one cross-encoder input) and their lengths."""
  ids = lm_ensembles.task_ids(config.task, tok, splits, max_length=config.encoder.max_length)
  return ids, {s: (v != cfg.pad_token_id).sum(1)[:, None] for s, v in ids.items()}


def _features(config, splits, workdir, folder, cfg, tok):
  """{depth: {split: (N, F)}} of the frozen encoder and token lengths, cached in the workdir."""
  depths, path = tuple(int(d) for d in config.encoder.depths), os.path.join(workdir, "features.npz")
  if os.path.exists(path):
    saved = np.load(path)
    return ({d: {s: saved[f"{d}_{s}"] for s in splits} for d in depths},
            {s: saved[f"len_{s}"] for s in splits})
  feats, lens = lm_ensembles.frozen_features(
      bert.load_pretrained_params(folder, cfg)["params"], cfg, tok,
      {s: x for s, (x, _) in splits.items()}, pairs=config.task != "newsgroups", depths=depths,
      max_length=int(config.encoder.max_length), batch_size=int(config.encoder.batch_size))
  np.savez(path, **{f"{d}_{s}": v for d, fs in feats.items() for s, v in fs.items()},
           **{f"len_{s}": v for s, v in lens.items()})
  return feats, lens


def _gflops(cfg, lens_NxP, depth, in_dim, widths, num_classes):
  enc = np.mean([sum(lm_ensembles.encoder_flops(cfg, num_layers=depth, seq_len=l) for l in r)
                 for r in lens_NxP])
  return enc / 1e9, lm_ensembles.mlp_flops(in_dim, widths, num_classes=num_classes) / 1e9


def run(config, workdir: str):
  lim = config.limits
  splits, num_classes = lm_ensembles.task_splits(config.task, config.data_dir,
                                                 seed=int(config.seed), train=lim.train,
                                                 stack=lim.stack, test=lim.test)
  folder, cfg, tok = _encoder(config, splits, workdir)
  tuned = bool(config.finetune.enabled)  # fine-tuned encoders, or heads on frozen features
  feats, lens = (_ids(config, splits, tok, cfg) if tuned else
                 _features(config, splits, workdir, folder, cfg, tok))
  if tuned:  # every depth reads the same ids; the members' schedule is config.finetune's
    pretrained = bert.load_pretrained_params(folder, cfg)["params"]
    feats = {int(d): feats for d in config.encoder.depths}
    ft = config.copy_and_resolve_references()
    ft.epochs, ft.batch_size = config.finetune.epochs, config.finetune.batch_size
    ft.optim.learning_rate = config.finetune.learning_rate
  labels = {s: y for s, (_, y) in splits.items()}
  outs, cost = {}, {}
  for d, f in feats.items():
    sp = data.Splits(f["train"], labels["train"], f["stack"], labels["stack"], f["test"],
                     labels["test"], num_classes, name=f"L{d}")
    if tuned:
      model, v = lm_ensembles.finetune_init(jax.random.key(int(config.seed) + d), pretrained,
                                            cfg, num_layers=d, num_classes=num_classes,
                                            num_members=int(config.members))
      model, res = configlib.train_members_from_config(
          ft, sp, os.path.join(workdir, f"L{d}"), desc=f"L{d} fine-tuned", model=model,
          init_variables=v)
    else:
      model, res = configlib.train_members_from_config(
          config, sp, os.path.join(workdir, f"L{d}"), desc=f"L{d} members",
          model=configlib.model_from_config(config.model, num_classes=num_classes))
    for s in ("stack", "test"):
      logits, emb = members.predict(model, res.state, f[s], with_features=True)
      for k in range(int(config.members)):
        outs.setdefault(f"{d}.{k}", {})[s] = (np.asarray(jax.nn.softmax(logits[k], -1),
                                                         np.float64), emb[k])
    head = ((cfg.hidden_size, ()) if tuned else (f["train"].shape[1], tuple(config.model.widths)))
    for k in range(int(config.members)):
      cost[f"{d}.{k}"] = (d, *_gflops(cfg, lens["test"], d, *head, num_classes))
  rows, cb = {}, config.combine
  for name, o in outs.items():
    rows[f"L{name.replace('.', '#')}"] = {
        **lm_ensembles.scores(o["test"][0], labels["test"]), "depth": cost[name][0],
        "GFLOPs (own encoders)": sum(cost[name][1:]), "GFLOPs (shared trunk)": sum(cost[name][1:])}
  width = cfg.hidden_size if tuned else int(config.model.widths[-1])
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
    gf = lm_ensembles.ensemble_gflops([cost[n][1:] for n in names], feature_dim=width,
                                      num_classes=num_classes, gate_hidden=int(cb.gate_hidden),
                                      shared_trunk=not tuned)
    for m in lm_ensembles.METHODS:
      rows[f"{g} {m}"] = {**res[m], "depth": max(cost[n][0] for n in names), **gf[m]}
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

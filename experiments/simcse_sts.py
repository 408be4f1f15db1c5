"""SimCSE encoders on STS (seed 000, Table 3): pretrained encoder; per augmentation, K
fine-tuned seeds (vmapped), the best single one (picked on STS-B dev), the naive average of
their embeddings and the aligned average (the best one's space shared, the others mapped
into it by a fitted linear layer). Writes results.md/json, metrics.jsonl and a PNG."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import time

import jax
import numpy as np
import optax

from ensembling import losses, members, report, text, train
from ensembling import tree as tree_lib
from ensembling.data import sts
from ensembling.models import bert

SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


@contextlib.contextmanager
def prng_impl(name: str):
  """Sets jax's default PRNG for the duration of a run, then restores it."""
  old = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", name)
  try:
    yield
  finally:
    jax.config.update("jax_default_prng_impl", old)


def run(config, workdir: str) -> dict:
  with prng_impl(config.prng_impl):
    return _run(config, workdir)


def _shared_layers(mask, cfg) -> int:
  """How many bottom layers (with the embeddings) no member trains."""
  if mask is None or any(jax.tree.leaves(mask["embeddings"])):
    return 0
  for i in range(cfg.num_layers):
    if any(jax.tree.leaves(mask[f"layer_{i}"])):
      return i
  return cfg.num_layers


def _train_group(config, g, aug, pretrained, model, tok, sentences, log_f):
  k = int(config.members)
  batch_fn, _ = text.make_simcse_batch_fn(
      sentences, tok, seed=int(config.seed) + 1000 * g, batch_size=config.batch_size,
      num_members=k, max_length=config.model.max_length, augmentation=aug,
      delete_rate=config.delete_rate)
  steps = int(config.steps)
  schedule = optax.linear_schedule(config.optim.learning_rate, 0.0, steps)  # as SimCSE
  tx, mask = text.frozen_optimizer(
      optax.adamw(schedule, weight_decay=config.optim.weight_decay), pretrained,
      tuple(config.model.trainable))
  state = members.init_states(tree_lib.broadcast({"params": pretrained}, k), tx)
  strategy = members.resolve_strategy(config.members_strategy, state["params"])
  step_fn = members.ensemble_step(
      apply_fn=model.apply, tx=tx, num_members=k, strategy=strategy,
      loss_fn=functools.partial(losses.info_nce, temperature=config.temperature),
      step_fn=functools.partial(text.simcse_step, trainable=mask))
  t0 = time.time()
  state, _, history = train.fit(
      state, step_fn=step_fn, batch_fn=batch_fn, num_steps=steps,
      key=jax.random.key(int(config.seed) + 1 + g), workdir=None,
      eval_every=max(1, steps // 10), progress=config.progress,
      desc=f"SimCSE {aug} x{k} ({strategy})")
  seconds = time.time() - t0
  for r in history:
    log_f.write(json.dumps({"augmentation": aug, **r}) + "\n")
  return state["params"], mask, history, seconds, strategy


def _row(scores: dict, dev: float) -> dict:
  row = {SHORT.get(t, t): v["all"] for t, v in scores.items()}
  row["avg"] = float(np.mean([v["all"] for v in scores.values()]))
  row["STS-B dev"] = dev
  return row


def _run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  root = config.eval.data_root
  sentences = sts.training_sentences(root=root)
  if config.train_limit:
    sentences = sentences[:config.train_limit]
  path = config.model.path
  if path == "tiny_random":
    words = collections.Counter(w.lower() for s in sentences for w in re.findall(r"\w+|[^\w\s]", s))
    path = bert.write_random_bert(os.path.join(workdir, "tiny_bert"),
                                  [w for w, _ in words.most_common(400)], num_layers=1,
                                  seed=int(config.seed))
  else:
    path = bert.resolve_model_path(path)
  cfg = bert.bert_config_from_dir(path)
  tok = bert.load_tokenizer(path)
  pretrained = bert.load_pretrained_params(path, cfg)["params"]
  model = bert.Bert(cfg, pooling=config.model.pooling)

  tasks = sts.subsample_tasks(sts.load_sts_tasks(tuple(config.eval.tasks), root=root),
                              config.eval.max_pairs_per_task)
  dev = {"dev": {"dev": sts.subsample(sts.read_stsb("dev", root=root), config.eval.select_pairs)}}
  rng = np.random.default_rng(int(config.seed))
  n_fit = min(int(config.adapter.num_sentences), len(sentences))
  fit_sents = [sentences[i] for i in np.sort(rng.choice(len(sentences), n_fit, replace=False))]
  all_sents = sorted(set(text.unique_sentences(tasks)) | set(text.unique_sentences(dev))
                     | set(fit_sents))
  index = {s: i for i, s in enumerate(all_sents)}
  fit_rows = np.array([index[s] for s in fit_sents])

  timings, names, groups, mask, strategy = {}, ["pretrained"], [], None, "-"
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as log_f:
    for g, aug in enumerate(config.augmentations):
      params_K, mask, _, secs, strategy = _train_group(config, g, aug, pretrained, model, tok,
                                                       sentences, log_f)
      timings[f"train_{aug}_s"] = secs
      groups.append((aug, list(range(len(names), len(names) + int(config.members)))))
      names += [f"{aug} seed {m}" for m in range(int(config.members))]
      all_params = (jax.tree.map(lambda p, q: np.concatenate([np.asarray(p)[None], q]),
                                 pretrained, params_K) if g == 0 else
                    jax.tree.map(lambda a, q: np.concatenate([a, q]), all_params, params_K))
  shared = _shared_layers(mask, cfg)
  t0 = time.time()
  emb = text.encode_members(all_params, cfg, tok, all_sents, pooling=config.model.pooling,
                            max_length=config.eval.max_length,
                            batch_size=config.eval.batch_size, shared_layers=shared)
  timings["encode_s"] = time.time() - t0

  def score(e):
    return text.sts_spearman(tasks, index, e), text.sts_spearman(dev, index, e)["dev"]["all"]

  results = {"encoders": {}, "groups": {}}
  rows = []
  for j, name in enumerate(names):
    s, d = score(emb[j])
    results["encoders"][name] = {"sts": s, "stsb_dev": d}
    rows.append((name, _row(s, d)))
  for aug, idx in groups:
    devs = [results["encoders"][names[j]]["stsb_dev"] for j in idx]
    best = int(np.argmax(devs))
    gr = {"best": names[idx[best]], "members": [names[j] for j in idx]}
    rows.append((f"{aug}: best single ({names[idx[best]]}, by STS-B dev)",
                 _row(*score(emb[idx[best]]))))
    s, d = score(text.average_embeddings(emb[idx]))
    gr["naive"] = {"sts": s, "stsb_dev": d}
    rows.append((f"{aug}: naive average of {len(idx)}", _row(s, d)))
    for method in config.adapter.methods:
      adapters = text.align_members(emb[idx][:, fit_rows], anchor=best, method=method,
                                    l2=config.adapter.l2, steps=config.adapter.steps,
                                    learning_rate=config.adapter.learning_rate,
                                    seed=int(config.seed))
      s, d = score(text.average_embeddings(text.aligned_embeddings(emb[idx], adapters)))
      gr[f"aligned_{method}"] = {"sts": s, "stsb_dev": d}
      rows.append((f"{aug}: aligned average ({method})", _row(s, d)))
    results["groups"][aug] = gr

  columns = [SHORT.get(t, t) for t in config.eval.tasks] + ["avg", "STS-B dev"]
  results.update(table=rows, timings=timings, strategy=strategy, shared_layers=shared,
                 model_path=path, num_eval_pairs={t: sum(len(p) for p in v.values())
                                                  for t, v in tasks.items()},
                 num_eval_sentences=len(all_sents), num_train_sentences=len(sentences))
  report.write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# SimCSE on STS: Spearman x 100 of cosine similarity ({config.model.path})\n\n")
    f.write(report.markdown_table(rows, columns, digits=2))
    f.write(f"\n{config.members} members per augmentation, {config.steps} steps x "
            f"{config.batch_size} sentences, trained {list(config.model.trainable) or 'all'}, "
            f"strategy {strategy}. Eval pairs per task: {results['num_eval_pairs']}. "
            f"Timings (s): { {k: round(v, 1) for k, v in timings.items()} }\n")
  hist = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  curves = {}
  for aug, _ in groups:
    recs = [r for r in hist if r["augmentation"] == aug and r["member"] == 0]
    curves[f"{aug} (member 0)"] = [r["train_loss"] for r in recs]
  steps_axis = [r["step"] for r in hist if r["augmentation"] == groups[0][0] and r["member"] == 0]
  report.plot_curve(os.path.join(workdir, "train_loss.png"), steps_axis, curves,
                    xlabel="step", ylabel="SimCSE loss")
  return results

"""SimCSE encoders on STS (seed 000, Table 3): pretrained encoder; per augmentation, K
fine-tuned seeds (`text.fit_simcse`, vmapped), the best single one (picked on STS-B dev),
the naive average of their embeddings and the aligned average (the best one's space
shared, the others mapped into it by a fitted linear layer). Writes metrics.jsonl and a
PNG; main writes results.md/json."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import optax

from ensembling import report, text
from ensembling.data import sts
from ensembling.models import bert

SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


def _encoder(config, sentences, workdir):
  """(path, cfg, tokenizer, pretrained params, model) of `config.model`."""
  path = bert.encoder_folder(config.model.path, scratch_dir=workdir, sentences=sentences,
                            num_layers=1, seed=int(config.seed))
  cfg = bert.bert_config_from_dir(path)
  return (path, cfg, bert.load_tokenizer(path), bert.load_pretrained_params(path, cfg)["params"],
          bert.Bert(cfg, pooling=config.model.pooling))


def _train_group(config, g: int, aug: str, pretrained, model, tok, sentences):
  steps = int(config.steps)
  schedule = optax.linear_schedule(config.optim.learning_rate, 0.0, steps)  # as SimCSE
  return text.fit_simcse(
      pretrained, model, tok, sentences, num_members=int(config.members), num_steps=steps,
      batch_size=int(config.batch_size), max_length=int(config.model.max_length),
      tx=optax.adamw(schedule, weight_decay=config.optim.weight_decay),
      trainable=tuple(config.model.trainable), temperature=config.temperature,
      augmentation=aug, delete_rate=config.delete_rate, seed=int(config.seed) + 1000 * g,
      key=jax.random.key(int(config.seed) + 1 + g, impl=config.prng_impl),
      strategy=config.members_strategy, progress=config.progress)


def _row(scores: dict, dev: float) -> dict:
  row = {SHORT.get(t, t): v["all"] for t, v in scores.items()}
  row["avg"] = float(np.mean([v["all"] for v in scores.values()]))
  row["STS-B dev"] = dev
  return row


def run(config, workdir: str):
  root = config.eval.data_root
  sentences = sts.training_sentences(root=root)
  if config.train_limit:
    sentences = sentences[:config.train_limit]
  path, cfg, tok, pretrained, model = _encoder(config, sentences, workdir)
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

  timings, names, groups, params, curves = {}, ["pretrained"], [], [pretrained], {}
  mask, strategy, steps_axis = None, "-", None
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as log_f:
    for g, aug in enumerate(config.augmentations):
      res = _train_group(config, g, aug, pretrained, model, tok, sentences)
      mask, strategy = res.trainable, res.strategy
      timings[f"train_{aug}_s"] = res.seconds
      groups.append((aug, list(range(len(names), len(names) + int(config.members)))))
      names += [f"{aug} seed {m}" for m in range(int(config.members))]
      params.append(res.params_K)
      for r in res.history:
        log_f.write(json.dumps({"augmentation": aug, **r}) + "\n")
      first = [r for r in res.history if r["member"] == 0]
      curves[f"{aug} (member 0)"] = [r["train_loss"] for r in first]
      steps_axis = steps_axis or [r["step"] for r in first]
  all_params = jax.tree.map(lambda p, *q: np.concatenate([np.asarray(p)[None], *q]), *params)
  shared = text.shared_layers(mask, cfg.num_layers)
  t0 = time.time()
  emb = text.encode_members(all_params, cfg, tok, all_sents, pooling=config.model.pooling,
                            max_length=config.eval.max_length,
                            batch_size=config.eval.batch_size, shared_layers=shared)
  timings["encode_s"] = time.time() - t0

  def score(e):
    return text.sts_spearman(tasks, index, e), text.sts_spearman(dev, index, e)["dev"]["all"]

  results, rows = {"encoders": {}, "groups": {}}, []
  for j, name in enumerate(names):
    s, d = score(emb[j])
    results["encoders"][name] = {"sts": s, "stsb_dev": d}
    rows.append((name, _row(s, d)))
  for aug, idx in groups:
    best = int(np.argmax([results["encoders"][names[j]]["stsb_dev"] for j in idx]))
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
  markdown = (f"# SimCSE on STS: Spearman x 100 of cosine similarity ({config.model.path})\n\n"
              + report.markdown_table(rows, columns, digits=2)
              + f"\n{config.members} members per augmentation, {config.steps} steps x "
              f"{config.batch_size} sentences, trained {list(config.model.trainable) or 'all'}, "
              f"strategy {strategy}. Eval pairs per task: {results['num_eval_pairs']}. "
              f"Timings (s): { {k: round(v, 1) for k, v in timings.items()} }\n")
  report.plot_curve(os.path.join(workdir, "train_loss.png"), steps_axis, curves,
                    xlabel="step", ylabel="SimCSE loss")
  return results, markdown

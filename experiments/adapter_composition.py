"""Zero-shot adapter composition on 20 Newsgroups domains (issue 16); configs/adapter_composition.py.

MiniLM + tied MLM head (`adapters.fit_mlm` on `^mlm_head/`), six domain adapters trained as
vmapped members, then `composition`: five scorings x top-k x {parameter average, output
ensemble}, MLM perplexity on held-out posts, in-domain and leave-one-domain-out.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import adapters, composition, report, text
from ensembling import tree as tree_lib
from ensembling.data import newsgroups
from ensembling.models import bert


def _encoder(config, workdir, words):
  enc = config.encoder
  folder = bert.encoder_folder(enc.path, scratch_dir=workdir, sentences=words, num_layers=2,
                               seed=int(config.seed))
  cfg, tok = bert.bert_config_from_dir(folder), bert.load_tokenizer(folder)
  return cfg, tok, bert.load_pretrained_params(folder, cfg)["params"]


def _train(config, workdir, model, base, ids_by_domain, specials):
  """The MLM head on all domains (frozen encoder), then one adapter per domain."""
  seed, a = int(config.seed), len(ids_by_domain)
  init = model.init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32), train=False)["params"]
  params = tree_lib.transplant(base, init)  # pretrained encoder, fresh head and adapters
  h = config.head
  head = adapters.fit_mlm(
      params, model, adapters.make_mlm_batch_fn(
          [np.concatenate(ids_by_domain)], seed=seed, batch_size=int(h.batch_size),
          rate=float(config.mask_rate), stacked=False, **specials),
      trainable="^mlm_head/", tx=optax.adam(float(h.learning_rate)), num_steps=int(h.steps),
      seed=seed, workdir=os.path.join(workdir, "head"), progress=config.progress,
      desc="MLM head")
  fresh = adapters.init_adapters(head.params, model, num=a, seed=seed + 1)
  params_A = jax.vmap(lambda ad: bert.with_adapter(head.params, ad))(fresh)
  c = config.adapters
  res = adapters.fit_mlm(
      params_A, model, adapters.make_mlm_batch_fn(
          ids_by_domain, seed=seed + 2, batch_size=int(c.batch_size),
          rate=float(config.mask_rate), **specials),
      trainable=bert.ADAPTER_PATTERN, tx=optax.adam(float(c.learning_rate)),
      num_steps=int(c.steps), seed=seed + 3, stacked=True, workdir=os.path.join(workdir, "adapters"),
      progress=config.progress, desc=f"{a} domain adapters")
  return head, res


def run(config, workdir: str):
  raw = newsgroups.read_archive(config.posts.dir)
  p = config.posts
  dom = newsgroups.domain_texts(raw, train_per_domain=int(p.train_per_domain),
                                test_per_domain=int(p.test_per_domain), seed=int(config.seed))
  names = list(dom)
  cfg, tok, base = _encoder(config, workdir, [t for d in dom.values() for t in d["train"]])
  model = bert.BertMLM(cfg, adapter_size=int(config.adapter.size),
                       adapter_start=int(config.adapter.start),
                       lora_rank=int(config.adapter.lora_rank))
  length, specials = int(config.encoder.max_length), adapters.tokenizer_specials(tok)
  ids = [bert.tokenize(tok, dom[d]["train"], max_length=length) for d in names]
  head, res = _train(config, workdir, model, base, ids, specials)
  adapters_A = bert.adapter_params(res.params)
  a = len(names)

  test = [t for d in names for t in dom[d]["test"]]
  label = np.repeat(np.arange(a), [len(dom[d]["test"]) for d in names])
  batch = adapters.mask_tokens(bert.tokenize(tok, test, max_length=length),
                               rate=float(config.mask_rate), seed=(int(config.seed), 7),
                               replace=False, **specials)
  bs = int(config.encoder.batch_size)
  kw = dict(batch_size=bs, states=composition.shared_states(head.params, model, batch,
                                                            batch_size=bs))
  lp, ent = composition.adapter_log_probs(head.params, model, adapters_A, batch, **kw)
  zero = jax.tree.map(jnp.zeros_like, adapters_A)  # identity adapters, the compiled shape
  lp_base = composition.adapter_log_probs(head.params, model, zero, batch, **kw)[0][0]
  ppl = lambda x: composition.perplexity(x, batch["weights"])
  enc = lambda texts: text.encode_members(tree_lib.broadcast(base, 1), cfg, tok, texts,
                                          max_length=length, batch_size=bs)[0]
  n_cent = int(p.centroid_per_domain)
  cents = composition.centroids([enc(dom[d]["train"][:n_cent]) for d in names])
  counts = np.bincount([names.index(newsgroups.domain_of(g)) for g in raw["train"][1]],
                       minlength=a)
  scores = {"sentence": composition.cosine_scores(enc(test), cents),
            "tfidf": composition.tfidf_scores(test, [dom[d]["train"] for d in names]),
            "entropy": composition.entropy_scores(ent),
            "prior": composition.prior_scores(counts, len(test)), "uniform": None}
  settings = {"in": np.ones((len(test), a), bool), "out": np.arange(a)[None] != label[:, None]}
  table, rows = {}, []
  for strategy in composition.STRATEGIES:
    for combo in composition.COMBINATIONS:
      for k in range(1, a + 1):
        cell = {}
        for setting, av in settings.items():
          if k > int(av.sum(1).min()):
            continue
          w = composition.strategy_weights(
              strategy, k, scores_NxA=scores[strategy], num_adapters=a, num_texts=len(test),
              temperature=float(config.temperature.get(strategy, 1.0)), available=av,
              seed=int(config.seed))
          if combo == "ensemble" or k == 1:  # one adapter: averaging = ensembling
            v = ppl(composition.ensemble_log_probs(lp, w))
          else:
            v = ppl(composition.merged_log_probs(head.params, model, adapters_A, w, batch, **kw))
          cell[f"{setting} ppl"] = v
          cell[f"{setting} passes"] = composition.forward_passes(
              strategy, combo, k, int(av.sum(1).min()))
        table[f"{strategy}/{combo}/k={k}"] = cell
        rows.append((f"{strategy} / {combo} / k={k}", cell))
  refs = {"no adapter (MLM head only)": ppl(lp_base),
          "own-domain adapter (oracle, in-domain)": ppl(lp[label, np.arange(len(test))]),
          "routing accuracy of top-1 (in-domain)": {
              s: float(np.mean(np.argmax(v, 1) == label)) for s, v in scores.items()
              if v is not None and s != "prior"}}
  wins = [table[f"{s}/ensemble/k={k}"][f"{st} ppl"] < table[f"{s}/average/k={k}"][f"{st} ppl"]
          for s in composition.STRATEGIES for k in range(2, a + 1) for st in settings
          if f"{st} ppl" in table[f"{s}/average/k={k}"]]
  cols = ("in ppl", "in passes", "out ppl", "out passes")
  md = (f"# Zero-shot adapter composition: {a} 20 Newsgroups domains, MLM perplexity on "
        f"{len(test)} held-out posts ({int(batch['weights'].sum())} masked tokens)\n\n"
        + report.markdown_table(rows, cols, digits=3)
        + f"\nNo adapter: {refs['no adapter (MLM head only)']:.3f}; own-domain adapter "
        f"(oracle): {refs['own-domain adapter (oracle, in-domain)']:.3f}. Output ensembling "
        f"beats parameter averaging in {sum(wins)} of {len(wins)} (strategy, k >= 2, "
        f"setting) cells. Top-1 routing accuracy: "
        + ", ".join(f"{s} {v:.3f}" for s, v in refs["routing accuracy of top-1 (in-domain)"].items())
        + f". Training: head {head.seconds:.0f}s, adapters {res.seconds:.0f}s.\n")
  out = {"table": table, "references": refs, "ensemble_wins": [int(sum(wins)), len(wins)],
         "domains": names, "texts": len(test), "masked_tokens": int(batch["weights"].sum()),
         "seconds": {"head": head.seconds, "adapters": res.seconds},
         "train_loss": {"head": [r["train_loss"] for r in head.history],
                        "adapters": [r["train_loss"] for r in res.history]}}
  return out, md

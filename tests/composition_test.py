"""Zero-shot adapter composition (issue 16, part 2): scores, top-k weights, combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import adapters, composition
from ensembling.data import newsgroups
from ensembling.models import bert


def test_top_k_weights_match_a_loop():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(7, 5))
  av = rng.random((7, 5)) > 0.3
  av[:, 0] = av[:, 1] = True
  for k in (1, 2):
    w = composition.top_k_weights(s, k, temperature=0.5, available=av)
    for n in range(7):
      idx = [a for a in np.argsort(-s[n], kind="stable") if av[n, a]][:k]
      ref = np.zeros(5)
      ref[idx] = np.exp(s[n, idx] / 0.5) / np.exp(s[n, idx] / 0.5).sum()
      np.testing.assert_allclose(w[n], ref, atol=1e-12)
  u = composition.strategy_weights("uniform", 2, num_adapters=5, num_texts=7, available=av)
  assert ((u == 0) | np.isclose(u, 0.5)).all() and not (u[~av] > 0).any()


def test_bad_weights_and_k_are_refused():
  s = np.zeros((2, 3))
  with pytest.raises(ValueError, match="k must be in"):
    composition.top_k_weights(s, 4)
  with pytest.raises(ValueError, match="k must be in"):
    composition.top_k_weights(s, 3, available=~np.eye(3, dtype=bool)[:2])  # 2 left per text
  with pytest.raises(ValueError, match="NaN"):
    composition.top_k_weights(np.array([[np.nan, 0.0]]), 1)
  with pytest.raises(ValueError, match="sum to one"):
    composition.check_weights([[0.5, 0.4]], 2)
  with pytest.raises(ValueError, match="non-negative"):
    composition.check_weights([[1.5, -0.5]], 2)
  with pytest.raises(ValueError, match="one per adapter"):
    composition.check_weights([[1.0]], 2)
  with pytest.raises(ValueError, match="excluded"):
    composition.check_weights([[1.0, 0.0]], 2, available=[[False, True]])
  with pytest.raises(ValueError, match="Unknown strategy"):
    composition.strategy_weights("oracle", 1, scores_NxA=s)
  with pytest.raises(ValueError, match="positive"):
    composition.prior_scores([3, 0], 2)


def test_ensemble_is_the_mixture_and_average_the_weighted_parameter_sum():
  rng = np.random.default_rng(1)
  p = rng.dirichlet(np.ones(4), size=(3, 2, 5))[..., 0]  # (A, N, P) probabilities of a token
  w = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
  ref = np.einsum("na,anp->np", w, p)
  np.testing.assert_allclose(np.exp(composition.ensemble_log_probs(np.log(p), w)), ref, rtol=1e-10)
  ads = [{"up": {"kernel": jnp.full((2, 3), float(a))}} for a in range(3)]
  merged = composition.merge_adapters(ads, w)
  np.testing.assert_allclose(merged["up"]["kernel"][:, 0, 0], w @ np.arange(3.0), rtol=1e-6)
  with pytest.raises(ValueError):
    composition.merge_adapters(ads[:2] + [{"up": {"kernel": jnp.zeros((3, 3))}}], w)
  lp, mask = np.log(np.full((2, 3), 0.5)), np.array([[1, 1, 0], [1, 0, 0]], float)
  assert composition.perplexity(lp, mask) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="No scored"):
    composition.perplexity(lp, 0 * mask)


def test_scores():
  c = composition.centroids([np.array([[1.0, 0.0], [3.0, 0.1]]), np.array([[0.0, 2.0]])])
  s = composition.cosine_scores(np.array([[5.0, 0.2], [0.1, 1.0]]), c)
  assert (np.argmax(s, 1) == [0, 1]).all()
  t = composition.tfidf_scores(["the goalie saved the puck"],
                               [["compiler error in the kernel", "gcc kernel build"],
                                ["hockey goalie puck", "the puck and the goalie"]])
  assert np.argmax(t[0]) == 1
  np.testing.assert_array_equal(composition.entropy_scores(np.array([[1.0, 2.0]])), [[-1.0], [-2.0]])
  with pytest.raises(ValueError, match="no embeddings"):
    composition.centroids([np.zeros((0, 2))])
  with pytest.raises(ValueError, match="no text"):
    composition.tfidf_scores(["a"], [["b c"], []])
  assert composition.forward_passes("tfidf", "ensemble", 3, 6) == 3
  assert composition.forward_passes("entropy", "ensemble", 2, 6) == 6
  assert composition.forward_passes("uniform", "average", 4, 6) == 1


def test_merged_and_per_adapter_passes_agree_with_the_module():
  """One-hot weights: the averaged adapter is that adapter; equal adapters: any mix is it."""
  cfg = bert.BertConfig(vocab_size=30, hidden_size=8, num_layers=2, num_heads=2,
                        intermediate_size=16, max_position_embeddings=12)
  model = bert.BertMLM(cfg, adapter_size=4, adapter_start=1)
  ids = np.random.default_rng(0).integers(5, 30, size=(5, 8)).astype(np.int32)
  batch = adapters.mask_tokens(ids, rate=0.3, seed=0, replace=False, mask_id=4,
                               special_ids=(0, 1, 2, 3, 4), vocab_size=30)
  p = model.init(jax.random.key(0), jnp.asarray(ids), train=False)["params"]
  ads = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(x.size), (3,) + x.shape[1:]),
                     adapters.init_adapters(p, model, num=3, seed=0))
  lp, ent = composition.adapter_log_probs(p, model, ads, batch, batch_size=4)
  assert lp.shape == (3, 5, batch["positions"].shape[1]) and ent.shape == (3, 5)
  # Reference: the module itself with adapter 1 put in.
  logits = model.apply({"params": bert.with_adapter(p, jax.tree.map(lambda x: x[1], ads))},
                       batch["ids"], batch["positions"], train=False).logits
  np.testing.assert_allclose(lp[1], adapters.token_log_probs(logits, batch["targets"]), atol=1e-5)
  onehot = np.eye(3)[[0, 2, 1, 1, 0]]
  merged = composition.merged_log_probs(p, model, ads, onehot, batch, batch_size=4)
  np.testing.assert_allclose(merged, lp[[0, 2, 1, 1, 0], np.arange(5)], atol=1e-5)
  same = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), ads)
  mix = composition.merged_log_probs(p, model, same, np.full((5, 3), 1 / 3), batch, batch_size=4)
  np.testing.assert_allclose(mix, composition.adapter_log_probs(p, model, same, batch)[0][0],
                             atol=1e-5)
  with pytest.raises(ValueError, match="sum to one"):
    composition.merged_log_probs(p, model, ads, np.full((5, 3), 0.5), batch)


def test_domains():
  raw = {"train": (["H: x\n\nbody one here"] * 3 + ["H\n\nalt text is here"],
                   ["comp.graphics", "rec.autos", "talk.religion.misc", "alt.atheism"]),
         "test": (["H\n\nanother body text"] * 4,
                  ["comp.graphics", "rec.autos", "talk.politics.guns", "soc.religion.christian"])}
  d = newsgroups.domain_texts(raw, train_per_domain=0, test_per_domain=0, min_chars=5,
                              domains=("comp", "rec", "talk", "religion"))
  assert d["religion"] == {"train": ["alt text is here"], "test": ["another body text"]}
  assert d["talk"]["train"] == ["body one here"]  # talk.religion.misc stays under talk
  with pytest.raises(ValueError, match="Unknown domain"):
    newsgroups.domain_texts(raw, train_per_domain=0, test_per_domain=0, domains=("comp", "x"))
  with pytest.raises(ValueError, match="no train text"):
    newsgroups.domain_texts(raw, train_per_domain=0, test_per_domain=0, domains=("misc",))
  with pytest.raises(ValueError, match="belongs to no domain"):
    newsgroups.domain_of("news.announce")

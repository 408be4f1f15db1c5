"""Ensembles of small language models: Shallow, Semi and Deep (Tyagi et al.).

Tyagi, Sarkar & Gaur, "Simple is Better and Large is Not Enough: Towards Ensembling of
Foundational Language Models" (2023) combine several fine-tuned language models three
ways and find ensembles of small models competitive with, or better than, one large one.
Here, as plain functions on member-axis-first arrays (K members, N examples):

- Members. `truncate` turns a `models.bert` encoder into a smaller one by keeping its first
  L layers (MiniLM-L6 -> L2/L3/L4); `finetune_init` stacks K copies of it with their own
  classifier heads for fine-tuning on the member axis; `pair_features` makes a sentence-pair input
  [u, v, |u - v|, u * v] (the InferSent / Sentence-BERT classifier input) for SICK.
- Shallow ensemble: `shallow_probs` (weighted average of the members' probabilities) and
  `vote` (majority vote; ties to the class with the larger averaged probability).
- Semi ensemble: `fit_semi` / `semi_probs`, the members' sentence embeddings concatenated
  under one trained softmax layer. This is SuperNet stacking (`supernet.concat_features`,
  `supernet.init_head`, `supernet.fit_head`, which trains with `train.fit`).
- Deep ensemble: `fit_gate` / `deep_probs`, a small gate (one hidden ReLU layer over the
  concatenated member embeddings) that outputs per-example weights over the members; the
  prediction is the gate-weighted mixture of the members' probabilities. The gate is a
  policy: per training example it samples one member, gets reward 1 when that member's
  prediction is correct (0 otherwise), and is trained by REINFORCE (`reinforce_loss`) with
  the expected reward under the current policy as baseline, plus an optional entropy
  bonus, through `train.fit`.
- Cost: `encoder_flops` / `mlp_flops` (analytic forward FLOPs per example) and
  `macro_f1`.

Departures from the paper (stated plainly):
- The paper's Deep ensemble uses a knowledge-guided reinforcement-learning reward; that
  reward is NOT reproduced. Ours is the bare 0/1 reward for a correct prediction of the
  sampled member, with a REINFORCE baseline.
- The paper fine-tunes whole foundation models (BERT, RoBERTa, ...). `finetune_init`
  makes such members from MiniLM and its truncations (the encoder fine-tuned end to end
  with a linear head; `config.finetune.enabled` in the experiment), at a budget our 2 CPU
  cores allow; by default the experiment keeps MiniLM frozen and trains only a classifier
  (an MLP) on its cached sentence embeddings. Members of one depth differ by seed, data
  order and learning rate. See docs/lm_ensembles.md.
- The Semi head and the Deep gate are trained on a held-out "stack" split that the members
  never saw (on the members' own training data they are almost always right, which would
  leave the gate nothing to learn).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import checks, members, metrics, supernet, text, train
from ensembling.models import bert
from ensembling.models.linear import apply_linear, init_linear

PyTree = Any


# --------------------------------------------------------------------------- tasks

TASKS = ("newsgroups", "sick")


def task_splits(task: str, root: str, *, seed: int, train: int = 0, stack: int = 0,
                test: int = 0) -> tuple[dict[str, tuple[Any, np.ndarray]], int]:
  """A text classification task's {"train", "stack", "test"}: (texts, labels), and C.

  "newsgroups": 20 Newsgroups topics, texts a list of posts (`newsgroups.topic_splits`);
  "sick": SICK entailment, texts a pair (sentences_a, sentences_b) of lists
  (`sick.entailment_splits`). Sizes are seeded random subsets (0: all); `root` holds the
  data folders (../shared/data).
  """
  from ensembling.data import newsgroups, sick
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
  kw = dict(seed=int(seed), train=train, stack=stack, test=test)
  if task == "newsgroups":
    splits, names = newsgroups.topic_splits(root, **kw)
    return splits, len(names)
  return sick.entailment_splits(root, **kw), len(sick.LABELS)


def task_sentences(task: str, texts) -> list[str]:
  """The sentences of one split's texts (`task_splits`): the posts, or both sides of the pairs."""
  return list(texts) if task == "newsgroups" else list(texts[0]) + list(texts[1])


def task_ids(task: str, tokenizer, splits: Mapping[str, Any], *, max_length: int
             ) -> dict[str, np.ndarray]:
  """{split: token ids (N, max_length)} of `task_splits`' texts; SICK's pair as one
  cross-encoder input "[CLS] a [SEP] b [SEP]" (`bert.tokenize(pairs_with=...)`)."""
  m = int(max_length)
  return {s: bert.tokenize(tokenizer, x, max_length=m) if task == "newsgroups" else
          bert.tokenize(tokenizer, x[0], max_length=m, pairs_with=x[1])
          for s, (x, _) in splits.items()}


# --------------------------------------------------------------------------- members

def truncate(params: Mapping[str, Any], cfg: bert.BertConfig, num_layers: int
             ) -> tuple[dict, bert.BertConfig]:
  """The encoder keeping only its first `num_layers` layers: (params, config).

  `bert.Bert(cfg_L).apply({"params": params_L}, ids)` then equals pooling the full
  encoder's token states after layer L (what `text.encode_depths` computes in one pass).

  Args:
    params: `Bert` params (without the "params" key): embeddings, layer_0..layer_{N-1}
      and optionally a head.
    cfg: their architecture.
    num_layers: L in [1, cfg.num_layers].

  Returns:
    (params without layers L..N-1, `cfg` with num_layers=L).

  >>> cfg = bert.BertConfig(vocab_size=10, num_layers=3)
  >>> p, c = truncate({"embeddings": {}, "layer_0": {}, "layer_1": {}, "layer_2": {}}, cfg, 2)
  >>> sorted(p), c.num_layers
  (['embeddings', 'layer_0', 'layer_1'], 2)
  """
  if isinstance(num_layers, bool) or not 1 <= int(num_layers) <= cfg.num_layers:
    raise ValueError(f"num_layers must be in [1, {cfg.num_layers}], got {num_layers!r}.")
  missing = [f"layer_{i}" for i in range(cfg.num_layers) if f"layer_{i}" not in params]
  if missing or "embeddings" not in params:
    raise ValueError(f"params do not match a {cfg.num_layers}-layer Bert: missing "
                     f"{(['embeddings'] if 'embeddings' not in params else []) + missing}.")
  num_layers = int(num_layers)
  dropped = {f"layer_{i}" for i in range(num_layers, cfg.num_layers)}
  return ({k: v for k, v in params.items() if k not in dropped},
          dataclasses.replace(cfg, num_layers=num_layers))


def finetune_init(key: jax.Array, params: Mapping[str, Any], cfg: bert.BertConfig, *,
                  num_layers: int, num_members: int, num_classes: int,
                  pooling: str = "mean") -> tuple[bert.Bert, dict]:
  """K classifiers that fine-tune a pretrained encoder's first `num_layers` layers.

  Every member starts from the same truncated encoder (`truncate`), copied onto the
  member axis, with its own randomly initialised linear head on the pooled features
  (member k from `split(key, K)[k]`, as `members.init_members` does); train them with
  `train.train_members(model, ids, labels, init_variables=variables_K, ...)`, which runs
  the members of one depth on the member axis, and read their probabilities and pooled
  embeddings with `members.predict(model, state, ids, with_features=True)`.

  Args:
    key: PRNG key of the heads.
    params: pretrained `Bert` params (no "params" key); a "head" in them is replaced.
    cfg: their architecture.
    num_layers: L, the layers kept (`truncate`).
    num_members: K.
    num_classes: C, the heads' outputs.
    pooling: "mean" or "cls" (`bert.Bert`).

  Returns:
    (`bert.Bert(cfg_L, pooling=pooling, num_classes=C)`, {"params": stacked (K, ...)}).
  """
  checks.integer(num_classes, name="num_classes", low=2)
  k = members.check_num_members(num_members)
  enc, cfg_l = truncate({n: v for n, v in params.items() if n != "head"}, cfg, num_layers)
  model = bert.Bert(cfg_l, pooling=pooling, num_classes=int(num_classes))
  heads = members.init_members(key, nn.Dense(int(num_classes)),
                               jnp.zeros((1, cfg.hidden_size)), k)["params"]
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (k,) + np.shape(x)), enc)
  return model, {"params": {**stacked, "head": heads}}


def frozen_features(params: Mapping[str, Any], cfg: bert.BertConfig, tokenizer,
                    texts: Mapping[str, Any], *, pairs: bool, depths: Sequence[int],
                    max_length: int, batch_size: int = 64
                    ) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """Frozen-encoder member inputs after each of `depths` layers, per split.

  Every distinct text is encoded once for all depths (`text.encode_depths`, mean pooling).

  Args:
    params, cfg, tokenizer: the pretrained encoder.
    texts: {split: texts_N} or, with `pairs`, {split: (a_N, b_N)}.
    pairs: sentence pairs: the features are `pair_features(u, v)`.
    depths: layer counts L.
    max_length, batch_size: tokens per text, texts per forward pass.

  Returns:
    ({L: {split: (N, F)}}, {split: (N, 1 or 2) token counts of each text}).
  """
  cols = {s: [list(x[0]), list(x[1])] if pairs else [list(x)] for s, x in texts.items()}
  unique = sorted({t for c in cols.values() for col in c for t in col})
  row = {t: i for i, t in enumerate(unique)}
  emb = text.encode_depths(params, cfg, tokenizer, unique, depths=tuple(depths),
                           max_length=int(max_length), batch_size=int(batch_size))
  length = (bert.tokenize(tokenizer, unique, max_length=int(max_length))
            != cfg.pad_token_id).sum(1)
  feats, lens = {int(d): {} for d in depths}, {}
  for s, c in cols.items():
    rows = [np.array([row[t] for t in col]) for col in c]
    lens[s] = np.stack([length[r] for r in rows], 1)
    for d in depths:
      e = [emb[d][r] for r in rows]
      feats[int(d)][s] = e[0] if len(e) == 1 else pair_features(*e)
  return feats, lens


def pair_features(u_NxD, v_NxD) -> np.ndarray:
  """[u, v, |u - v|, u * v]: (N, 4D), the classifier input of a sentence pair.

  >>> pair_features(np.array([[1.0, 2.0]]), np.array([[3.0, 0.0]])).tolist()
  [[1.0, 2.0, 3.0, 0.0, 2.0, 2.0, 3.0, 0.0]]
  """
  u, v = np.asarray(u_NxD), np.asarray(v_NxD)
  if u.ndim != 2 or u.shape != v.shape:
    raise ValueError(f"Expected two (N, D) arrays of one shape, got {u.shape} and {v.shape}.")
  return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def check_member_probs(probs_KxNxC) -> np.ndarray:
  """`probs_KxNxC` as float64 after checking: (K, N, C), K >= 1, every row a distribution."""
  p = np.asarray(probs_KxNxC, np.float64)
  if p.ndim != 3:
    raise ValueError(f"Expected member probabilities of shape (K, N, C), got {p.shape}.")
  if p.shape[0] == 0 or p.shape[1] == 0:
    raise ValueError(f"Need at least one member and one example, got shape {p.shape}.")
  for k in range(p.shape[0]):
    metrics.check_probs(p[k], what=f"member {k}'s probs")
  return p


def check_weights(weights_K, num_members: int, *, atol: float = 1e-6) -> np.ndarray:
  """Member weights as float64 after checking: K finite, non-negative values summing to one.

  >>> check_weights([0.25, 0.75], 2).tolist()
  [0.25, 0.75]
  """
  w = np.asarray(weights_K, np.float64)
  if w.shape != (num_members,):
    raise ValueError(f"Need one weight per member: shape ({num_members},), got {w.shape}.")
  if not np.isfinite(w).all() or (w < 0).any():
    raise ValueError(f"Weights must be finite and non-negative, got {w.tolist()}.")
  if abs(w.sum() - 1.0) > atol:
    raise ValueError(f"Weights must sum to one, got sum {w.sum():.6g} ({w.tolist()}).")
  return w


def _labels(labels_N, num_examples: int, num_classes: int) -> np.ndarray:
  y = np.asarray(labels_N)
  if y.shape != (num_examples,):
    raise ValueError(f"Expected {num_examples} labels, got shape {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= num_classes).any():
    raise ValueError(f"Labels must be integers in [0, {num_classes}).")
  return y


# --------------------------------------------------------------------------- shallow

def shallow_probs(probs_KxNxC, *, weights=None) -> np.ndarray:
  """The Shallow ensemble's probabilities: the (weighted) mean over members, (N, C).

  Args:
    probs_KxNxC: the members' predicted distributions.
    weights: K non-negative weights summing to one (None: 1/K each).

  >>> shallow_probs(np.array([[[1.0, 0.0]], [[0.5, 0.5]]])).tolist()
  [[0.75, 0.25]]
  """
  p = check_member_probs(probs_KxNxC)
  if weights is None:
    return p.mean(0)
  return np.tensordot(check_weights(weights, p.shape[0]), p, axes=1)


def vote(probs_KxNxC, *, weights=None) -> tuple[np.ndarray, np.ndarray]:
  """Majority (or weighted) voting over the members' argmax predictions.

  Args:
    probs_KxNxC: the members' predicted distributions.
    weights: K non-negative weights summing to one (None: one vote each).

  Returns:
    (shares (N, C): the weighted fraction of members voting for each class,
     predictions (N,): the class with the most votes; ties go to the tied class with
     the larger `shallow_probs`, then to the lowest index).

  >>> p = np.array([[[0.6, 0.4, 0.0]], [[0.0, 0.4, 0.6]]])  # one vote each for 0 and 2
  >>> shares, pred = vote(p)
  >>> shares.tolist(), pred.tolist()
  ([[0.5, 0.0, 0.5]], [0])
  """
  p = check_member_probs(probs_KxNxC)
  k, n, c = p.shape
  w = np.full(k, 1.0 / k) if weights is None else check_weights(weights, k)
  shares = np.zeros((n, c))
  for m in range(k):
    shares[np.arange(n), p[m].argmax(-1)] += w[m]
  mean = np.tensordot(w, p, axes=1)
  top = np.isclose(shares, shares.max(-1, keepdims=True), rtol=0.0, atol=1e-12)
  pred = np.where(top, mean, -np.inf).argmax(-1)
  return shares, pred


# --------------------------------------------------------------------------- semi

def _check_embeddings(emb_KxNxD) -> jax.Array:
  e = jnp.asarray(emb_KxNxD, jnp.float32)
  if e.ndim != 3 or 0 in e.shape:
    raise ValueError(f"Expected member embeddings of shape (K, N, D), K, N, D >= 1, got "
                     f"{e.shape}.")
  if not bool(jnp.isfinite(e).all()):
    raise ValueError("Member embeddings contain NaN or inf.")
  return e


def fit_semi(emb_KxNxD, labels_N, *, num_classes: int, tx: optax.GradientTransformation,
             epochs: int, batch_size: int = 128, seed: int = 0, l2: float = 0.0,
             dropout: float = 0.0, eval_sets: Mapping[str, tuple[Any, Any]] | None = None,
             best_by: str | None = None) -> tuple[dict, list[dict]]:
  """The Semi ensemble: one softmax layer over the members' concatenated embeddings.

  Args:
    emb_KxNxD: the K members' sentence embeddings of N training examples.
    labels_N: their labels.
    num_classes: C.
    tx, epochs, batch_size, seed, l2, dropout, best_by: as `supernet.fit_head` (the head
      starts from `supernet.init_head(init="random")` with key `seed`).
    eval_sets: {name: (emb_KxMxD, labels_M)} evaluated after every epoch.

  Returns:
    (head {"kernel": (K*D, C), "bias": (C,)}, history of `supernet.fit_head`).
  """
  e = _check_embeddings(emb_KxNxD)
  y = _labels(labels_N, e.shape[1], num_classes)
  head = supernet.init_head(jax.random.key(seed), num_features=e.shape[0] * e.shape[2],
                            num_classes=num_classes)
  evals = {n: (supernet.concat_features(_check_embeddings(f)), yv)
           for n, (f, yv) in (eval_sets or {}).items()}
  return supernet.fit_head(head, supernet.concat_features(e), y, tx=tx, epochs=epochs,
                           batch_size=min(batch_size, e.shape[1]), seed=seed, l2=l2,
                           dropout=dropout, eval_sets=evals, best_by=best_by)


def semi_probs(head: Mapping[str, Any], emb_KxNxD) -> np.ndarray:
  """The Semi ensemble's probabilities (N, C) on new examples."""
  return supernet.head_probs(head, supernet.concat_features(_check_embeddings(emb_KxNxD)))


# --------------------------------------------------------------------------- deep

def init_gate(key: jax.Array, *, num_members: int, feature_dim: int, hidden: int = 64
              ) -> dict[str, dict]:
  """The Deep ensemble's gate: K*D -> hidden (ReLU) -> K member logits.

  The output layer starts at zero, so the initial gate weights every member 1/K (the
  Shallow ensemble).
  """
  if num_members < 1 or feature_dim < 1 or hidden < 1:
    raise ValueError(f"num_members, feature_dim and hidden must be >= 1, got {num_members}, "
                     f"{feature_dim}, {hidden}.")
  hid = init_linear(key, num_members * feature_dim, hidden)
  out = jax.tree.map(jnp.zeros_like, init_linear(key, hidden, num_members))
  return {"hidden": hid, "out": out}


def gate_logits(gate: Mapping[str, Any], features_NxF) -> jax.Array:
  """The gate's member logits (N, K) for concatenated member embeddings (N, K*D)."""
  return apply_linear(gate["out"], jax.nn.relu(apply_linear(gate["hidden"], features_NxF)))


def gate_weights(gate: Mapping[str, Any], emb_KxNxD) -> np.ndarray:
  """Per-example member weights (N, K): softmax of the gate's logits; rows sum to one."""
  e = _check_embeddings(emb_KxNxD)
  k = gate["out"]["kernel"].shape[1]
  if e.shape[0] != k:
    raise ValueError(f"The gate weights {k} members, got embeddings of {e.shape[0]}.")
  return np.asarray(jax.nn.softmax(gate_logits(gate, supernet.concat_features(e)), -1))


def member_correct(probs_KxNxC, labels_N) -> np.ndarray:
  """(N, K) float32: 1 where member k's argmax is example n's label (the reward table)."""
  p = check_member_probs(probs_KxNxC)
  y = _labels(labels_N, p.shape[1], p.shape[2])
  return (p.argmax(-1) == y[None]).T.astype(np.float32)


def reinforce_loss(gate: Mapping[str, Any], batch: Mapping[str, jax.Array], key: jax.Array,
                   *, entropy: float = 0.0) -> tuple[jax.Array, dict]:
  """REINFORCE for the gate on one batch: `(loss, {"reward", "expected_reward"})`.

  For example n the gate's policy pi(.|x_n) = softmax(gate_logits) samples member a_n;
  the reward r_n = correct[n, a_n] is 1 when that member predicts the label. With the
  baseline b_n = sum_k pi(k|x_n) correct[n, k] (the expected reward, held constant),

      loss = -mean_n (r_n - b_n) log pi(a_n|x_n) - entropy * mean_n H(pi(.|x_n)),

  whose gradient is, in expectation over the samples, -grad mean_n E_pi[r_n] minus the
  entropy bonus's gradient.

  Args:
    gate: `init_gate` params.
    batch: {"x": (B, K*D) concatenated embeddings, "y": (B, K) `member_correct` rows}.
    key: the PRNG key of the sampled members.
    entropy: weight of the entropy bonus (>= 0).
  """
  logits = gate_logits(gate, batch["x"])
  logp = jax.nn.log_softmax(logits, -1)
  correct = batch["y"].astype(logits.dtype)
  a = jax.random.categorical(key, logits, axis=-1)
  rows = jnp.arange(logits.shape[0])
  reward = correct[rows, a]
  probs = jnp.exp(logp)
  baseline = jax.lax.stop_gradient(jnp.sum(probs * correct, -1))
  loss = -jnp.mean((reward - baseline) * logp[rows, a])
  if entropy:
    loss = loss + entropy * jnp.mean(jnp.sum(probs * logp, -1))
  return loss, {"reward": jnp.mean(reward), "expected_reward": jnp.mean(baseline)}


def fit_gate(emb_KxNxD, probs_KxNxC, labels_N, *, tx: optax.GradientTransformation,
             num_steps: int, batch_size: int = 128, hidden: int = 64, entropy: float = 0.0,
             seed: int = 0, progress: bool = False) -> tuple[dict, list[dict]]:
  """The Deep ensemble: trains the gate by REINFORCE (`reinforce_loss`) with `train.fit`.

  Args:
    emb_KxNxD: the members' embeddings of the gate's training examples.
    probs_KxNxC: the members' probabilities on the same examples (the rewards).
    labels_N: their labels.
    tx: the gate's optimizer.
    num_steps: gradient steps (each on `batch_size` examples, reshuffled every epoch).
    batch_size: examples per step (at most N).
    hidden: the gate's hidden width.
    entropy: the entropy bonus weight.
    seed: the gate's init, data order and sampled members.
    progress: a progress bar.

  Returns:
    (gate, history): the `train.fit` records (train_loss, train_reward,
    train_expected_reward).
  """
  e = _check_embeddings(emb_KxNxD)
  p = check_member_probs(probs_KxNxC)
  if p.shape[:2] != e.shape[:2]:
    raise ValueError(f"Embeddings {e.shape} and probabilities {p.shape} must cover the same "
                     "members and examples.")
  if num_steps < 1 or batch_size < 1 or entropy < 0:
    raise ValueError(f"Need num_steps >= 1, batch_size >= 1, entropy >= 0; got {num_steps}, "
                     f"{batch_size}, {entropy}.")
  correct = member_correct(p, labels_N)
  feats = np.asarray(supernet.concat_features(e))
  gate = init_gate(jax.random.key(seed), num_members=e.shape[0], feature_dim=e.shape[2],
                   hidden=hidden)
  batch_fn, _ = train.make_batch_fn(feats, correct, seed=seed,
                                    batch_size=min(batch_size, e.shape[1]))
  step = train.pytree_step(functools.partial(reinforce_loss, entropy=float(entropy)), tx,
                           has_aux=True)
  state, _, history = train.fit(train.init_pytree_state(gate, tx), step_fn=step,
                                batch_fn=batch_fn, num_steps=int(num_steps),
                                key=jax.random.key(seed + 1),
                                eval_every=max(1, int(num_steps) // 10), progress=progress,
                                desc="Deep-ensemble gate")
  return state["params"], history


def deep_probs(gate: Mapping[str, Any], emb_KxNxD, probs_KxNxC) -> np.ndarray:
  """The Deep ensemble's probabilities: sum_k w_k(x) p_k(x) with the gate's weights, (N, C)."""
  p = check_member_probs(probs_KxNxC)
  w = gate_weights(gate, emb_KxNxD)
  if w.shape != p.shape[1::-1]:
    raise ValueError(f"Embeddings give weights {w.shape} but there are probabilities "
                     f"{p.shape}.")
  return np.einsum("nk,knc->nc", w, p)


# --------------------------------------------------------------------------- evaluation

def macro_f1(preds_N, labels_N, *, num_classes: int) -> float:
  """The unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

  A class absent from both predictions and labels is skipped (its F1 is undefined).

  >>> macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), num_classes=2)
  0.6666666666666666
  """
  pr, y = np.asarray(preds_N), _labels(labels_N, len(np.asarray(preds_N)), num_classes)
  f1 = []
  for c in range(num_classes):
    tp = np.sum((pr == c) & (y == c))
    denom = 2 * tp + np.sum((pr == c) & (y != c)) + np.sum((pr != c) & (y == c))
    if denom:
      f1.append(2 * tp / denom)
  return float(np.mean(f1))


def scores(probs_NxC, labels_N, *, preds_N=None, num_bins: int = 15) -> dict[str, float]:
  """Accuracy, macro-F1, NLL and ECE of one predictor (preds default to the argmax).

  With `preds_N` given (voting), accuracy and macro-F1 use them and NLL/ECE the `probs`.
  """
  p = metrics.check_probs(probs_NxC)
  y = _labels(labels_N, p.shape[0], p.shape[1])
  pred = p.argmax(-1) if preds_N is None else np.asarray(preds_N)
  return {"accuracy": float(np.mean(pred == y)),
          "macro_f1": macro_f1(pred, y, num_classes=p.shape[1]),
          "nll": metrics.nll(p, y), "ece": metrics.ece(p, y, num_bins=num_bins)}


def encoder_flops(cfg: bert.BertConfig, *, num_layers: int, seq_len: float) -> float:
  """Forward FLOPs (2 per multiply-add) of `num_layers` BERT layers on one sequence.

  Per layer: the Q, K, V and output projections 4 L D^2, the feed-forward 2 L D I, and
  the attention scores and mixing 2 L^2 D multiply-adds (L = `seq_len`, D hidden, I
  intermediate). Embedding lookups, LayerNorms, softmax and pooling are not counted.

  >>> cfg = bert.BertConfig(vocab_size=10, hidden_size=2, intermediate_size=4, num_layers=1)
  >>> encoder_flops(cfg, num_layers=1, seq_len=3)  # 2 * (4*3*4 + 2*3*2*4 + 2*9*2)
  264.0
  """
  if not 0 <= num_layers <= cfg.num_layers or seq_len < 0:
    raise ValueError(f"Need num_layers in [0, {cfg.num_layers}] and seq_len >= 0, got "
                     f"{num_layers} and {seq_len}.")
  d, i, length = cfg.hidden_size, cfg.intermediate_size, float(seq_len)
  per_layer = 4 * length * d * d + 2 * length * d * i + 2 * length * length * d
  return float(2 * num_layers * per_layer)


def mlp_flops(in_dim: int, widths: Sequence[int], *, num_classes: int) -> float:
  """Forward FLOPs (2 per multiply-add) of an MLP in_dim -> widths -> num_classes.

  >>> mlp_flops(4, (3,), num_classes=2)
  36.0
  """
  dims = [int(in_dim), *map(int, widths), int(num_classes)]
  return float(2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])))


# --------------------------------------------------------------------------- all three

METHODS = ("shallow_mean", "shallow_vote", "semi", "deep")


def ensemble_gflops(member_gflops: Sequence[tuple[float, float]], *, feature_dim: int,
                    num_classes: int, gate_hidden: int, shared_trunk: bool = True
                    ) -> dict[str, dict[str, float | None]]:
  """GFLOPs per example of each of `METHODS` over members of (encoder, head) GFLOPs.

  "own encoders": every member runs its own encoder; "shared trunk": the members are
  truncations of one frozen encoder, so the deepest encoder runs once and every head
  reads its own layer (None when `shared_trunk` is False: fine-tuned members have
  encoders of their own). Semi adds its softmax layer over the K concatenated
  `feature_dim`-wide embeddings, Deep its gate (`gate_hidden` units, K outputs).
  """
  if not member_gflops:
    raise ValueError("ensemble_gflops needs at least one member.")
  k = len(member_gflops)
  own = sum(e + h for e, h in member_gflops)
  shared = max(e for e, _ in member_gflops) + sum(h for _, h in member_gflops)
  extra = {"semi": 2 * k * feature_dim * num_classes / 1e9,
           "deep": mlp_flops(k * feature_dim, (int(gate_hidden),), num_classes=k) / 1e9}
  return {m: {"GFLOPs (own encoders)": own + extra.get(m, 0.0),
              "GFLOPs (shared trunk)": shared + extra.get(m, 0.0) if shared_trunk else None}
          for m in METHODS}


def compare_ensembles(stack: Mapping[str, Any], test: Mapping[str, Any], *, num_classes: int,
                      semi_tx: optax.GradientTransformation, semi_epochs: int,
                      gate_tx: optax.GradientTransformation, gate_steps: int,
                      batch_size: int = 128, gate_hidden: int = 64, entropy: float = 0.0,
                      seed: int = 0) -> dict[str, dict]:
  """The three ensembles of K members, fitted on `stack` and scored on `test`.

  Args:
    stack, test: {"emb": (K, N, D) member embeddings, "probs": (K, N, C) member
      probabilities, "labels": (N,)}; the Semi head and the Deep gate train on `stack`.
    num_classes: C.
    semi_tx, semi_epochs: the Semi head's optimizer and epochs (`fit_semi`).
    gate_tx, gate_steps, gate_hidden, entropy: the Deep gate's (`fit_gate`).
    batch_size: for both.
    seed: for both.

  Returns:
    {method: `scores`} for each of `METHODS` (voting has NLL and ECE None: its vote
    shares are not a calibrated distribution), plus "gate_weights": the Deep gate's mean
    weight per member on `test`.
  """
  for name, part in (("stack", stack), ("test", test)):
    missing = {"emb", "probs", "labels"} - set(part)
    if missing:
      raise ValueError(f"{name} lacks {sorted(missing)}.")
  if np.shape(stack["emb"])[0] != np.shape(test["emb"])[0]:
    raise ValueError("stack and test must hold the same members.")
  out = {"shallow_mean": scores(shallow_probs(test["probs"]), test["labels"])}
  shares, pred = vote(test["probs"])
  out["shallow_vote"] = {**scores(shares, test["labels"], preds_N=pred), "nll": None,
                         "ece": None}
  head, _ = fit_semi(stack["emb"], stack["labels"], num_classes=num_classes, tx=semi_tx,
                     epochs=semi_epochs, batch_size=batch_size, seed=seed)
  out["semi"] = scores(semi_probs(head, test["emb"]), test["labels"])
  gate, _ = fit_gate(stack["emb"], stack["probs"], stack["labels"], tx=gate_tx,
                     num_steps=gate_steps, batch_size=batch_size, hidden=gate_hidden,
                     entropy=entropy, seed=seed)
  out["deep"] = scores(deep_probs(gate, test["emb"], test["probs"]), test["labels"])
  out["gate_weights"] = gate_weights(gate, test["emb"]).mean(0).tolist()
  return out

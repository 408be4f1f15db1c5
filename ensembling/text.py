"""Sentence encoders: SimCSE training, augmentations, encoding, STS scoring, alignment.

The pieces of seed 000's NLP experiment, as plain functions:

- `simcse_step`: one member's contrastive step (two views of a batch in one forward pass,
  `losses.info_nce` on the pooled features); `members.ensemble_step(model=...,
  step_fn=simcse_step, loss_fn=partial(losses.info_nce, temperature=...))` runs K members
  vmapped, and `fit_simcse` trains K members from one pretrained encoder with `train.fit`
  (frozen leaves: `optim.freeze` with the same `optim.trainable_mask`).
- `delete_words` / `make_simcse_batch_fn`: the two augmentations, "dropout" (the same
  sentence twice; only dropout differs) and "delete" (the second view loses random words;
  dropout still applies to both).
- `encode_members`: embeddings of a list of sentences for K stacked members, batched by
  length so that short sentences are not padded to the maximum; frozen bottom layers
  shared by all members (`shared_layers`) run once.
- `sts_spearman`: Spearman x 100 of cosine similarity against gold scores, per subset and
  over all subsets of a task concatenated ("all", the SimCSE setting).
- `fit_linear_adapter` / `align_members` / `average_embeddings`: the naive ensemble (mean of
  normalised embeddings) and the aligned one (the best encoder's space is shared; every
  other encoder gets a linear layer, fitted on unlabelled sentences, that maps it there).

Normalisation is `losses.l2_normalize` (float64 on NumPy inputs), linear maps
`models.linear.apply_linear`.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import data, losses, members, metrics, optim, train
from ensembling import tree as tree_lib
from ensembling.data.sts import STSPairs
from ensembling.losses import l2_normalize
from ensembling.models import bert
from ensembling.models.contract import as_model
from ensembling.models.linear import apply_linear
from ensembling.shared_head import ADAPTER_METHODS, fit_linear_adapter  # noqa: F401

PyTree = Any
AUGMENTATIONS = ("dropout", "delete")


# --------------------------------------------------------------------------- augmentations

def delete_words(sentence: str, *, rate: float, rng: np.random.Generator) -> str:
  """Drops each whitespace-separated word with probability `rate`; keeps at least one.

  Args:
    sentence: the text.
    rate: deletion probability per word, in [0, 1).
    rng: the NumPy generator drawing the deletions.

  Returns:
    The remaining words, in order, joined by single spaces.

  >>> rng = np.random.default_rng(0)
  >>> delete_words("a b c", rate=0.0, rng=rng), delete_words("word", rate=0.9, rng=rng)
  ('a b c', 'word')
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"Word deletion rate must be in [0, 1), got {rate}.")
  words = sentence.split()
  if len(words) <= 1:
    return sentence
  keep = rng.random(len(words)) >= rate
  if not keep.any():
    keep[rng.integers(len(words))] = True
  return " ".join(w for w, k in zip(words, keep) if k)


def make_simcse_batch_fn(sentences: Sequence[str], tokenizer, *, seed: int, batch_size: int,
                         num_members: int, max_length: int, augmentation: str = "dropout",
                         delete_rate: float = 0.1) -> tuple[Callable[[int], dict], int]:
  """`batch_fn(step) -> {"a": (K, B, L), "b": (K, B, L)}` token ids, and steps per epoch.

  Each member has its own shuffle per epoch (`data.member_batch_indices`). View "a" is the
  sentence; view "b" is the same ids ("dropout") or the sentence with words deleted with
  probability `delete_rate` ("delete", seeded by (seed, step, member), so a resumed run
  sees the same batches). L is always `max_length` (one compiled shape).
  """
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"Unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}.")
  if len(sentences) < batch_size:
    raise ValueError(f"Need at least batch_size={batch_size} sentences, got {len(sentences)}.")
  sentences = list(sentences)
  ids_all = bert.tokenize(tokenizer, sentences, max_length=max_length)
  indices, steps_per_epoch = data.batch_indices_fn(seed, num_examples=len(sentences),
                                                   batch_size=batch_size,
                                                   num_members=num_members)

  def batch_fn(step: int) -> dict:
    idx = indices(step)  # (K, B)
    a = ids_all[idx]
    if augmentation == "dropout":
      return {"a": a, "b": a}
    b = np.empty_like(a)
    for k in range(num_members):
      rng = np.random.default_rng((seed, int(step), k))
      views = [delete_words(sentences[i], rate=delete_rate, rng=rng) for i in idx[k]]
      b[k] = bert.tokenize(tokenizer, views, max_length=max_length)
    return {"a": a, "b": b}

  return batch_fn, steps_per_epoch


# --------------------------------------------------------------------------- training step

def simcse_step(state: dict, batch: Mapping[str, jax.Array], key: jax.Array, *,
                model, tx: optax.GradientTransformation,
                loss_fn: Callable = losses.info_nce,
                trainable: PyTree | None = None) -> tuple[dict, dict]:
  """One SimCSE step of one member (same signature as `members.train_step`).

  Args:
    state: the member's state dict (params, batch_stats={}, opt_state, step).
    batch: {"a": (B, L), "b": (B, L)} token ids of the two views.
    key: dropout PRNG key.
    model: the encoder (`Bert`, or any model of `models.as_model` whose features are the
      embeddings).
    tx: optax transformation.
    loss_fn: `(z1, z2) -> scalar`, e.g. `partial(losses.info_nce, temperature=0.05)`.
    trainable: optional tree of bools like the params (`optim.trainable_mask`); False leaves
      are wrapped in `stop_gradient`, so no gradient work is done for them or for the
      layers below the lowest trainable one (pair it with `optim.freeze` on the same
      mask).

  Returns:
    (new state, {"loss", "accuracy" (the positive is the most similar row), "grad_norm"}).
  """
  a, b = batch["a"], batch["b"]
  if a.shape != b.shape:
    raise ValueError(f"Views must have the same shape, got {a.shape} and {b.shape}.")
  n = a.shape[0]
  m = as_model(model)

  def loss_of(params):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                            trainable)
    # Both views in one pass: different rows get independent dropout masks.
    z = m.apply({"params": params}, jnp.concatenate([a, b]), train=True, key=key,
                with_features=True)[0].features
    return loss_fn(z[:n], z[n:]), z

  (loss, z), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  z1, z2 = z[:n], z[n:]
  sim = z1 @ z2.T / (jnp.linalg.norm(z1, axis=-1, keepdims=True)
                     * jnp.linalg.norm(z2, axis=-1)[None, :])
  new_state = {**state, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "step": state["step"] + 1}
  return new_state, {"loss": loss,
                     "accuracy": jnp.mean(jnp.argmax(sim, -1) == jnp.arange(n)),
                     "grad_norm": optax.tree.norm(grads)}


def shared_layers(trainable_mask: PyTree | None, num_layers: int) -> int:
  """How many bottom layers (with the embeddings) no member trains.

  Members fine-tuned from one encoder with this mask share the embeddings and these
  layers exactly, so `encode_members(shared_layers=...)` runs them once for all.

  Args:
    trainable_mask: a tree of bools over `Bert` params (`optim.trainable_mask`), or
      None (everything trained).
    num_layers: the encoder's layer count.

  Returns:
    0 when the embeddings are trained, else the index of the lowest trained layer
    (`num_layers` when none is).

  >>> mask = {"embeddings": {"w": False}, "layer_0": {"w": False}, "layer_1": {"w": True}}
  >>> shared_layers(mask, 2), shared_layers(None, 2)
  (1, 0)
  """
  if trainable_mask is None or any(jax.tree.leaves(trainable_mask["embeddings"])):
    return 0
  for i in range(num_layers):
    if any(jax.tree.leaves(trainable_mask[f"layer_{i}"])):
      return i
  return num_layers


class SimCSEResult(NamedTuple):
  """What `fit_simcse` returns.

  Attributes:
    params_K: the members' params, stacked on axis 0.
    trainable: the trainable mask (None: everything was trained).
    history: the `train.fit` records (mean train metrics per member, every `log_every`).
    seconds: wall time of the training loop.
    strategy: the member-parallel strategy that ran.
  """
  params_K: PyTree
  trainable: PyTree | None
  history: list
  seconds: float
  strategy: str


def fit_simcse(pretrained: PyTree, model, tokenizer, sentences: Sequence[str], *,
               num_members: int, num_steps: int, batch_size: int, max_length: int,
               tx: optax.GradientTransformation, trainable: Sequence[str] = (),
               temperature: float = 0.05, augmentation: str = "dropout",
               delete_rate: float = 0.1, seed: int = 0, key: jax.Array | None = None,
               strategy: str = "auto", log_every: int = 0, progress: bool = False,
               desc: str = "SimCSE") -> SimCSEResult:
  """K SimCSE members fine-tuned from one pretrained encoder, in one member-parallel loop.

  Every member starts from `pretrained` and has its own data order
  (`make_simcse_batch_fn(seed=seed)`) and dropout keys (from `key`, whose PRNG
  implementation they keep: `jax.random.key(seed, impl="rbg")` gives rbg dropout
  masks). Leaves outside `trainable` are frozen: `optim.freeze` (zero updates, no
  optimizer state) and a `stop_gradient` in `simcse_step`.

  Args:
    pretrained: the encoder's params (without the "params" key).
    model: the encoder module (`bert.Bert`, or any model whose features are the
      embeddings).
    tokenizer: its tokenizer.
    sentences: unlabelled training sentences.
    num_members, num_steps, batch_size: K, steps per member, sentences per member-step.
    max_length: truncation in tokens.
    tx: the optimizer of the trained leaves.
    trainable: regexes over param paths ("^layer_5/"); empty trains everything.
    temperature: the InfoNCE temperature.
    augmentation, delete_rate: see `make_simcse_batch_fn`.
    seed: the data order (and the deletions).
    key: the dropout key (default `jax.random.key(seed)`).
    strategy: member-parallel strategy (`members.STRATEGIES`).
    log_every: steps between history records (0: a tenth of the run).
    progress, desc: the progress bar.

  Returns:
    A `SimCSEResult`.
  """
  k = members.check_num_members(num_members)
  batch_fn, _ = make_simcse_batch_fn(sentences, tokenizer, seed=seed, batch_size=batch_size,
                                     num_members=k, max_length=max_length,
                                     augmentation=augmentation, delete_rate=delete_rate)
  mask = None
  if trainable:
    mask = optim.trainable_mask(pretrained, list(trainable))
    tx = optim.freeze(tx, pretrained, trainable=mask)
  state = members.init_states(tree_lib.broadcast({"params": pretrained}, k), tx)
  step = members.ensemble_step(
      model=model, tx=tx, num_members=k, strategy=strategy, donate=True,
      loss_fn=functools.partial(losses.info_nce, temperature=temperature),
      step_fn=functools.partial(simcse_step, trainable=mask))
  strategy = step.resolve(state["params"])
  t0 = time.perf_counter()
  state, _, history = train.fit(
      state, step_fn=step, batch_fn=batch_fn, num_steps=int(num_steps),
      key=jax.random.key(seed) if key is None else key,
      eval_every=log_every or max(1, int(num_steps) // 10), progress=progress,
      desc=f"{desc} {augmentation} x{k} ({strategy})")
  return SimCSEResult(state["params"], mask, history, time.perf_counter() - t0, strategy)


# --------------------------------------------------------------------------- encoding

def encode_members(params_K: PyTree, cfg: bert.BertConfig, tokenizer,
                   sentences: Sequence[str], *, pooling: str = "mean", max_length: int,
                   batch_size: int = 64, shared_layers: int = 0, bucket: int = 16
                   ) -> np.ndarray:
  """Pooled embeddings (K, N, D) of `sentences` for K stacked BERT members (inference).

  Sentences are sorted by token length and batched, each batch padded to a multiple of
  `bucket` tokens; the result is returned in the input order.

  Args:
    params_K: the members' `Bert` params (without the "params" key), stacked on axis 0.
    cfg: their architecture.
    tokenizer: the members' tokenizer.
    sentences: N sentences.
    pooling: "mean" | "cls".
    max_length: truncation in tokens.
    batch_size: sentences per forward pass.
    shared_layers: when the members share the embeddings and layers [0, shared_layers)
      (e.g. only the top layers were fine-tuned), those are run once per batch with
      member 0's weights and only the rest per member. Checked: sharing must be exact.
    bucket: lengths are rounded up to a multiple of this.

  Returns:
    NumPy (K, N, D), row n the embedding of `sentences[n]`.
  """
  if shared_layers:
    shared = ["embeddings"] + [f"layer_{i}" for i in range(shared_layers)]
    for name in shared:
      for leaf in jax.tree.leaves(params_K[name]):
        leaf = np.asarray(leaf)
        if not (leaf == leaf[:1]).all():
          raise ValueError(f"shared_layers={shared_layers} but members differ in {name!r}.")
    base = jax.tree.map(lambda x: x[0], {n: params_K[n] for n in shared})
    top = {n: v for n, v in params_K.items() if n not in shared}
  else:
    base, top = {}, params_K
  fwd = _encode_fn(cfg, pooling, shared_layers)
  return _by_length(tokenizer, sentences, lambda xb: fwd(base, top, xb), max_length=max_length,
                    batch_size=batch_size, bucket=bucket)


def _by_length(tokenizer, sentences, fwd, *, max_length, batch_size, bucket) -> np.ndarray:
  """`fwd(ids (B, L)) -> (G, B, D)` over length-sorted batches; (G, N, D) in input order."""
  ids = bert.tokenize(tokenizer, sentences, max_length=max_length)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  lengths = (ids != pad_id).sum(1)
  order = np.argsort(lengths, kind="stable")
  chunks = []
  for start in range(0, len(order), batch_size):
    sel = order[start:start + batch_size]
    length = int(min(max_length, -(-max(int(lengths[sel].max()), 1) // bucket) * bucket))
    xb = ids[sel, :length]
    pad = batch_size - len(sel)
    if pad and len(order) > batch_size:  # keep one batch shape per length bucket
      xb = np.concatenate([xb, np.full((pad, length), pad_id, xb.dtype)])
    chunks.append(np.asarray(fwd(jnp.asarray(xb)))[:, :len(sel)])
  emb = np.concatenate(chunks, axis=1)
  result = np.empty_like(emb)
  result[:, order] = emb
  return result


def encode_depths(params: PyTree, cfg: bert.BertConfig, tokenizer, sentences: Sequence[str],
                  *, depths: Sequence[int], pooling: str = "mean", max_length: int,
                  batch_size: int = 64, bucket: int = 16) -> dict[int, np.ndarray]:
  """Pooled embeddings of one encoder truncated after each of `depths` layers, one pass.

  The encoder keeping only its first L layers is a smaller encoder in its own right
  (the small members of Tyagi et al.; heterogeneous encoders for the shared head): one
  forward pass of the deepest one pools the token states after every requested layer.

  Args:
    params: the `Bert` params (without the "params" key).
    cfg: its architecture.
    tokenizer: its tokenizer.
    sentences: N texts.
    depths: layer counts L in [1, cfg.num_layers].
    pooling, max_length, batch_size, bucket: as `encode_members`.

  Returns:
    {L: NumPy (N, D)}.
  """
  depths = tuple(int(d) for d in depths)
  if not depths or any(not 1 <= d <= cfg.num_layers for d in depths):
    raise ValueError(f"depths must lie in [1, {cfg.num_layers}], got {list(depths)}.")
  fwd = _depths_fn(cfg, pooling, tuple(sorted(set(depths))))
  emb = _by_length(tokenizer, sentences, lambda xb: fwd(params, xb), max_length=max_length,
                   batch_size=batch_size, bucket=bucket)
  order = sorted(set(depths))
  return {d: emb[order.index(d)] for d in depths}


@functools.lru_cache(maxsize=16)
def _depths_fn(cfg, pooling, depths):
  def fwd(params, ids):
    h, prev, out = bert.hidden_states(params, cfg, ids, stop=0), 0, []
    for d in depths:
      h = bert.run_layers(params, cfg, h, ids, start=prev, stop=d)
      out.append(bert.pool(h, ids, cfg, pooling))
      prev = d
    return jnp.stack(out)
  return jax.jit(fwd)


@functools.lru_cache(maxsize=16)
def _encode_fn(cfg, pooling, shared_layers):
  def fwd(base, top_K, ids):
    if shared_layers:
      h = bert.hidden_states(base, cfg, ids, stop=shared_layers)
    else:
      h = None
    def one(top):
      if h is None:
        return bert.Bert(cfg, pooling=pooling).apply({"params": top}, ids, train=False).features
      return bert.encode_from(top, cfg, h, ids, start=shared_layers, pooling=pooling)
    return jax.vmap(one)(top_K)
  return jax.jit(fwd)


# --------------------------------------------------------------------------- STS scoring

def unique_sentences(tasks: Mapping[str, Mapping[str, STSPairs]]) -> list[str]:
  """Every distinct sentence of the given STS tasks, sorted (encode these once).

  >>> pairs = STSPairs("t", ("b", "a"), ("a", "c"), np.array([1.0, 2.0]))
  >>> unique_sentences({"T": {"x": pairs}})
  ['a', 'b', 'c']
  """
  out = set()
  for subsets in tasks.values():
    for pairs in subsets.values():
      out.update(pairs.sentences1)
      out.update(pairs.sentences2)
  return sorted(out)


def sts_spearman(tasks: Mapping[str, Mapping[str, STSPairs]], index: Mapping[str, int],
                 emb_NxD: np.ndarray) -> dict[str, dict]:
  """Spearman x 100 between cosine similarity and the gold scores.

  Args:
    tasks: {task: {subset: STSPairs}} (`data.sts.load_sts_tasks`).
    index: sentence -> row of `emb_NxD`.
    emb_NxD: one embedding per indexed sentence.

  Returns:
    {task: {"all": Spearman over all subsets concatenated (the SimCSE "all" setting),
            "mean": unweighted mean of the subsets, "subsets": {name: value}}}.

  >>> pairs = STSPairs("t", ("a", "a", "b"), ("b", "c", "c"), np.array([3.0, 1.0, 2.0]))
  >>> emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 1.0]])  # a, b, c
  >>> sts_spearman({"T": {"x": pairs}}, {"a": 0, "b": 1, "c": 2}, emb)["T"]["all"]
  100.0
  """
  emb = l2_normalize(np.asarray(emb_NxD))
  out = {}
  for task, subsets in tasks.items():
    per, preds, golds = {}, [], []
    for name, pairs in subsets.items():
      i1 = np.fromiter((index[s] for s in pairs.sentences1), int, len(pairs))
      i2 = np.fromiter((index[s] for s in pairs.sentences2), int, len(pairs))
      cos = np.sum(emb[i1] * emb[i2], axis=-1)
      per[name] = 100.0 * metrics.spearman(cos, pairs.scores)
      preds.append(cos)
      golds.append(pairs.scores)
    out[task] = {"all": 100.0 * metrics.spearman(np.concatenate(preds), np.concatenate(golds)),
                 "mean": float(np.mean(list(per.values()))), "subsets": per}
  return out


# --------------------------------------------------------------------------- ensembles

def average_embeddings(emb_KxNxD: np.ndarray, *, weights: Sequence[float] | None = None
                       ) -> np.ndarray:
  """The (weighted) mean of the members' L2-normalised embeddings.

  Args:
    emb_KxNxD: K members' embeddings of the same N sentences.
    weights: one non-negative weight per member (None: equal weights).

  Returns:
    (N, D) float64; K identical members average to their normalised embeddings.

  >>> average_embeddings(np.array([[[3.0, 4.0]], [[0.0, 2.0]]])).tolist()
  [[0.3, 0.9]]
  """
  emb = l2_normalize(np.asarray(emb_KxNxD))
  if weights is None:
    return emb.mean(0)
  w = np.asarray(weights, np.float64)
  if w.shape != (emb.shape[0],):
    raise ValueError(f"Need one weight per member ({emb.shape[0]}), got shape {w.shape}.")
  return np.tensordot(w / w.sum(), emb, axes=1)


def align_members(emb_KxNxD: np.ndarray, *, anchor: int, **fit_kwargs
                  ) -> list[dict[str, np.ndarray] | None]:
  """Fits one adapter per member into member `anchor`'s space (None for the anchor).

  Args:
    emb_KxNxD: all members' embeddings of the same unlabelled fitting sentences.
    anchor: the member whose space is shared (the best one on a dev set).
    **fit_kwargs: for `fit_linear_adapter` (method, l2, steps, ...).

  Returns:
    K entries: {"kernel", "bias"} per member, None for the anchor.
  """
  k = emb_KxNxD.shape[0]
  if not 0 <= anchor < k:
    raise ValueError(f"anchor must index one of the {k} members, got {anchor}.")
  return [None if m == anchor else
          fit_linear_adapter(emb_KxNxD[m], emb_KxNxD[anchor], **fit_kwargs)
          for m in range(k)]


def aligned_embeddings(emb_KxNxD: np.ndarray, adapters: Sequence[Mapping | None]
                       ) -> np.ndarray:
  """Every member's normalised embeddings mapped into the shared space: (K, N, E).

  Args:
    emb_KxNxD: the members' embeddings.
    adapters: one `{"kernel", "bias"}` per member (`align_members`); None keeps that
      member's normalised embeddings as they are (the anchor).

  Returns:
    (K, N, E) float64.

  >>> e = np.array([[[2.0, 0.0]], [[0.0, 3.0]]])
  >>> swap = {"kernel": np.array([[0.0, 1.0], [1.0, 0.0]]), "bias": np.zeros(2)}
  >>> aligned_embeddings(e, [None, swap]).tolist()
  [[[1.0, 0.0]], [[1.0, 0.0]]]
  """
  if len(adapters) != emb_KxNxD.shape[0]:
    raise ValueError(f"Need one adapter (or None) per member: {emb_KxNxD.shape[0]} members, "
                     f"{len(adapters)} adapters.")
  emb = l2_normalize(np.asarray(emb_KxNxD))
  return np.stack([e if a is None else np.asarray(apply_linear(a, e))
                   for e, a in zip(emb, adapters)])

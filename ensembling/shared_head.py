"""Shared-head alignment (seed 000): average heterogeneous models in one frozen space.

Averaging the embeddings of independently trained models mixes unrelated coordinate
systems. The fix: pick the best model on a validation metric, freeze its ArcFace head
(its class centres define the shared space) and map every other model into that space
under the ArcFace loss; then average the aligned, L2-normalised embeddings and classify
the average with the shared head.

Everything here works on any encoder, not only image models. A model to align is one
parameter tree

    params = {"encoder": <anything, e.g. Flax variables; {} for precomputed features>,
              "adapter": {"kernel": (D_in, D), "bias": (D,)}   # or {} for none
              "head":    {"centers": (C, D)}}                   # the shared, frozen head

with an `encode_fn(encoder_params, x, *, train, key) -> features (B, D_in)` (None: `x`
already holds the features). Two cases (seed 000, Sec. 3):

- heterogeneous (`trainable=ADAPTER_ONLY`): encoder and head frozen, only the new linear
  adapter D_in -> D is trained;
- homogeneous (`trainable=FINETUNE`): the encoder (and adapter, if any) is fine-tuned
  under the frozen head.

Freezing is `optim.freeze` (one `optax.partition` over parameter paths); frozen leaves
get zero updates and carry no optimizer state, so they stay bit-identical. Training runs
in `train.fit`; the adapter is the library's linear layer (`models.linear`).

Two levels of API: the pieces (`init_aligned`, `fit_aligned`, `embed`, `combine`,
`classify`, `evaluate_space`) for any encoder, and, for trained ArcFace models
(`models.with_arcface`), `align_model` (one model into a given head) and `align_group`
(seed 000's whole recipe: select, align, evaluate the naive and aligned averages).

Example (features computed once by a frozen encoder; a new adapter into the shared space):

>>> import jax, numpy as np, optax
>>> rng = np.random.default_rng(0)
>>> feats, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, 64)
>>> head = {"centers": rng.normal(size=(3, 4)).astype(np.float32)}  # the best model's
>>> params = init_aligned(jax.random.key(0), encoder={}, in_dim=6, head=head)
>>> params, loss = fit_aligned(params, feats, y, tx=optax.adam(1e-2),
...                            trainable=ADAPTER_ONLY, num_steps=4, batch_size=16)
>>> emb = embed(params, feats)                      # (N, D) in the shared space
>>> cos = classify(combine([emb, emb]), head)       # mean of normalised embeddings
>>> emb.shape, cos.shape, loss.shape
((64, 4), (64, 3), (4,))
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import losses, metrics, optim, schedules, train
from ensembling import tree as tree_lib
from ensembling.losses import l2_normalize
from ensembling.models.contract import as_model
from ensembling.models.linear import apply_linear, init_linear

PyTree = Any
EncodeFn = Callable[..., jax.Array]
log = logging.getLogger(__name__)

ADAPTER_ONLY = ("^adapter/",)
FINETUNE = ("^encoder/", "^adapter/")
ADAPTER_METHODS = ("lstsq", "procrustes", "info_nce")  # closed-form / label-free fits
ALIGN_METHODS = ("arcface", "procrustes", "lstsq")     # align_group: trained / closed form


def select_best(scores: Sequence[float], *, higher_is_better: bool = True) -> int:
  """Index of the best model on a validation metric (first one on ties).

  Args:
    scores: one finite score per model.
    higher_is_better: False for losses.

  Returns:
    The index of the best score.

  >>> select_best([0.2, 0.7, 0.7]), select_best([0.2, 0.7, 0.1], higher_is_better=False)
  (1, 2)
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"Expected a non-empty list of scores, got shape {s.shape}.")
  if not np.isfinite(s).all():
    raise ValueError(f"Scores must be finite, got {s.tolist()}.")
  return int(np.argmax(s) if higher_is_better else np.argmin(s))


def init_aligned(key: jax.Array | None, *, encoder: PyTree, head: PyTree,
                 in_dim: int | None = None) -> PyTree:
  """The parameter tree of one model to align.

  Args:
    key: PRNG key for the adapter (unused when `in_dim` is None).
    encoder: the encoder's parameters ({} when training on precomputed features).
    head: the shared head, {"centers": (C, D)}.
    in_dim: the encoder's feature dimension; None for no adapter (the encoder must
      already output D-dimensional embeddings: the homogeneous case).

  Returns:
    {"encoder": encoder, "adapter": {...} or {}, "head": head}.
  """
  centers = head.get("centers") if isinstance(head, dict) else None
  if centers is None or np.ndim(centers) != 2:
    raise ValueError("head must be {'centers': (C, D) array}.")
  adapter = {} if in_dim is None else init_linear(key, int(in_dim), np.shape(centers)[1])
  return {"encoder": encoder, "adapter": adapter, "head": head}


def shared_embeddings(params: PyTree, x, *, encode_fn: EncodeFn | None = None,
                      train: bool = False, key: jax.Array | None = None) -> jax.Array:
  """The (un-normalised) embeddings of `x` in the shared space: adapter(encoder(x))."""
  feats = x if encode_fn is None else encode_fn(params["encoder"], x, train=train, key=key)
  return apply_linear(params["adapter"], jnp.asarray(feats))


def classify(embeddings_BxD, head: PyTree) -> jax.Array:
  """Cosine logits (B, C) of embeddings under the shared head (argmax = class)."""
  return losses.cosine_logits(jnp.asarray(embeddings_BxD), jnp.asarray(head["centers"]))


def combine(embeddings_KxBxD) -> jax.Array:
  """The combined representation: mean over models of the L2-normalised embeddings.

  Args:
    embeddings_KxBxD: K models' embeddings of the same B inputs (an array or a list).

  Returns:
    (B, D); K identical embeddings combine to their normalised value.

  >>> import numpy as np
  >>> combine([np.array([[3.0, 4.0]]), np.array([[6.0, 8.0]])]).tolist()
  [[0.6000000238418579, 0.800000011920929]]
  """
  e = jnp.asarray(embeddings_KxBxD) if not isinstance(embeddings_KxBxD, (list, tuple)) \
      else jnp.stack([jnp.asarray(a) for a in embeddings_KxBxD])
  if e.ndim != 3:
    raise ValueError(f"Expected embeddings of shape (K, B, D), got {e.shape}.")
  return jnp.mean(l2_normalize(e), axis=0)


def head_span_parts(embeddings_NxD, head: PyTree, *, rtol: float = 1e-6
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Splits L2-normalised embeddings into their parts inside / outside the head's span.

  The ArcFace loss only sees an embedding through its cosines with the class centres,
  so a frozen head pins the part of the embedding that lies in the span of its centres
  and leaves the orthogonal rest unconstrained. When the head has fewer classes than
  the embedding has dimensions (C < D), alignment to it fixes a C-dim subspace only.
  This diagnostic says how much of each (normalised) embedding that subspace holds.

  Args:
    embeddings_NxD: embeddings (any norm; normalised here).
    head: {"centers": (C, D)}.
    rtol: singular values below rtol * the largest count as zero (rank-deficient heads).

  Returns:
    (inside, outside), both (N, D) float64, with inside + outside = the normalised
    embeddings, inside in the span of the centres and outside orthogonal to it;
    `(inside ** 2).sum(1)` is the fraction of each embedding's squared norm in the span.

  >>> inside, outside = head_span_parts(np.array([[3.0, 4.0]]), {"centers": np.eye(2)[:1]})
  >>> inside.tolist(), outside.tolist()
  ([[0.6, 0.0]], [[0.0, 0.8]])
  """
  e = l2_normalize(np.asarray(embeddings_NxD))
  centers = np.asarray(head["centers"], np.float64)
  if e.ndim != 2 or centers.ndim != 2 or centers.shape[1] != e.shape[1]:
    raise ValueError(f"Expected embeddings (N, D) and centers (C, D) with the same D, got "
                     f"{e.shape} and {centers.shape}.")
  _, sv, vt = np.linalg.svd(centers, full_matrices=False)
  basis = vt[sv > rtol * max(float(sv.max(initial=0.0)), 1e-300)]  # (rank, D), orthonormal
  inside = (e @ basis.T) @ basis
  return inside, e - inside


def aligned_loss(params: PyTree, batch: dict, key: jax.Array | None, *,
                 encode_fn: EncodeFn | None, scale: float, margin: float) -> jax.Array:
  """ArcFace loss of the shared-space embeddings against the shared head."""
  emb = shared_embeddings(params, batch["x"], encode_fn=encode_fn, train=True, key=key)
  return losses.arcface_loss(emb, batch["y"], params["head"]["centers"], scale=scale,
                             margin=margin)


def fit_aligned(params: PyTree, x, y, *, tx: optax.GradientTransformation,
                trainable: Sequence[str] = ADAPTER_ONLY, num_steps: int,
                batch_size: int = 128, encode_fn: EncodeFn | None = None,
                scale: float = 64.0, margin: float = 0.5, seed: int = 0,
                progress: bool = False) -> tuple[PyTree, np.ndarray]:
  """Trains the `trainable` part of `params` under the frozen shared head (`train.fit`).

  Args:
    params: from `init_aligned`.
    x, y: training inputs (or features if `encode_fn` is None) and integer labels.
    tx: the optimizer for the trainable leaves (the rest is frozen by `optim.freeze`).
    trainable: regexes over "a/b/c" paths: `ADAPTER_ONLY` or `FINETUNE`.
    num_steps: optimizer steps; batches follow `train.make_batch_fn(x, y, seed=seed)`.
    batch_size: examples per step.
    encode_fn: `(encoder_params, x, *, train, key) -> features`; None: x are features.
    scale, margin: ArcFace s and m.
    seed: data order and dropout keys.
    progress: a progress bar.

  Returns:
    (params, losses): the trained tree (frozen leaves keep their values bit for bit)
    and the mean loss of every step.
  """
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  y = np.asarray(y, np.int32)
  batch_fn, _ = train.make_batch_fn(x, y, seed=seed, batch_size=batch_size)
  ftx = optim.freeze(tx, params, trainable=trainable)
  loss_fn = lambda p, batch, key: aligned_loss(p, batch, key, encode_fn=encode_fn, scale=scale,
                                               margin=margin)
  state, _, history = train.fit(train.init_pytree_state(params, ftx),
                                step_fn=train.pytree_step(loss_fn, ftx), batch_fn=batch_fn,
                                num_steps=int(num_steps), key=jax.random.key(seed),
                                eval_every=1, progress=progress, desc="align")
  return state["params"], np.asarray([r["train_loss"] for r in history], np.float32)


def encoder_for(model, variables: PyTree, *, mode: str, adapter_input: str = "features"):
  """What one trained ArcFace model contributes to alignment, by mode.

  Args:
    model: an `ArcFaceModel` (backbone -> `embed` -> `head`).
    variables: its variables.
    mode: "adapter" (frozen model, a new linear layer into the shared space) or
      "finetune" (backbone and embedding layer trained under the shared head).
    adapter_input: for "adapter": "features" (the backbone's features) or "embedding"
      (the model's own embedding, seed 000's f_i).

  Returns:
    (encoder params, encode_fn, needs_adapter, trainable patterns): the tree and
    function `init_aligned` / `fit_aligned` take, whether a new adapter is needed, and
    the regexes of the trained leaves.

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> m = models.with_arcface(models.MLP(widths=(8,)), num_classes=3, embedding_dim=4)
  >>> v = m.init(jax.random.key(0), jnp.ones((1, 5)))
  >>> enc, fn, needs_adapter, trainable = encoder_for(m, v, mode="adapter")
  >>> fn(enc, jnp.ones((2, 5)), train=False, key=None).shape, needs_adapter, trainable
  ((2, 8), True, ('^adapter/',))
  """
  if mode == "adapter" and adapter_input == "embedding":
    return variables, flax_encoder(model, train_mode=False), True, ADAPTER_ONLY
  if mode == "adapter":
    if adapter_input != "features":
      raise ValueError(f"Unknown adapter_input {adapter_input!r}; use features or embedding.")
    enc = {"params": variables["params"]["backbone"]}
    if "batch_stats" in variables:
      enc["batch_stats"] = variables["batch_stats"]["backbone"]
    return enc, flax_encoder(model.backbone, train_mode=False), True, ADAPTER_ONLY
  if mode == "finetune":
    encode_fn = flax_encoder(model, train_mode="batch_stats" not in variables)
    return variables, encode_fn, False, ("^encoder/params/(backbone|embed)/",)
  raise ValueError(f"Unknown alignment mode {mode!r}; use adapter or finetune.")


def span_diagnostic(emb: Mapping[str, np.ndarray], head: PyTree, y_test, y_index, *,
                    k: int) -> dict:
  """How much of a model's query embeddings its own head pins, and where retrieval is.

  Args:
    emb: {"test": queries (Q, D), "index": index (N, D)} embeddings.
    head: {"centers": (C, D)}.
    y_test, y_index: their labels.
    k: the mP@k cut-off.

  Returns:
    `fraction`: mean share of the squared norm of the normalised test embeddings in the
    span of the head's centres (the part an ArcFace head constrains); mP@k of the
    retrieval with only the part inside / outside that span (None: nothing outside).
  """
  test, index = (head_span_parts(emb[w], head) for w in ("test", "index"))
  mp = lambda a, b: float(metrics.mean_precision_at_k(a, y_test, b, y_index, k=k))
  has_outside = float(np.abs(test[1]).max(initial=0.0)) > 1e-6
  return {"fraction": float(np.mean(np.sum(test[0] ** 2, axis=1))),
          f"mP@{k} inside": mp(test[0], index[0]),
          f"mP@{k} outside": mp(test[1], index[1]) if has_outside else None}


def flax_encoder(model, *, train_mode: bool = True) -> EncodeFn:
  """An `encode_fn` returning a model's features (any model of `models.as_model`).

  Args:
    model: the encoder (a Linen module or its `.apply`, an NNX module, `(init, apply)`);
      its params are its full variables dict.
    train_mode: run the model in training mode while training (dropout on). Set False
      for models with BatchNorm: their statistics are then used, not updated.

  Returns:
    `encode(variables, x, *, train, key) -> features (B, D)`.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> net = nn.Dense(3)
  >>> v = net.init(jax.random.key(0), jnp.ones((1, 5)))
  >>> flax_encoder(net)(v, jnp.ones((2, 5)), train=False, key=None).shape  # Dense input
  (2, 5)
  """
  m = as_model(model)

  def encode(variables, x, *, train: bool, key):
    use_train = bool(train and train_mode)
    out, _ = m.apply(variables, x, train=use_train, key=key if use_train else None,
                     with_features=True)
    return out.features
  return encode


def embed(params: PyTree, x, *, encode_fn: EncodeFn | None = None,
          batch_size: int = 1000) -> np.ndarray:
  """`shared_embeddings` in inference mode over chunks of `x`.

  Args:
    params: {"encoder", "adapter", ...} (`init_aligned`).
    x: inputs (N, ...), or features when `encode_fn` is None.
    encode_fn: see `fit_aligned`.
    batch_size: inputs per forward pass.

  Returns:
    A NumPy (N, D) array.
  """
  fn = jax.jit(lambda p, xb: shared_embeddings(p, xb, encode_fn=encode_fn))
  return np.concatenate([np.asarray(fn(params, x[s:s + batch_size]))
                         for s in range(0, len(x), batch_size)])


def evaluate_space(query_emb, query_labels, index_emb, index_labels, head: PyTree | None, *,
                   k: int = 5) -> dict[str, float]:
  """mP@k of retrieval (queries vs index) and, with a head, Acc@1 / Acc@5 through it.

  Args:
    query_emb, query_labels: the queries' embeddings (any norm) and classes.
    index_emb, index_labels: the searched set.
    head: {"centers": (C, D)} to classify the queries with, or None (retrieval only).
    k: the mP@k cut-off.

  Returns:
    {"mP@k": ...} and, with a head, "Acc@1" and "Acc@5" (top-min(5, C)).
  """
  out = {f"mP@{k}": metrics.mean_precision_at_k(query_emb, query_labels, index_emb,
                                                 index_labels, k=k)}
  if head is not None:
    cos = np.asarray(classify(query_emb, head))
    out["Acc@1"] = metrics.top_k_accuracy(cos, query_labels, k=1)
    out["Acc@5"] = metrics.top_k_accuracy(cos, query_labels, k=min(5, cos.shape[1]))
  return out


# --------------------------------------------------------------------------- trained ArcFace models

def frozen_leaves_unchanged(before: PyTree, after: PyTree, *,
                            trainable: str | Sequence[str] | PyTree) -> bool:
  """Whether every leaf outside `trainable` has the same bytes in `before` and `after`.

  Args:
    before, after: two parameter trees of the same structure.
    trainable: regexes over "a/b/c" paths or a tree of bools (`optim.trainable_mask`).

  Returns:
    True when all frozen leaves are bit-identical.

  >>> p = {"adapter": {"w": np.ones(2)}, "head": {"centers": np.ones((2, 2))}}
  >>> q = {"adapter": {"w": np.zeros(2)}, "head": {"centers": np.ones((2, 2))}}
  >>> frozen_leaves_unchanged(p, q, trainable=ADAPTER_ONLY)
  True
  >>> frozen_leaves_unchanged(p, q, trainable="^head/")
  False
  """
  tree_lib.check_same_structure([before, after], what="parameter trees")
  mask = optim.trainable_mask(before, trainable)
  return all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
             for t, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(before),
                                jax.tree.leaves(after)) if not t)


class AlignedModel(NamedTuple):
  """What `align_model` returns.

  Attributes:
    params: {"encoder", "adapter", "head"} after alignment (for `embed`).
    encode_fn: the function `params["encoder"]` is applied with.
    losses: the mean ArcFace loss of every step.
    frozen_unchanged: every leaf outside the trained part kept its bytes.
  """
  params: PyTree
  encode_fn: EncodeFn
  losses: np.ndarray
  frozen_unchanged: bool


def align_model(model, variables: PyTree, x, y, *, head: PyTree, mode: str = "adapter",
                adapter_input: str = "features", tx: optax.GradientTransformation,
                num_steps: int, batch_size: int = 128, scale: float = 64.0,
                margin: float = 0.5, seed: int = 0,
                key: jax.Array | None = None) -> AlignedModel:
  """Maps one trained ArcFace model into the space of a frozen `head` (`fit_aligned`).

  Args:
    model, variables: an `ArcFaceModel` and its variables.
    x, y: the alignment data (the model's own inputs) and labels of the head's classes.
    head: the shared head {"centers": (C, D)}, frozen.
    mode, adapter_input: what is trained (`encoder_for`): "adapter" (a new linear layer
      on the frozen model's "features" or "embedding") or "finetune" (backbone and
      embedding layer).
    tx: the optimizer of the trained part.
    num_steps, batch_size: optimizer steps and examples per step.
    scale, margin: ArcFace s and m.
    seed: batch order (`train.make_batch_fn`).
    key: initialises the adapter (default: `jax.random.key(seed)`).

  Returns:
    An `AlignedModel`; `embed(result.params, x, encode_fn=result.encode_fn)` gives the
    aligned embeddings.
  """
  enc, encode_fn, needs_adapter, trainable = encoder_for(model, variables, mode=mode,
                                                         adapter_input=adapter_input)
  in_dim = None
  if needs_adapter:
    in_dim = int(np.shape(encode_fn(enc, x[:2], train=False, key=None))[1])
  params = init_aligned(jax.random.key(seed) if key is None else key, encoder=enc,
                        head=head, in_dim=in_dim)
  before = jax.tree.map(np.array, params)
  params, loss = fit_aligned(params, x, y, tx=tx, trainable=trainable, num_steps=num_steps,
                             batch_size=batch_size, encode_fn=encode_fn, scale=scale,
                             margin=margin, seed=seed)
  return AlignedModel(params, encode_fn, loss,
                      frozen_leaves_unchanged(before, params, trainable=trainable))


def own_embeddings(model, variables: PyTree, inputs: Mapping[str, Any], *,
                   batch_size: int = 1000) -> dict[str, np.ndarray]:
  """A model's own embeddings (its features) of every input set, by role.

  Args:
    model, variables: a trained model (for an `ArcFaceModel`: its ArcFace embedding).
    inputs: {role: inputs (N, ...)}; an array given under several roles is embedded once.
    batch_size: inputs per forward pass.

  Returns:
    {role: NumPy (N, D)}.
  """
  params, fn = {"encoder": variables, "adapter": {}}, flax_encoder(model, train_mode=False)
  done: dict[int, np.ndarray] = {}
  for x in inputs.values():
    if id(x) not in done:
      done[id(x)] = embed(params, x, encode_fn=fn, batch_size=batch_size)
  return {role: done[id(x)] for role, x in inputs.items()}


def align_group(trained: Sequence[tuple[Any, PyTree]], inputs: Sequence[Mapping[str, Any]], *,
                labels: Mapping[str, np.ndarray], names: Sequence[str] | None = None,
                mode: str = "adapter", method: str = "arcface",
                adapter_input: str = "features", k: int = 5,
                classify_with_heads: bool = True, select: tuple[str, str] = ("val", "fit"),
                optimizer: str = "adam", learning_rate: float = 1e-3, epochs: int = 1,
                batch_size: int = 128, scale: float = 64.0, margin: float = 0.5,
                seed: int = 0) -> dict[str, Any]:
  """Seed 000's shared-head ensemble of trained ArcFace models, measured by retrieval.

  The model with the best validation mP@k (retrieval of `select[0]` in `select[1]`)
  lends its frozen head; every other model is mapped into that space (`align_model`, or
  a closed-form label-free map of its "fit" embeddings onto the shared model's), and
  the test queries are retrieved in the index with each model's own embeddings
  ("traditional") and with the aligned ones ("ours"), one by one and averaged ("mean":
  the mean of the L2-normalised embeddings, classified by the shared head).

  Args:
    trained: [(model, variables)] ArcFace models (`models.with_arcface`); they may
      differ in architecture and input shape.
    inputs: per model, its own inputs by role: "train" (alignment data), "test"
      (queries), "index" (the retrieval index), "fit" (the closed-form maps' data) and
      the roles named in `select`. The same array under two roles is embedded once.
    labels: {role: integer labels} for the same roles.
    names: one name per model (the keys of the rows; default "0", "1", ...).
    mode, adapter_input: see `encoder_for`.
    method: one of `ALIGN_METHODS`: "arcface" (train under the frozen head) or
      "procrustes" | "lstsq" (`fit_linear_adapter`, no labels).
    k: the mP@k cut-off.
    classify_with_heads: also report Acc@1 / Acc@5 through the heads and the
      probability average of the models' own heads (closed set); False when the test
      classes are not the heads' (open set).
    select: the (queries, index) roles of the selection retrieval.
    optimizer, learning_rate: `optim.make_optimizer(name=optimizer)`, cosine decay from
      `learning_rate` over the alignment (0 leaves every model where it was).
    epochs, batch_size: alignment passes over "train" and examples per step.
    scale, margin: ArcFace s and m.
    seed: model i's adapter starts from `key(seed + 7 + i)`, its batches from `seed + i`.

  Returns:
    {"val_mP": per model, "best": its name, "rows": {"traditional" | "ours":
    {name | "mean": metrics}}, "own_heads_prob_average": {"Acc@1", "Acc@5"} or None,
    "head_span": `span_diagnostic` per model, "frozen_leaves_unchanged": per aligned
    model (None for closed-form maps), "align_seconds"}.
  """
  if method not in ALIGN_METHODS:
    raise ValueError(f"Unknown align method {method!r}; choose one of {ALIGN_METHODS}.")
  if len(trained) != len(inputs) or not trained:
    raise ValueError(f"Need inputs for every model: {len(trained)} models, {len(inputs)} "
                     "input sets.")
  names = [str(i) for i in range(len(trained))] if names is None else list(names)
  own = [own_embeddings(m, v, {r: x for r, x in inp.items() if r != "train"})
         for (m, v), inp in zip(trained, inputs)]
  heads = [{"centers": v["params"]["head"]["centers"]} for _, v in trained]
  span = [span_diagnostic(e, h, labels["test"], labels["index"], k=k)
          for e, h in zip(own, heads)]
  q, ix = select
  val_mp = [evaluate_space(e[q], labels[q], e[ix], labels[ix], None, k=k)[f"mP@{k}"]
            for e in own]
  best = select_best(val_mp)
  shared = heads[best]
  log.info("validation mP@%d %s; best = %s", k, np.round(val_mp, 4), names[best])

  t0 = time.time()
  aligned, frozen_ok = [], []
  for i, ((model, variables), inp) in enumerate(zip(trained, inputs)):
    if i == best:
      aligned.append(own[i])
    elif method != "arcface":  # nothing is trained: no model parameter can move
      adapter = fit_linear_adapter(own[i]["fit"], own[best]["fit"], method=method)
      aligned.append({w: l2_normalize(np.asarray(apply_linear(adapter, l2_normalize(own[i][w]))))
                      for w in ("test", "index")})
      frozen_ok.append(None)
    else:
      steps = int(epochs) * (len(labels["train"]) // int(batch_size))
      tx = optim.make_optimizer(name=optimizer,
                                learning_rate=schedules.warmup_cosine(learning_rate, steps))
      res = align_model(model, variables, inp["train"], labels["train"], head=shared,
                        mode=mode, adapter_input=adapter_input, tx=tx, num_steps=steps,
                        batch_size=batch_size, scale=scale, margin=margin, seed=seed + i,
                        key=jax.random.key(seed + 7 + i))
      frozen_ok.append(res.frozen_unchanged)
      log.info("%s aligned: loss %.3f -> %.3f; frozen leaves unchanged: %s", names[i],
               res.losses[:50].mean(), res.losses[-50:].mean(), res.frozen_unchanged)
      aligned.append({w: embed(res.params, inp[w], encode_fn=res.encode_fn)
                      for w in ("test", "index")})
  t_align = time.time() - t0

  def ev(emb, head):
    return evaluate_space(emb["test"], labels["test"], emb["index"], labels["index"],
                          head if classify_with_heads else None, k=k)

  rows = {"traditional": {n: ev(e, h) for n, e, h in zip(names, own, heads)},
          "ours": {n: ev(e, shared) for n, e in zip(names, aligned)}}
  for kind, embs in (("traditional", own), ("ours", aligned)):
    rows[kind]["mean"] = ev({w: combine([e[w] for e in embs]) for w in ("test", "index")},
                            shared)
  prob_avg = None
  if classify_with_heads:  # for context: the usual classifier ensemble of the own heads
    probs = np.mean([np.asarray(jax.nn.softmax(scale * classify(e["test"], h)))
                     for e, h in zip(own, heads)], axis=0)
    top5 = min(5, probs.shape[1])
    prob_avg = {"Acc@1": metrics.top_k_accuracy(probs, labels["test"], k=1),
                "Acc@5": metrics.top_k_accuracy(probs, labels["test"], k=top5)}
  return {"val_mP": val_mp, "best": names[best], "rows": rows,
          "own_heads_prob_average": prob_avg, "head_span": span,
          "frozen_leaves_unchanged": frozen_ok, "align_seconds": t_align}


# --------------------------------------------------------------------------- label-free adapters
#
# A linear map fitted from one encoder's embeddings of some inputs to the shared space's
# embeddings of the same inputs (no labels, no head): closed form or a short InfoNCE fit.
# Used for sentence encoders (text.py) and as a closed-form alternative to `fit_aligned`.

def fit_linear_adapter(source_NxD: np.ndarray, target_NxE: np.ndarray, *,
                       method: str = "lstsq", l2: float = 1e-3, steps: int = 300,
                       learning_rate: float = 1e-3, batch_size: int = 256,
                       temperature: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
  """A linear map from one encoder's (normalised) embeddings into a fixed target space.

  The target encoder and the source encoder are frozen; only the map is fitted, on the
  same unlabelled inputs (sentences, images) encoded by both.

  Args:
    source_NxD: the encoder to align (rows are L2-normalised inside).
    target_NxE: the shared space's embeddings of the same N inputs (normalised inside).
    method: "lstsq" (ridge regression with bias, closed form), "procrustes" (orthogonal
      map, no bias, closed form; needs D == E) or "info_nce" (cross-model contrastive:
      the mapped input must be closest to its own target among the batch; Adam from
      the ridge solution).
    l2: ridge penalty (relative to N) for "lstsq" and the "info_nce" initialisation.
    steps, learning_rate, batch_size, temperature, seed: for "info_nce".

  Returns:
    {"kernel": (D, E), "bias": (E,)} float32, for `models.linear.apply_linear`.

  >>> rng = np.random.default_rng(0)
  >>> y = rng.normal(size=(50, 3))
  >>> q, _ = np.linalg.qr(rng.normal(size=(3, 3)))       # a rotation
  >>> a = fit_linear_adapter(y @ q.T, y, method="procrustes")
  >>> bool(np.allclose(a["kernel"], q, atol=1e-5))
  True
  """
  if method not in ADAPTER_METHODS:
    raise ValueError(f"Unknown adapter method {method!r}; choose one of {ADAPTER_METHODS}.")
  x, y = l2_normalize(np.asarray(source_NxD)), l2_normalize(np.asarray(target_NxE))
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
    raise ValueError(f"Expected source (N, D) and target (N, E) with the same N, got "
                     f"{x.shape} and {y.shape}.")
  n, d = x.shape
  if method == "procrustes":
    if d != y.shape[1]:
      raise ValueError(f"Procrustes needs equal dimensions, got {d} and {y.shape[1]}.")
    u, _, vt = np.linalg.svd(x.T @ y)
    return {"kernel": (u @ vt).astype(np.float32), "bias": np.zeros(d, np.float32)}
  xa = np.concatenate([x, np.ones((n, 1))], axis=1)
  reg = l2 * n * np.eye(d + 1)
  reg[-1, -1] = 0.0  # no penalty on the bias
  sol = np.linalg.solve(xa.T @ xa + reg, xa.T @ y)
  adapter = {"kernel": sol[:-1].astype(np.float32), "bias": sol[-1].astype(np.float32)}
  if method == "lstsq":
    return adapter
  return _fit_info_nce_adapter(adapter, x.astype(np.float32), y.astype(np.float32),
                               steps=steps, learning_rate=learning_rate,
                               batch_size=min(batch_size, n), temperature=temperature,
                               seed=seed)


def _fit_info_nce_adapter(init, x, y, *, steps, learning_rate, batch_size, temperature, seed):
  tx = optax.adam(learning_rate)
  loss_fn = lambda p, batch, key: losses.info_nce(apply_linear(p, batch["x"]), batch["y"],
                                                  temperature=temperature)
  batch_fn, _ = train.make_batch_fn(x, y, seed=seed, batch_size=batch_size)
  state, _, _ = train.fit(train.init_pytree_state(jax.tree.map(jnp.asarray, init), tx),
                          step_fn=train.pytree_step(loss_fn, tx), batch_fn=batch_fn,
                          num_steps=int(steps), key=jax.random.key(seed), progress=False,
                          desc="InfoNCE adapter")
  return jax.tree.map(lambda a: np.asarray(a, np.float32), state["params"])

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

Freezing is one `optax.partition` over parameter paths (`freeze`); frozen leaves get
zero updates and carry no optimizer state, so they stay bit-identical.

Example (text or image features computed once by a frozen encoder)::

    head = {"centers": best_centers}                     # (C, D), from the best model
    params = init_aligned(key, encoder={}, in_dim=feats.shape[1], head=head)
    params, losses = fit_aligned(params, feats_train, y_train, tx=optax.adam(1e-3),
                                 trainable=ADAPTER_ONLY, num_steps=1000, batch_size=128)
    emb = shared_embeddings(params, feats_test)          # (N, D) in the shared space
    combined = combine([emb, emb_other, ...])            # mean of normalised embeddings
    cos = classify(combined, head)                       # (N, C) cosines
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import losses
from ensembling import tree as tree_lib

PyTree = Any
EncodeFn = Callable[..., jax.Array]

ADAPTER_ONLY = ("^adapter/",)
FINETUNE = ("^encoder/", "^adapter/")
ADAPTER_METHODS = ("lstsq", "procrustes", "info_nce")  # closed-form / label-free fits


def select_best(scores: Sequence[float], *, higher_is_better: bool = True) -> int:
  """Index of the best model on a validation metric (first one on ties)."""
  s = np.asarray(scores, np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"Expected a non-empty list of scores, got shape {s.shape}.")
  if not np.isfinite(s).all():
    raise ValueError(f"Scores must be finite, got {s.tolist()}.")
  return int(np.argmax(s) if higher_is_better else np.argmin(s))


def init_adapter(key: jax.Array, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
  """A linear layer (LeCun-normal kernel (in_dim, out_dim), zero bias)."""
  kernel = jax.nn.initializers.lecun_normal()(key, (in_dim, out_dim), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((out_dim,), jnp.float32)}


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
  adapter = {} if in_dim is None else init_adapter(key, int(in_dim), np.shape(centers)[1])
  return {"encoder": encoder, "adapter": adapter, "head": head}


def freeze(tx: optax.GradientTransformation, params: PyTree, *,
           trainable: Sequence[str]) -> optax.GradientTransformation:
  """`tx` on the leaves whose "a/b/c" path matches a `trainable` regex, zero elsewhere.

  One `optax.partition` over parameter paths (`tree.partition_labels`); frozen leaves
  get `optax.set_to_zero()` updates and no optimizer state.
  """
  labels = trainable_labels(params, trainable=trainable)
  if "trainable" not in jax.tree.leaves(labels):
    raise ValueError(f"No parameter matches the trainable patterns {list(trainable)}; "
                     f"paths are e.g. {[n for n, _ in tree_lib.named_leaves(params)][:5]}.")
  return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def trainable_labels(params: PyTree, *, trainable: Sequence[str]) -> PyTree:
  """"trainable" / "frozen" for every leaf (the labels `freeze` partitions on)."""
  return tree_lib.partition_labels(params, [(p, "trainable") for p in trainable],
                                   default="frozen")


def apply_adapter(adapter: PyTree, features_BxF: jax.Array) -> jax.Array:
  """features @ kernel + bias, or the features unchanged for an empty adapter."""
  if not adapter:
    return features_BxF
  if features_BxF.shape[-1] != adapter["kernel"].shape[0]:
    raise ValueError(f"Adapter expects {adapter['kernel'].shape[0]} input features, got "
                     f"{features_BxF.shape[-1]}.")
  return features_BxF @ adapter["kernel"] + adapter["bias"]


def shared_embeddings(params: PyTree, x, *, encode_fn: EncodeFn | None = None,
                      train: bool = False, key: jax.Array | None = None) -> jax.Array:
  """The (un-normalised) embeddings of `x` in the shared space: adapter(encoder(x))."""
  feats = x if encode_fn is None else encode_fn(params["encoder"], x, train=train, key=key)
  return apply_adapter(params["adapter"], jnp.asarray(feats))


def classify(embeddings_BxD, head: PyTree) -> jax.Array:
  """Cosine logits (B, C) of embeddings under the shared head (argmax = class)."""
  return losses.cosine_logits(jnp.asarray(embeddings_BxD), jnp.asarray(head["centers"]))


def combine(embeddings_KxBxD) -> jax.Array:
  """The combined representation: mean over models of the L2-normalised embeddings."""
  e = jnp.asarray(embeddings_KxBxD) if not isinstance(embeddings_KxBxD, (list, tuple)) \
      else jnp.stack([jnp.asarray(a) for a in embeddings_KxBxD])
  if e.ndim != 3:
    raise ValueError(f"Expected embeddings of shape (K, B, D), got {e.shape}.")
  return jnp.mean(losses.l2_normalize(e), axis=0)


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
  """
  e = normalize(embeddings_NxD)
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


def make_step(tx: optax.GradientTransformation, *, encode_fn: EncodeFn | None = None,
              scale: float = 64.0, margin: float = 0.5) -> Callable:
  """A jitted `(params, opt_state, batch, key) -> (params, opt_state, loss)`.

  `tx` should already be `freeze(...)`-ed.
  """
  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(aligned_loss)(params, batch, key, encode_fn=encode_fn,
                                                   scale=scale, margin=margin)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step)


def fit_aligned(params: PyTree, x, y, *, tx: optax.GradientTransformation,
                trainable: Sequence[str] = ADAPTER_ONLY, num_steps: int,
                batch_size: int = 128, encode_fn: EncodeFn | None = None,
                scale: float = 64.0, margin: float = 0.5,
                seed: int = 0) -> tuple[PyTree, np.ndarray]:
  """Trains the `trainable` part of `params` under the frozen shared head.

  Args:
    params: from `init_aligned`.
    x, y: training inputs (or features if `encode_fn` is None) and integer labels.
    tx: the optimizer for the trainable leaves (frozen ones are zeroed by `freeze`).
    trainable: regexes over "a/b/c" paths: `ADAPTER_ONLY` or `FINETUNE`.
    num_steps: SGD steps; batches are reshuffled every epoch (seeded).
    batch_size: examples per step.
    encode_fn: `(encoder_params, x, *, train, key) -> features`; None: x are features.
    scale, margin: ArcFace s and m.
    seed: data order and dropout keys.

  Returns:
    (params, losses): the trained tree (frozen leaves are the very same arrays'
    values) and the loss of every step.
  """
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  y = np.asarray(y, np.int32)
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
  if batch_size > len(y):
    raise ValueError(f"batch_size {batch_size} exceeds the {len(y)} training examples.")
  ftx = freeze(tx, params, trainable=trainable)
  opt_state = ftx.init(params)
  step = make_step(ftx, encode_fn=encode_fn, scale=scale, margin=margin)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  per_epoch = len(y) // batch_size
  order = None
  out = np.zeros((num_steps,), np.float32)
  for t in range(num_steps):
    if t % per_epoch == 0:
      order = rng.permutation(len(y))
    idx = np.sort(order[(t % per_epoch) * batch_size:(t % per_epoch + 1) * batch_size])
    batch = {"x": x[idx], "y": y[idx]}
    params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(key, t))
    out[t] = loss
  if not np.isfinite(out).all():
    raise FloatingPointError(f"Alignment loss became non-finite at step "
                             f"{int(np.flatnonzero(~np.isfinite(out))[0])}.")
  return params, out


def flax_encoder(apply_fn: Callable, *, output: str = "features",
                 train_mode: bool = True) -> EncodeFn:
  """An `encode_fn` from a Flax model returning `Output` (or any NamedTuple).

  Args:
    apply_fn: `model.apply`; the encoder params are its full variables dict.
    output: which field to return ("features").
    train_mode: run the model with `train=True` while training (dropout on). Set
      False for models with BatchNorm: their statistics are then used, not updated.
  """
  def encode(variables, x, *, train: bool, key):
    use_train = bool(train and train_mode)
    rngs = {"dropout": key} if (use_train and key is not None) else {}
    return getattr(apply_fn(variables, x, train=use_train, rngs=rngs), output)
  return encode


def embed(params: PyTree, x, *, encode_fn: EncodeFn | None = None,
          batch_size: int = 1000) -> np.ndarray:
  """`shared_embeddings` in inference mode over chunks of `x`: a NumPy (N, D) array."""
  fn = jax.jit(lambda p, xb: shared_embeddings(p, xb, encode_fn=encode_fn))
  return np.concatenate([np.asarray(fn(params, x[s:s + batch_size]))
                         for s in range(0, len(x), batch_size)])


def evaluate_space(query_emb, query_labels, index_emb, index_labels, head: PyTree | None, *,
                   k: int = 5) -> dict[str, float]:
  """mP@k of retrieval (queries vs index) and, with a head, Acc@1 / Acc@5 through it."""
  from ensembling import metrics
  out = {f"mP@{k}": metrics.mean_precision_at_k(query_emb, query_labels, index_emb,
                                                 index_labels, k=k)}
  if head is not None:
    cos = np.asarray(classify(query_emb, head))
    out["Acc@1"] = metrics.top_k_accuracy(cos, query_labels, k=1)
    out["Acc@5"] = metrics.top_k_accuracy(cos, query_labels, k=min(5, cos.shape[1]))
  return out


# --------------------------------------------------------------------------- label-free adapters
#
# A linear map fitted from one encoder's embeddings of some inputs to the shared space's
# embeddings of the same inputs (no labels, no head): closed form or a short InfoNCE fit.
# Used for sentence encoders (text.py) and as a closed-form alternative to `fit_aligned`.

def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def apply_linear_adapter(adapter: Mapping[str, np.ndarray], x_NxD: np.ndarray) -> np.ndarray:
  """x @ kernel + bias."""
  return np.asarray(x_NxD) @ np.asarray(adapter["kernel"]) + np.asarray(adapter["bias"])


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
    {"kernel": (D, E), "bias": (E,)} float32, for `apply_linear_adapter`.
  """
  if method not in ADAPTER_METHODS:
    raise ValueError(f"Unknown adapter method {method!r}; choose one of {ADAPTER_METHODS}.")
  x, y = normalize(source_NxD), normalize(target_NxE)
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
  params = jax.tree.map(jnp.asarray, init)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, g = jax.value_and_grad(
        lambda p: losses.info_nce(xb @ p["kernel"] + p["bias"], yb, temperature=temperature)
    )(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.choice(len(x), size=batch_size, replace=False)
    params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)

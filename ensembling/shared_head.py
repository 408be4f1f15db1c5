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

from ensembling import losses, optim, train
from ensembling import tree as tree_lib
from ensembling.losses import l2_normalize
from ensembling.models.contract import as_model
from ensembling.models.linear import apply_linear, init_linear

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
  """The combined representation: mean over models of the L2-normalised embeddings."""
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
    (encoder params, encode_fn, needs_adapter, trainable patterns).
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
  from ensembling import metrics
  test, index = (head_span_parts(emb[w], head) for w in ("test", "index"))
  mp = lambda a, b: float(metrics.mean_precision_at_k(a, y_test, b, y_index, k=k))
  has_outside = float(np.abs(test[1]).max(initial=0.0)) > 1e-6
  return {"fraction": float(np.mean(np.sum(test[0] ** 2, axis=1))),
          f"mP@{k} inside": mp(test[0], index[0]),
          f"mP@{k} outside": mp(test[1], index[1]) if has_outside else None}


def flax_encoder(model, *, train_mode: bool = True) -> EncodeFn:
  """An `encode_fn` returning a model's features (any model of `models.as_model`).

  Args:
    model: the encoder; its params are its full variables dict.
    train_mode: run the model in training mode while training (dropout on). Set False
      for models with BatchNorm: their statistics are then used, not updated.
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

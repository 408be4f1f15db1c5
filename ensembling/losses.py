"""Losses: arrays in, scalars out (means over the batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def softmax_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy of integer labels under softmax(logits).

  Concrete labels are checked to be integers in [0, C) (`data.check_labels`). Traced ones
  (inside `jax.jit`) cannot be, and a label outside would one-hot to zeros and add
  nothing to the loss, so training checks its labels before any step.
  """
  num_classes = logits_BxC.shape[-1]
  if not isinstance(labels_B, jax.core.Tracer):
    from ensembling.data.core import check_labels
    check_labels(np.ravel(labels_B), num_classes=num_classes)
  targets = jax.nn.one_hot(labels_B, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxC, targets))


# --------------------------------------------------------------------------- ArcFace

def l2_normalize(x, *, axis: int = -1, eps: float = 1e-12):
  """x / max(||x||, eps) along `axis`: the library's one L2 normalisation.

  JAX arrays (and tracers) stay JAX, with finite values and gradients also at x = 0;
  NumPy arrays and lists are normalised in float64 and returned as NumPy (evaluation
  code: cosines, Spearman, retrieval).

  >>> import numpy as np
  >>> l2_normalize(np.array([[3.0, 4.0]]))
  array([[0.6, 0.8]])
  """
  if not isinstance(x, jax.Array):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cosine_logits(embeddings_BxD: jax.Array, centers_CxD: jax.Array, *,
                  eps: float = 1e-12) -> jax.Array:
  """cos(theta) between every embedding and every class centre: (B, C) in [-1, 1].

  Args:
    embeddings_BxD: embeddings (any norm; normalised here).
    centers_CxD: one centre per class, as rows (any norm; normalised here).
    eps: guards the normalisation of zero vectors.

  Returns:
    The cosine similarities, clipped to [-1, 1].
  """
  if embeddings_BxD.ndim != 2 or centers_CxD.ndim != 2:
    raise ValueError(f"Expected embeddings (B, D) and centers (C, D), got "
                     f"{embeddings_BxD.shape} and {centers_CxD.shape}.")
  if embeddings_BxD.shape[-1] != centers_CxD.shape[-1]:
    raise ValueError(f"Embedding dim {embeddings_BxD.shape[-1]} does not match the centres' "
                     f"dim {centers_CxD.shape[-1]}.")
  cos = l2_normalize(embeddings_BxD, eps=eps) @ l2_normalize(centers_CxD, eps=eps).T
  return jnp.clip(cos, -1.0, 1.0)


def _sqrt_with_finite_grad(x):
  """sqrt(x) for x >= 0 whose gradient at x = 0 is 0 instead of inf."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def additive_angular_margin(cos_BxC: jax.Array, labels_B: jax.Array, *,
                            margin: float = 0.5) -> jax.Array:
  """Replaces each target cosine cos(theta) by the ArcFace value (unscaled logits).

  As pytorch-metric-learning's `ArcFaceLoss` (easy_margin=False): the target becomes
  cos(theta + m) where theta <= pi - m, and cos(theta) - m sin(m) beyond, which keeps
  the logit decreasing in theta. cos(theta + m) is evaluated as
  cos(theta) cos(m) - sin(theta) sin(m) with sin(theta) = sqrt(1 - cos^2) (no arccos),
  so values and gradients stay finite at cos(theta) = +-1.

  Args:
    cos_BxC: cosines (see `cosine_logits`).
    labels_B: integer class of each row.
    margin: m, in radians (pytorch-metric-learning takes degrees: 28.6 deg = 0.5 rad).

  Returns:
    (B, C) cosines with the target entries modified.
  """
  if cos_BxC.ndim != 2 or labels_B.shape != cos_BxC.shape[:1]:
    raise ValueError(f"Expected cosines (B, C) and labels (B,), got {cos_BxC.shape} and "
                     f"{labels_B.shape}.")
  c = jnp.clip(cos_BxC, -1.0, 1.0)
  onehot = jax.nn.one_hot(labels_B, c.shape[-1], dtype=bool)
  cos_t = jnp.sum(jnp.where(onehot, c, 0.0), axis=-1)
  sin_t = _sqrt_with_finite_grad(1.0 - cos_t * cos_t)
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  with_margin = cos_t * cos_m - sin_t * sin_m
  # theta <= pi - m  <=>  cos(theta) >= cos(pi - m) = -cos(m).
  target = jnp.where(cos_t >= -cos_m, with_margin, cos_t - margin * sin_m)
  return jnp.where(onehot, target[:, None], c)


def arcface_loss_from_cosines(cos_BxC: jax.Array, labels_B: jax.Array, *,
                              scale: float = 64.0, margin: float = 0.5) -> jax.Array:
  """Mean cross-entropy of `scale * additive_angular_margin(cos)`; see `arcface_loss`."""
  logits = scale * additive_angular_margin(cos_BxC, labels_B, margin=margin)
  return softmax_cross_entropy(logits, labels_B)


def arcface_loss(embeddings_BxD: jax.Array, labels_B: jax.Array, centers_CxD: jax.Array, *,
                 scale: float = 64.0, margin: float = 0.5) -> jax.Array:
  """Additive angular margin loss (ArcFace, Deng et al. 2019), mean over the batch.

  loss_i = -log softmax(s * [cos(theta_ij) for j != y_i, cos(theta_iy + m)])_y with
  embeddings and centres L2-normalised; matches pytorch-metric-learning's
  `ArcFaceLoss(num_classes=C, embedding_size=D, margin=degrees(m), scale=s)` with
  its centre matrix `W = centers_CxD.T` (and no weight regulariser).

  Args:
    embeddings_BxD: embeddings, any norm.
    labels_B: integer labels in [0, C).
    centers_CxD: class centres as rows, any norm.
    scale: s, the radius of the hypersphere.
    margin: m in radians.

  Returns:
    A scalar.
  """
  return arcface_loss_from_cosines(cosine_logits(embeddings_BxD, centers_CxD), labels_B,
                                   scale=scale, margin=margin)


def arcface_loss_from_logits(logits_BxC: jax.Array, labels_B: jax.Array, *,
                             scale: float = 64.0, margin: float = 0.5) -> jax.Array:
  """ArcFace loss for models whose logits are `scale * cos(theta)` (`ArcFaceHead`).

  Lets an ArcFace model train with the standard `loss_fn(logits, labels)` step
  (`members.train_step`): the cosines are recovered as logits / scale. `scale` must
  be the head's scale.
  """
  return arcface_loss_from_cosines(logits_BxC / scale, labels_B, scale=scale, margin=margin)


# --------------------------------------------------------------------------- SimCSE

def info_nce(z1_BxD: jax.Array, z2_BxD: jax.Array, *, temperature: float = 0.05,
             symmetric: bool = False) -> jax.Array:
  """InfoNCE / SimCSE loss: row i of `z1` should match row i of `z2` among all rows.

  Both inputs are L2-normalised, `sim[i, j] = cos(z1_i, z2_j) / temperature`, and the loss
  is the mean cross-entropy of the diagonal: `-mean_i log softmax_j(sim[i])[i]`. In
  unsupervised SimCSE `z1`, `z2` are the same sentences encoded with two dropout masks, so
  the other sentences of the batch are the negatives.

  Args:
    z1_BxD: anchors (B, D).
    z2_BxD: positives (B, D), same order as `z1_BxD`.
    temperature: softmax temperature (SimCSE: 0.05).
    symmetric: also add the z2 -> z1 direction and average the two.

  Returns:
    The scalar loss.
  """
  if z1_BxD.ndim != 2 or z1_BxD.shape != z2_BxD.shape:
    raise ValueError(f"info_nce expects two (B, D) arrays of the same shape, got "
                     f"{z1_BxD.shape} and {z2_BxD.shape}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  sim = l2_normalize(z1_BxD, eps=1e-8) @ l2_normalize(z2_BxD, eps=1e-8).T / temperature
  labels = jnp.arange(sim.shape[0])
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim, labels))
  if symmetric:
    loss = 0.5 * (loss + jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim.T, labels)))
  return loss

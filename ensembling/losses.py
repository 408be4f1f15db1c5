"""Losses: arrays in, scalars out (means over the batch)."""

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy of integer labels under softmax(logits)."""
  num_classes = logits_BxC.shape[-1]
  targets = jax.nn.one_hot(labels_B, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxC, targets))


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
  normalize = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  sim = normalize(z1_BxD) @ normalize(z2_BxD).T / temperature
  labels = jnp.arange(sim.shape[0])
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim, labels))
  if symmetric:
    loss = 0.5 * (loss + jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim.T, labels)))
  return loss

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

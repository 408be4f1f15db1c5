"""Combining members' outputs over the leading member axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_k(logits_KxBxC):
  logits = jnp.asarray(logits_KxBxC)
  if logits.ndim != 3:
    raise ValueError(f"Expected member logits of shape (K, B, C), got {logits.shape}.")
  if logits.shape[0] == 0:
    raise ValueError("Cannot ensemble zero members.")
  if not isinstance(logits, jax.core.Tracer):
    finite = np.asarray(jnp.isfinite(logits).reshape(logits.shape[0], -1).all(axis=1))
    if not finite.all():
      raise ValueError(f"Member(s) {np.flatnonzero(~finite).tolist()} of {len(finite)} have "
                       "NaN or inf logits.")
  return logits


def check_weights(weights_K, num_members: int) -> np.ndarray:
  """`weights_K` as float64 after checking: length K, finite, non-negative, positive sum."""
  w = np.asarray(weights_K, np.float64)
  if w.shape != (num_members,):
    raise ValueError(f"weights must have one value per member: shape ({num_members},), got "
                     f"{w.shape}.")
  if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}.")
  return w


def average_probs(logits_KxBxC, weights_K=None) -> jax.Array:
  """Mean (or weighted mean) of the members' softmax probabilities: (B, C)."""
  logits = _check_k(logits_KxBxC)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if weights_K is None:
    return probs.mean(0)
  w = check_weights(weights_K, logits.shape[0])
  return jnp.tensordot(jnp.asarray(w / w.sum(), jnp.float32), probs, axes=1)


def average_logits(logits_KxBxC) -> jax.Array:
  """Mean of the members' logits, (B, C); softmax it for probabilities."""
  return _check_k(logits_KxBxC).mean(0)


def vote(logits_KxBxC) -> jax.Array:
  """Majority vote: the fraction of members predicting each class, (B, C).

  Argmax gives the majority class; ties go to the lowest class index.
  """
  logits = _check_k(logits_KxBxC)
  preds = logits.argmax(-1)
  return jax.nn.one_hot(preds, logits.shape[-1]).mean(0)


def cumulative_average_probs(logits_KxBxC) -> jax.Array:
  """(K, B, C): entry k is the prob-average of the first k+1 members."""
  probs = jax.nn.softmax(_check_k(logits_KxBxC).astype(jnp.float32), axis=-1)
  counts = jnp.arange(1, probs.shape[0] + 1, dtype=jnp.float32)[:, None, None]
  return jnp.cumsum(probs, axis=0) / counts


def members_probs(logits_KxBxC) -> np.ndarray:
  return np.asarray(jax.nn.softmax(_check_k(logits_KxBxC).astype(jnp.float32), axis=-1))

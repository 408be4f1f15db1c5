"""Image augmentation inside jit: random shifts and horizontal flips of NHWC batches.

The bounds may be traced values, so every member of a vmapped ensemble can draw its own
augmentation strength from its state (`soups.finetune_step` does).

>>> import jax, jax.numpy as jnp
>>> x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1)
>>> random_shift_flip(jax.random.key(0), x, max_shift=1, flip=True).shape
(2, 4, 4, 1)
>>> bool(jnp.all(random_shift_flip(jax.random.key(0), x, max_shift=0, flip=False) == x))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_shift_flip(key: jax.Array, x, *, max_shift, flip, pad: int = 2) -> jax.Array:
  """Shifts every image by up to `max_shift` pixels and flips it left-right with p = 1/2.

  Each image gets its own vertical and horizontal offset, drawn uniformly from
  [-max_shift, max_shift]; the vacated pixels are zeros (the batch is zero padded by
  `pad` pixels, then cropped back). Where `flip` is true, each image is mirrored with
  probability 1/2 (after the shift).

  Args:
    key: PRNG key; split into (vertical, horizontal, flip) draws.
    x: images (B, H, W, C), or (B, H, W) (returned as (B, H, W)).
    max_shift: the largest offset in pixels, an int or a traced int32 scalar, at most
      `pad`.
    flip: whether to flip at random (a bool or a traced bool scalar).
    pad: the padding, and so the largest possible `max_shift` (static).

  Returns:
    The augmented batch, shaped and typed as `x`.

  Raises:
    ValueError: for a concrete `max_shift` outside [0, pad], or an input that is not a
      batch of images.
  """
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(f"Expected images (B, H, W[, C]), got shape {x.shape}.")
  if isinstance(max_shift, (int, np.integer)) and not 0 <= max_shift <= pad:
    raise ValueError(f"max_shift must be in [0, pad={pad}], got {max_shift}.")
  squeeze = x.ndim == 3
  if squeeze:
    x = x[..., None]
  b, h, w, c = x.shape
  k1, k2, k3 = jax.random.split(key, 3)
  dy = jax.random.randint(k1, (b,), -max_shift, max_shift + 1)
  dx = jax.random.randint(k2, (b,), -max_shift, max_shift + 1)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = jax.vmap(lambda im, i, j: jax.lax.dynamic_slice(im, (pad + i, pad + j, 0), (h, w, c)))(
      xp, dy, dx)
  do_flip = jnp.logical_and(flip, jax.random.bernoulli(k3, 0.5, (b,)))
  out = jnp.where(do_flip[:, None, None, None], crop[:, :, ::-1], crop)
  return out[..., 0] if squeeze else out

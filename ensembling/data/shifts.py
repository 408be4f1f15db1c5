"""Shifted test sets for NHWC images and an embedded OOD set (digits at 28 x 28).

All functions take and return NumPy arrays of images shaped (N, H, W, C) and are
deterministic: rotations and contrast changes have no randomness, and the noise is
drawn from the seed or key passed in. They are meant for images in [0, 1] (the IDX
loader's pixels before `make_splits` standardizes them): apply the shift first, then
the training split's standardization, or pass the standardized background value as
`cval` to `rotate`. The corruptions follow the usual benchmark definitions
(MNIST-C / CIFAR-10-C: Gaussian noise x + N(0, std^2), contrast (x - mean) * c + mean,
both optionally clipped to [0, 1]). `by_name` applies one of them from a short name
("rotate90", "noise0.5", "contrast0.3"), e.g. to define tasks in a config.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np


def _check_nhwc(x, name: str = "x") -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{name} must be a batch of NHWC images (N, H, W, C), got shape "
                     f"{x.shape} (add a channel axis with x[..., None]).")
  return x


def _float(x: np.ndarray) -> np.ndarray:
  return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def _maybe_clip(y: np.ndarray, clip) -> np.ndarray:
  if clip is None:
    return y
  lo, hi = clip
  return np.clip(y, lo, hi)


def rotate(x, degrees: float, *, order: int = 1, cval: float = 0.0) -> np.ndarray:
  """Rotates every image by `degrees` about its centre, keeping its size.

  `scipy.ndimage.rotate` over the (H, W) axes with `reshape=False`: positive angles turn
  the image counter-clockwise as displayed (row 0 at the top), so `rotate(x, 90,
  order=0)` equals `np.rot90(x, 1, axes=(1, 2))` for square images. Pixels that come
  from outside the image are `cval`.

  Args:
    x: (N, H, W, C) images.
    degrees: the angle.
    order: spline order of the interpolation (0 nearest, 1 bilinear; 3 can overshoot
      the input's range).
    cval: value of the pixels rotated in from outside (the background).

  Returns:
    (N, H, W, C) array, x's dtype for floating inputs (float32 otherwise).

  >>> x = np.arange(9.0).reshape(1, 3, 3, 1)
  >>> rotate(x, 90, order=0)[0, :, :, 0]
  array([[2., 5., 8.],
         [1., 4., 7.],
         [0., 3., 6.]])
  """
  from scipy import ndimage
  x = _float(_check_nhwc(x))
  return ndimage.rotate(x, float(degrees), axes=(1, 2), reshape=False, order=order,
                        mode="constant", cval=cval)


def gaussian_noise(key_or_seed: Any, x, std: float, *, clip=None) -> np.ndarray:
  """x + std * z with z standard normal, one draw per pixel.

  Deterministic given `key_or_seed`: an int seeds NumPy
  (`np.random.default_rng(seed).standard_normal(x.shape)`), anything else is taken as a
  JAX PRNG key (`jax.random.normal(key, x.shape)`).

  Args:
    key_or_seed: int seed or JAX key.
    x: (N, H, W, C) images.
    std: noise standard deviation (>= 0), in pixel units.
    clip: optional (lo, hi) to clip the result to, e.g. (0, 1) as in MNIST-C; without
      it the added noise has exactly the requested distribution.

  Returns:
    (N, H, W, C) array, x's dtype for floating inputs (float32 otherwise).

  >>> x = np.zeros((2, 4, 4, 1), np.float32)
  >>> bool((gaussian_noise(0, x, 0.1) == gaussian_noise(0, x, 0.1)).all())
  True
  """
  x = _float(_check_nhwc(x))
  if not std >= 0:
    raise ValueError(f"std must be >= 0, got {std}.")
  if isinstance(key_or_seed, (int, np.integer)):
    z = np.random.default_rng(int(key_or_seed)).standard_normal(x.shape)
  else:
    import jax
    z = np.asarray(jax.random.normal(key_or_seed, x.shape))
  return _maybe_clip((x + std * z).astype(x.dtype), clip)


def contrast(x, factor: float, *, clip=None) -> np.ndarray:
  """Scales every image's deviations from its own mean: (x - m) * factor + m.

  m is each image's per-channel mean over (H, W) (CIFAR-10-C's contrast corruption);
  factor < 1 lowers the contrast (0 gives the flat mean image), factor > 1 raises it,
  factor = 1 is the identity. Without clipping each image's mean is unchanged and its
  standard deviation is multiplied by `factor`.

  Args:
    x: (N, H, W, C) images.
    factor: contrast factor, >= 0.
    clip: optional (lo, hi) to clip the result to, e.g. (0, 1).

  Returns:
    (N, H, W, C) array, x's dtype for floating inputs (float32 otherwise).

  >>> contrast(np.array([0.0, 1.0]).reshape(1, 1, 2, 1), 0.5)[0, 0, :, 0]
  array([0.25, 0.75])
  """
  x = _float(_check_nhwc(x))
  if not factor >= 0:
    raise ValueError(f"factor must be >= 0, got {factor}.")
  m = x.mean(axis=(1, 2), keepdims=True)
  # The blend x * f + m * (1 - f) is (x - m) * f + m, exact at f = 1 (x) and f = 0 (m).
  return _maybe_clip((x * factor + m * (1.0 - factor)).astype(x.dtype), clip)


SHIFT_NAME = re.compile(r"(rotate|noise|contrast)(\d+(?:\.\d+)?)")


def by_name(name: str, x, *, seed: int = 0, cval: float = 0.0) -> np.ndarray:
  """The shift that `name` describes, applied to `x`.

  "rotate<degrees>" is `rotate(x, degrees, cval=cval)` (nearest neighbour, `order=0`,
  for multiples of 90 degrees, which then equal `np.rot90`; bilinear otherwise);
  "noise<std>" is `gaussian_noise(seed, x, std)`; "contrast<factor>" is
  `contrast(x, factor)` (no clipping, so they suit standardized images too).

  >>> x = np.arange(4.0).reshape(1, 2, 2, 1)
  >>> bool((by_name("rotate90", x) == np.rot90(x, 1, axes=(1, 2))).all())
  True
  """
  match = SHIFT_NAME.fullmatch(str(name))
  if match is None:
    raise ValueError(f"Unknown shift {name!r}; use rotate<degrees>, noise<std> or "
                     "contrast<factor>, e.g. rotate90, noise0.5, contrast0.3.")
  kind, value = match.group(1), float(match.group(2))
  if kind == "rotate":
    return rotate(x, value, order=0 if value % 90 == 0 else 1, cval=cval)
  if kind == "noise":
    return gaussian_noise(int(seed), x, value)
  return contrast(x, value)


def digits_28x28(*, border: int = 0) -> np.ndarray:
  """scikit-learn's 1797 bundled 8x8 digits, bilinearly upsampled to 28 x 28, in [0, 1].

  An OOD set for Fashion-MNIST-shaped models with no download. Pixels 0..16 are divided
  by 16, then `jax.image.resize(..., method="linear")` (half-pixel centres, edge values
  repeated) maps each image to (28 - 2 * border) squared, and `border` zero pixels are
  padded on every side (border=4 frames the digit like MNIST's 20 x 20 box).

  Args:
    border: zero margin in pixels, 0 <= border < 14.

  Returns:
    (1797, 28, 28, 1) float32 in [0, 1], in scikit-learn's order (labels:
    `sklearn.datasets.load_digits().target`).
  """
  import jax
  from ensembling.data.images import digits_arrays
  if not 0 <= border < 14:
    raise ValueError(f"border must be in [0, 14), got {border}.")
  x = digits_arrays()[0].astype(np.float32) / 16.0
  inner = 28 - 2 * border
  x = np.asarray(jax.image.resize(x, (len(x), inner, inner), method="linear"))
  x = np.pad(x, ((0, 0), (border, border), (border, border)))
  return np.clip(x, 0.0, 1.0)[..., None].astype(np.float32)

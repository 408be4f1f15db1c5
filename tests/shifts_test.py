"""Shifted test sets: invariants of rotation, noise and contrast; the digits OOD set."""

import math

import jax
import numpy as np
import pytest

from ensembling.data import shifts


def _images(seed=0, n=3, h=9, w=9, c=2):
  return np.random.default_rng(seed).random((n, h, w, c)).astype(np.float32)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_rotate_by_zero_and_full_turns_is_identity(order):
  x = _images()
  np.testing.assert_allclose(shifts.rotate(x, 0, order=order), x, atol=1e-6)
  np.testing.assert_allclose(shifts.rotate(x, 360, order=order), x, atol=1e-5)
  np.testing.assert_allclose(shifts.rotate(x, -720, order=order), x, atol=1e-5)


@pytest.mark.parametrize("size", [9, 10])  # odd and even: centre on a pixel or between
def test_rotate_quarter_turns_equal_rot90(size):
  x = _images(1, h=size, w=size)
  for k in (1, 2, 3, -1):
    want = np.rot90(x, k, axes=(1, 2))
    np.testing.assert_array_equal(shifts.rotate(x, 90 * k, order=0), want)
    np.testing.assert_allclose(shifts.rotate(x, 90 * k, order=1), want, atol=1e-5)
  np.testing.assert_array_equal(shifts.rotate(x, 180, order=0), x[:, ::-1, ::-1])


def test_rotate_keeps_shape_dtype_and_treats_images_independently():
  x = _images(2, n=2, h=8, w=12, c=1)                  # non-square keeps its shape
  once = shifts.rotate(x, 30)
  assert once.shape == x.shape and once.dtype == np.float32
  # Rotating each image separately (no mixing across the batch or channels).
  for i in range(2):
    np.testing.assert_array_equal(once[i:i + 1], shifts.rotate(x[i:i + 1], 30))


def test_rotate_constant_image_with_matching_background_is_unchanged():
  x = np.full((2, 11, 11, 1), 0.3, np.float32)
  np.testing.assert_allclose(shifts.rotate(x, 37, cval=0.3), x, atol=1e-6)
  corner = shifts.rotate(x, 45, cval=0.0)[:, 0, 0, 0]   # corners come from outside
  np.testing.assert_array_equal(corner, 0.0)


def test_gaussian_noise_has_requested_std_and_zero_mean():
  x = _images(3, n=64, h=28, w=28, c=1)
  std = 0.2
  d = (shifts.gaussian_noise(0, x, std) - x).astype(np.float64).ravel()
  n = d.size
  # Sample std of n normals: standard error std / sqrt(2 (n - 1)); 5 of them as tolerance.
  assert abs(d.std(ddof=1) - std) < 5 * std / math.sqrt(2 * (n - 1))
  assert abs(d.mean()) < 5 * std / math.sqrt(n)


def test_gaussian_noise_is_the_documented_draw():
  x = _images(4)
  z = np.random.default_rng(7).standard_normal(x.shape)
  np.testing.assert_allclose(shifts.gaussian_noise(7, x, 0.5), x + 0.5 * z, rtol=1e-6)
  key = jax.random.PRNGKey(7)
  zj = np.asarray(jax.random.normal(key, x.shape))
  np.testing.assert_allclose(shifts.gaussian_noise(key, x, 0.5), x + 0.5 * zj, rtol=1e-6)
  assert not np.array_equal(shifts.gaussian_noise(7, x, 0.5), shifts.gaussian_noise(8, x, 0.5))
  np.testing.assert_array_equal(shifts.gaussian_noise(7, x, 0.0), x)
  clipped = shifts.gaussian_noise(7, x, 0.5, clip=(0.0, 1.0))
  np.testing.assert_array_equal(clipped, np.clip(shifts.gaussian_noise(7, x, 0.5), 0, 1))


def test_contrast_invariants():
  x = _images(5)
  np.testing.assert_array_equal(shifts.contrast(x, 1.0), x)
  m = x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(shifts.contrast(x, 0.0), np.broadcast_to(m, x.shape), atol=1e-7)
  for f in (0.3, 2.0):
    y = shifts.contrast(x, f)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(y.std(axis=(1, 2)), f * x.std(axis=(1, 2)), rtol=1e-5)
  y = shifts.contrast(x, 3.0, clip=(0.0, 1.0))
  np.testing.assert_array_equal(y, np.clip(shifts.contrast(x, 3.0), 0.0, 1.0))


def test_integer_images_become_float32():
  x = (np.arange(2 * 4 * 4) % 7).reshape(2, 4, 4, 1).astype(np.uint8)
  for y in (shifts.rotate(x, 90, order=0), shifts.contrast(x, 1.0),
            shifts.gaussian_noise(0, x, 0.0)):
    assert y.dtype == np.float32
  np.testing.assert_array_equal(shifts.contrast(x, 1.0), x.astype(np.float32))
  np.testing.assert_array_equal(shifts.rotate(x, 90, order=0),
                                np.rot90(x, 1, axes=(1, 2)).astype(np.float32))


@pytest.mark.parametrize("fn", [lambda x: shifts.rotate(x, 10),
                                lambda x: shifts.gaussian_noise(0, x, 0.1),
                                lambda x: shifts.contrast(x, 0.5)])
def test_wrong_shapes_raise(fn):
  with pytest.raises(ValueError, match=r"NHWC.*\(28, 28\)"):
    fn(np.zeros((28, 28)))
  with pytest.raises(ValueError, match="NHWC"):
    fn(np.zeros((2, 28, 28)))


def test_bad_parameters_raise():
  with pytest.raises(ValueError, match="std"):
    shifts.gaussian_noise(0, _images(), -0.1)
  with pytest.raises(ValueError, match="factor"):
    shifts.contrast(_images(), -1.0)
  with pytest.raises(ValueError, match="border"):
    shifts.digits_28x28(border=14)


def _bilinear_half_pixel(img, size):
  """Explicit bilinear upsampling with half-pixel centres and clamped edges."""
  n = img.shape[0]
  out = np.zeros((size, size))
  coord = lambda i: min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1.0)
  for i in range(size):
    for j in range(size):
      u, v = coord(i), coord(j)
      i0, j0 = int(math.floor(u)), int(math.floor(v))
      i1, j1 = min(i0 + 1, n - 1), min(j0 + 1, n - 1)
      a, b = u - i0, v - j0
      out[i, j] = ((1 - a) * (1 - b) * img[i0, j0] + (1 - a) * b * img[i0, j1]
                   + a * (1 - b) * img[i1, j0] + a * b * img[i1, j1])
  return out


def test_digits_28x28_is_bilinear_upsampling_of_sklearn_digits():
  from sklearn.datasets import load_digits
  raw = load_digits().images / 16.0
  x = shifts.digits_28x28()
  assert x.shape == (1797, 28, 28, 1) and x.dtype == np.float32
  for i in (0, 1, 1796):
    np.testing.assert_allclose(x[i, :, :, 0], _bilinear_half_pixel(raw[i], 28), atol=1e-5)
  framed = shifts.digits_28x28(border=4)
  np.testing.assert_array_equal(framed[:, :4], 0.0)
  np.testing.assert_array_equal(framed[:, :, -4:], 0.0)
  np.testing.assert_allclose(framed[5, 4:24, 4:24, 0], _bilinear_half_pixel(raw[5], 20),
                             atol=1e-5)


def test_by_name_dispatches_to_the_documented_shift():
  x = np.random.default_rng(0).uniform(size=(2, 6, 6, 1)).astype(np.float32)
  np.testing.assert_array_equal(shifts.by_name("rotate180", x), np.rot90(x, 2, axes=(1, 2)))
  np.testing.assert_allclose(shifts.by_name("rotate30", x, cval=0.5),
                             shifts.rotate(x, 30, order=1, cval=0.5))
  np.testing.assert_array_equal(shifts.by_name("noise0.5", x, seed=3),
                                shifts.gaussian_noise(3, x, 0.5))
  np.testing.assert_array_equal(shifts.by_name("contrast0.3", x), shifts.contrast(x, 0.3))
  with pytest.raises(ValueError, match="Unknown shift 'blur2'"):
    shifts.by_name("blur2", x)

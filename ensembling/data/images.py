"""Image datasets that need no download (scikit-learn's digits, IDX directories), and resizing."""

from __future__ import annotations

import functools
import gzip
import os
import struct

import numpy as np

from ensembling.data.core import Splits, make_splits

IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: str, *, expect_magic: int) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file, checking its magic number and length."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"IDX file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"Cannot read {path}: {e} (corrupt or not gzip?)") from e
  if len(raw) < 8:
    raise ValueError(f"{path} is too short to be an IDX file ({len(raw)} bytes).")
  magic = struct.unpack(">I", raw[:4])[0]
  if magic != expect_magic:
    raise ValueError(f"{path}: expected IDX magic {expect_magic}, found {magic}.")
  ndim = IDX_MAGIC[magic]
  dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
  offset = 4 + 4 * ndim
  expected = int(np.prod(dims))
  if len(raw) - offset != expected:
    raise ValueError(f"{path}: header says {dims} = {expected} bytes of data, "
                     f"file holds {len(raw) - offset}.")
  return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_idx_directory(directory: str, *, validation_size=5000, seed: int = 0,
                       name: str = "idx") -> Splits:
  """Loads the four MNIST-format files from `directory` (Fashion-MNIST, MNIST)."""
  if not directory:
    raise ValueError(f"{name} needs data.dir: a directory holding {sorted(IDX_FILES.values())}.")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{name}: data directory not found: {directory}")
  arr = {}
  for key, fname in IDX_FILES.items():
    arr[key] = read_idx(os.path.join(directory, fname),
                        expect_magic=2051 if key.endswith("images") else 2049)
  for split in ("train", "test"):
    if len(arr[f"{split}_images"]) != len(arr[f"{split}_labels"]):
      raise ValueError(f"{directory}: {split} has {len(arr[f'{split}_images'])} images but "
                       f"{len(arr[f'{split}_labels'])} labels.")
  to_x = lambda a: (a.astype(np.float32) / 255.0)[..., None]
  return make_splits((to_x(arr["train_images"]), arr["train_labels"]),
                     (to_x(arr["test_images"]), arr["test_labels"]),
                     num_classes=10, validation_size=validation_size, seed=seed, name=name)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled digits as (images (1797, 8, 8) float64 0..16, labels int).

  Read straight from the `digits.csv.gz` that scikit-learn ships, which is what its
  `load_digits()` parses, without importing `sklearn` (whose import, with SciPy's, took
  about 3.5 s of a 16 s smoke run here). Falls back to `sklearn.datasets.load_digits`
  when the file is not where this version keeps it.
  """
  import importlib.util
  spec = importlib.util.find_spec("sklearn")
  roots = list(spec.submodule_search_locations or []) if spec else []
  for root in roots:
    path = os.path.join(root, "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
      table = np.loadtxt(path, delimiter=",")
      return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
  from sklearn.datasets import load_digits as sk_digits
  d = sk_digits()
  return d.images, d.target


def load_digits(directory: str = "", *, validation_size=0.1, seed: int = 0,
                test_size: int = 360) -> Splits:
  """scikit-learn's bundled 8x8 digits (1797 images): the embedded default.

  A fixed test split of `test_size` images (seed 0, independent of `seed`) is held out
  first, then the validation split is carved from the rest with `seed`.
  """
  del directory
  images, labels = digits_arrays()
  x = (images.astype(np.float32) / 16.0)[..., None]
  y = labels.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  test, train = perm[:test_size], perm[test_size:]
  return make_splits((x[train], y[train]), (x[test], y[test]), num_classes=10,
                     validation_size=validation_size, seed=seed, name="digits")


def resize(images_NxHxWxC: np.ndarray, size: int, *, chunk: int = 10000) -> np.ndarray:
  """NHWC images resized to `size` x `size` (`jax.image.resize`, linear, antialiased).

  Images already of that size are returned as they are (the same array). The work is
  done in chunks of `chunk` images, each through one compiled function per shape.

  Args:
    images_NxHxWxC: a float array of N images (height, width, channels).
    size: the new height and width in pixels.
    chunk: images per call of the compiled resize.

  Returns:
    A NumPy array (N, size, size, C) of the input's dtype.

  >>> x = np.ones((3, 28, 28, 1), np.float32)
  >>> resize(x, 20).shape
  (3, 20, 20, 1)
  >>> resize(x, 28) is x
  True
  """
  x = np.asarray(images_NxHxWxC)
  if x.ndim != 4:
    raise ValueError(f"resize expects NHWC images, got shape {x.shape}.")
  if x.shape[1] == size and x.shape[2] == size:
    return images_NxHxWxC
  fn = _resize_fn(int(size))
  return np.concatenate([np.asarray(fn(x[s:s + chunk])) for s in range(0, len(x), chunk)])


@functools.lru_cache(maxsize=8)
def _resize_fn(size: int):
  import jax  # local: the loaders themselves need only NumPy
  return jax.jit(lambda a: jax.image.resize(a, (a.shape[0], size, size, a.shape[3]), "linear"))


BUILTIN = {
    "digits": load_digits,
    "fashion_mnist": lambda d, **kw: load_idx_directory(d, name="fashion_mnist", **kw),
    "mnist": lambda d, **kw: load_idx_directory(d, name="mnist", **kw),
}

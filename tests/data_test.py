import gzip
import os
import struct

import numpy as np
import pytest

from ensembling import data
from conftest import SHARED_DATA


def _write_idx(path, arr, magic):
  header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + arr.astype(np.uint8).tobytes())


def _fake_idx_dir(tmp_path, n_train=120, n_test=30):
  rng = np.random.default_rng(0)
  files = {
      "train-images-idx3-ubyte.gz": (rng.integers(0, 256, (n_train, 28, 28)), 2051),
      "train-labels-idx1-ubyte.gz": (rng.integers(0, 10, n_train), 2049),
      "t10k-images-idx3-ubyte.gz": (rng.integers(0, 256, (n_test, 28, 28)), 2051),
      "t10k-labels-idx1-ubyte.gz": (rng.integers(0, 10, n_test), 2049),
  }
  for name, (arr, magic) in files.items():
    _write_idx(os.path.join(tmp_path, name), arr, magic)
  return files


def test_idx_directory_roundtrip(tmp_path):
  files = _fake_idx_dir(tmp_path)
  s = data.load({"name": "fashion_mnist", "dir": str(tmp_path), "validation_size": 20}, seed=3)
  assert s.x_train.shape == (100, 28, 28, 1) and s.x_val.shape == (20, 28, 28, 1)
  assert s.x_test.shape == (30, 28, 28, 1) and s.num_classes == 10
  # The split is a permutation of the original training set.
  y_all = files["train-labels-idx1-ubyte.gz"][0]
  assert sorted(np.concatenate([s.y_train, s.y_val]).tolist()) == sorted(y_all.tolist())
  np.testing.assert_array_equal(s.y_test, files["t10k-labels-idx1-ubyte.gz"][0])
  assert abs(float(s.x_train.mean())) < 1e-4  # standardized with train statistics
  s2 = data.load({"name": "fashion_mnist", "dir": str(tmp_path), "validation_size": 20}, seed=3)
  np.testing.assert_array_equal(s.y_val, s2.y_val)


def test_idx_errors_name_the_file(tmp_path):
  _fake_idx_dir(tmp_path)
  bad = os.path.join(tmp_path, "train-labels-idx1-ubyte.gz")
  _write_idx(bad, np.zeros(120), 2051)
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: expected IDX magic 2049, found 2051"):
    data.load({"name": "fashion_mnist", "dir": str(tmp_path)})
  with gzip.open(bad, "wb") as f:  # truncated payload
    f.write(struct.pack(">II", 2049, 120) + b"\x00" * 50)
  with pytest.raises(ValueError, match="header says"):
    data.load({"name": "fashion_mnist", "dir": str(tmp_path)})
  os.remove(bad)
  with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz"):
    data.load({"name": "fashion_mnist", "dir": str(tmp_path)})
  with open(os.path.join(tmp_path, "train-labels-idx1-ubyte.gz"), "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(ValueError, match="corrupt"):
    data.load({"name": "fashion_mnist", "dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="not found"):
    data.load({"name": "fashion_mnist", "dir": str(tmp_path / "nope")})
  with pytest.raises(ValueError, match="needs data.dir"):
    data.load({"name": "fashion_mnist", "dir": ""})


def test_unknown_names():
  with pytest.raises(ValueError, match="Unknown data.source"):
    data.load({"name": "digits", "source": "web"})
  with pytest.raises(ValueError, match=r"Unknown dataset 'cifar'; built-in: \['digits'"):
    data.load({"name": "cifar", "source": "builtin"})
  # A typo is answered with the close match, not a fall-through to tfds and its catalogue.
  with pytest.raises(ValueError, match=r"Unknown dataset 'digitz' \(did you mean 'digits'\?\)"):
    data.load({"name": "digitz"})
  with pytest.raises(ValueError, match=r"Unknown data key\(s\) 'validaton_size' \(did you "
                     r"mean 'validation_size'\?\)"):
    data.load({"name": "digits", "validaton_size": 0.2})
  with pytest.raises(ValueError, match="limit_train must be an integer >= 0"):
    data.load({"name": "digits", "limit_train": -5})


def test_fashion_mnist_folder_name_is_accepted(tmp_path):
  _fake_idx_dir(tmp_path)
  a = data.load({"name": "fashion-mnist", "dir": str(tmp_path), "validation_size": 20})
  b = data.load({"name": "fashion_mnist", "dir": str(tmp_path), "validation_size": 20})
  np.testing.assert_array_equal(a.x_train, b.x_train)


@pytest.mark.parametrize("size,n_val", [(0, 0), (0.0, 0), (0.25, 359), (100, 100), (100.0, 100)])
def test_validation_size_rules(digits, size, n_val):
  s = data.load({"name": "digits", "validation_size": size})
  assert len(s.x_val) == n_val == len(s.y_val)
  assert len(s.x_train) + n_val == 1797 - 360


@pytest.mark.parametrize("size", [1, 1.0, 1.5, -3, 5000])
def test_bad_validation_sizes_are_refused(size):
  with pytest.raises(ValueError, match="validation_size"):
    data.load({"name": "digits", "validation_size": size})


def test_labels_out_of_range_fail_at_load(tmp_path):
  _fake_idx_dir(tmp_path)
  _write_idx(os.path.join(tmp_path, "train-labels-idx1-ubyte.gz"),
             np.r_[np.arange(10), [12], np.zeros(109)], 2049)
  with pytest.raises(ValueError, match=r"train labels must lie in \[0, 10\); found \[12\]"):
    data.load({"name": "fashion_mnist", "dir": str(tmp_path)})
  for bad, match in (([0, -1], r"found \[-1\]"), ([0.5, 1], "integer classes"),
                     ([[0], [1]], "1-d")):
    with pytest.raises(ValueError, match=match):
      data.check_labels(np.asarray(bad), num_classes=3)


def test_digits_is_embedded(digits):
  assert digits.x_test.shape == (360, 8, 8, 1)
  assert len(digits.x_train) + len(digits.x_val) == 1797 - 360
  assert set(np.unique(digits.y_train)) == set(range(10))


def test_digits_arrays_equal_sklearns_loader_and_fall_back_to_it(monkeypatch):
  """The direct read of sklearn's digits.csv.gz is its load_digits(), bit for bit."""
  from sklearn.datasets import load_digits
  from ensembling.data import images
  want = load_digits()
  x, y = images.digits_arrays()
  np.testing.assert_array_equal(x, want.images)
  np.testing.assert_array_equal(y, want.target)
  # Where the file is missing (another sklearn layout), sklearn's own loader is used.
  monkeypatch.setattr(images.os.path, "exists", lambda p: False)
  x2, y2 = images.digits_arrays()
  np.testing.assert_array_equal(x2, want.images)
  np.testing.assert_array_equal(y2, want.target)


def test_split_classes_against_a_python_loop(digits):
  """Open-set split: each part keeps exactly its classes, in order, renumbered 0..C-1."""
  seen, unseen = data.split_classes(digits, held_out=(7, 1, 1))
  assert seen.num_classes == 8 and unseen.num_classes == 2
  kept = [0, 2, 3, 4, 5, 6, 8, 9]
  for part, classes in ((seen, kept), (unseen, [1, 7])):
    for which in ("train", "val", "test"):
      x, y = digits.split(which)
      rows = [(x[i], classes.index(int(y[i]))) for i in range(len(y)) if int(y[i]) in classes]
      px, py = part.split(which)
      assert py.dtype == np.int32 and len(py) == len(rows)
      np.testing.assert_array_equal(py, [r[1] for r in rows])
      np.testing.assert_array_equal(px, np.stack([r[0] for r in rows]))
  for held, match in (((), "empty"), ((3, 10), r"\[10\] are not in 0..9"),
                      (tuple(range(10)), "every class")):
    with pytest.raises(ValueError, match=match):
      data.split_classes(digits, held_out=held)


def test_member_batch_indices_are_per_member_permutations():
  idx = data.member_batch_indices(0, 0, num_examples=103, batch_size=10, num_members=4)
  assert idx.shape == (10, 4, 10)
  for k in range(4):
    seen = idx[:, k].reshape(-1)
    assert len(set(seen.tolist())) == 100  # without replacement within an epoch
  assert not np.array_equal(idx[:, 0], idx[:, 1])  # members see different orders
  idx_e1 = data.member_batch_indices(0, 1, num_examples=103, batch_size=10, num_members=4)
  assert not np.array_equal(idx, idx_e1)  # a new order each epoch
  np.testing.assert_array_equal(idx, data.member_batch_indices(0, 0, num_examples=103,
                                                               batch_size=10, num_members=4))
  with pytest.raises(ValueError, match="exceeds"):
    data.member_batch_indices(0, 0, num_examples=5, batch_size=10, num_members=2)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "fashion-mnist")),
                    reason="../shared/data/fashion-mnist not present")
def test_real_fashion_mnist_headers():
  s = data.load({"name": "fashion_mnist", "dir": os.path.join(SHARED_DATA, "fashion-mnist"),
                 "validation_size": 5000})
  assert s.x_train.shape == (55000, 28, 28, 1) and s.x_test.shape == (10000, 28, 28, 1)
  assert np.bincount(s.y_test).tolist() == [1000] * 10


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    s = data.load({"name": "mnist", "source": "tfds", "validation_size": 8}, seed=0)
  assert s.x_train.shape == (32, 28, 28, 1) and s.x_val.shape == (8, 28, 28, 1)
  assert s.x_test.shape[1:] == (28, 28, 1) and s.num_classes == 10


def test_split_seed_fixes_the_validation_split_whatever_the_run_seed():
  ref = data.load({"name": "digits"}, seed=0)
  shared = data.load({"name": "digits", "split_seed": 0}, seed=5)
  own = data.load({"name": "digits"}, seed=5)
  for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(shared, name), getattr(ref, name))
  assert not np.array_equal(own.y_val, ref.y_val)
  with pytest.raises(ValueError, match="split_seed"):
    data.check_data_config({"name": "digits", "split_seed": -2})

"""Any tfds dataset already prepared on disk, through `tfds.data_source` (no download)."""

from __future__ import annotations

import numpy as np

from ensembling.data.core import Splits, make_splits


def _to_arrays(source, image_key: str, label_key: str):
  xs, ys = [], []
  for i in range(len(source)):
    ex = source[i]
    xs.append(np.asarray(ex[image_key]))
    ys.append(int(ex[label_key]))
  return np.stack(xs).astype(np.float32), np.asarray(ys, np.int32)


def load_tfds(name: str, *, data_dir: str | None, validation_size, seed: int,
              image_key: str = "image", label_key: str = "label") -> Splits:
  """Reads train and test of `name` with `tfds.data_source(..., download=False)`."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("data.source='tfds' needs the [tfds] extra: "
                      "pip install -e '.[tfds]'") from e
  builder = tfds.builder(name, data_dir=data_dir)
  num_classes = builder.info.features[label_key].num_classes
  splits = {}
  for split in ("train", "test"):
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    splits[split] = _to_arrays(src, image_key, label_key)
  scale = 255.0 if splits["train"][0].max() > 1.5 else 1.0
  tr = (splits["train"][0] / scale, splits["train"][1])
  te = (splits["test"][0] / scale, splits["test"][1])
  return make_splits(tr, te, num_classes=num_classes, validation_size=validation_size,
                     seed=seed, name=name)

"""NumPy data loaders: every loader returns a `Splits` of (x, y) arrays."""

from ensembling.data.core import (Splits, batch_indices_fn, check_data_config, check_labels, load,
                                  member_batch_indices, num_steps_per_epoch, split_classes,
                                  validation_count)
from ensembling.data.images import load_digits, load_idx_directory, read_idx, resize

__all__ = ["Splits", "batch_indices_fn", "check_data_config", "check_labels", "load", "member_batch_indices",
           "num_steps_per_epoch", "split_classes", "validation_count", "load_digits",
           "load_idx_directory", "read_idx", "resize"]

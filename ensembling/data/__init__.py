"""NumPy data loaders: every loader returns a `Splits` of (x, y) arrays."""

from ensembling.data.core import Splits, load, member_batch_indices, num_steps_per_epoch
from ensembling.data.core import split_classes
from ensembling.data.images import load_digits, load_idx_directory, read_idx

__all__ = ["Splits", "load", "member_batch_indices", "num_steps_per_epoch", "split_classes",
           "load_digits", "load_idx_directory", "read_idx"]

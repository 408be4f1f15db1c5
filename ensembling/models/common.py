"""What every model returns."""

from typing import Any, NamedTuple

import jax


class Output(NamedTuple):
  """A model's outputs: penultimate `features` (B x D) and `logits` (B x C)."""
  features: jax.Array
  logits: jax.Array


def has_batch_stats(variables: Any) -> bool:
  return "batch_stats" in variables and bool(jax.tree.leaves(variables["batch_stats"]))

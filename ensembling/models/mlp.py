"""Multilayer perceptrons, dense and partitioned."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ensembling.models.common import Output


class MLP(nn.Module):
  """Dense ReLU network; features are the last hidden layer's activations.

  Attributes:
    widths: hidden layer sizes, e.g. (512, 512).
    num_classes: output size.
    dropout: dropout rate after each hidden layer (0 disables it).
    batch_norm: BatchNorm (`bn_{i}`) between each hidden Dense and its ReLU (off by
      default; parameter names of the plain MLP are unchanged).
  """
  widths: Sequence[int] = (512, 512)
  num_classes: int = 10
  dropout: float = 0.0
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    x = x.reshape((x.shape[0], -1))
    for i, w in enumerate(self.widths):
      x = nn.Dense(w, name=f"Dense_{i}")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn_{i}")(x)
      x = nn.relu(x)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, name="head")(x)
    return Output(x, logits)


class _Part(nn.Module):
  """One part of a `PartitionedMLP`: an `MLP` taking `train` positionally (for nn.vmap)."""
  widths: Sequence[int]
  num_classes: int
  dropout: float

  @nn.compact
  def __call__(self, x, train):
    return MLP(self.widths, self.num_classes, self.dropout, name="mlp")(x, train=train)


class PartitionedMLP(nn.Module):
  """A dense MLP cut into `parts` independent sub-networks: `nn.vmap` of `MLP`.

  Every hidden layer has `widths[i]` neurons in total, `widths[i] // parts` per part;
  the parts share only the input (block-diagonal weights). Each part is an `MLP` with
  its own softmax head, its own initialisation and dropout stream; the parameters are
  those of `parts` stacked MLPs under `parts/mlp` (leading axis = part). The output
  logits are the mean of the parts' logits; features are the concatenated last hidden
  layers (part-major), ready for a SuperNet head.
  """
  widths: Sequence[int] = (240, 560, 560)
  num_classes: int = 10
  parts: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    for w in self.widths:
      if w % self.parts:
        raise ValueError(f"width {w} is not divisible by parts={self.parts}.")
    parts = nn.vmap(_Part, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=(None, None),
                    out_axes=0, axis_size=self.parts)
    out = parts(tuple(w // self.parts for w in self.widths), self.num_classes, self.dropout,
                name="parts")(x, train)
    features = jnp.transpose(out.features, (1, 0, 2)).reshape((x.shape[0], -1))
    return Output(features, out.logits.mean(axis=0))


def partitioned_from_members(params_K) -> dict:
  """`PartitionedMLP` params equal to K stacked `MLP` members' params.

  Member k of `MLP(widths=w)` becomes part k of `PartitionedMLP(widths=K*w, parts=K)`:
  the block-diagonal network computes the K members side by side, its features are
  the members' features concatenated (member-major) and its logits the mean of the
  members' logits.

  Args:
    params_K: stacked `MLP` params (`Dense_i` and `head`, member axis first).

  Returns:
    The `PartitionedMLP` params (without the member axis).
  """
  if "head" not in params_K or not any(n.startswith("Dense_") for n in params_K):
    raise ValueError(f"Expected MLP params with Dense_i and head, got {sorted(params_K)}.")
  return {"parts": {"mlp": dict(params_K)}}

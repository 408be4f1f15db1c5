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


class PartitionedMLP(nn.Module):
  """A dense MLP cut into `parts` independent sub-networks (block-diagonal weights).

  Every hidden layer has `widths[i]` neurons in total, `widths[i] // parts` per part;
  the sub-networks share only the input. Each part has its own softmax head
  (`head` kernel: parts x (width / parts) x C) and the output logits are the mean of
  the parts' logits; features are the concatenated last hidden layers, ready for a
  SuperNet head.
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
    x = x.reshape((x.shape[0], -1))
    h = None
    for i, w in enumerate(self.widths):
      wp = w // self.parts
      if h is None:  # input shared by all parts: one dense layer, then split.
        kernel = self.param(f"kernel_{i}", nn.initializers.lecun_normal(),
                            (self.parts, x.shape[-1], wp))
        h = jnp.einsum("bi,pio->pbo", x, kernel)
      else:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=1, out_axis=2, batch_axis=(0,))
        kernel = self.param(f"kernel_{i}", init, (self.parts, h.shape[-1], wp))
        h = jnp.einsum("pbi,pio->pbo", h, kernel)
      bias = self.param(f"bias_{i}", nn.initializers.zeros, (self.parts, 1, wp))
      h = nn.relu(h + bias)
      if self.dropout > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=1, out_axis=2, batch_axis=(0,))
    head_k = self.param("head_kernel", init, (self.parts, h.shape[-1], self.num_classes))
    head_b = self.param("head_bias", nn.initializers.zeros, (self.parts, 1, self.num_classes))
    logits_P = jnp.einsum("pbi,pio->pbo", h, head_k) + head_b
    features = jnp.transpose(h, (1, 0, 2)).reshape((x.shape[0], -1))
    return Output(features, logits_P.mean(axis=0))

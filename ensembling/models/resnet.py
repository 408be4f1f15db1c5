"""A small CIFAR-style ResNet (ResNet-20 at the default depth)."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ensembling.models.common import Output


class _Block(nn.Module):
  filters: int
  strides: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.filters, (3, 3), (self.strides, self.strides), padding="SAME",
                use_bias=False, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = nn.Conv(self.filters, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = norm("bn2")(y)
    if x.shape != y.shape:
      x = nn.Conv(self.filters, (1, 1), (self.strides, self.strides), use_bias=False,
                  name="proj")(x)
      x = norm("bn_proj")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with `blocks_per_stage` basic blocks in each of three stages.

  Attributes:
    blocks_per_stage: 3 gives ResNet-20.
    widths: filters per stage (times `width_multiplier`).
  """
  num_classes: int = 10
  blocks_per_stage: int = 3
  widths: Sequence[int] = (16, 32, 64)
  width_multiplier: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    if x.ndim == 3:
      x = x[..., None]
    w0 = self.widths[0] * self.width_multiplier
    x = nn.Conv(w0, (3, 3), padding="SAME", use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_stem")(x))
    for s, w in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        strides = 2 if (s > 0 and b == 0) else 1
        x = _Block(w * self.width_multiplier, strides, name=f"stage{s}_block{b}")(x, train=train)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="head")(features)
    return Output(features, logits)

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
    # LeCun-normal per part, as each part's own nn.Dense would be: fan_in is the
    # part's input size (batch_axis=0 keeps the part axis out of the fan).
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=1, out_axis=2, batch_axis=(0,))
    h = None
    for i, w in enumerate(self.widths):
      wp = w // self.parts
      if h is None:  # input shared by all parts, each with its own weights.
        kernel = self.param(f"kernel_{i}", init, (self.parts, x.shape[-1], wp))
        h = jnp.einsum("bi,pio->pbo", x, kernel)
      else:
        kernel = self.param(f"kernel_{i}", init, (self.parts, h.shape[-1], wp))
        h = jnp.einsum("pbi,pio->pbo", h, kernel)
      bias = self.param(f"bias_{i}", nn.initializers.zeros, (self.parts, 1, wp))
      h = nn.relu(h + bias)
      if self.dropout > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
    head_k = self.param("head_kernel", init, (self.parts, h.shape[-1], self.num_classes))
    head_b = self.param("head_bias", nn.initializers.zeros, (self.parts, 1, self.num_classes))
    logits_P = jnp.einsum("pbi,pio->pbo", h, head_k) + head_b
    features = jnp.transpose(h, (1, 0, 2)).reshape((x.shape[0], -1))
    return Output(features, logits_P.mean(axis=0))


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
  names = sorted((n for n in params_K if n.startswith("Dense_")), key=lambda n: int(n[6:]))
  if "head" not in params_K or not names:
    raise ValueError(f"Expected MLP params with Dense_i and head, got {sorted(params_K)}.")
  out = {}
  for i, n in enumerate(names):
    out[f"kernel_{i}"] = params_K[n]["kernel"]
    out[f"bias_{i}"] = params_K[n]["bias"][:, None, :]
  out["head_kernel"] = params_K["head"]["kernel"]
  out["head_bias"] = params_K["head"]["bias"][:, None, :]
  return out

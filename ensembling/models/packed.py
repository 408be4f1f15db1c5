"""Packed-Ensembles (Laurent et al., ICLR 2023): M small networks in one grouped network.

A packed layer built for a base layer of width w has alpha * w channels split into M
estimators of alpha * w / M channels each; estimator m owns the contiguous channel
block [m * alpha * w / M, (m + 1) * alpha * w / M). Connections only run inside an
estimator (a block-diagonal weight, i.e. a grouped layer with M groups), so the
network computes M independent networks of width alpha * w / M side by side. Each
estimator can be split further into gamma groups (M * gamma groups in all; a block-
diagonal weight inside every estimator block), which divides its parameters by gamma.

Conventions (those of torch-uncertainty's `PackedLinear` / `PackedConv2d`):
  first=True  the input is shared by all estimators: a dense map from the whole input
              to the alpha * w channels (equal to M independent first layers).
  last=True   `features` is each estimator's output size (e.g. classes); the layer has
              M * features outputs.
Departures: sizes that do not divide raise a ValueError here, where torch-uncertainty
rounds the channel counts up; gamma is not silently lowered.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ensembling import checks
from ensembling.models.common import Output


def _check_packing(num_estimators, alpha, gamma) -> None:
  checks.integer(num_estimators, name="num_estimators (ensemble size M)")
  if not alpha > 0:
    raise ValueError(f"alpha (width factor) must be > 0, got {alpha!r}.")
  checks.integer(gamma, name="gamma (groups per estimator)")


def packed_width(features: int, *, num_estimators: int, alpha: float, gamma: int = 1,
                 last: bool = False, name: str = "packed layer") -> int:
  """Total channels of a packed layer (alpha * features, or M * features if `last`).

  Raises a ValueError unless the count is an integer divisible by M * gamma.

  Args:
    features: the base layer's width (classes when `last`).
    num_estimators: M.
    alpha: width factor.
    gamma: groups per estimator.
    last: output layer (each estimator has `features` outputs).
    name: for the error message.

  Returns:
    The number of output channels.

  >>> packed_width(64, num_estimators=4, alpha=2)
  128
  """
  _check_packing(num_estimators, alpha, gamma)
  total = num_estimators * features if last else alpha * features
  if abs(total - round(total)) > 1e-9:
    raise ValueError(f"{name}: alpha * features = {alpha} * {features} is not an integer.")
  total = int(round(total))
  groups = num_estimators * gamma
  if total % groups:
    raise ValueError(f"{name}: {total} channels (alpha={alpha} x features={features}"
                     f"{', last' if last else ''}) are not divisible by num_estimators * "
                     f"gamma = {num_estimators} * {gamma} = {groups}.")
  return total


class PackedDense(nn.Module):
  """Grouped dense layer of a Packed-Ensemble.

  Input (..., D_in) with the estimators' channels in contiguous blocks (any D_in when
  `first`); output (..., packed_width(features)). Parameters: `kernel` (G, D_in / G,
  D_out / G) with G = M * gamma groups (G = 1 when `first`: kernel (1, D_in, D_out)),
  group g mapping input block g to output block g; `bias` (D_out,).

  Attributes:
    features: the base layer's width (per-estimator outputs when `last`).
    num_estimators: M.
    alpha: width factor.
    gamma: groups per estimator (ignored when `first`: the input is shared).
    first: input layer.
    last: output layer.
    use_bias: add a bias.
  """
  features: int
  num_estimators: int
  alpha: float = 2
  gamma: int = 1
  first: bool = False
  last: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x)
    if x.ndim < 1:
      raise ValueError("PackedDense expects (..., D_in) inputs, got a scalar.")
    out = packed_width(self.features, num_estimators=self.num_estimators, alpha=self.alpha,
                       gamma=1 if self.first else self.gamma, last=self.last,
                       name="PackedDense")
    groups = 1 if self.first else self.num_estimators * self.gamma
    d_in = x.shape[-1]
    if d_in % groups:
      raise ValueError(f"PackedDense: input width {d_in} is not divisible by num_estimators * "
                       f"gamma = {groups} (is the previous layer packed the same way, or "
                       "should this layer be first=True?).")
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=1, out_axis=2, batch_axis=(0,))
    kernel = self.param("kernel", init, (groups, d_in // groups, out // groups))
    xg = x.reshape(x.shape[:-1] + (groups, d_in // groups))
    y = jnp.einsum("...gi,gio->...go", xg, kernel).reshape(x.shape[:-1] + (out,))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (out,))
    return y


class PackedConv(nn.Module):
  """Grouped 2-D convolution (NHWC) of a Packed-Ensemble: `nn.Conv` with
  feature_group_count = M * gamma (1 when `first`).

  Input (B, H, W, C_in), output (B, H', W', packed_width(features)). Parameters (the
  `conv` submodule): `kernel` (kh, kw, C_in / G, C_out), `bias` (C_out,); output block
  g (C_out / G channels) sees input block g only.

  Attributes:
    features: the base layer's filters (per-estimator outputs when `last`).
    kernel_size: (kh, kw).
    num_estimators: M.
    alpha, gamma, first, last: as `PackedDense`.
    strides, padding, use_bias: as `nn.Conv`.
  """
  features: int
  kernel_size: Sequence[int]
  num_estimators: int
  alpha: float = 2
  gamma: int = 1
  first: bool = False
  last: bool = False
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x)
    if x.ndim != 4:
      raise ValueError(f"PackedConv expects NHWC inputs (B, H, W, C), got shape {x.shape}.")
    out = packed_width(self.features, num_estimators=self.num_estimators, alpha=self.alpha,
                       gamma=1 if self.first else self.gamma, last=self.last,
                       name="PackedConv")
    groups = 1 if self.first else self.num_estimators * self.gamma
    if x.shape[-1] % groups:
      raise ValueError(f"PackedConv: {x.shape[-1]} input channels are not divisible by "
                       f"num_estimators * gamma = {groups} (should this layer be "
                       "first=True?).")
    return nn.Conv(out, tuple(self.kernel_size), strides=tuple(self.strides),
                   padding=self.padding, feature_group_count=groups, use_bias=self.use_bias,
                   name="conv")(x)


class PackedMLP(nn.Module):
  """Packed-Ensemble of M ReLU MLPs, each of widths alpha * w / M.

  Layer 0 is `first` (shared input), the hidden layers are grouped with gamma groups per
  estimator, and the head is `last` with gamma = 1 (every class output sees the whole
  estimator). With gamma = 1, estimator m is exactly `MLP(widths=[alpha * w / M],
  num_classes)` whose weights are the m-th diagonal blocks.

  Attributes:
    widths: the base network's hidden widths w.
    num_classes: C per estimator.
    num_estimators: M.
    alpha: width factor.
    gamma: groups per estimator in the hidden layers after the first.

  Returns (from __call__):
    Output(features (M, B, alpha * widths[-1] / M), logits (M, B, C)), member first.

  >>> model = PackedMLP(widths=(32, 32), num_classes=10, num_estimators=4, alpha=2)
  >>> out, _ = model.init_with_output(jax.random.PRNGKey(0), jnp.ones((5, 28, 28, 1)))
  >>> out.features.shape, out.logits.shape
  ((4, 5, 16), (4, 5, 10))
  """
  widths: Sequence[int] = (512, 512)
  num_classes: int = 10
  num_estimators: int = 4
  alpha: float = 2
  gamma: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    del train  # no dropout / BatchNorm
    x = jnp.asarray(x)
    if not self.widths:
      raise ValueError("PackedMLP needs at least one hidden layer (widths is empty).")
    m = self.num_estimators
    h = x.reshape((x.shape[0], -1))
    for i, w in enumerate(self.widths):
      h = nn.relu(PackedDense(w, m, alpha=self.alpha, gamma=self.gamma, first=i == 0,
                              name=f"Dense_{i}")(h))
    logits = PackedDense(self.num_classes, m, alpha=self.alpha, gamma=1, last=True,
                         name="head")(h)
    b = x.shape[0]
    per_member = lambda a: jnp.transpose(a.reshape((b, m, -1)), (1, 0, 2))
    return Output(per_member(h), per_member(logits))


# --------------------------------------------------------------------------- training
# (shared helpers: batchensemble's label check and chunked predict)

def loss(logits_MxBxC, labels) -> jax.Array:
  """Every estimator's cross-entropy, averaged over estimators and examples
  (torch-uncertainty: `criterion(logits, targets.repeat(M))`).

  Args:
    logits_MxBxC: the estimators' logits.
    labels: (B,) shared by all estimators, or (M, B).

  Returns:
    A scalar.
  """
  from ensembling.models import batchensemble
  labels = jnp.asarray(labels)
  if labels.ndim == 1 and logits_MxBxC.ndim == 3:
    labels = jnp.broadcast_to(labels, logits_MxBxC.shape[:1] + labels.shape)
  batchensemble._check_member_logits(logits_MxBxC, labels, "packed.loss")
  return optax.softmax_cross_entropy_with_integer_labels(logits_MxBxC, labels).mean()


def train_step(state, batch, key, *, model, tx):
  """One optimizer step of the Packed-Ensemble: ONE model state, no member axis.

  All estimators see the same batch {"x": (B, ...), "y": (B,)} (the input is shared).
  For `train.fit`: `jax.jit(functools.partial(train_step, model=m, tx=tx))` on
  `members.init_state(variables, tx)`.

  Args:
    state: {"params", "batch_stats", "opt_state", "step"}.
    batch: {"x": (B, ...), "y": (B,)}.
    key: dropout key.
    model: the packed model (logits (M, B, C)).
    tx: the optimizer.

  Returns:
    (state, {"loss", "accuracy" (mean over estimators), "grad_norm"}).
  """
  from ensembling import members
  if jnp.ndim(batch["y"]) != 1:
    raise ValueError(f"A Packed-Ensemble trains on one shared batch (x (B, ...), y (B,)); got "
                     f"y of shape {jnp.shape(batch['y'])}.")
  return members.train_step(state, batch, key, model=model, tx=tx, loss_fn=loss)


def predict(model, variables, x, *, batch_size: int = 1000):
  """Every estimator's logits (M, N, C): one forward pass per chunk.

  Args:
    model: the packed model.
    variables: {"params", ...} (a training state works).
    x: inputs (N, ...).
    batch_size: examples per forward pass.

  Returns:
    NumPy logits (M, N, C).
  """
  from ensembling.models import batchensemble
  return batchensemble._chunked(_predict_fn(batchensemble._as_model(model)),
                                batchensemble._variables(variables), x, batch_size)


@functools.lru_cache(maxsize=32)
def _predict_fn(m):
  return jax.jit(lambda v, xb: m.apply(v, xb, train=False)[0].logits)

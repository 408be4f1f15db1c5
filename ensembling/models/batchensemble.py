"""BatchEnsemble (Wen, Tran & Ba, ICLR 2020): one shared weight, rank-1 members.

Member k of a BatchEnsemble layer uses the weight W_k = W * (r_k s_k^T) (elementwise),
where W (D_in x D_out) is shared, r_k (D_in) and s_k (D_out) are the member's "fast
weights", and b_k its own bias. It is computed without forming W_k:

    y_k = ((x_k * r_k) @ W) * s_k + b_k.

Batch layout: the layers take the K members' inputs stacked on the batch axis,
MEMBER-MAJOR: rows [k*B, (k+1)*B) belong to member k (the paper's "mini-batch repeated
K times" at test time is `repeat_batch(x, num_members=K)`; during training each
member may also get its own B examples). The model returns member-first outputs,
`Output(features_KxBxD, logits_KxBxC)`, ready for `ensemble.average_probs`.

Fast-weight initialization follows uncertainty-baselines' `random_sign_init` flag:
a value p > 0 draws random signs (+1 with probability p; the paper's choice with
p = 0.5), a value v < 0 draws N(1, v^2) (their default, v = -0.5).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ensembling.models.common import Output

Initializer = Callable[..., jax.Array]


def fast_weight_init(random_sign_init: float = -0.5) -> Initializer:
  """Initializer for the fast weights r_k, s_k.

  Args:
    random_sign_init: p > 0: +1 with probability p, -1 otherwise; v < 0: N(1, v^2).

  Returns:
    A Flax initializer `init(key, shape, dtype)`.

  >>> w = fast_weight_init(0.5)(jax.random.PRNGKey(0), (1000,))
  >>> sorted(set(w.tolist()))
  [-1.0, 1.0]
  """
  if random_sign_init == 0:
    raise ValueError("random_sign_init must be > 0 (random signs) or < 0 (N(1, v^2)), not 0.")

  def init(key, shape, dtype=jnp.float32):
    if random_sign_init > 0:
      return jnp.where(jax.random.bernoulli(key, random_sign_init, shape), 1.0, -1.0).astype(dtype)
    return (1.0 - random_sign_init * jax.random.normal(key, shape)).astype(dtype)
  return init


def _check_members(num_members: int) -> None:
  if not isinstance(num_members, int) or num_members < 1:
    raise ValueError(f"num_members (ensemble size) must be an integer >= 1, got {num_members!r}.")


def _split(x: jax.Array, num_members: int, name: str) -> jax.Array:
  """(K*B, ...) -> (K, B, ...), member-major."""
  if x.ndim < 1 or x.shape[0] % num_members:
    raise ValueError(f"{name}: the batch axis ({x.shape[0] if x.ndim else 'none'}) must hold "
                     f"num_members={num_members} equal member-major groups (K*B rows; "
                     "use repeat_batch(x, num_members=K) to give every member the same batch).")
  return x.reshape((num_members, x.shape[0] // num_members) + x.shape[1:])


def _per_member(v: jax.Array, ndim: int) -> jax.Array:
  """(K, D) -> (K, 1, ..., 1, D) to broadcast over a (K, B, ..., D) array of `ndim` axes."""
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[1],))


def repeat_batch(x, *, num_members: int) -> jax.Array:
  """(B, ...) -> (K*B, ...): every member gets the whole batch (member-major).

  Args:
    x: a batch.
    num_members: K.

  Returns:
    K copies of x stacked on the batch axis.

  >>> repeat_batch(jnp.array([1, 2]), num_members=3).tolist()
  [1, 2, 1, 2, 1, 2]
  """
  _check_members(num_members)
  x = jnp.asarray(x)
  return jnp.concatenate([x] * num_members, axis=0)


class BEDense(nn.Module):
  """BatchEnsemble dense layer: y_k = ((x_k * r_k) @ W) * s_k + b_k.

  Input (K*B, ..., D_in) member-major; output (K*B, ..., features). Parameters:
  `kernel` W (D_in, features), `r` (K, D_in), `s` (K, features), `bias` (K, features).

  Attributes:
    features: output size.
    num_members: K.
    use_bias: per-member bias b_k.
    kernel_init: for the shared W (LeCun normal, as nn.Dense).
    fast_init: for r and s (see `fast_weight_init`).
  """
  features: int
  num_members: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  fast_init: Initializer = fast_weight_init(-0.5)

  @nn.compact
  def __call__(self, x):
    _check_members(self.num_members)
    x = jnp.asarray(x)
    if x.ndim < 2:
      raise ValueError(f"BEDense expects (K*B, ..., D_in) inputs, got shape {x.shape}.")
    k, d_in = self.num_members, x.shape[-1]
    xk = _split(x, k, "BEDense")
    kernel = self.param("kernel", self.kernel_init, (d_in, self.features))
    r = self.param("r", self.fast_init, (k, d_in))
    s = self.param("s", self.fast_init, (k, self.features))
    y = jnp.matmul(xk * _per_member(r, xk.ndim), kernel) * _per_member(s, xk.ndim)
    if self.use_bias:
      y = y + _per_member(self.param("bias", nn.initializers.zeros, (k, self.features)), xk.ndim)
    return y.reshape(x.shape[:-1] + (self.features,))


class BEConv(nn.Module):
  """BatchEnsemble 2-D convolution (NHWC): y_k = conv(x_k * r_k, W) * s_k + b_k.

  Equal to member k convolving with W * (r_k s_k^T) (r over input channels, s over
  output channels, broadcast over the kernel window). Input (K*B, H, W, C_in)
  member-major. Parameters: `kernel` (kh, kw, C_in, features), `r` (K, C_in),
  `s` (K, features), `bias` (K, features).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    num_members: K.
    strides: (sh, sw).
    padding: "SAME", "VALID" or explicit ((lo, hi), (lo, hi)), as `jax.lax.conv`.
    use_bias: per-member bias.
    kernel_init, fast_init: as `BEDense`.
  """
  features: int
  kernel_size: Sequence[int]
  num_members: int
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  fast_init: Initializer = fast_weight_init(-0.5)

  @nn.compact
  def __call__(self, x):
    _check_members(self.num_members)
    x = jnp.asarray(x)
    if x.ndim != 4:
      raise ValueError(f"BEConv expects NHWC inputs (K*B, H, W, C), got shape {x.shape}.")
    k, c_in = self.num_members, x.shape[-1]
    xk = _split(x, k, "BEConv")
    kernel = self.param("kernel", self.kernel_init, tuple(self.kernel_size) + (c_in, self.features))
    r = self.param("r", self.fast_init, (k, c_in))
    s = self.param("s", self.fast_init, (k, self.features))
    xr = (xk * _per_member(r, 5)).reshape(x.shape)
    y = jax.lax.conv_general_dilated(xr, kernel, tuple(self.strides), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    yk = _split(y, k, "BEConv") * _per_member(s, 5)
    if self.use_bias:
      yk = yk + _per_member(self.param("bias", nn.initializers.zeros, (k, self.features)), 5)
    return yk.reshape(y.shape)


class BatchEnsembleMLP(nn.Module):
  """A ReLU MLP of `BEDense` layers: K rank-1 members sharing every weight matrix.

  Input (K*B, ...) member-major (flattened per example); member k is exactly an
  `MLP(widths, num_classes)` whose layer weights are W * (r_k s_k^T) and biases b_k.

  Attributes:
    widths: hidden sizes.
    num_classes: output size.
    num_members: K.
    random_sign_init: fast-weight initialization (see `fast_weight_init`).

  Returns (from __call__):
    Output(features (K, B, widths[-1]), logits (K, B, num_classes)), member first.

  >>> model = BatchEnsembleMLP(widths=(16,), num_classes=3, num_members=4)
  >>> x = repeat_batch(jnp.ones((5, 8)), num_members=4)   # test time: same batch for all
  >>> out, _ = model.init_with_output(jax.random.PRNGKey(0), x)
  >>> out.logits.shape
  (4, 5, 3)
  """
  widths: Sequence[int] = (512, 512)
  num_classes: int = 10
  num_members: int = 4
  random_sign_init: float = -0.5

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    del train  # no dropout / BatchNorm
    _check_members(self.num_members)
    x = jnp.asarray(x)
    k = self.num_members
    xk = _split(x, k, "BatchEnsembleMLP")
    h = x.reshape((x.shape[0], -1))
    init = fast_weight_init(self.random_sign_init)
    for i, w in enumerate(self.widths):
      h = nn.relu(BEDense(w, k, fast_init=init, name=f"Dense_{i}")(h))
    logits = BEDense(self.num_classes, k, fast_init=init, name="head")(h)
    b = xk.shape[1]
    return Output(h.reshape((k, b, -1)), logits.reshape((k, b, self.num_classes)))

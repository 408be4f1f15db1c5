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

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import checks
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
  checks.integer(num_members, name="num_members (ensemble size)")


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


# --------------------------------------------------------------------------- training

def _num_members_of(model, num_members):
  """K from the argument, else from the model's (or wrapped module's) `num_members`."""
  k = num_members
  if k is None:
    k = getattr(model, "num_members", None)
    k = getattr(getattr(model, "module", None), "num_members", None) if k is None else k
  if k is None:
    raise ValueError("Cannot tell the ensemble size: pass num_members=K (the model has no "
                     "`num_members` attribute).")
  _check_members(k)
  return k


def _check_member_logits(logits, labels, name):
  if logits.ndim != 3 or labels.shape != logits.shape[:2]:
    raise ValueError(f"{name} expects member logits (K, B, C) and labels (K, B), got "
                     f"{logits.shape} and {labels.shape}.")


def loss(logits_KxBxC, labels_KxB) -> jax.Array:
  """Every member's cross-entropy on its own labels, averaged over members and examples.

  As uncertainty-baselines' BatchEnsemble (labels tiled K times, one `reduce_mean`):
  mean_k mean_b -log softmax(logits[k, b])[labels[k, b]].

  Args:
    logits_KxBxC: member-first logits.
    labels_KxB: integer labels, member k's in row k.

  Returns:
    A scalar.
  """
  _check_member_logits(logits_KxBxC, labels_KxB, "batchensemble.loss")
  return optax.softmax_cross_entropy_with_integer_labels(logits_KxBxC, labels_KxB).mean()


def member_batch(batch, *, num_members: int) -> dict:
  """The model's training batch: inputs (K*B, ...) member-major, labels (K, B).

  Args:
    batch: {"x": (K, B, ...), "y": (K, B)}: member k trains on its own B examples
      (`train.make_batch_fn(..., num_members=K)`, torch-uncertainty's default); or
      {"x": (B, ...), "y": (B,)}: every member on the same batch (uncertainty-baselines
      tiles it).
    num_members: K.

  Returns:
    {"x": (K*B, ...), "y": (K, B)}.
  """
  _check_members(num_members)
  x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
  k = num_members
  if y.ndim == 1:
    if x.shape[:1] != y.shape:
      raise ValueError(f"x {x.shape} and y {y.shape} must share the batch axis.")
    return {"x": repeat_batch(x, num_members=k), "y": jnp.broadcast_to(y, (k,) + y.shape)}
  if y.ndim != 2 or y.shape[0] != k or x.shape[:2] != y.shape:
    raise ValueError(f"A per-member batch must be x (K, B, ...) and y (K, B) with K={k}, got "
                     f"{x.shape} and {y.shape}.")
  return {"x": x.reshape((k * y.shape[1],) + x.shape[2:]), "y": y}


def train_step(state, batch, key, *, model, tx, num_members: int | None = None):
  """One optimizer step of the whole BatchEnsemble: ONE model state, no member axis.

  `jax.jit(functools.partial(train_step, model=m, tx=tx))` is a `train.fit` step_fn for
  a state from `members.init_state(variables, tx)`.

  Args:
    state: {"params", "batch_stats", "opt_state", "step"} of the one model.
    batch: see `member_batch`.
    key: dropout key.
    model: anything `models.as_model` accepts returning (K, B, C) logits.
    tx: the optimizer.
    num_members: K (default: the model's `num_members`).

  Returns:
    (state, {"loss", "accuracy" (mean over members), "grad_norm"}).

  >>> import functools, numpy as np, optax
  >>> from ensembling import members, train
  >>> x = np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32)
  >>> y = (x[:, 0] > 0).astype(np.int32)
  >>> model, tx = BatchEnsembleMLP(widths=(8,), num_classes=2, num_members=3), optax.sgd(0.1)
  >>> state = members.init_state(model.init(jax.random.key(0), repeat_batch(x[:1], num_members=3)), tx)
  >>> batch_fn, _ = train.make_batch_fn(x, y, seed=0, batch_size=8, num_members=3)
  >>> state, _, _ = train.fit(state, step_fn=jax.jit(functools.partial(train_step, model=model, tx=tx)),
  ...                         batch_fn=batch_fn, num_steps=4, key=jax.random.key(1), progress=False)
  >>> int(state["step"]), predict(model, state, x).shape        # one model; (K, N, C) logits
  (4, (3, 32, 2))
  """
  from ensembling import members
  k = _num_members_of(model, num_members)
  return members.train_step(state, member_batch(batch, num_members=k), key, model=model,
                            tx=tx, loss_fn=loss)


def predict(model, variables, x, *, num_members: int | None = None,
            batch_size: int = 1000):
  """Every member's logits (K, N, C) on `x`: one forward pass of the repeated batch per chunk.

  Args:
    model: the BatchEnsemble model (anything `models.as_model` accepts).
    variables: {"params", ...} (a training state works).
    x: inputs (N, ...).
    num_members: K (default: the model's `num_members`).
    batch_size: examples per forward pass (K * batch_size rows).

  Returns:
    NumPy logits (K, N, C).
  """
  k = _num_members_of(model, num_members)
  return _chunked(_predict_fn(_as_model(model), k), _variables(variables), x, batch_size)


def _as_model(model):
  from ensembling.models.contract import as_model
  return as_model(model)


def _variables(tree):
  from ensembling import members
  return members.variables_of(tree)


def _chunked(fn, variables, x, batch_size):
  """fn(variables, chunk) -> (K, b, C) over chunks of `batch_size`, concatenated on axis 1."""
  batch_size = checks.integer(batch_size, name="batch_size")
  outs = [np.asarray(fn(variables, jnp.asarray(x[i:i + batch_size])))
          for i in range(0, len(x), batch_size)]
  if not outs:
    raise ValueError("predict got no examples.")
  return np.concatenate(outs, axis=1)


@functools.lru_cache(maxsize=32)
def _predict_fn(m, k):
  return jax.jit(lambda v, xb: m.apply(v, repeat_batch(xb, num_members=k), train=False)[0].logits)

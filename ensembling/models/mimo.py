"""MIMO: multi-input multi-output networks (Havasi et al., ICLR 2021).

One network takes K inputs at once, concatenated at the input layer, and has K output
heads; trained with independent examples per head, it holds K subnetworks that act
as an ensemble in a single forward pass.

Layouts:
  input  (B, K, ...): example b's K inputs on axis 1 (the paper's and
         uncertainty-baselines' `tf.stack(..., axis=1)`); at test time the same image
         K times, `repeat_input(x, num_members=K)`.
  output Output(features (B, D), logits (K, B, C)): the features are the shared trunk's
         (one per example, not per head), the logits member-first like the other
         ensembles, so `ensemble.average_probs(out.logits)` is the MIMO prediction.
  labels `mimo_batch` returns them as (K, B), aligned with the logits.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ensembling import checks
from ensembling.models import batchensemble
from ensembling.models.common import Output


def _check_input(x: jax.Array, num_members: int, min_ndim: int, name: str) -> None:
  if x.ndim < min_ndim or x.shape[1] != num_members:
    raise ValueError(f"{name} expects inputs (B, K, ...) with the member axis K="
                     f"{num_members} at position 1, got shape {x.shape}; at test time use "
                     f"repeat_input(x, num_members={num_members}).")


def repeat_input(x, *, num_members: int) -> jax.Array:
  """(B, ...) -> (B, K, ...): every head sees the same example (evaluation).

  Args:
    x: a batch.
    num_members: K.

  Returns:
    The batch with a member axis of size K at position 1.

  >>> repeat_input(jnp.zeros((5, 28, 28, 1)), num_members=3).shape
  (5, 3, 28, 28, 1)
  """
  batchensemble._check_members(num_members)
  x = jnp.asarray(x)
  return jnp.repeat(x[:, None], num_members, axis=1)


def mimo_batch(key, x, y, *, num_members: int, repeat_prob: float = 0.0,
               batch_repetitions: int = 1) -> tuple[jax.Array, jax.Array]:
  """A MIMO training batch: K inputs per row, independently shuffled per head.

  As uncertainty-baselines' `baselines/cifar/mimo.py`: the B indices are tiled
  `batch_repetitions` times and shuffled (`main`); the first
  n_shuffled = floor(R*B * (1 - repeat_prob)) of them are shuffled again,
  independently for each head, and the remaining rows keep `main`'s order for every
  head, so in a fraction `repeat_prob` of the rows all heads see the same example.
  Keys: `main_key, *head_keys = jax.random.split(key, K + 1)`, and every shuffle is
  `jax.random.permutation`.

  Args:
    key: JAX PRNG key.
    x: (B, ...) examples.
    y: (B,) labels (or any (B, ...) per-example targets).
    num_members: K.
    repeat_prob: input repetition probability rho in [0, 1].
    batch_repetitions: R >= 1; the batch has R*B rows and every head sees each example
      R times.

  Returns:
    (x_mimo (R*B, K, ...), y_mimo (K, R*B, ...)): head k of row i gets x[idx_k[i]]
    with label y[idx_k[i]].

  >>> xm, ym = mimo_batch(jax.random.PRNGKey(0), jnp.zeros((8, 4)), jnp.arange(8), num_members=3)
  >>> xm.shape, ym.shape
  ((8, 3, 4), (3, 8))
  """
  batchensemble._check_members(num_members)
  if not 0.0 <= repeat_prob <= 1.0:
    raise ValueError(f"repeat_prob must be in [0, 1], got {repeat_prob}.")
  checks.integer(batch_repetitions, name="batch_repetitions")
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must share the batch axis, got {x.shape} and {y.shape}.")
  n = x.shape[0] * batch_repetitions
  n_shuffled = int(n * (1.0 - repeat_prob))
  main_key, *head_keys = jax.random.split(key, num_members + 1)
  main = jax.random.permutation(main_key, jnp.tile(jnp.arange(x.shape[0]), batch_repetitions))
  idx = jnp.stack([jnp.concatenate([jax.random.permutation(k, main[:n_shuffled]),
                                    main[n_shuffled:]]) for k in head_keys])  # (K, n)
  return jnp.moveaxis(x[idx], 0, 1), y[idx]


class MIMOMLP(nn.Module):
  """ReLU MLP with K inputs concatenated at the first layer and K softmax heads.

  The (B, K, ...) input is flattened per example to K * D features (member-major), the
  hidden layers are shared, and the K heads are one Dense of K * C outputs (head k:
  columns [k*C, (k+1)*C)).

  Attributes:
    widths: hidden sizes.
    num_classes: C per head.
    num_members: K (heads and inputs).

  Returns (from __call__):
    Output(features (B, widths[-1]), logits (K, B, C)).

  >>> model = MIMOMLP(widths=(32,), num_classes=10, num_members=3)
  >>> x = repeat_input(jnp.ones((5, 28, 28, 1)), num_members=3)
  >>> out, _ = model.init_with_output(jax.random.PRNGKey(0), x)
  >>> out.features.shape, out.logits.shape
  ((5, 32), (3, 5, 10))
  """
  widths: Sequence[int] = (512, 512)
  num_classes: int = 10
  num_members: int = 3

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    del train  # no dropout / BatchNorm
    batchensemble._check_members(self.num_members)
    x = jnp.asarray(x)
    _check_input(x, self.num_members, 3, "MIMOMLP")
    h = x.reshape((x.shape[0], -1))
    for i, w in enumerate(self.widths):
      h = nn.relu(nn.Dense(w, name=f"Dense_{i}")(h))
    logits = nn.Dense(self.num_members * self.num_classes, name="head")(h)
    logits = logits.reshape((x.shape[0], self.num_members, self.num_classes))
    return Output(h, jnp.transpose(logits, (1, 0, 2)))


class MIMOCNN(nn.Module):
  """Small MIMO conv net: K images concatenated on the channel axis, K heads.

  (B, K, H, W, C) -> (B, H, W, K*C) (image k's channels at [k*C, (k+1)*C)) -> per stage
  a 3x3 'same' conv, ReLU and 2x2 max pooling -> flatten -> one Dense of K * classes.

  Attributes:
    stages: filters per stage.
    num_classes: C per head.
    num_members: K.

  Returns (from __call__):
    Output(features (B, D) flattened last stage, logits (K, B, num_classes)).
  """
  stages: Sequence[int] = (32, 64)
  num_classes: int = 10
  num_members: int = 3

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    del train
    batchensemble._check_members(self.num_members)
    x = jnp.asarray(x)
    if x.ndim != 5:
      raise ValueError(f"MIMOCNN expects (B, K, H, W, C) images, got shape {x.shape}.")
    _check_input(x, self.num_members, 5, "MIMOCNN")
    b, k, hh, ww, c = x.shape
    h = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape((b, hh, ww, k * c))
    for s, filters in enumerate(self.stages):
      h = nn.relu(nn.Conv(filters, (3, 3), padding="SAME", name=f"conv{s}")(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    features = h.reshape((b, -1))
    logits = nn.Dense(k * self.num_classes, name="head")(features)
    return Output(features, jnp.transpose(logits.reshape((b, k, self.num_classes)), (1, 0, 2)))


# --------------------------------------------------------------------------- training
# (shared with batchensemble: its ensemble-size check and lookup, label check, chunked predict)

def loss(logits_KxBxC, labels_KxB) -> jax.Array:
  """The heads' cross-entropies summed, averaged over the batch (the paper's and
  uncertainty-baselines' MIMO loss): sum_k mean_b -log softmax(logits[k, b])[labels[k, b]].

  Args:
    logits_KxBxC: the heads' logits.
    labels_KxB: head k's labels in row k (`mimo_batch`'s y).

  Returns:
    A scalar.
  """
  batchensemble._check_member_logits(logits_KxBxC, labels_KxB, "mimo.loss")
  return optax.softmax_cross_entropy_with_integer_labels(logits_KxBxC, labels_KxB).mean(1).sum()


def train_step(state, batch, key, *, model, tx, num_members: int | None = None,
               repeat_prob: float = 0.0, batch_repetitions: int = 1):
  """One optimizer step of the MIMO network: ONE model state, no member axis.

  The plain batch {"x": (B, ...), "y": (B,)} (`train.make_batch_fn(x, y, ...)`) becomes
  `mimo_batch(shuffle_key, x, y, ...)` with `shuffle_key, dropout_key = split(key)`, so
  each head trains on its own shuffle of the batch. For `train.fit`:
  `jax.jit(functools.partial(train_step, model=m, tx=tx, num_members=K))` on
  `members.init_state(variables, tx)`.

  Args:
    state: {"params", "batch_stats", "opt_state", "step"}.
    batch: {"x": (B, ...), "y": (B,)}.
    key: this step's key.
    model: the MIMO model (inputs (B, K, ...), logits (K, B, C)).
    tx: the optimizer.
    num_members: K (default: the model's `num_members`).
    repeat_prob, batch_repetitions: see `mimo_batch`.

  Returns:
    (state, {"loss", "accuracy" (mean over heads), "grad_norm"}).
  """
  from ensembling import members
  k = batchensemble._num_members_of(model, num_members)
  if jnp.ndim(batch["y"]) != 1:
    raise ValueError(f"MIMO trains on a plain batch (x (B, ...), y (B,)); got y of shape "
                     f"{jnp.shape(batch['y'])}.")
  shuffle_key, dropout_key = jax.random.split(key)
  xm, ym = mimo_batch(shuffle_key, batch["x"], batch["y"], num_members=k,
                      repeat_prob=repeat_prob, batch_repetitions=batch_repetitions)
  return members.train_step(state, {"x": xm, "y": ym}, dropout_key, model=model, tx=tx,
                            loss_fn=loss)


def predict(model, variables, x, *, num_members: int | None = None, batch_size: int = 1000):
  """Every head's logits (K, N, C): one forward pass of `repeat_input(x)` per chunk.

  Args:
    model: the MIMO model.
    variables: {"params", ...} (a training state works).
    x: inputs (N, ...).
    num_members: K (default: the model's `num_members`).
    batch_size: examples per forward pass.

  Returns:
    NumPy logits (K, N, C).
  """
  k = batchensemble._num_members_of(model, num_members)
  return batchensemble._chunked(_predict_fn(batchensemble._as_model(model), k),
                                batchensemble._variables(variables), x, batch_size)


@functools.lru_cache(maxsize=32)
def _predict_fn(m, k):
  return jax.jit(lambda v, xb: m.apply(v, repeat_input(xb, num_members=k), train=False)[0].logits)

"""K members trained at once: init, one-member steps, and member-parallel wrappers.

A member's training state is a plain dict::

    {"params": ..., "batch_stats": ... (or {}), "opt_state": ..., "step": int32}

The ensemble holds the same dict with a leading member axis on every leaf
(`state_K`). `train_step` is written for one member; `ensemble_step` turns it into a
member-parallel function with one of several strategies (see `STRATEGIES`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ensembling import im2col as im2col_lib
from ensembling import losses
from ensembling import tree as tree_lib

PyTree = Any
State = dict[str, Any]
STRATEGIES = ("auto", "vmap", "unroll", "map", "loop", "im2col", "unroll_im2col")
MEMBER_AXIS = "members"


# --------------------------------------------------------------------------- init

def init_members(key: jax.Array, model, sample_input, num_members: int) -> PyTree:
  """Initialises `num_members` independent copies of `model`, stacked on axis 0.

  Args:
    key: PRNG key; member k uses `jax.random.split(key, K)[k]`.
    model: a Flax Linen module taking `(x, *, train)`.
    sample_input: an example batch (shape only matters).
    num_members: K.

  Returns:
    Variables (`params` and, if the model has BatchNorm, `batch_stats`) with a
    leading member axis of size K.
  """
  if num_members < 1:
    raise ValueError(f"num_members must be >= 1, got {num_members}.")
  keys = jax.random.split(key, num_members)
  x = jnp.asarray(sample_input)

  @jax.jit
  @jax.vmap
  def init_one(k):
    pk, dk = jax.random.split(k)
    return model.init({"params": pk, "dropout": dk}, x, train=False)

  return jax.tree.map(lambda a: a, dict(init_one(keys)))


def init_state(variables: PyTree, tx: optax.GradientTransformation) -> State:
  """One member's training state from its variables."""
  params = variables["params"]
  return {
      "params": params,
      "batch_stats": variables.get("batch_stats", {}),
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
  }


def init_states(variables_K: PyTree, tx: optax.GradientTransformation) -> State:
  """The stacked training states of all members (vmapped `init_state`)."""
  return jax.jit(jax.vmap(functools.partial(init_state, tx=tx)))(variables_K)


def variables_of(state: State) -> PyTree:
  """The Flax variables (`params`, `batch_stats` if any) held in a state."""
  v = {"params": state["params"]}
  if jax.tree.leaves(state.get("batch_stats", {})):
    v["batch_stats"] = state["batch_stats"]
  return v


# --------------------------------------------------------------------------- steps

def train_step(state: State, batch: dict[str, jax.Array], key: jax.Array, *,
               apply_fn: Callable, tx: optax.GradientTransformation,
               loss_fn: Callable = losses.softmax_cross_entropy) -> tuple[State, dict]:
  """One SGD step of one member.

  Args:
    state: the member's state dict.
    batch: {"x": (B, ...), "y": (B,)}.
    key: PRNG key for dropout.
    apply_fn: `model.apply`.
    tx: the optax transformation.
    loss_fn: `loss_fn(logits, labels) -> scalar`.

  Returns:
    (new state, {"loss", "accuracy", "grad_norm"}).
  """
  has_bn = bool(jax.tree.leaves(state["batch_stats"]))

  def loss_of(params):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = state["batch_stats"]
      out, new_vars = apply_fn(variables, batch["x"], train=True, rngs={"dropout": key},
                               mutable=["batch_stats"])
      new_stats = new_vars["batch_stats"]
    else:
      out = apply_fn(variables, batch["x"], train=True, rngs={"dropout": key})
      new_stats = state["batch_stats"]
    return loss_fn(out.logits, batch["y"]), (out.logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
      state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {
      **state,
      "params": optax.apply_updates(state["params"], updates),
      "batch_stats": new_stats,
      "opt_state": opt_state,
      "step": state["step"] + 1,
  }
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
      "grad_norm": optax.global_norm(grads),
  }
  return new_state, metrics


def has_convolutions(params: PyTree, *, stacked: bool = True) -> bool:
  """Whether any parameter is a conv kernel (rank >= 4, plus the member axis)."""
  min_rank = 5 if stacked else 4
  return any(np.ndim(x) >= min_rank for x in jax.tree.leaves(params))


def resolve_strategy(strategy: str, params_K: PyTree) -> str:
  """Picks the member-parallel strategy; 'auto' depends on backend and model.

  Measured on a 2-core CPU (benchmarks/README.md): vmap is about as fast as a loop for
  dense layers, but vmapped convolutions become grouped convolutions that XLA:CPU runs
  ~4x slower than K separate ones. On one CPU device, models with convolutions get
  'unroll' (K one-member steps traced into one jit, run one after the other): 1.25x the
  loop at K=8 where 'unroll_im2col' was no faster and compiles 3x longer. On
  accelerators, and with several devices (the member axis sharded), 'vmap' is the
  default.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown members_strategy {strategy!r}; choose one of {STRATEGIES}.")
  if strategy != "auto":
    return strategy
  if jax.default_backend() == "cpu" and jax.device_count() == 1 and has_convolutions(params_K):
    return "unroll"
  return "vmap"


def over_members(fn: Callable, *, strategy: str, num_members: int,
                 donate: tuple[int, ...] = ()) -> Callable:
  """Makes `fn(*args)` (one member) run on args stacked on a member axis.

  Strategies: 'vmap' (jit(vmap(fn))), 'unroll' (a Python loop over members traced
  into one jit: K separate computations in one program, chained with
  `optimization_barrier` so that XLA runs them one at a time instead of interleaving
  them, which was 0.8x a loop unchained and 1.25x chained for a CNN at K=8), 'map' (`jax.lax.map` over
  members inside jit), 'loop' (a Python loop of a jitted one-member function, outside
  jit). 'im2col' and 'unroll_im2col' are 'vmap' and 'unroll' of `fn` with its
  convolutions (forward and gradients) rewritten as slices + matrix products
  (`im2col.convs_as_matmuls`): under vmap these become batched matmuls instead of
  grouped convolutions. All return outputs stacked on axis 0 and compute the same
  values (up to float32 summation order).
  """
  if strategy in ("im2col", "unroll_im2col"):
    fn = im2col_lib.convs_as_matmuls(fn)
    strategy = "vmap" if strategy == "im2col" else "unroll"
  if strategy == "vmap":
    return jax.jit(jax.vmap(fn), donate_argnums=donate)
  if strategy == "map":
    return jax.jit(lambda *a: jax.lax.map(lambda t: fn(*t), a), donate_argnums=donate)
  if strategy == "unroll":
    def unrolled(*args):
      outs = []
      for k in range(num_members):
        args_k = jax.tree.map(lambda x: x[k], args)
        if outs:  # member k starts after member k-1 is done: one at a time, in cache
          args_k, _ = jax.lax.optimization_barrier((args_k, outs[-1]))
        outs.append(fn(*args_k))
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jax.jit(unrolled, donate_argnums=donate)
  if strategy == "loop":
    one = jax.jit(fn)

    def looped(*args):
      outs = [one(*jax.tree.map(lambda x: x[k], args)) for k in range(num_members)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return looped
  raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES[1:]}.")


def ensemble_step(*, apply_fn: Callable, tx: optax.GradientTransformation,
                  num_members: int, strategy: str = "vmap",
                  loss_fn: Callable = losses.softmax_cross_entropy,
                  step_fn: Callable = train_step) -> Callable:
  """The member-parallel training step `(state_K, batch_K, keys_K) -> (state_K, metrics_K)`.

  `batch_K` holds each member's own batch: {"x": (K, B, ...), "y": (K, B)}.
  `strategy` must already be resolved (see `resolve_strategy`).
  """
  fn = functools.partial(step_fn, apply_fn=apply_fn, tx=tx, loss_fn=loss_fn)
  return over_members(fn, strategy=strategy, num_members=num_members, donate=(0,))


# --------------------------------------------------------------------------- eval

def predict(apply_fn: Callable, variables_K: PyTree, x: np.ndarray, *,
            batch_size: int = 1000, strategy: str = "vmap",
            with_features: bool = False):
  """Every member's logits (K, N, C) on `x` (and features (K, N, D) if asked).

  Runs in inference mode (`train=False`) over chunks of `batch_size` examples; every
  member sees the same inputs.
  """
  k = tree_lib.num_members(variables_K)
  strategy = resolve_strategy(strategy, variables_K.get("params", variables_K))

  fwd = _predict_fn(apply_fn, with_features, strategy, k)
  outs = []
  n = len(x)
  for start in range(0, n, batch_size):
    xb = np.asarray(x[start:start + batch_size])
    pad = (-len(xb)) % batch_size if n > batch_size else 0
    if pad:  # keep one compiled shape
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
    xb_K = jnp.broadcast_to(xb, (k,) + xb.shape)
    res = fwd(variables_K, xb_K)
    res = jax.tree.map(lambda a: np.asarray(a[:, : a.shape[1] - pad]), res)
    outs.append(res)
  if with_features:
    return (np.concatenate([o[0] for o in outs], axis=1),
            np.concatenate([o[1] for o in outs], axis=1))
  return np.concatenate(outs, axis=1)


@functools.lru_cache(maxsize=32)
def _predict_fn(apply_fn, with_features, strategy, k):
  def one(variables, xb):
    out = apply_fn(variables, xb, train=False)
    return (out.logits, out.features) if with_features else out.logits
  return over_members(one, strategy=strategy, num_members=k)


# --------------------------------------------------------------------------- sharding

def member_mesh(devices=None) -> Mesh:
  """A 1-d mesh over all (or the given) devices, axis name 'members'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (MEMBER_AXIS,))


def shard_members(tree: PyTree, mesh: Mesh | None = None, *, axis: int = 0) -> PyTree:
  """Places `tree` with its member axis (`axis`) split across the mesh's devices.

  With one device this is a no-op. The member count must be divisible by the number
  of devices.
  """
  mesh = mesh or member_mesh()
  ndev = mesh.devices.size
  if ndev == 1:
    return tree

  def put(x):
    x = jnp.asarray(x)
    if x.ndim <= axis or x.shape[axis] % ndev:
      raise ValueError(f"Cannot shard a leaf of shape {x.shape} over {ndev} devices on "
                       f"axis {axis}: members must be a multiple of the device count.")
    spec = P(*([None] * axis + [MEMBER_AXIS]))
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


def member_keys(key: jax.Array, num_members: int) -> jax.Array:
  """One PRNG key per member (used for dropout; folded with the step each step)."""
  return jax.random.split(key, num_members)


@jax.jit
def step_keys(keys_K: jax.Array, step) -> jax.Array:
  """Per-member keys for `step`: deterministic, so a resumed run repeats exactly."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_K)

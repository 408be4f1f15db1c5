"""K members trained at once: init, one-member steps, and member-parallel wrappers.

Every function takes any model the contract accepts (`models.as_model`: a Linen module or
its `.apply`, an NNX module or factory, a pair of pure functions). A member's training
state is a plain dict::

    {"params": ..., "batch_stats": ... (or {}), "opt_state": ..., "step": int32}

The ensemble holds the same dict with a leading member axis on every leaf (`state_K`).
`train_step` is written for one member; `ensemble_step` turns it into a member-parallel
function with one of several strategies (see `STRATEGIES`).

Arrays passed in stay valid: nothing here donates its inputs unless asked
(`ensemble_step(..., donate=True)`, for loops that own their state, as `train.fit` does
with its own copy).

Example (three members of a plain Linen module trained for one step):

>>> import jax, jax.numpy as jnp, flax.linen as nn, optax
>>> net = nn.Dense(2)
>>> v = init_members(jax.random.key(0), net, jnp.ones((1, 3)), 3)
>>> tx = optax.sgd(0.1)
>>> state = init_states(v, tx)
>>> step = ensemble_step(model=net, tx=tx, num_members=3)
>>> batch = {"x": jnp.ones((3, 4, 3)), "y": jnp.zeros((3, 4), jnp.int32)}
>>> state, metrics = step(state, batch, member_keys(jax.random.key(1), 3))
>>> metrics["loss"].shape, step.strategy
((3,), 'vmap')
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ensembling import checks, losses
from ensembling import tree as tree_lib
from ensembling.models.contract import as_model

PyTree = Any
State = dict[str, Any]
STRATEGIES = ("auto", "vmap", "unroll", "map", "loop", "chunked")
DEFAULT_CHUNK = 8  # members per vmapped group of 'chunked'
MAX_UNROLL = 16  # 'auto' unrolls at most this many convolutional members (then: 'loop')
MAX_DENSE_VMAP = 8  # 'auto' vmaps at most this many dense members on one CPU (then: 'loop')
MEMBER_AXIS = "members"


# --------------------------------------------------------------------------- init

def check_num_members(num_members) -> int:
  """`num_members` as an int >= 1, or a ValueError naming it."""
  return checks.integer(num_members, name="num_members")


def init_members(key: jax.Array, model, sample_input, num_members: int) -> PyTree:
  """Initialises `num_members` independent copies of `model`, stacked on axis 0.

  Args:
    key: PRNG key; member k uses `jax.random.split(key, K)[k]`.
    model: anything `models.as_model` accepts.
    sample_input: an example batch (shape only matters).
    num_members: K.

  Returns:
    Variables (`params` and, if the model has BatchNorm, `batch_stats`) with a
    leading member axis of size K.
  """
  k = check_num_members(num_members)
  m = as_model(model)
  if m.kind == "nnx_instance" and k > 1:
    raise ValueError("An nnx.Module instance holds one set of weights, so its K members would "
                     "be identical; pass a factory instead: "
                     "`models.from_nnx(lambda rngs: MyModel(..., rngs=rngs))`.")
  x = jnp.asarray(sample_input)
  variables = jax.jit(jax.vmap(lambda kk: m.init(kk, x)))(jax.random.split(key, k))
  return dict(variables)


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


def variables_of(tree: PyTree) -> PyTree:
  """The model variables (`params`, and `batch_stats` if non-empty) of a state or variables."""
  v = {"params": tree["params"]}
  if jax.tree.leaves(tree.get("batch_stats", {})):
    v["batch_stats"] = tree["batch_stats"]
  return v


# --------------------------------------------------------------------------- steps

def train_step(state: State, batch: dict[str, jax.Array], key: jax.Array, *,
               model, tx: optax.GradientTransformation,
               loss_fn: Callable = losses.softmax_cross_entropy) -> tuple[State, dict]:
  """One optimizer step of one member.

  Args:
    state: the member's state dict.
    batch: {"x": (B, ...), "y": (B,)}.
    key: PRNG key for dropout.
    model: anything `models.as_model` accepts.
    tx: the optax transformation.
    loss_fn: `loss_fn(logits, labels) -> scalar`.

  Returns:
    (new state, {"loss", "accuracy", "grad_norm"}).
  """
  m = as_model(model)

  def loss_of(params):
    variables = {"params": params, "batch_stats": state["batch_stats"]}
    out, new_stats = m.apply(variables, batch["x"], train=True, key=key)
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
      "grad_norm": optax.tree.norm(grads),
  }
  return new_state, metrics


def has_convolutions(params: PyTree, *, stacked: bool = True) -> bool:
  """Whether any parameter is a conv kernel (rank >= 4, plus the member axis)."""
  min_rank = 5 if stacked else 4
  return any(len(np.shape(x)) >= min_rank for x in jax.tree.leaves(params))


def resolve_strategy(strategy: str, params_K: PyTree) -> str:
  """Picks the member-parallel strategy; 'auto' depends on backend, model and K.

  Measured on a 2-core CPU with steps that donate their state, as `train.fit`'s do,
  against a loop of jitted one-member steps over separately held states
  (benchmarks/README.md, "K x strategy"). Dense models: one wide vmap is 1.14-1.19x the
  loop at K = 2..8 but 0.80-0.93x at K = 16..64, where every strategy that splits the
  stacked state into groups inside one program ('chunked', 'unroll', `lax.map`) is
  slower still (0.60-0.71x), and vmap's batched matrix products cost 17% at K = 1; so
  dense models get 'vmap' for 2 <= K <= `MAX_DENSE_VMAP` and 'loop' otherwise.
  Vmapped convolutions become grouped convolutions that XLA:CPU runs ~3x slower than K
  separate ones (vmap 0.36-0.38x the loop), so models with convolutions get 'unroll'
  (K one-member steps traced into one jit, run one after the other: 1.25-1.40x the
  loop at K = 2..16) up to `MAX_UNROLL` members and 'loop' beyond (the unrolled program
  keeps every member's temporaries, ~190 MB per thesis-CNN member at batch 128, and
  fell to 0.96x the loop at K = 32). 'loop' in a training loop that holds its state
  (`MemberStep.hold`, as `train.fit` does) is that same loop of separately held states.
  On accelerators, and with several devices (the member axis sharded), 'vmap' is the
  default.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown members_strategy {strategy!r}; choose one of {STRATEGIES}.")
  if strategy != "auto":
    return strategy
  if jax.default_backend() == "cpu" and jax.device_count() == 1:
    k = num_members_in(params_K)
    if k <= 1:
      return "loop"
    if has_convolutions(params_K):
      return "unroll" if k <= MAX_UNROLL else "loop"
    return "vmap" if k <= MAX_DENSE_VMAP else "loop"
  return "vmap"


def num_members_in(params_K: PyTree) -> int:
  """K, the leading axis of a stacked pytree (0 for an empty one)."""
  leaves = jax.tree.leaves(params_K)
  return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def over_members(fn: Callable, *, strategy: str, num_members: int,
                 donate: tuple[int, ...] = (), chunk_size: int = DEFAULT_CHUNK) -> Callable:
  """Makes `fn(*args)` (one member) run on args stacked on a member axis.

  Strategies: 'vmap' (jit(vmap(fn))), 'unroll' (a Python loop over members traced
  into one jit: K separate computations in one program, chained with
  `optimization_barrier` so that XLA runs them one at a time instead of interleaving
  them, which was 0.8x a loop unchained and 1.25x chained for a CNN at K=8), 'map'
  (`jax.lax.map` over members inside jit), 'loop' (a Python loop of a jitted one-member
  function, outside jit), 'chunked' (members in groups of `chunk_size`, each group
  vmapped, the groups traced one after the other into one jit and chained like
  'unroll': between a loop and one wide vmap). All return outputs stacked on axis 0 and
  compute the same values (up to float32 summation order). `donate` lists argument
  positions whose buffers may be reused ('loop' never donates).
  """
  if strategy == "chunked":
    size = max(1, min(int(chunk_size), num_members))
    group = jax.vmap(fn)

    def chunked(*args):
      outs = []
      for start in range(0, num_members, size):
        args_g = jax.tree.map(lambda x: x[start:start + size], args)
        if outs:  # group g starts after group g-1 is done
          args_g, _ = jax.lax.optimization_barrier((args_g, outs[-1]))
        outs.append(group(*args_g))
      return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
    return jax.jit(chunked, donate_argnums=donate)
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
  raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")


class MemberStep:
  """A member-parallel step `(state_K, batch_K, keys_K) -> (state_K, metrics_K)`.

  `strategy` is the resolved strategy ('auto' is resolved on the first call, from the
  parameters it sees).
  """

  def __init__(self, fn: Callable, *, strategy: str, num_members: int, donate: bool,
               chunk_size: int = DEFAULT_CHUNK):
    self._fn, self._requested = fn, strategy
    self._num_members, self._donate, self._chunk = num_members, donate, chunk_size
    self._compiled = self._one = None
    self.strategy = None if strategy == "auto" else strategy
    if strategy not in STRATEGIES:
      raise ValueError(f"Unknown members_strategy {strategy!r}; choose one of {STRATEGIES}.")

  def resolve(self, params_K) -> str:
    """Resolves 'auto' for these parameters (done by the first call otherwise)."""
    if self._compiled is None:
      self.strategy = resolve_strategy(self._requested, params_K)
      self._compiled = over_members(self._fn, strategy=self.strategy,
                                    num_members=self._num_members,
                                    donate=(0,) if self._donate else (),
                                    chunk_size=self._chunk)
    return self.strategy

  def __call__(self, state_K, batch_K, keys_K):
    self.resolve(state_K["params"])
    return self._compiled(state_K, batch_K, keys_K)

  # A loop that owns its state between steps (as `train.fit` does) holds it in the form
  # the strategy runs fastest on: for 'loop', K separate one-member states, so that no
  # step pays for slicing the stacked state and stacking it again (that cost put the
  # stacked 'loop' at 0.95x a loop of separately held states for 32 CNN members);
  # every other strategy holds the stacked state as is.

  def hold(self, state_K, *, copy: bool = True) -> Any:
    """The held form of `state_K` that `step_held` advances (resolves 'auto').

    New arrays unless `copy=False` (for a caller that gives up `state_K`; 'loop' always
    makes new ones), so a donating step never invalidates `state_K`. With several
    devices the state stays stacked (its member axis may be sharded, even over
    processes), and 'loop' slices it every step.
    """
    if self.resolve(state_K["params"]) != "loop" or jax.device_count() > 1:
      return jax.tree.map(jnp.copy, state_K) if copy else state_K
    if self._one is None:
      self._one = jax.jit(self._fn, donate_argnums=(0,) if self._donate else ())
    return split_members(state_K, self._num_members)

  def release(self, held) -> Any:
    """The stacked state of a held form (for K held states: new arrays, `held` stays
    valid; a held stacked state is returned as is)."""
    return _stack(held) if isinstance(held, list) else held

  def step_held(self, held, batch_K, keys_K):
    """One step on the held form: `(held, batch_K, keys_K) -> (held, metrics_K)`.

    `batch_K` and `keys_K` may be stacked or (for 'loop') lists of K per-member values;
    stacked NumPy batches are split into views, so each member's batch goes to the
    device on its own. With `donate=True` the held arrays passed in are reused.
    """
    if not isinstance(held, list):
      return self(held, batch_K, keys_K)
    k = len(held)
    outs = [self._one(s, b, key) for s, b, key in
            zip(held, split_members(batch_K, k), split_members(keys_K, k))]
    return [o[0] for o in outs], _stack([o[1] for o in outs])


def split_members(tree: PyTree, num_members: int) -> list[PyTree]:
  """A stacked tree as a list of `num_members` one-member trees (a list: as is).

  NumPy leaves become views; device arrays are sliced by one jitted call.
  """
  if isinstance(tree, list):
    if len(tree) != num_members:
      raise ValueError(f"Got a list of {len(tree)} per-member values for {num_members} "
                       "members.")
    return tree
  found = tree_lib.num_members(tree)  # raises if the leaves disagree
  if found != num_members:
    raise ValueError(f"A stacked value of {found} members where {num_members} were expected.")
  if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree)):
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num_members)]
  return _unstack(tree, num_members)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, num_members):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num_members)]


@jax.jit
def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def ensemble_step(*, model, tx: optax.GradientTransformation, num_members: int,
                  strategy: str = "auto", loss_fn: Callable = losses.softmax_cross_entropy,
                  step_fn: Callable = train_step, donate: bool = False,
                  chunk_size: int = DEFAULT_CHUNK) -> MemberStep:
  """The member-parallel training step `(state_K, batch_K, keys_K) -> (state_K, metrics_K)`.

  Args:
    model: anything `models.as_model` accepts.
    tx: the optimizer (per-member hyperparameters live in the stacked state).
    num_members: K.
    strategy: one of `STRATEGIES`; 'auto' is resolved on the first call.
    loss_fn: `loss_fn(logits, labels) -> scalar`, passed to `step_fn`.
    step_fn: a one-member step with `train_step`'s signature.
    donate: let the step reuse the buffers of the `state_K` passed in (which are then
      deleted). Off by default; turn it on only where a loop owns its state.
    chunk_size: members per vmapped group for strategy 'chunked'.

  Returns:
    A `MemberStep`; `batch_K` holds each member's own batch {"x": (K, B, ...), "y": (K, B)}.
  """
  fn = functools.partial(step_fn, model=as_model(model), tx=tx, loss_fn=loss_fn)
  return MemberStep(fn, strategy=strategy, num_members=check_num_members(num_members),
                    donate=donate, chunk_size=chunk_size)


# --------------------------------------------------------------------------- eval

def predict(model, variables_K: PyTree, x: np.ndarray, *, batch_size: int = 1000,
            strategy: str = "auto", with_features: bool = False):
  """Every member's logits (K, N, C) on `x` (and features (K, N, D) if asked).

  Runs in inference mode over chunks of `batch_size` examples; every member sees the
  same inputs.

  Args:
    model: anything `models.as_model` accepts.
    variables_K: stacked variables ({"params", "batch_stats"?}; a training state works).
    x: inputs (N, ...).
    batch_size: examples per forward pass.
    strategy: member-parallel strategy ('auto' as for training).
    with_features: also return the members' features.

  Returns:
    NumPy logits (K, N, C), or (logits, features (K, N, D)).
  """
  variables_K = variables_of(variables_K)
  if jax.process_count() > 1:  # sharded over processes: every process predicts all members
    from ensembling import distributed
    variables_K = distributed.to_host(variables_K)
  k = tree_lib.num_members(variables_K)
  strategy = resolve_strategy(strategy, variables_K["params"])
  fwd = _predict_fn(as_model(model), with_features, strategy, k)
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
def _predict_fn(model, with_features, strategy, k):
  def one(variables, xb):
    out, _ = model.apply(variables, xb, train=False, with_features=with_features)
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
  of devices. Under `jax.distributed` the mesh spans every process's devices and each
  process places only the slices of its own members (`jax.make_array_from_callback`);
  every process must pass the same values (ours are deterministic in the seed and step).
  """
  mesh = mesh or member_mesh()
  ndev = mesh.devices.size
  if ndev == 1:
    return tree
  multi = jax.process_count() > 1

  def put(x):
    if multi and isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already global
    shape = np.shape(x)
    if len(shape) <= axis or shape[axis] % ndev:
      raise ValueError(f"Cannot shard a leaf of shape {shape} over {ndev} devices on "
                       f"axis {axis}: members must be a multiple of the device count.")
    sharding = NamedSharding(mesh, P(*([None] * axis + [MEMBER_AXIS])))
    if not multi:
      return jax.device_put(jnp.asarray(x), sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      global_data = jax.make_array_from_callback(data.shape, NamedSharding(
          mesh, P(*([None] * axis + [MEMBER_AXIS]))), lambda idx: data[idx])
      return jax.random.wrap_key_data(global_data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree)


def member_keys(key: jax.Array, num_members: int) -> jax.Array:
  """One PRNG key per member (used for dropout; folded with the step each step)."""
  return jax.random.split(key, check_num_members(num_members))


@jax.jit
def step_keys(keys_K: jax.Array, step) -> jax.Array:
  """Per-member keys for `step`: deterministic, so a resumed run repeats exactly."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_K)

"""The model contract: what every member-level primitive takes.

`as_model(obj)` turns a user's model into a `Model`, a pair of pure functions

    init(key, x) -> variables            # {"params": ..., "batch_stats": ... (if any)}
    apply(variables, x, *, train=False, key=None, with_features=False)
        -> (Output(features, logits), batch_stats)

`apply` returns the updated `batch_stats` in training mode and the given ones otherwise
({} for a model without BatchNorm). `key` drives dropout; under `jax.vmap` every member
gets its own. Four kinds of model are accepted:

- a Flax Linen module (or its bound `module.apply`) returning plain logits or our
  `Output(features, logits)`, with or without a `train` / `training` / `deterministic` /
  `is_training` argument (used when present); BatchNorm statistics live in the
  `batch_stats` collection. A module returning plain logits still has features: the input
  of its last `nn.Dense` call (what a SuperNet head or an adapter reads);
- an `nnx.Module` factory, `from_nnx(lambda rngs: MyModel(..., rngs=rngs))` (the NNX
  idiom for ensembles: every member built from its own key), or an `nnx.Module`
  instance (one fixed set of weights: fine for prediction, soups and SWA; `init_members`
  refuses to make K > 1 identical members from it). Weights and `nnx.BatchStat`s become
  plain dicts, dropout streams are re-keyed from `key` on every call, `train()` /
  `eval()` set the mode;
- a pair of pure functions `(init, apply)`, `init(key, x) -> variables` and
  `apply(variables, x, *, train, key) -> logits | Output | (logits | Output, batch_stats)`;
- a `Model` (returned as is).

Example:

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> class Net(nn.Module):  # a plain Linen module: no `train`, returns logits
...   @nn.compact
...   def __call__(self, x):
...     return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))
>>> m = as_model(Net())
>>> v = m.init(jax.random.key(0), jnp.ones((2, 5)))
>>> out, stats = m.apply(v, jnp.ones((2, 5)), with_features=True)
>>> out.logits.shape, out.features.shape, stats
((2, 3), (2, 4), {})
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ensembling.models.common import Output

PyTree = Any
MODE_ARGS = ("train", "training", "deterministic", "is_training")


class Model(NamedTuple):
  """A model as the member primitives see it (see the module docstring).

  Attributes:
    init: `(key, x) -> variables`.
    apply: `(variables, x, *, train=False, key=None, with_features=False)
      -> (Output, batch_stats)`.
    kind: "linen", "nnx", "nnx_instance" or "functions".
    module: the wrapped object (for error messages and `repr`).
  """
  init: Callable
  apply: Callable
  kind: str
  module: Any = None

  # Identity semantics: a Model is a cache key (jit, lru_cache), whatever it wraps.
  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other

  def __ne__(self, other):
    return self is not other


def _to_output(out, source) -> Output:
  if isinstance(out, Output):
    return out
  if hasattr(out, "shape") and hasattr(out, "dtype"):
    return Output(None, out)
  raise TypeError(f"{source} returned {type(out).__name__}; a model must return its logits "
                  "(an array) or `models.Output(features, logits)`.")


def _check_collections(variables, source):
  extra = sorted(set(variables) - {"params", "batch_stats"})
  if extra:
    raise ValueError(f"{source} has variable collections {extra}; the model contract carries "
                     "'params' and 'batch_stats' only.")


# --------------------------------------------------------------------------- Linen

def _mode_kwargs(fn: Callable) -> Callable[[bool], dict]:
  """How to tell `fn` (a `__call__`) training from inference mode."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  for name in MODE_ARGS:
    if name in params:
      if name == "deterministic":
        return lambda train: {"deterministic": not train}
      return lambda train, name=name: {name: train}
  return lambda train: {}


class _LastDenseInput:
  """An interceptor recording the input of every `nn.Dense` call (the last one wins)."""

  def __init__(self):
    self.value = None

  def __call__(self, next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      self.value = args[0]
    return next_fun(*args, **kwargs)


def linen(module: nn.Module) -> Model:
  """The `Model` of a Flax Linen module (see the module docstring)."""
  mode = _mode_kwargs(type(module).__call__)
  source = f"Linen module {type(module).__name__}"

  def init(key, x):
    pk, dk = jax.random.split(key)
    variables = dict(module.init({"params": pk, "dropout": dk}, x, **mode(False)))
    variables.pop("intermediates", None)
    _check_collections(variables, source)
    return variables

  def apply(variables, x, *, train=False, key=None, with_features=False):
    rngs = {"dropout": key} if key is not None else {}
    stats = variables.get("batch_stats", {})
    recorder = _LastDenseInput()

    def call():
      if train and jax.tree.leaves(stats):
        out, new = module.apply(variables, x, rngs=rngs, mutable=["batch_stats"], **mode(train))
        return out, new["batch_stats"]
      return module.apply(variables, x, rngs=rngs, **mode(train)), stats

    if with_features:
      with nn.intercept_methods(recorder):
        out, new_stats = call()
    else:
      out, new_stats = call()
    out = _to_output(out, source)
    if with_features and out.features is None:
      if recorder.value is None:
        raise ValueError(f"{source} returns plain logits and calls no nn.Dense: it has no "
                         "features to read; return models.Output(features, logits).")
      out = Output(recorder.value, out.logits)
    return out, new_stats

  return Model(init, apply, "linen", module)


# --------------------------------------------------------------------------- NNX

def _nnx():
  from flax import nnx
  return nnx


def from_nnx(module_or_factory) -> Model:
  """The `Model` of an `nnx.Module` factory `rngs -> module`, or of one instance.

  A factory is called as `factory(nnx.Rngs(key))` for every member, so each member has
  its own initialisation; an instance has one set of weights, which `init` returns
  whatever the key.
  """
  nnx = _nnx()
  if isinstance(module_or_factory, nnx.Module):
    template, factory, kind = module_or_factory, None, "nnx_instance"
  elif callable(module_or_factory):
    factory, kind = module_or_factory, "nnx"
    template = factory(nnx.Rngs(0))
    if not isinstance(template, nnx.Module):
      raise TypeError(f"from_nnx expects an nnx.Module or a factory `rngs -> nnx.Module`; the "
                      f"factory returned {type(template).__name__}.")
  else:
    raise TypeError(f"from_nnx expects an nnx.Module or a factory, got "
                    f"{type(module_or_factory).__name__}.")
  source = f"NNX module {type(template).__name__}"
  graphdef, params0, stats0, rest0 = nnx.split(template, nnx.Param, nnx.BatchStat, ...)
  accepts_rngs = "rngs" in inspect.signature(type(template).__call__).parameters

  def split_pure(module):
    _, p, s, _ = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    out = {"params": nnx.to_pure_dict(p)}
    stats = nnx.to_pure_dict(s)
    if jax.tree.leaves(stats):
      out["batch_stats"] = stats
    return out

  fixed = split_pure(template)

  def init(key, x):
    del x
    if factory is None:
      return jax.tree.map(jnp.asarray, fixed)
    return split_pure(factory(nnx.Rngs(key)))

  def fill(state, pure):
    state = jax.tree.map(lambda a: a, state)  # fresh Variables at this trace level
    nnx.replace_by_pure_dict(state, pure)
    return state

  def apply(variables, x, *, train=False, key=None, with_features=False):
    stats = variables.get("batch_stats", {})
    rng_key = jax.random.key(0) if key is None else key
    counter = iter(range(1 << 30))

    def rekey(_, leaf):  # every RNG stream restarts from `key` (one fold per stream)
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.fold_in(rng_key, next(counter))
      return jnp.zeros_like(leaf)

    rest = jax.tree_util.tree_map_with_path(rekey, rest0)
    module = nnx.merge(graphdef, fill(params0, variables["params"]),
                       fill(stats0, stats) if jax.tree.leaves(stats) else stats0, rest)
    module.train() if train else module.eval()
    kwargs = {"rngs": nnx.Rngs(dropout=rng_key)} if accepts_rngs and key is not None else {}
    out = _to_output(module(x, **kwargs), source)
    if with_features and out.features is None:
      raise ValueError(f"{source} returns plain logits; return models.Output(features, "
                       "logits) from __call__ for primitives that read features.")
    new_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)) if (
        train and jax.tree.leaves(stats)) else stats
    return out, new_stats

  return Model(init, apply, kind, template)


# --------------------------------------------------------------------------- functions

def from_functions(init_fn: Callable, apply_fn: Callable) -> Model:
  """The `Model` of `init(key, x) -> variables` and `apply(variables, x, *, train, key)`.

  `apply` returns logits, `Output(features, logits)`, or `(either, new_batch_stats)`.
  """
  source = f"apply function {getattr(apply_fn, '__name__', apply_fn)!r}"

  def init(key, x):
    variables = init_fn(key, x)
    if not isinstance(variables, dict) or "params" not in variables:
      raise TypeError(f"init function must return a dict with 'params' (and optionally "
                      f"'batch_stats'), got {type(variables).__name__}.")
    _check_collections(variables, "init function's variables")
    return dict(variables)

  def apply(variables, x, *, train=False, key=None, with_features=False):
    stats = variables.get("batch_stats", {})
    out = apply_fn(variables, x, train=train, key=key)
    if isinstance(out, tuple) and not isinstance(out, Output):
      if len(out) != 2 or not isinstance(out[1], dict):
        raise TypeError(f"{source} returned a tuple; return logits, Output, or "
                        "(logits or Output, new batch_stats dict).")
      out, new_stats = out
    else:
      new_stats = stats
    out = _to_output(out, source)
    if with_features and out.features is None:
      raise ValueError(f"{source} returns plain logits; return models.Output(features, "
                       "logits) for primitives that read features.")
    return out, (new_stats if train else stats)

  return Model(init, apply, "functions", (init_fn, apply_fn))


# --------------------------------------------------------------------------- dispatch

_BUILDERS = {"linen": linen, "nnx": from_nnx, "functions": lambda pair: from_functions(*pair)}


@functools.lru_cache(maxsize=128)
def _cached_build(kind: str, obj) -> Model:
  return _BUILDERS[kind](obj)


def _cached(kind: str, obj) -> Model:
  try:
    return _cached_build(kind, obj)
  except TypeError as e:  # an unhashable module (e.g. a list attribute): build uncached
    if "unhashable" not in str(e):
      raise
    return _BUILDERS[kind](obj)


def as_model(obj) -> Model:
  """The `Model` for a Linen module (or its `.apply`), an NNX module, a pair of functions.

  Results are cached per object, so jitted functions keyed on the model compile once.

  Args:
    obj: a `Model`; a `flax.linen.Module` or its bound `apply`; an `nnx.Module` (see
      `from_nnx` for factories); or a tuple `(init_fn, apply_fn)`.

  Returns:
    The `Model`.
  """
  if isinstance(obj, Model):
    return obj
  if isinstance(obj, nn.Module):
    return _cached("linen", obj)
  owner = getattr(obj, "__self__", None)
  if isinstance(owner, nn.Module) and getattr(obj, "__name__", "") == "apply":
    return _cached("linen", owner)
  if isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj):
    return _cached("functions", obj)
  try:
    nnx = _nnx()
    if isinstance(obj, nnx.Module):
      return _cached("nnx", obj)
  except ImportError:  # pragma: no cover - flax always ships nnx here
    pass
  raise TypeError(
      f"Cannot use {type(obj).__name__} as a model: pass a Flax Linen module (or its "
      "`.apply`), an nnx.Module, `models.from_nnx(lambda rngs: Module(..., rngs=rngs))`, "
      "a pair `(init_fn, apply_fn)`, or a `models.Model`.")

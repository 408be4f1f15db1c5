"""Low-precision ensembling: training-free members drawn from one model (Nam & Lee 2024).

Nam and Lee, "Ex Uno Pluria: Insights on Ensembling in Low Precision Number Systems"
(NeurIPS 2024). One trained model's weights are quantised onto a low-precision grid
several times with stochastic rounding; each draw is a member, and the ensemble of
the members (LPE-BSR) is compared with plain round-to-nearest (RTN) at the same bits.

The grid (bits b in 3..8): symmetric and uniform, w_q = s * q with integer
q in [-(2^(b-1) - 1), 2^(b-1) - 1] (2^b - 1 levels, zero included), one scale per output
channel: for a leaf of rank >= 2 the output channel is the last axis (Flax Dense
kernels (in, out), Conv kernels (h, w, in, out)) and s_c = max |w[..., c]| / (2^(b-1) - 1),
so the largest weight of each channel lies on the grid and nothing is clipped; a leaf
of rank 0 or 1 that is quantised at all gets one scale for the whole leaf. Scales are
kept in float32.

- `rtn(params, *, bits)`: round to the nearest grid point (deterministic).
- `bsr(key, params, *, bits)`: Bernoulli stochastic rounding: with w / s = floor + f,
  round up with probability f, down otherwise, so E[w_q] = w (unbiased).
- `members(key, params, *, num_members, bits)`: `num_members` BSR draws, stacked on a
  leading member axis (ready for `members.predict`: one member-parallel pass).
- `memory_bits(params, *, bits)`: the bits one member needs (b per quantised weight,
  32 per scale and per full-precision leaf entry).
- `ambiguity(logits_KxBxC, labels)`: the members' diversity, mean member NLL minus the
  ensemble's NLL (>= 0 by Jensen's inequality).

Leaves that stay in full precision are chosen by path (`keep`, regexes over "a/b/c"
names); by default biases and normalisation parameters (`DEFAULT_KEEP`).

Departures from the paper: the paper quantises large pre-trained models (ViT, LLaMa)
and also studies other grids and number formats; we implement the symmetric uniform
integer grid with per-output-channel absmax scales only. Members are not fine-tuned.

Example (RTN at 3 bits: every value is a multiple of its channel's scale):

>>> import jax.numpy as jnp
>>> w = {"kernel": jnp.array([[0.3, -1.0], [0.9, 0.5]])}
>>> rtn(w, bits=3)["kernel"]          # scales 0.9/3 = 0.3 and 1.0/3
Array([[ 0.3       , -1.        ],
       [ 0.90000004,  0.6666667 ]], dtype=float32)
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ensembling import checks, ensemble, metrics
from ensembling import tree as tree_lib

PyTree = Any
MIN_BITS, MAX_BITS = 3, 8
DEFAULT_KEEP = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)(bn|norm|BatchNorm|LayerNorm)[^/]*/",
                r"^batch_stats/")


def check_bits(bits) -> int:
  """`bits` as an int in [3, 8], or a ValueError naming it."""
  return checks.integer(bits, name="bits", low=MIN_BITS, high=MAX_BITS)


def levels(bits: int) -> int:
  """q_max = 2^(b-1) - 1: the grid is s * {-q_max, ..., q_max}."""
  return 2 ** (check_bits(bits) - 1) - 1


def channel_scales(x, *, bits: int) -> jax.Array:
  """The grid step of leaf `x`, broadcastable to it: absmax per output channel / q_max.

  Rank >= 2: one scale per entry of the last axis (shape (1, ..., 1, C)); rank 0-1: one
  scale. An all-zero channel gets scale 1 (its weights stay 0).
  """
  x = jnp.asarray(x)
  axes = tuple(range(x.ndim - 1)) if x.ndim >= 2 else None
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=x.ndim >= 2).astype(jnp.float32)
  return jnp.where(amax > 0, amax / levels(bits), 1.0)


def quantised_mask(params: PyTree, *, keep: str | Iterable[str] = DEFAULT_KEEP) -> PyTree:
  """True for the floating-point leaves that are quantised (not matched by `keep`)."""
  kept = tree_lib.path_mask(params, keep) if keep else jax.tree.map(lambda _: False, params)
  return jax.tree.map(lambda k, x: (not k) and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating),
                      kept, params)


def _check_params(params: PyTree, keep) -> tuple[bool, ...]:
  """Validates `params` and `keep`; the quantised flag of every leaf, in tree order."""
  if not jax.tree.leaves(params):
    raise ValueError("params is empty: nothing to quantise.")
  if isinstance(keep, str):
    keep = (keep,)
  for p in keep or ():
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"keep pattern {p!r} is not a regex: {e}.") from None
  for name, x in tree_lib.named_leaves(params):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      raise ValueError(f"params has non-finite values at '{name}': cannot quantise them.")
  return tuple(bool(m) for m in jax.tree.leaves(quantised_mask(params, keep=keep)))


def _quantise(leaves, u, *, flags, bits):
  """Every flagged leaf onto its grid: nearest (u is None) or up with prob. frac (u: flat)."""
  out, offset = [], 0
  for m, x in zip(flags, leaves):
    if not m:
      out.append(x)
      continue
    s = channel_scales(x, bits=bits)
    v = x / s
    if u is None:
      q = jnp.round(v)
    else:
      lo = jnp.floor(v)
      q = lo + (u[offset:offset + x.size].reshape(x.shape) < (v - lo))
      offset += x.size
    out.append((jnp.clip(q, -levels(bits), levels(bits)) * s).astype(x.dtype))
  return out


def _num_quantised(leaves, flags) -> int:
  return int(sum(np.size(x) for m, x in zip(flags, leaves) if m))


@functools.partial(jax.jit, static_argnames=("flags", "bits"))
def _rtn_jit(leaves, *, flags, bits):
  return _quantise(leaves, None, flags=flags, bits=bits)


@functools.partial(jax.jit, static_argnames=("flags", "bits", "num_members"))
def _bsr_jit(keys, leaves, *, flags, bits, num_members):
  # One uniform draw per member over all quantised entries (flattened in tree order):
  # one random-number program however many leaves there are (fast to compile).
  n = _num_quantised(leaves, flags)
  u = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)
  return jax.vmap(lambda u_m: _quantise(leaves, u_m, flags=flags, bits=bits))(u)


def rtn(params: PyTree, *, bits: int, keep: str | Iterable[str] = DEFAULT_KEEP) -> PyTree:
  """Round-to-nearest onto the b-bit per-channel grid (leaves matching `keep` unchanged).

  Args:
    params: a parameter tree (one model).
    bits: b in 3..8.
    keep: regexes over "a/b/c" paths of leaves kept in full precision.

  Returns:
    A tree like `params`, in its dtypes, with quantised values.
  """
  bits = check_bits(bits)
  flags = _check_params(params, keep)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, _rtn_jit([jnp.asarray(x) for x in leaves], flags=flags,
                                              bits=bits))


def bsr(key: jax.Array, params: PyTree, *, bits: int,
        keep: str | Iterable[str] = DEFAULT_KEEP) -> PyTree:
  """Bernoulli stochastic rounding onto the b-bit grid: up with probability frac(w / s).

  Unbiased: E[bsr(key, w)] = w. The uniforms are one draw `uniform(key, (n,))` over the
  n quantised entries, flattened in tree order.

  Args:
    key: PRNG key.
    params: a parameter tree (one model).
    bits: b in 3..8.
    keep: regexes over paths of leaves kept in full precision.

  Returns:
    A tree like `params` with stochastically rounded values.
  """
  return tree_lib.index(_members(key[None], params, bits=bits, keep=keep), 0)


def _members(keys, params, *, bits, keep):
  bits = check_bits(bits)
  flags = _check_params(params, keep)
  leaves, treedef = jax.tree.flatten(params)
  out = _bsr_jit(keys, [jnp.asarray(x) for x in leaves], flags=flags, bits=bits,
                 num_members=int(keys.shape[0]))
  return jax.tree.unflatten(treedef, out)


def members(key: jax.Array, params: PyTree, *, num_members: int, bits: int,
            keep: str | Iterable[str] = DEFAULT_KEEP) -> PyTree:
  """`num_members` training-free members: independent BSR draws of one model, stacked.

  Member m is `bsr(split(key, M)[m], params, ...)`.

  Args:
    key: PRNG key.
    params: the full-precision parameter tree.
    num_members: M >= 1.
    bits: b in 3..8.
    keep: regexes over paths of leaves kept in full precision (copied to every member).

  Returns:
    A tree with a leading member axis of size M on every leaf (`params_M`).
  """
  num_members = checks.integer(num_members, name="num_members")
  return _members(jax.random.split(key, num_members), params, bits=bits, keep=keep)


def memory_bits(params: PyTree, *, bits: int | None,
                keep: str | Iterable[str] = DEFAULT_KEEP) -> int:
  """Bits to store one member: b per quantised weight + 32 per scale and per kept entry.

  `bits=None` is the full-precision model (32 per entry).
  """
  if bits is None:
    return int(sum(32 * np.size(x) for x in jax.tree.leaves(params)))
  bits = check_bits(bits)
  flags = _check_params(params, keep)
  total = 0
  for m, x in zip(flags, jax.tree.leaves(params)):
    if m:
      shape = np.shape(x)
      n_scales = shape[-1] if len(shape) >= 2 else 1
      total += bits * int(np.size(x)) + 32 * n_scales
    else:
      total += 32 * int(np.size(x))
  return int(total)


def ambiguity(logits_KxBxC, labels_B) -> float:
  """Mean member NLL minus the NLL of the probability-averaged ensemble (>= 0).

  The diversity term of the ensemble's log loss: how much the members disagree, in the
  units of the NLL gain they give.
  """
  probs = ensemble.members_probs(logits_KxBxC)
  member_nll = float(np.mean([metrics.nll(p, labels_B) for p in probs]))
  return member_nll - metrics.nll(np.asarray(ensemble.average_probs(logits_KxBxC)), labels_B)

"""Convolutions rewritten as matrix products (im2col), for member-parallel steps.

`jax.vmap` over members turns a convolution whose kernel is batched too into a
*grouped* convolution, which XLA:CPU runs several times slower than K separate ones
(benchmarks/README.md). `convs_as_matmuls(fn)` traces `fn` (one member, including its
backward pass) and replays it with every `conv_general_dilated` replaced by shifted
slices of the (padded, dilated) input and one `dot_general`; vmapping the result gives
batched matrix products instead of grouped convolutions. The values are those of the
convolution up to float32 summation order.

Only ungrouped convolutions are rewritten (feature and batch group counts 1, which is
everything `jax.grad` of a plain `nn.Conv` produces); grouped ones, and convolutions
inside control flow (`scan`, `cond`, `while`), are left as they are.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

_CONV = lax.conv_general_dilated_p
# Call-like primitives whose body we replay inline when it holds a convolution.
_CALL_PARAMS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
                "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
                "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
                "checkpoint": "jaxpr", "remat": "jaxpr"}


def conv_via_matmul(lhs: jax.Array, rhs: jax.Array, *, window_strides: Sequence[int],
                    padding: Sequence[tuple[int, int]], lhs_dilation: Sequence[int],
                    rhs_dilation: Sequence[int], dimension_numbers,
                    precision=None, preferred_element_type=None, **unused) -> jax.Array:
  """`lax.conv_general_dilated` (ungrouped) as slices and one `dot_general`.

  With W window positions and O output positions, it either gathers the W shifted
  views of the input into patches and contracts (positions x channels) with the
  kernel (im2col; when W <= O, e.g. a 3x3 forward conv), or gathers the O windows
  and contracts (window x channels) for each output position (when O < W, e.g. the
  kernel gradient of a conv, whose "window" is the whole image).

  Args:
    lhs, rhs: the convolution's operands.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
    precision, preferred_element_type: as in the `conv_general_dilated` primitive
      (`dimension_numbers` a `ConvDimensionNumbers`).

  Returns:
    The convolution's output, in its `dimension_numbers.out_spec` layout.
  """
  if unused.get("feature_group_count", 1) != 1 or unused.get("batch_group_count", 1) != 1:
    raise ValueError("conv_via_matmul handles ungrouped convolutions only.")
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nsp = len(lhs_spec) - 2
  # (N, spatial..., C) and (spatial..., I, O).
  x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  zero = jnp.zeros((), x.dtype)
  x = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in
                                      zip(padding, lhs_dilation)] + [(0, 0, 0)])
  win = w.shape[:nsp]
  ext = [(k - 1) * d + 1 for k, d in zip(win, rhs_dilation)]
  out_sp = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], ext, window_strides)]
  if min(out_sp) <= 0:
    raise ValueError(f"Empty convolution output {out_sp}.")
  n, c, o = x.shape[0], x.shape[-1], w.shape[-1]
  dot = dict(precision=precision, preferred_element_type=preferred_element_type)

  if math.prod(win) <= math.prod(out_sp):
    cols = []
    for pos in itertools.product(*[range(k) for k in win]):
      start = [0] + [p * d for p, d in zip(pos, rhs_dilation)] + [0]
      limit = [n] + [st + (m - 1) * s + 1 for st, m, s in
                     zip(start[1:-1], out_sp, window_strides)] + [c]
      cols.append(lax.slice(x, start, limit, [1, *window_strides, 1]))
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    y = lax.dot_general(patches, w.reshape(-1, o),
                        (((patches.ndim - 1,), (0,)), ((), ())), **dot)
  else:
    outs = []
    for pos in itertools.product(*[range(m) for m in out_sp]):
      start = [0] + [p * s for p, s in zip(pos, window_strides)] + [0]
      limit = [n] + [st + e for st, e in zip(start[1:-1], ext)] + [c]
      window = lax.slice(x, start, limit, [1, *rhs_dilation, 1])
      outs.append(lax.dot_general(window, w, ((tuple(range(1, nsp + 2)),
                                               tuple(range(nsp + 1))), ((), ())), **dot))
    y = jnp.stack(outs, axis=1).reshape((n, *out_sp, o))
  # (N, spatial..., O) -> out_spec layout.
  src = {out_spec[0]: 0, out_spec[1]: nsp + 1}
  src.update({out_spec[2 + i]: 1 + i for i in range(nsp)})
  return jnp.transpose(y, [src[j] for j in range(nsp + 2)])


def _body(eqn) -> Any:
  name = _CALL_PARAMS.get(eqn.primitive.name)
  return eqn.params.get(name) if name else None


def _has_conv(jaxpr) -> bool:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive is _CONV:
      return True
    body = _body(eqn)
    if body is not None and _has_conv(body):
      return True
  return False


def _eval(jaxpr, consts, args):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    body = _body(eqn)
    if (eqn.primitive is _CONV and eqn.params["feature_group_count"] == 1
        and eqn.params["batch_group_count"] == 1):
      outs = [conv_via_matmul(*invals, **eqn.params)]
    elif body is not None and _has_conv(body):
      inner = getattr(body, "jaxpr", body)
      outs = _eval(inner, getattr(body, "consts", ()), invals)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      if isinstance(params, tuple):  # jax < 0.8: (subfuns, params)
        subfuns, params = params
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
      else:
        outs = eqn.primitive.bind(*invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, val in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = val
  return [read(v) for v in jaxpr.outvars]


def convs_as_matmuls(fn: Callable) -> Callable:
  """`fn` with its convolutions (and their gradients) computed by `conv_via_matmul`.

  The returned function traces `fn` on the shapes of its (positional) arguments each
  time it is traced itself, so use it inside `jax.jit` (optionally under `jax.vmap`):
  `jax.jit(jax.vmap(convs_as_matmuls(train_step)))`. It is meant to be transformed
  by `vmap`/`jit`, not differentiated (custom derivative rules inside `fn` are
  inlined).

  Args:
    fn: a function of arrays / pytrees of arrays.

  Returns:
    A function with the same signature and (up to summation order) the same outputs.
  """
  def rewritten(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if not _has_conv(closed.jaxpr):
      return fn(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return rewritten

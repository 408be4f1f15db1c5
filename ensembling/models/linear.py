"""The one linear layer of the library: SuperNet heads, adapters, closed-form maps.

A plain dict {"kernel": (in, out), "bias": (out,)}, initialised as `nn.Dense` does
(LeCun-normal kernel, zero bias); `apply_linear` works on NumPy and JAX arrays alike.

>>> import jax, numpy as np
>>> p = init_linear(jax.random.key(0), 3, 2)
>>> apply_linear(p, np.ones((4, 3))).shape
(4, 2)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp


def init_linear(key: jax.Array, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
  """{"kernel": LeCun-normal (in_dim, out_dim), "bias": zeros (out_dim,)}, float32."""
  kernel = jax.nn.initializers.lecun_normal()(key, (int(in_dim), int(out_dim)), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((int(out_dim),), jnp.float32)}


def apply_linear(params: Mapping[str, Any], x):
  """x @ kernel + bias; an empty `params` ({}) is the identity."""
  if not params:
    return x
  kernel = params["kernel"]
  if x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"Linear layer expects {kernel.shape[0]} input features, got "
                     f"{x.shape[-1]}.")
  return x @ kernel + params["bias"]

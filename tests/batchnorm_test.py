"""recompute_batch_stats against a NumPy re-implementation of PyTorch's update_bn."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import averaging


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    h = nn.Dense(5, name="d0")(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn0")(h))
    h = nn.Dense(4, name="d1")(h)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(h)


def _np_update_bn(p, batches, eps=1e-5):
  """Training-mode forward per batch; cumulative average of biased batch moments."""
  sums = {"bn0": [0, 0], "bn1": [0, 0]}
  for x in batches:
    x = np.asarray(x, np.float64)
    h = x @ p["d0"]["kernel"] + p["d0"]["bias"]
    m, v = h.mean(0), h.var(0)
    sums["bn0"][0] += m
    sums["bn0"][1] += v
    h = np.maximum((h - m) / np.sqrt(v + eps) * p["bn0"]["scale"] + p["bn0"]["bias"], 0)
    h = h @ p["d1"]["kernel"] + p["d1"]["bias"]
    sums["bn1"][0] += h.mean(0)
    sums["bn1"][1] += h.var(0)
  return {k: {"mean": s[0] / len(batches), "var": s[1] / len(batches)} for k, s in sums.items()}


def test_matches_numpy_update_bn():
  model = _Net()
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.normal(1.0, 2.0, size=(8, 3)), jnp.float32) for _ in range(3)]
  v = model.init(jax.random.key(0), batches[0])
  v = {"params": jax.tree.map(lambda a: a + 0.5 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                              v["params"]),
       "batch_stats": jax.tree.map(lambda a: a + 7.0, v["batch_stats"])}  # stale stats
  new = averaging.recompute_batch_stats(model.apply, v, batches)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  chex.assert_trees_all_close(new["batch_stats"], _np_update_bn(p, batches), rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_equal(new["params"], v["params"])
  # one batch: the stored statistics are exactly that batch's, so eval == train output
  one = averaging.recompute_batch_stats(model.apply, v, batches[:1])
  out_eval = model.apply(one, batches[0], train=False)
  out_train, _ = model.apply(one, batches[0], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out_eval, out_train, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="at least one"):
    averaging.recompute_batch_stats(model.apply, v, [])

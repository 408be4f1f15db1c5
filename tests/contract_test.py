"""The model contract: Linen (plain or Output, train/deterministic/none), NNX, pure functions.

Each kind, with BatchNorm and dropout, trained as K=3 members equals three separately
initialised and trained single models (same keys, same batches), under vmap and the loop.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ensembling import averaging, members, models, optim
from ensembling import tree as tree_lib

K, D_IN, C = 3, 6, 4


class LinenTrain(nn.Module):  # plain logits, `train` argument
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(8)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    h = nn.Dropout(0.3, deterministic=not train)(nn.relu(h))
    return nn.Dense(C)(h)


class LinenDeterministic(nn.Module):  # plain logits, Flax's other convention
  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    h = nn.Dense(8)(x)
    h = nn.BatchNorm(use_running_average=deterministic, momentum=0.9)(h)
    h = nn.Dropout(0.3, deterministic=deterministic)(nn.relu(h))
    return nn.Dense(C)(h)


class LinenNoMode(nn.Module):  # no mode argument at all, no BN/dropout
  @nn.compact
  def __call__(self, x):
    return nn.Dense(C, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(D_IN, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.l2 = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.bn(self.l1(x))))
    return models.Output(h, self.l2(h))


def pure_init(key, x):
  k1, k2 = jax.random.split(key)
  return {"params": {"w1": jax.random.normal(k1, (x.shape[-1], 8)) * 0.4, "b1": jnp.zeros(8),
                     "w2": jax.random.normal(k2, (8, C)) * 0.4, "b2": jnp.zeros(C)},
          "batch_stats": {"mean": jnp.zeros(8), "var": jnp.ones(8)}}


def pure_apply(variables, x, *, train, key):
  p, s = variables["params"], variables["batch_stats"]
  h = x @ p["w1"] + p["b1"]
  if train:
    mu, var = h.mean(0), h.var(0)
    new = {"mean": 0.9 * s["mean"] + 0.1 * mu, "var": 0.9 * s["var"] + 0.1 * var}
  else:
    mu, var, new = s["mean"], s["var"], s
  h = jax.nn.relu((h - mu) / jnp.sqrt(var + 1e-5))
  if train:
    h = jnp.where(jax.random.bernoulli(key, 0.7, h.shape), h / 0.7, 0.0)
  logits = h @ p["w2"] + p["b2"]
  return (logits, new) if train else logits


KINDS = {
    "linen_train": LinenTrain(),
    "linen_deterministic": LinenDeterministic(),
    "linen_output": models.MLP(widths=(8,), num_classes=C, dropout=0.3, batch_norm=True),
    "nnx": models.from_nnx(lambda rngs: NNXNet(rngs)),
    "functions": (pure_init, pure_apply),
}


def _data(steps=3):
  rng = np.random.default_rng(0)
  return [{"x": jnp.asarray(rng.normal(size=(K, 16, D_IN)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, (K, 16)), jnp.int32)} for _ in range(steps)]


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_members_equal_separately_trained_models(kind, strategy):
  model = KINDS[kind]
  m = models.as_model(model)
  tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9)
  batches = _data()
  v = members.init_members(jax.random.key(0), model, batches[0]["x"][0], K)
  step = members.ensemble_step(model=model, tx=tx, num_members=K, strategy=strategy)
  keys = members.member_keys(jax.random.key(1), K)
  state = members.init_states(v, tx)
  for t, b in enumerate(batches):
    state, _ = step(state, b, members.step_keys(keys, t))
  one = jax.jit(functools.partial(members.train_step, model=model, tx=tx))
  singles = []
  for k, init_key in enumerate(jax.random.split(jax.random.key(0), K)):
    s = members.init_state(m.init(init_key, batches[0]["x"][0]), tx)  # its own init
    for t, b in enumerate(batches):
      s, _ = one(s, tree_lib.index(b, k), members.step_keys(keys, t)[k])
    singles.append(s)
  chex.assert_trees_all_close(state, tree_lib.stack(singles), rtol=1e-5, atol=1e-6)
  # The test exercises what it claims: BN statistics moved, dropout draws per member.
  if jax.tree.leaves(v.get("batch_stats", {})):
    assert not np.allclose(jax.tree.leaves(state["batch_stats"])[0],
                           jax.tree.leaves(v["batch_stats"])[0])
  x0 = batches[0]["x"][0]
  v0 = tree_lib.index(members.variables_of(state), 0)
  a = m.apply(v0, x0, train=True, key=jax.random.key(5))[0].logits
  b = m.apply(v0, x0, train=True, key=jax.random.key(6))[0].logits
  assert not np.allclose(a, b)  # dropout follows the key
  e1 = m.apply(v0, x0, train=False, key=jax.random.key(5))[0].logits
  e2 = m.apply(v0, x0, train=False, key=jax.random.key(6))[0].logits
  np.testing.assert_array_equal(e1, e2)  # inference is deterministic
  logits = members.predict(model, state, np.asarray(x0), strategy=strategy)
  np.testing.assert_allclose(logits[0], e1, rtol=1e-5, atol=1e-6)


FIRST_LAYER = {  # (kernel path, bias path, BN stats path) of the first Dense -> BN
    "linen_train": (("Dense_0", "kernel"), ("Dense_0", "bias"), ("BatchNorm_0",)),
    "nnx": (("l1", "kernel"), ("l1", "bias"), ("bn",)),
    "functions": (("w1",), ("b1",), ()),
}


@pytest.mark.parametrize("kind", sorted(FIRST_LAYER))
def test_recomputed_batch_stats_are_the_batch_statistics(kind):
  """BN right after the first layer: recalibrated stats = mean/var of its input, per batch."""
  model = KINDS[kind]
  get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)
  x = [jnp.asarray(np.random.default_rng(i).normal(2.0, 3.0, size=(32, D_IN)), jnp.float32)
       for i in range(2)]
  v = models.as_model(model).init(jax.random.key(0), x[0])
  v = {**v, "batch_stats": jax.tree.map(lambda a: a + 4.0, v["batch_stats"])}  # stale
  new = averaging.recompute_batch_stats(model, v, x, key=jax.random.key(2))
  kpath, bpath, spath = FIRST_LAYER[kind]
  h = [xb @ get(v["params"], kpath) + get(v["params"], bpath) for xb in x]
  got = get(new["batch_stats"], spath)
  np.testing.assert_allclose(got["mean"], np.mean([hb.mean(0) for hb in h], 0), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(got["var"], np.mean([hb.var(0) for hb in h], 0), rtol=1e-4,
                             atol=1e-4)
  chex.assert_trees_all_equal(new["params"], v["params"])


def test_plain_linen_features_are_the_last_dense_input():
  m = models.as_model(LinenNoMode())
  x = jnp.ones((5, D_IN))
  v = m.init(jax.random.key(0), x)
  out, stats = m.apply(v, x, with_features=True)
  want = jnp.tanh(x @ v["params"]["hidden"]["kernel"] + v["params"]["hidden"]["bias"])
  np.testing.assert_allclose(out.features, want, rtol=1e-6)
  assert stats == {} and out.logits.shape == (5, C)
  assert models.as_model(LinenNoMode().apply) is models.as_model(LinenNoMode())  # cached


def test_bad_models_get_clear_errors():
  with pytest.raises(TypeError, match="Cannot use int as a model"):
    models.as_model(3)
  inst = NNXNet(nnx.Rngs(0))
  with pytest.raises(ValueError, match="pass a factory"):
    members.init_members(jax.random.key(0), inst, jnp.ones((1, D_IN)), 2)
  one = members.init_members(jax.random.key(0), inst, jnp.ones((1, D_IN)), 1)
  np.testing.assert_array_equal(one["params"]["l1"]["kernel"][0], inst.l1.kernel[...])
  bad = models.as_model((pure_init, lambda v, x, *, train, key: "logits"))
  with pytest.raises(TypeError, match="must return its logits"):
    bad.apply(pure_init(jax.random.key(0), jnp.ones((1, D_IN))), jnp.ones((1, D_IN)))
  nofeat = models.as_model((pure_init, pure_apply))
  with pytest.raises(ValueError, match="returns plain logits"):
    nofeat.apply(pure_init(jax.random.key(0), jnp.ones((2, D_IN))), jnp.ones((2, D_IN)),
                 with_features=True)

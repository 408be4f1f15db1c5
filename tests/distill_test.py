"""Ensemble distillation: the loss against NumPy KL, the student's training, gain retained."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import distill, losses, members, train
from ensembling.models import as_model


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_kl(q, s, t):
  """T^2 mean_b sum_c q log(q / softmax(s / T)) with explicit loops, 0 log 0 = 0."""
  p = _softmax(np.asarray(s) / t)
  total = 0.0
  for b in range(q.shape[0]):
    total += sum(q[b, c] * (math.log(q[b, c]) - math.log(p[b, c]))
                 for c in range(q.shape[1]) if q[b, c] > 0)
  return t * t * total / q.shape[0]


@pytest.mark.parametrize("t", [1.0, 2.0, 4.5])
def test_distillation_loss_equals_numpy_kl(t):
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(3, 6, 5)) * 2
  q = np.mean([_softmax(z / t) for z in teacher], 0)
  q[0] = [0.5, 0.5, 0, 0, 0]                      # exact zeros: 0 log 0 = 0
  s = rng.normal(size=(6, 5)).astype(np.float32)
  got = float(distill.distillation_loss(s, q.astype(np.float32), temperature=t))
  np.testing.assert_allclose(got, _np_kl(q, s, t), rtol=1e-5)
  np.testing.assert_allclose(distill.teacher_probs(teacher, temperature=t)[1:], q[1:], rtol=1e-5)


def test_at_temperature_one_a_one_hot_teacher_gives_cross_entropy():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(8, 4)).astype(np.float32)
  y = rng.integers(0, 4, 8)
  got = float(distill.distillation_loss(s, np.eye(4, dtype=np.float32)[y], temperature=1.0))
  np.testing.assert_allclose(got, float(losses.softmax_cross_entropy(jnp.asarray(s), y)),
                             rtol=1e-6)
  np.testing.assert_allclose(got, -np.mean(np.log(_softmax(s)[np.arange(8), y])), rtol=1e-5)


def test_gradient_is_t_times_the_probability_gap():
  """d/ds of T^2 KL(q || softmax(s/T)) is T (softmax(s/T) - q) per example (Hinton et al.)."""
  rng = np.random.default_rng(2)
  s = rng.normal(size=(5, 3)).astype(np.float32)
  q = _softmax(rng.normal(size=(5, 3))).astype(np.float32)
  t = 3.0
  g = jax.grad(lambda a: distill.distillation_loss(a, q, temperature=t))(jnp.asarray(s))
  np.testing.assert_allclose(np.asarray(g), t * (_softmax(s / t) - q) / 5, rtol=1e-4, atol=1e-7)


def test_fit_student_is_train_fit_of_the_distillation_step():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(48, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  teacher = members.predict(nn.Dense(3), members.init_members(jax.random.key(5), nn.Dense(3),
                                                              x[:1], 2), x)
  q = distill.teacher_probs(teacher, temperature=2.0)
  tx = optax.sgd(0.1, momentum=0.9)
  res = distill.fit_student(nn.Dense(3), x, q, tx=tx, epochs=2, batch_size=16, seed=7,
                            temperature=2.0, eval_data=(x, y), progress=False)
  state = members.init_state(as_model(nn.Dense(3)).init(jax.random.key(7), x[:1]), tx)
  step = jax.jit(functools.partial(distill.train_step, model=nn.Dense(3), tx=tx, temperature=2.0))
  batch_fn, spe = train.make_batch_fn(x, q, seed=7, batch_size=16)
  for t in range(2 * spe):
    state, m = step(state, batch_fn(t), jax.random.fold_in(jax.random.key(8), t))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               res.state["params"], state["params"])
  assert [r["step"] for r in res.history] == [spe, 2 * spe]
  probs = _softmax(nn.Dense(3).apply({"params": state["params"]}, x))
  np.testing.assert_allclose(res.history[-1]["val_accuracy"],
                             np.mean(probs.argmax(-1) == y), rtol=1e-6)


def test_gain_retained():
  single, ens = {"nll": 0.40, "ece": 0.05}, {"nll": 0.30, "ece": 0.03}
  got = distill.gain_retained(single, {"nll": 0.35, "ece": 0.06}, ens, names=("nll", "ece"))
  np.testing.assert_allclose([got["nll"], got["ece"]], [0.5, -0.5])
  assert math.isnan(distill.gain_retained(single, ens, single)["nll"])   # no gain to keep
  with pytest.raises(ValueError, match="brier"):
    distill.gain_retained(single, ens, ens, names=("brier",))


def test_bad_input_raises():
  with pytest.raises(ValueError, match="temperature"):
    distill.teacher_probs(np.zeros((2, 3, 4)), temperature=0.0)
  with pytest.raises(ValueError, match=r"\(K, N, C\)"):
    distill.teacher_probs(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="same shape"):
    distill.distillation_loss(np.zeros((3, 4)), np.full((3, 5), 0.2))
  x = np.zeros((8, 2), np.float32)
  with pytest.raises(ValueError, match="probabilities"):
    distill.fit_student(nn.Dense(2), x, np.ones((8, 2)), tx=optax.sgd(0.1), epochs=1,
                        batch_size=4, seed=0)
  with pytest.raises(ValueError, match="for the 8 inputs"):
    distill.fit_student(nn.Dense(2), x, np.full((7, 2), 0.5), tx=optax.sgd(0.1), epochs=1,
                        batch_size=4, seed=0)

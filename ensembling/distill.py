"""Ensemble distillation (Hinton, Vinyals & Dean 2015): one student from an ensemble.

The teacher is the ensemble's averaged probabilities at a temperature T,
q = mean_k softmax(z_k / T), and the student s minimises

    T^2 * mean_b KL(q_b || softmax(s_b / T)) = T^2 * mean_b sum_c q_bc (log q_bc - log p_bc)

(0 log 0 = 0; the T^2 keeps the gradients' size independent of T, as Hinton et al.
prescribe). At T = 1 with a one-hot teacher this is the cross-entropy. The student
trains with the library's one loop (`train.fit`) on (x, q) batches; `gain_retained`
says how much of the ensemble's gain over a single model it keeps.

>>> import jax, numpy as np, flax.linen as nn, optax
>>> from ensembling import members
>>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
>>> y = (x[:, 0] > 0).astype(np.int32)
>>> teacher = members.predict(nn.Dense(2), members.init_members(jax.random.key(0), nn.Dense(2),
...                           x[:1], 3), x)                          # (K=3, N, C) logits
>>> q = teacher_probs(teacher, temperature=2.0)
>>> res = fit_student(nn.Dense(2), x, q, tx=optax.sgd(0.1), epochs=2, batch_size=16, seed=0,
...                   temperature=2.0, progress=False)
>>> res.state["params"]["kernel"].shape, len(res.history) > 0
((4, 2), True)
>>> gain_retained({"nll": 0.5}, {"nll": 0.375}, {"nll": 0.25})
{'nll': 0.5}
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import members, train
from ensembling.models.contract import as_model

PyTree = Any


def _check_temperature(temperature):
  if not (isinstance(temperature, (int, float, np.floating)) and temperature > 0):
    raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")
  return float(temperature)


def teacher_probs(logits_KxNxC, *, temperature: float = 1.0) -> np.ndarray:
  """The ensemble's averaged probabilities at temperature T: mean_k softmax(z_k / T).

  Args:
    logits_KxNxC: the members' logits (member axis first; a single model is K = 1).
    temperature: T > 0.

  Returns:
    (N, C) float32 probabilities.
  """
  t = _check_temperature(temperature)
  z = np.asarray(logits_KxNxC)
  if z.ndim != 3 or 0 in z.shape:
    raise ValueError(f"teacher logits must be (K, N, C) with K >= 1, got shape {z.shape}.")
  return np.asarray(jax.nn.softmax(jnp.asarray(z, jnp.float32) / t, axis=-1).mean(0))


def distillation_loss(student_logits_BxC, teacher_probs_BxC, *,
                      temperature: float = 1.0) -> jax.Array:
  """T^2 * mean over the batch of KL(teacher || softmax(student / T)).

  Args:
    student_logits_BxC: the student's logits.
    teacher_probs_BxC: the teacher's probabilities at the same T (`teacher_probs`).
    temperature: T > 0.

  Returns:
    A scalar (>= 0; 0 when the student matches the teacher).
  """
  t = _check_temperature(temperature)
  s, q = jnp.asarray(student_logits_BxC), jnp.asarray(teacher_probs_BxC)
  if s.ndim != 2 or s.shape != q.shape:
    raise ValueError(f"Expected student logits (B, C) and teacher probabilities of the same "
                     f"shape, got {s.shape} and {q.shape}.")
  log_p = jax.nn.log_softmax(s.astype(jnp.float32) / t, axis=-1)
  log_q = jnp.log(jnp.where(q > 0, q, 1.0))
  kl = jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=-1)
  return t * t * jnp.mean(kl)


def train_step(state, batch, key, *, model, tx, temperature: float = 1.0):
  """One optimizer step of the student on {"x": (B, ...), "y": teacher probs (B, C)}.

  Args:
    state: {"params", "batch_stats", "opt_state", "step"} (`members.init_state`).
    batch: inputs and the teacher's probabilities at `temperature`.
    key: dropout key.
    model: anything `models.as_model` accepts.
    tx: the optimizer.
    temperature: T.

  Returns:
    (state, {"loss", "agreement" (student argmax = teacher argmax), "grad_norm"}).
  """
  m = as_model(model)

  def loss_of(params):
    out, stats = m.apply({"params": params, "batch_stats": state["batch_stats"]}, batch["x"],
                         train=True, key=key)
    return distillation_loss(out.logits, batch["y"], temperature=temperature), (out.logits, stats)

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new = {**state, "params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
         "opt_state": opt_state, "step": state["step"] + 1}
  return new, {"loss": loss,
               "agreement": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["y"], -1)),
               "grad_norm": optax.tree.norm(grads)}


class StudentResult(NamedTuple):
  """What `fit_student` returns: the student's state, the metrics records, wall time."""
  state: PyTree
  history: list
  seconds: float


def fit_student(model, x: np.ndarray, teacher_probs_NxC: np.ndarray, *,
                tx: optax.GradientTransformation, epochs: int, batch_size: int, seed: int,
                temperature: float = 1.0, workdir: str | None = None,
                eval_data: tuple | None = None, eval_every: int = 0,
                checkpoint_every: int = 0, progress: bool = True,
                schedule: optax.Schedule | None = None) -> StudentResult:
  """Trains a fresh `model` on (x, teacher probabilities) with `train.fit`.

  Args:
    model: the student (anything `models.as_model` accepts).
    x: training inputs (N, ...).
    teacher_probs_NxC: `teacher_probs(ensemble logits on x, temperature=T)`.
    tx: the optimizer.
    epochs: passes over x.
    batch_size: examples per step.
    seed: init `as_model(model).init(key(seed), x[:1])`, data order
      (`train.make_batch_fn(x, q, seed=seed)`), dropout keys from `key(seed + 1)`.
    temperature: T (the same as the teacher's).
    workdir: metrics.jsonl and checkpoints (a rerun resumes); None: nothing written.
    eval_data: (x, y) whose accuracy and NLL are logged (default: every epoch).
    eval_every, checkpoint_every: in steps (0: once per epoch).
    progress: the progress bar.
    schedule: the learning-rate schedule inside `tx` (for error messages).

  Returns:
    A `StudentResult`.
  """
  t = _check_temperature(temperature)
  q = np.asarray(teacher_probs_NxC, np.float32)
  if q.ndim != 2 or len(q) != len(x):
    raise ValueError(f"teacher_probs must be (N, C) for the {len(x)} inputs, got {q.shape}.")
  if (q < 0).any() or not np.allclose(q.sum(-1), 1.0, atol=1e-3):
    raise ValueError("teacher_probs must be probabilities (rows summing to 1): pass "
                     "teacher_probs(logits, temperature=T), not logits.")
  m = as_model(model)
  state = members.init_state(jax.jit(m.init)(jax.random.key(seed), jnp.asarray(x[:1])), tx)
  batch_fn, spe = train.make_batch_fn(x, q, seed=seed, batch_size=batch_size)
  step = jax.jit(functools.partial(train_step, model=m, tx=tx, temperature=t))
  eval_fn = None
  if eval_data is not None:
    eval_fn = lambda s: {k: v[0] for k, v in train.evaluate_members(
        m, jax.tree.map(lambda a: a[None], members.variables_of(s)), *eval_data).items()}
  t0 = time.perf_counter()
  state, _, history = train.fit(
      state, step_fn=step, batch_fn=batch_fn, num_steps=spe * int(epochs),
      key=jax.random.key(seed + 1), workdir=workdir, eval_fn=eval_fn,
      eval_every=eval_every or spe, checkpoint_every=checkpoint_every or spe,
      progress=progress, desc=f"distill (T={t:g})", steps_per_epoch=spe, schedule=schedule)
  return StudentResult(state, history, time.perf_counter() - t0)


def gain_retained(single: Mapping[str, float], student: Mapping[str, float],
                  ensemble: Mapping[str, float], *,
                  names: Sequence[str] = ("nll",)) -> dict[str, float]:
  """(single - student) / (single - ensemble) for each metric in `names`.

  1 means the student keeps all of the ensemble's improvement over a single model, 0
  none, < 0 that it is worse than the single model, > 1 that it beats the ensemble. For
  metrics where lower is better (NLL, ECE, Brier) the sign works as written; for
  accuracy too (both differences flip). NaN where the ensemble equals the single model
  (no gain to keep).

  Args:
    single, student, ensemble: metric dicts (e.g. `metrics.classification_metrics`).
    names: the metrics to compare.

  Returns:
    {name: fraction}.
  """
  out = {}
  for n in names:
    missing = [w for w, d in (("single", single), ("student", student), ("ensemble", ensemble))
               if n not in d]
    if missing:
      raise ValueError(f"metric {n!r} is missing from {missing}.")
    gap = float(single[n]) - float(ensemble[n])
    out[n] = float("nan") if gap == 0 else (float(single[n]) - float(student[n])) / gap
  return out

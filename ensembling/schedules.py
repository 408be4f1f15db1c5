"""Learning-rate schedules: plain optax schedules (step -> learning rate)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from ensembling import checks


def warmup_cosine(base_lr: float, total_steps: int, *, warmup_steps: int = 0,
                  end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to `end_lr` at `total_steps`."""
  checks.integer(total_steps, name="total_steps")
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps,
                                              max(total_steps, warmup_steps + 1), end_lr)
  return optax.cosine_decay_schedule(base_lr, total_steps, alpha=end_lr / base_lr if base_lr else 0.0)


# --------------------------------------------------------------------------- trajectories
#
# Collection points are given as *completed-update counts*: a snapshot at `n` is the
# model right after the n-th optimizer update (`train.fit` calls `on_step(step, ...)`
# after update `step + 1`). Schedules are evaluated at the 0-based update index, which
# is what optax passes (the optimizer's `count` before the update).


def _check_positive(**values):
  for name, v in values.items():
    checks.integer(v, name=name)


def cycle_length(total_steps: int, num_cycles: int) -> int:
  """⌈T/M⌉: the length of one Snapshot Ensembles cycle."""
  _check_positive(total_steps=total_steps, num_cycles=num_cycles)
  if num_cycles > total_steps:
    raise ValueError(f"num_cycles={num_cycles} is larger than total_steps={total_steps}.")
  return -(-int(total_steps) // int(num_cycles))


def cosine_restarts(base_lr: float, total_steps: int, num_cycles: int) -> optax.Schedule:
  """Snapshot Ensembles' schedule, restarted `num_cycles` times (Huang et al., 2017).

  `optax.sgdr_schedule` with M cycles of ⌈T/M⌉ updates, each a cosine from `base_lr`
  to 0: α(t) = α0/2 · (cos(π · mod(t, ⌈T/M⌉) / ⌈T/M⌉) + 1) for the 0-based update index
  t < T, the values of PyTorch's `CosineAnnealingWarmRestarts(T_0=⌈T/M⌉, eta_min=0)`
  stepped once per iteration. With T not divisible by M the last cycle is cut short at T.

  Args:
    base_lr: α0, the rate at the start of every cycle.
    total_steps: T, the updates in the whole run.
    num_cycles: M, the number of cycles (= snapshots).

  Returns:
    An optax schedule `step -> lr`.

  Example:

  >>> s = cosine_restarts(0.1, total_steps=8, num_cycles=2)
  >>> [round(float(s(t)), 4) for t in (0, 2, 4, 6)]
  [0.1, 0.05, 0.1, 0.05]
  """
  period = cycle_length(total_steps, num_cycles)
  cycle = dict(init_value=base_lr, peak_value=base_lr, warmup_steps=0, decay_steps=period,
               end_value=0.0)
  return optax.sgdr_schedule([cycle] * int(num_cycles))


def cosine_restarts_steps(total_steps: int, num_cycles: int) -> np.ndarray:
  """Where `cosine_restarts` snapshots are taken: the end of every cycle.

  Returns the completed-update counts min((c+1)·⌈T/M⌉, T), c = 0..M-1 (the last cycle
  may be shorter). Raises if two cycles would end at the same step.
  """
  period = cycle_length(total_steps, num_cycles)
  steps = np.minimum(period * np.arange(1, num_cycles + 1), total_steps)
  if len(np.unique(steps)) != num_cycles:
    raise ValueError(f"{num_cycles} cycles of {period} steps do not fit in {total_steps} "
                     "steps; lower num_cycles.")
  return steps


def fge_cyclic(lr_1: float, lr_2: float, cycle_steps: int) -> optax.Schedule:
  """Fast Geometric Ensembling's cyclic schedule (Garipov et al., 2018).

  With t = mod(step, c) / c ∈ [0, 1): the rate goes linearly from `lr_1` (t = 0) down
  to `lr_2` (t = 1/2) and back up towards `lr_1`:
  (1 - 2t)·lr_1 + 2t·lr_2 for t < 1/2, (2t - 1)·lr_1 + (2 - 2t)·lr_2 otherwise.

  Args:
    lr_1: the largest rate (cycle start).
    lr_2: the smallest rate (cycle midpoint, where snapshots are taken).
    cycle_steps: c, updates per cycle (an even number puts an update exactly at lr_2).

  Returns:
    An optax schedule `step -> lr`.
  """
  _check_positive(cycle_steps=cycle_steps)
  if cycle_steps < 2:
    raise ValueError(f"cycle_steps must be >= 2, got {cycle_steps}.")

  def schedule(step):
    t = jnp.mod(jnp.asarray(step, jnp.float32), cycle_steps) / cycle_steps
    down = (1.0 - 2.0 * t) * lr_1 + 2.0 * t * lr_2
    up = (2.0 * t - 1.0) * lr_1 + (2.0 - 2.0 * t) * lr_2
    return jnp.where(t < 0.5, down, up)

  return schedule


def fge_steps(cycle_steps: int, total_steps: int) -> np.ndarray:
  """Where FGE snapshots are taken: right after the update made at the cycle midpoint.

  The midpoint update has index k·c + c//2 (the lr_2 point for even c), so the
  completed-update counts are k·c + c//2 + 1 for every cycle k that reaches it.
  """
  _check_positive(cycle_steps=cycle_steps, total_steps=total_steps)
  starts = np.arange(0, total_steps, cycle_steps)
  steps = starts + cycle_steps // 2 + 1
  return steps[steps <= total_steps]


def swa_schedule(base_lr: float, swa_lr: float, *, anneal_steps: int,
                 anneal: str = "cos") -> optax.Schedule:
  """Anneal from `base_lr` to the constant `swa_lr` over `anneal_steps`, then hold.

  The closed form of PyTorch's `SWALR(optimizer, swa_lr, anneal_epochs=anneal_steps,
  anneal_strategy=anneal)` stepped once per update, starting from an optimizer at
  `base_lr`: lr(t) = base_lr + (swa_lr - base_lr)·f(min(1, t / anneal_steps)) with
  f(u) = (1 - cos(πu))/2 ('cos': `optax.cosine_decay_schedule` with alpha =
  swa_lr / base_lr) or f(u) = u ('linear': `optax.linear_schedule`). `anneal_steps=0`
  holds `swa_lr` from the first update.

  Args:
    base_lr: the rate the annealing starts from.
    swa_lr: the constant rate during averaging.
    anneal_steps: updates spent annealing.
    anneal: 'cos' or 'linear'.

  Returns:
    An optax schedule `step -> lr`.
  """
  if anneal not in ("cos", "linear"):
    raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}.")
  checks.integer(anneal_steps, name="anneal_steps", low=0)
  if anneal_steps == 0:
    return optax.constant_schedule(swa_lr)
  if anneal == "linear":
    return optax.linear_schedule(base_lr, swa_lr, anneal_steps)
  if base_lr == 0:
    raise ValueError("base_lr must be non-zero for the cosine anneal.")
  return optax.cosine_decay_schedule(base_lr, anneal_steps, alpha=swa_lr / base_lr)


def swa_steps(start: int, total_steps: int, *, every: int) -> np.ndarray:
  """Where SWA averages: every `every` updates after `start`, i.e. start+every, ...

  Returns the completed-update counts in (start, total_steps]; `total_steps` itself is
  always included when it is on the grid.
  """
  _check_positive(every=every, total_steps=total_steps)
  if not 0 <= start < total_steps:
    raise ValueError(f"start must be in [0, total_steps={total_steps}), got {start}.")
  return np.arange(start + every, total_steps + 1, every)


def after_pretraining(schedule: optax.Schedule, *, pretrain_steps: int,
                      pretrain_schedule: optax.ScalarOrSchedule) -> optax.Schedule:
  """`pretrain_schedule` for the first `pretrain_steps` updates, then `schedule`.

  `schedule` sees its own step count starting at 0 (`optax.join_schedules`). Shift
  its collection steps with `offset_steps(steps, pretrain_steps)`.
  """
  checks.integer(pretrain_steps, name="pretrain_steps", low=0)
  if pretrain_steps == 0:
    return schedule
  if not callable(pretrain_schedule):
    pretrain_schedule = optax.constant_schedule(float(pretrain_schedule))
  return optax.join_schedules([pretrain_schedule, schedule], [pretrain_steps])


def offset_steps(steps, offset: int) -> np.ndarray:
  """Collection steps of a schedule that starts after `offset` pre-training updates."""
  return np.asarray(steps, np.int64) + int(offset)

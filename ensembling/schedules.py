"""Learning-rate schedules: plain optax schedules (step -> learning rate)."""

from __future__ import annotations

from typing import Any, Mapping

import optax


def warmup_cosine(base_lr: float, total_steps: int, *, warmup_steps: int = 0,
                  end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to `end_lr` at `total_steps`."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}.")
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps,
                                              max(total_steps, warmup_steps + 1), end_lr)
  return optax.cosine_decay_schedule(base_lr, total_steps, alpha=end_lr / base_lr if base_lr else 0.0)


def make_schedule(optim_config: Mapping[str, Any], *, total_steps: int) -> optax.Schedule:
  """The schedule that `config.optim.schedule` names ('constant' | 'cosine')."""
  name = optim_config.get("schedule", "cosine")
  lr = float(optim_config["learning_rate"])
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "cosine":
    return warmup_cosine(lr, total_steps, warmup_steps=int(optim_config.get("warmup_steps", 0)))
  raise ValueError(f"Unknown optim.schedule {name!r}; choose constant or cosine.")

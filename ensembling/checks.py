"""Argument checks shared by the library: one rule, one message, wherever a count is taken
(`integer`) or inputs are paired with labels (`paired`).

A count (members, steps, bins, bits, a batch size) is an *integer*: a Python `int`, a NumPy
integer, or a 0-d integer array — anything with `__index__`. `True` is refused although
Python counts it as 1, and so is `2.0`: a float where a count belongs is usually a bug
upstream (a `/` where `//` was meant), and slicing with it fails later with a TypeError
that no longer names the argument.
"""

from __future__ import annotations

import operator


def integer(value, *, name: str, low: int = 1, high: int | None = None) -> int:
  """`value` as a Python int in [low, high], or a ValueError naming `name`.

  Args:
    value: the argument to check.
    name: how the error names it ("num_members", "data.limit_train", ...).
    low: the smallest value allowed (1: a positive count).
    high: the largest value allowed, or None for no bound.

  Returns:
    `int(value)`.

  >>> integer(3, name="steps")
  3
  >>> integer(2.0, name="steps")
  Traceback (most recent call last):
  ...
  ValueError: steps must be an integer >= 1, got 2.0.
  """
  bound = f">= {low}" if high is None else f"in [{low}, {high}]"
  message = f"{name} must be an integer {bound}, got {value!r}."
  if isinstance(value, bool):
    raise ValueError(message)
  try:
    v = operator.index(value)
  except TypeError:
    raise ValueError(message) from None
  if v < low or (high is not None and v > high):
    raise ValueError(message)
  return v


def paired(x, y, *, where: str = "") -> None:
  """A ValueError "[where: ]x has N examples but y has M." unless len(x) == len(y).

  >>> paired([1, 2], [0], where="evaluate")
  Traceback (most recent call last):
  ...
  ValueError: evaluate: x has 2 examples but y has 1.
  """
  if len(x) != len(y):
    raise ValueError(f"{where + ': ' if where else ''}x has {len(x)} examples but y has {len(y)}.")

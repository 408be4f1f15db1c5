"""Save and restore pytrees with orbax: the one module that knows orbax's API."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if needed; absolute path)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mgr: ocp.CheckpointManager, step: int, tree: PyTree, *, wait: bool = True) -> None:
  """Saves `tree` as checkpoint `step` (overwriting nothing; orbax prunes old ones)."""
  mgr.save(int(step), args=ocp.args.StandardSave(tree), force=True)
  if wait:
    mgr.wait_until_finished()


def latest_step(mgr: ocp.CheckpointManager) -> int | None:
  return mgr.latest_step()


def restore(mgr: ocp.CheckpointManager, target: PyTree, *, step: int | None = None) -> PyTree:
  """Restores checkpoint `step` (default: latest) into the structure of `target`.

  `target` supplies the tree structure, shapes, dtypes and shardings (a freshly
  initialised state works). Raises FileNotFoundError when there is no checkpoint.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {mgr.directory}.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return mgr.restore(int(step), args=ocp.args.StandardRestore(abstract))


def save_tree(path: str, tree: PyTree) -> None:
  """One-off save of a pytree to `path` (a directory that must not exist yet)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree)


def load_tree(path: str, target: PyTree | None = None) -> PyTree:
  """Loads what `save_tree` wrote; with `target`, into its structure."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint at {path}.")
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(path)
    return ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, target))

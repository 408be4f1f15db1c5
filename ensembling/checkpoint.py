"""Save, verify and restore pytrees with orbax: the one module that knows orbax's API.

Every checkpoint holds two items: `state` (the pytree) and `meta` (JSON: a SHA-256
checksum over every array's dtype, shape and bytes, in tree order). `restore_latest_valid`
restores the newest checkpoint whose checksum verifies; a newer one that is corrupt,
truncated or unreadable is reported (its path and what failed) and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)
FORMAT = 1


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored and verified."""


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if needed; keeps `max_to_keep` >= 2)."""
  if max_to_keep < 2:
    raise ValueError(f"max_to_keep must be >= 2 (a corrupt newest checkpoint needs an older "
                     f"one to fall back to), got {max_to_keep}.")
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=("state", "meta"))


def checksum(tree: PyTree) -> str:
  """SHA-256 (hex) over every leaf's dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def save(mgr: ocp.CheckpointManager, step: int, tree: PyTree, *, wait: bool = True) -> None:
  """Saves `tree` and its checksum as checkpoint `step` (orbax prunes the oldest).

  Under `jax.distributed` every process calls this with the same (global) tree; orbax
  writes it collectively and every process computes the same checksum.
  """
  from ensembling import distributed
  host = distributed.to_host(tree)
  if jax.process_count() == 1:
    tree = host
  meta = {"format": FORMAT, "sha256": checksum(host), "step": int(step)}
  mgr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                              meta=ocp.args.JsonSave(meta)), force=True)
  if wait:
    mgr.wait_until_finished()


def latest_step(mgr: ocp.CheckpointManager) -> int | None:
  return mgr.latest_step()


def step_path(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(int(step)))


def restore(mgr: ocp.CheckpointManager, target: PyTree, *, step: int | None = None) -> PyTree:
  """Restores and verifies checkpoint `step` (default: latest) into `target`'s structure.

  `target` supplies the tree structure, shapes, dtypes and shardings (a freshly
  initialised state works).

  Raises:
    FileNotFoundError: there is no checkpoint.
    CheckpointError: the checkpoint cannot be read, does not fit `target`, or its
      checksum does not verify (the message names the path and what failed).
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {mgr.directory}.")
  path = step_path(mgr, step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    out = mgr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    meta, tree = out["meta"], out["state"]
  except Exception as e:  # orbax/tensorstore raise many types for unreadable files
    raise CheckpointError(f"Checkpoint {path} cannot be read: {type(e).__name__}: "
                          f"{_first_line(e)}") from e
  if not isinstance(meta, dict) or "sha256" not in meta:
    raise CheckpointError(f"Checkpoint {path} has no checksum (meta: {meta!r}).")
  from ensembling import distributed
  got = checksum(distributed.to_host(tree))
  if got != meta["sha256"]:
    raise CheckpointError(f"Checkpoint {path} fails verification: its arrays' SHA-256 is "
                          f"{got[:16]}..., the one written with it {meta['sha256'][:16]}....")
  return tree


def quarantine(mgr: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` aside (`<step>.corrupt-<n>`), out of orbax's sight; its new path."""
  from ensembling import distributed
  path = step_path(mgr, step)
  n = 0
  while os.path.exists(f"{path}.corrupt-{n}"):
    n += 1
  if distributed.is_primary():
    os.rename(path, f"{path}.corrupt-{n}")
  distributed.barrier(f"quarantine-{step}-{n}")
  mgr.reload()
  return f"{path}.corrupt-{n}"


def restore_latest_valid(mgr: ocp.CheckpointManager, target: PyTree
                         ) -> tuple[int, PyTree] | None:
  """(step, tree) of the newest checkpoint that restores and verifies; None if none exists.

  Every newer checkpoint that fails is logged as a warning with its path and the reason,
  and moved aside (`quarantine`), so that the resumed run can write that step again.

  Raises:
    CheckpointError: checkpoints exist but none verifies (each is named with its reason).
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  failures = []
  for step in steps:
    try:
      return int(step), restore(mgr, target, step=step)
    except CheckpointError as e:
      failures.append(str(e))
      moved = quarantine(mgr, step)
      log.warning("%s; moved to %s; trying an older checkpoint.", e, moved)
  if failures:
    raise CheckpointError("No checkpoint verifies:\n  " + "\n  ".join(failures)
                          + "\nStart afresh in a new workdir (or remove the checkpoints).")
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""

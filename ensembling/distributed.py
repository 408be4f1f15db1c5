"""Several processes, one ensemble: JAX's own multi-process runtime (`jax.distributed`).

With `initialize(coordinator=..., num_processes=N, process_id=i)` run first in each of N
processes (CPU collectives through gloo on CPU hosts), `jax.devices()` lists every
process's devices; `members.shard_members` places the member axis over that global mesh,
each process materialising only the slices of its own members; checkpoints are written
collectively by orbax; metrics, results and plots come from process 0 (`is_primary`).
With one process (the default) everything here is a no-op.

>>> is_primary(), to_host({"a": 1.0})
(True, {'a': 1.0})
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from ensembling import checks

PyTree = Any
log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
  """The processes could not form one runtime (bad settings, no coordinator)."""


def check_settings(*, coordinator: str, num_processes: int, process_id: int) -> bool:
  """Whether the settings ask for several processes; a ValueError when they are invalid."""
  num_processes = checks.integer(num_processes, name="distributed.num_processes")
  if num_processes == 1:
    return False
  if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", coordinator or ""):
    raise ValueError(f"distributed.coordinator must be host:port (e.g. 127.0.0.1:12355), got "
                     f"{coordinator!r}.")
  checks.integer(process_id, name="distributed.process_id", low=0, high=num_processes - 1)
  return True


def initialize(*, coordinator: str = "", num_processes: int = 1, process_id: int = 0,
               timeout: int = 60) -> None:
  """Joins the `num_processes` processes into one JAX runtime (before any JAX work).

  Args:
    coordinator: "host:port" of process 0's coordination service.
    num_processes: N; 1 means a single process and does nothing.
    process_id: this process, in [0, N).
    timeout: seconds to wait for the others; then a `DistributedError`, never a hang.
  """
  if not check_settings(coordinator=coordinator, num_processes=num_processes,
                        process_id=process_id):
    return
  if jax.distributed.is_initialized():
    return  # already joined (e.g. a second run in the same process)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  deadline = time.time() + int(timeout)
  if process_id != 0:  # the runtime aborts the process when the coordinator never answers:
    _wait_for(coordinator, deadline, process_id, num_processes)  # fail cleanly before that
  # Past the deadline the runtime aborts this process (DEADLINE_EXCEEDED, in C++); say why
  # first, in words, instead of leaving only its stack trace.
  watchdog = threading.Timer(max(int(timeout) - 1, 0), lambda: print(
      f"error: process {process_id} of {num_processes}: not every process joined the "
      f"coordinator at {coordinator} within {timeout}s; start all {num_processes} with the "
      "same coordinator and num_processes.", file=sys.stderr, flush=True))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator, num_processes=int(num_processes),
                               process_id=int(process_id), initialization_timeout=int(timeout))
  except Exception as e:  # the runtime raises XlaRuntimeError / RuntimeError variants
    raise DistributedError(
        f"Process {process_id} of {num_processes} could not join the coordinator at "
        f"{coordinator} within {timeout}s ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        "Start every process with the same coordinator and num_processes.") from e
  finally:
    watchdog.cancel()
  log.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _wait_for(coordinator: str, deadline: float, process_id: int, num_processes: int) -> None:
  host, port = coordinator.rsplit(":", 1)
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError:
      if time.time() >= deadline:
        raise DistributedError(
            f"Process {process_id} of {num_processes}: nothing answers at the coordinator "
            f"{coordinator} (process 0 must run there); gave up after the timeout.") from None
      time.sleep(0.25)


def is_primary() -> bool:
  """True in process 0 (and in a single-process run): the one that writes files."""
  return jax.process_index() == 0


def is_global(x) -> bool:
  """Whether `x` is a jax.Array spread over devices of other processes too."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def to_host(tree: PyTree) -> PyTree:
  """Every leaf as a host value, gathering arrays that span processes (all processes call)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if is_global(x):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(get, tree)


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)

"""One run per workdir: a config fingerprint and an OS lock.

A workdir holds one configuration and one process. `claim(workdir, fields=...)` takes an
exclusive `fcntl` lock on `workdir/.lock` (released by the OS when the process dies, so a
crash never leaves it stuck; a second process is refused at once, told the holder's pid,
host and start time) and compares the result-relevant config fields with those stored in
`workdir/run.json` by the first run: a rerun whose fields differ is refused before
anything is written, naming each differing field (old -> new).

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with claim(d, fields={"lr": 0.1}):
...   pass
>>> try:
...   with claim(d, fields={"lr": 0.5}):
...     pass
... except WorkdirError as e:
...   print(str(e).splitlines()[1])
  lr: 0.1 -> 0.5
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
from typing import Any, Iterator, Mapping

LOCK = ".lock"
FINGERPRINT = "run.json"


class WorkdirError(RuntimeError):
  """The workdir belongs to another configuration or another running process."""


def fingerprint(fields: Mapping[str, Any]) -> str:
  """SHA-256 of the fields' canonical JSON."""
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'a.b: old -> new' for every field that differs (missing fields shown as <unset>)."""
  a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(
      json.loads(json.dumps(new, default=str)))
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"
  except (OSError, ValueError, KeyError):
    return "another process"


def stored_fields(workdir: str) -> dict[str, Any]:
  """The fields `workdir` was claimed with (its run.json), checked against their SHA-256.

  Raises:
    WorkdirError: no such directory, no run.json, or one that is unreadable or was edited.
  """
  path = os.path.join(workdir, FINGERPRINT)
  if not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir} is not a directory.")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no {FINGERPRINT}: it is not a run of this project.")
  fields, sha = _read_stored(path)
  if fingerprint(fields) != sha:
    raise WorkdirError(f"{path} does not match its own SHA-256: it was edited after the run.")
  return fields


def _read_stored(path: str) -> tuple[Any, str | None]:
  """The "fields" and "sha256" (None if absent) of the run.json at `path`, or a WorkdirError."""
  try:
    with open(path) as f:
      stored = json.load(f)
    return stored["fields"], stored.get("sha256")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}).") from None


def holder(workdir: str) -> str | None:
  """Who holds `workdir`'s lock now ("pid ... on host, started ..."), or None."""
  path = os.path.join(workdir, LOCK)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return _holder(path)
  else:
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


def clear(workdir: str) -> None:
  """Deletes everything in `workdir` but its lock (for an explicit restart)."""
  for name in os.listdir(workdir):
    if name == LOCK:
      continue
    path = os.path.join(workdir, name)
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


@contextlib.contextmanager
def claim(workdir: str, *, fields: Mapping[str, Any], restart: bool = False,
          restart_flag: str = "--restart") -> Iterator[str]:
  """Locks `workdir` for this process and checks (or records) its config fingerprint.

  Args:
    workdir: the run's directory (created if needed).
    fields: the result-relevant config fields (JSON-serialisable).
    restart: delete the workdir's contents first (a new run with these fields).
    restart_flag: how the caller spells `restart` on its command line (for messages).

  Yields:
    The absolute workdir path, while the lock is held.

  Raises:
    WorkdirError: another process holds the workdir, or it holds a run of other fields.
  """
  workdir = os.path.abspath(workdir)
  stored_path = os.path.join(workdir, FINGERPRINT)
  if not restart and os.path.isdir(workdir):  # refuse before touching anything
    _check(workdir, stored_path, fields, restart_flag)
  os.makedirs(workdir, exist_ok=True)
  lock_path = os.path.join(workdir, LOCK)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirError(f"Workdir {workdir} is in use by {_holder(lock_path)}; wait for it "
                         "to finish or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(
                                 timespec="seconds")}).encode())
    if restart:
      clear(workdir)
    else:
      _check(workdir, stored_path, fields, restart_flag)  # again, now that we hold the lock
    if not os.path.exists(stored_path):
      with open(stored_path, "w") as f:
        json.dump({"sha256": fingerprint(fields), "fields": fields}, f, indent=2,
                  sort_keys=True, default=str)
    yield workdir
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _check(workdir, stored_path, fields, restart_flag):
  ways = (f"Use a new --workdir, or rerun with {restart_flag} to delete this run and start "
          "afresh.")
  if not os.path.exists(stored_path):
    leftovers = [n for n in os.listdir(workdir) if n != LOCK]
    if leftovers:
      raise WorkdirError(f"Workdir {workdir} holds files ({', '.join(sorted(leftovers)[:5])}) "
                         f"but no {FINGERPRINT}: it was not made by this version. {ways}")
    return
  try:
    old, _ = _read_stored(stored_path)
  except WorkdirError as e:
    raise WorkdirError(f"{e} {ways}") from None
  if fingerprint(old) != fingerprint(fields):
    diff = differences(old, fields)
    raise WorkdirError(f"Workdir {workdir} holds a run of another configuration:\n  "
                       + "\n  ".join(diff) + f"\n{ways}")

"""One trainer per workdir: `<workdir>/train.lock`, held by process 0 of the job that trains.

The file is created with O_CREAT | O_EXCL (atomic on local and network filesystems, where
fcntl/flock locks are not reliable, which is why filelock's FileLock is not used here) and
holds the holder's host, pid and start time. A second trainer finds it and stops with one line
naming the holder. A lock whose holder is gone (same host, pid no longer running, or running
but started after the lock was taken: a reused pid) is taken over with a warning; a holder on
another host cannot be checked from here, so the message says how to remove a stale lock.
Released when the run ends, however it ends short of kill -9 (then the next run takes over).
"""
import contextlib
import datetime
import json
import logging
import os
import socket
import time

import jax

from ldm_jax.errors import UserError

LOCK_FILE = "train.lock"


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
          "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds")}


def _proc_stat(pid: int) -> tuple[str, float] | None:
  """(state letter, wall-clock start time) of a process from Linux /proc; None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat", encoding="utf-8") as f:
      boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def holder_alive(holder: dict) -> bool | None:
  """True / False for a holder on this host; None for one on another host (unknown)."""
  if holder.get("host") != socket.gethostname():
    return None
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    pass
  stat = _proc_stat(pid)
  if stat is None:
    return True  # exists; no /proc to say more
  state, started = stat
  # A killed holder not yet reaped by its parent (a zombie) is gone; a pid reused by a process
  # that started after the lock was written is not the holder.
  return state not in ("Z", "X") and started <= float(holder.get("started", 0)) + 2.0


def describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
          f"{holder.get('started_utc', '?')}")


def _read(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}  # half-written by a holder killed while writing it: treated as gone


def _create(path: str, holder: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(holder, f)
  return True


def acquire(workdir: str) -> str | None:
  """Takes the workdir's lock (process 0 only; others return None). Raises UserError naming
  the holder when another live trainer has it."""
  if jax.process_index() != 0:
    return None
  path = os.path.join(workdir, LOCK_FILE)
  me = _holder()
  for _ in range(3):  # a stale lock removed here may be re-taken by a racing trainer
    if _create(path, me):
      return path
    holder = _read(path)
    alive = holder_alive(holder) if holder else False
    if alive:
      raise UserError(f"{workdir} is being trained by another train.py ({describe(holder)}); "
                      f"lock {path}")
    if alive is None:
      raise UserError(f"{workdir} is locked by a train.py on another host ({describe(holder)})"
                      f"; if that job is gone, delete {path}")
    logging.warning("taking over the lock of a trainer that is gone (%s): %s",
                    describe(holder) if holder else "unreadable lock file", path)
    with contextlib.suppress(FileNotFoundError):  # another trainer took it over first
      os.remove(path)
  raise UserError(f"could not take the lock {path}: other trainers keep taking it")


def release(path: str | None) -> None:
  """Removes the lock if this process still holds it."""
  if path is None:
    return
  holder = _read(path)
  if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    os.remove(path)


@contextlib.contextmanager
def held(workdir: str):
  path = acquire(workdir)
  try:
    yield path
  finally:
    release(path)

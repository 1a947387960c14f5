"""Atomic file writes: write a temporary file beside the target, then rename it over.

A failed write (a full disk, a killed process short of kill -9) leaves the target as it was
and removes the temporary file; an OSError that names no file (a failed `write()` does not)
is raised again naming the target, so the one-line message can say what was being written.
"""
import contextlib
import os


@contextlib.contextmanager
def replaced(path: str, suffix: str = ".tmp"):
  """Yields a temporary path beside `path`; on success it replaces `path` atomically."""
  tmp = path + suffix
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:
      raise OSError(e.errno, e.strerror, path) from e
    raise


@contextlib.contextmanager
def naming(path: str):
  """Raises an OSError without a file name again with `path` as its file name."""
  try:
    yield
  except OSError as e:
    if e.filename is None:
      raise OSError(e.errno, e.strerror, path) from e
    raise

"""What a person running train.py, sample.py or evaluate sees on the terminal.

One live progress line per stage or sampling run (name, step/total, loss, steps/s, ETA),
plain lines at stage boundaries and for the final summary, and warnings and errors in short
form. Library start-up noise (absl INFO of jax, TFDS, orbax; TensorFlow's C++ notices) is
silenced unless `--verbosity` (absl's -v) is 1 or more, which restores absl's full format.

On a terminal the progress line is rewritten in place (carriage return); piped to a file it is
written as a whole line every `every_secs` seconds and at the end, so logs get no flood of
carriage returns. Printing is by process 0 only.
"""
import functools
import logging
import math
import os
import sys
import time
from typing import Callable, Mapping, Optional, TextIO

# Environment read by TensorFlow (imported by clu and TFDS) at import: its C++ INFO notices
# ("oneDNN custom operations are on") go to stderr otherwise. TF computes nothing here, so
# turning its oneDNN kernels off changes no result of ours.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_environment() -> None:
  """Sets QUIET_ENV defaults; entry points call it before TensorFlow can be imported."""
  for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)


class _ShortFormatter(logging.Formatter):
  """'warning: message' instead of absl's 60-character 'W1201 03:24:01.973436 140...]'."""

  def format(self, record):
    return f"{record.levelname.lower()}: {record.getMessage()}"


# Library warnings that say nothing actionable about a run (seen on every start-up).
_NOISE = (
    "OpenCV is not installed",  # TFDS: PIL decodes our PNGs fine
    "Type handler registry type",  # orbax: ldm_jax.checkpoint's array handler replaces its own
    "has no dataset_info.json",  # TFDS, while it prepares a data set for the first time
)


class _NoiseFilter(logging.Filter):

  def filter(self, record):
    return record.levelno >= logging.ERROR or not any(
        n in record.getMessage() for n in _NOISE)


_verbosity: Optional[int] = None  # what `setup` was last called with in this process


def setup(verbosity: int = 0) -> None:
  """Console logging for an entry point: with verbosity <= 0 only warnings and errors of the
  log reach the terminal, in short form; with >= 1 absl's INFO lines and format come back."""
  global _verbosity
  _verbosity = verbosity
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  if verbosity >= 1:
    absl_logging.set_verbosity(absl_logging.INFO)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler.setFormatter(_ShortFormatter())
  handler.addFilter(_NoiseFilter())


def worker_init() -> Optional[Callable[[int, int], None]]:
  """For the input pipeline's worker processes (grain's `worker_init_fn`): the console setup
  of this process, so that a worker's log reads like the trainer's; None when this process
  never called `setup` (a library user keeps their own logging)."""
  if _verbosity is None:
    return None
  return functools.partial(_setup_worker, _verbosity)


def _setup_worker(verbosity: int, worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  quiet_environment()
  setup(verbosity)
  if verbosity <= 0:  # a spawned worker may log through Python's default handler, not absl's
    logging.getLogger("absl").addFilter(_NoiseFilter())


def _is_main_process() -> bool:
  # jax is imported here, not at the top: entry points import this module before
  # ldm_jax.platform has set the XLA flags that must precede jax's start.
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def say(message: str, stream: Optional[TextIO] = None) -> None:
  """A plain line for a person (process 0 only): stage boundaries, results, paths."""
  if _is_main_process():
    stream = stream or sys.stderr
    stream.write(message + "\n")
    stream.flush()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_value(v: float) -> str:
  return f"{v:.4g}"


class Progress:
  """A progress line: `update(done, scalars)` after each step; `close()` at the end.

  Rate and ETA come from the steps since the first update (compilation before it does not
  count). `unit` names what is counted ('steps', 'images').
  """

  def __init__(self, name: str, total: int, *, start: int = 0, unit: str = "steps",
               every_secs: float = 30.0, stream: Optional[TextIO] = None,
               show: Optional[Mapping[str, str]] = None, clock=time.monotonic):
    self.name, self.total, self.unit = name, int(total), unit
    self._stream = stream or sys.stderr
    self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
    self._every = 0.25 if self._tty else float(every_secs)
    self._clock = clock
    self._first: Optional[tuple[float, int]] = None
    self._last_print = -math.inf
    self._done = start
    self._scalars: dict = {}
    self._show = dict(show or {"loss": "loss"})
    self._enabled = _is_main_process()
    self._width = 0
    self._printed = None

  def text(self) -> str:
    """The current line: name, done/total, chosen scalars, rate, ETA."""
    parts = [f"{self.name}", f"{self.unit[:-1] if self.unit.endswith('s') else self.unit} "
             f"{self._done}/{self.total}"]
    for key, label in self._show.items():
      if key in self._scalars:
        parts.append(f"{label} {_format_value(self._scalars[key])}")
    rate = self.rate()
    if rate is not None:
      parts.append(f"{rate:.3g} {self.unit}/s")
      parts.append(f"ETA {format_duration((self.total - self._done) / rate)}"
                   if self._done < self.total else "done")
    return "  ".join(parts)

  def rate(self) -> Optional[float]:
    if self._first is None:
      return None
    t0, n0 = self._first
    dt = self._clock() - t0
    return (self._done - n0) / dt if dt > 0 and self._done > n0 else None

  def update(self, done: int, scalars: Optional[Mapping[str, float]] = None) -> None:
    now = self._clock()
    if self._first is None:
      self._first = (now, done)
    self._done = done
    if scalars:
      self._scalars.update(scalars)
    if self._enabled and (now - self._last_print >= self._every or done >= self.total):
      self._print(final=False)
      self._last_print = now

  def _print(self, final: bool) -> None:
    line = self.text()
    if self._tty:
      pad = max(0, self._width - len(line))
      self._stream.write("\r" + line + " " * pad + ("\n" if final else ""))
      self._width = 0 if final else len(line)
    else:
      self._stream.write(line + "\n")
    self._printed = self._done
    self._stream.flush()

  def close(self) -> None:
    """Ends the line (a final whole line when output is piped and the last one is stale)."""
    if not self._enabled or self._first is None:
      return
    if self._tty:
      self._print(final=True)
    elif self._printed != self._done:
      self._print(final=False)

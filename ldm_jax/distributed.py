"""Multi-process runtime: `jax.distributed` start-up and a preemption signal agreed by all processes.

One Python process runs per host (TPU VM worker, GPU node or SLURM task); `initialize` joins
them into one JAX runtime, after which `jax.devices()` lists every device of the job and each
jitted step is a single SPMD program over the global mesh. On CPU the cross-process
collectives go through gloo.

Preemption: the training loop asks `PreemptionWatch.reached(step)` after every step. With
several processes the answer comes from JAX's preemption sync manager (started by
`jax.distributed.initialize`): a SIGTERM to any process is sent to the coordination service,
every process reports the step it is at, and all of them get True at the same step (the
largest reported + 1). It costs no collective and no device sync per step, unlike an
all-reduce of a flag, and it is the mechanism orbax's CheckpointManager already uses. A
single process has no coordination service: there a Python SIGTERM handler sets the flag.
"""
import logging
import os
import signal
import sys
import threading
from typing import Optional

import jax

from ldm_jax.errors import UserError

# Environment variables by which jax.distributed.initialize() recognises a cluster on its own.
_CLUSTER_ENV = {
    "SLURM_JOB_ID": "SLURM",
    "OMPI_MCA_orte_hnp_uri": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "Cloud TPU",
    "MEGASCALE_COORDINATOR_ADDRESS": "Cloud TPU multislice",
    "KUBERNETES_SERVICE_HOST": "Kubernetes",
}


class Preempted(Exception):
  """Raised by the training loop after the preemption checkpoint is written (exit 0)."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved step {step} in {directory}; re-run the same command "
                     "to resume")
    self.step = step
    self.directory = directory


def initialize(*, coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[str] = None,
               heartbeat_timeout: int = 100, initialization_timeout: int = 300) -> None:
  """Joins this process to a multi-process JAX job (call before any other JAX call).

  With no arguments JAX detects the cluster from its environment (Cloud TPU pod slices,
  SLURM, Open MPI, Kubernetes); explicit values override that. `heartbeat_timeout` is how long
  (seconds) a silent peer may go unnoticed: after it the coordination service declares the
  peer dead and every survivor stops with an error instead of waiting in a collective forever.
  """
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes={num_processes} must be positive")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
  if coordinator_address is None and not any(k in os.environ for k in _CLUSTER_ENV):
    raise UserError("--distributed without --coordinator_address, and no cluster environment "
                    f"({', '.join(sorted(_CLUSTER_ENV))}) to detect it from")
  # Only affects the CPU backend: cross-process CPU collectives need an implementation.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  ids = None
  if local_device_ids:
    ids = [int(i) for i in str(local_device_ids).split(",")]
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=ids,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_multiprocess() -> bool:
  return jax.process_count() > 1


class PreemptionWatch:
  """`reached(step)`: True at the same step on every process once any of them got SIGTERM.

  Call it once per training step on every process, with the same step numbers. Use as a
  context manager so that the single-process SIGTERM handler is removed afterwards.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multi = is_multiprocess()
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint at the end of this step", signum)
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag.is_set()

  def signalled(self) -> bool:
    """Whether this process got SIGTERM, without agreeing on a step: the loop polls it while
    it waits for a compile. Multi-process jobs agree through the preemption sync point only,
    which needs a step, so there this stays False and the signal is honoured at the first
    step after the compile (the loop compiles later variants ahead, in the background)."""
    return not self._multi and self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def exit_after_preemption() -> None:
  """Exits 0 at once, after a preemption checkpoint is written (and flushed by the loop).

  A step program may still be compiling in the loop's background thread; letting the
  interpreter finalise under it aborts the process (XLA's compile throws into a dead
  runtime), and waiting for it is the delay a preemption grace period does not have. So: flush
  the logs, leave the distributed runtime in order (its shutdown is a barrier of all
  processes), and `os._exit(0)`.
  """
  for handler in logging.getLogger().handlers:
    handler.flush()
  if is_multiprocess():
    jax.distributed.shutdown()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(0)  # pylint: disable=protected-access


_INSTALLED: Optional[PreemptionWatch] = None


def install_preemption_watch() -> PreemptionWatch:
  """The process-wide watch, installed once by the entry point (train.py) so that a SIGTERM
  that arrives between training stages or during compilation is also kept for the loop."""
  global _INSTALLED
  if _INSTALLED is None:
    _INSTALLED = PreemptionWatch()
  return _INSTALLED


def installed_preemption_watch() -> Optional[PreemptionWatch]:
  return _INSTALLED


_BARRIERS = iter(range(1 << 62))


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here (no-op with one process).

  A barrier of the coordination service's key-value store, not a device collective: XLA:CPU's
  gloo gives up on a new communicator when its peers arrive more than 30 s apart, which
  happens when one process compiles (or loads from the compilation cache) much faster than
  another; the loop therefore meets here before its first step.
  """
  if not is_multiprocess():
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  client.wait_at_barrier(f"ldm_jax_{name}_{next(_BARRIERS)}", timeout_in_ms=timeout_s * 1000)

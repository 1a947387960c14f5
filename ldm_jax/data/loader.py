"""Batches made ahead of the consumer by grain: reader threads, optionally worker processes.

Every pipeline of this package is a pure function `make_batch(k)` of a batch index (training
batch k = f(seed, k); evaluation batch k = the k-th slice of the split), so the loader is
grain's random-access `MapDataset` over the range of batch indices, mapped by that function,
read ahead in order by `ReadOptions.num_threads` threads and, with `num_workers > 0`, by grain's
worker processes (`mp_prefetch`: worker i makes batches start + i, start + i + W, ...; grain
interleaves them back in order). Resuming at step k starts the range at k: the result never
depends on threads, workers or where a previous run stopped, and no iterator state is saved.

Why batches rather than grain's per-record pipeline (source -> shuffle -> map -> batch): the
record order is `pipeline.global_indices` (an epoch-permutation stream that the latent cache
and multi-host runs share, batch rows split between processes), and augmentation is seeded by
global stream position; both are functions of the batch index that grain's samplers do not
express, while grain still owns the execution: threads, processes, buffering and shutdown.
"""
from typing import Any, Callable, Iterator, Optional

from absl import flags
import grain
import numpy as np

# A training stream has no end, but a grain dataset has a length.
ENDLESS = 2 ** 62


def prefetched(make_batch: Callable[[int], Any], start: int, stop: int = ENDLESS, *,
               num_threads: int, prefetch: int, num_workers: int = 0,
               worker_init: Optional[Callable[[int, int], None]] = None) -> Iterator[Any]:
  """`make_batch(k)` for k = start, start + 1, ..., stop - 1, computed ahead.

  `num_threads` batches are made at once (each by one thread), up to `max(prefetch,
  num_threads)` ahead. With `num_workers > 0`, `make_batch` (pickled with cloudpickle; so is
  everything it references, e.g. the data source) runs in that many spawned worker processes,
  each with its own threads. An exception raised by `make_batch` is raised here, at the batch
  it belongs to. Closing the generator (`.close()`, or exhausting it) stops threads and workers.
  `worker_init(worker_index, worker_count)` runs first in each worker (e.g. logging setup).
  """
  if num_threads < 1 or prefetch < 1 or num_workers < 0:
    raise ValueError(f'num_threads={num_threads} and prefetch={prefetch} must be positive and '
                     f'num_workers={num_workers} non-negative')
  dataset = grain.MapDataset.range(start, stop).map(make_batch)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads)))
  if num_workers:
    _grain_flags_readable()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)),
                                  worker_init_fn=worker_init)
  iterator = iter(dataset)
  try:
    for batch in iterator:
      # A worker's arrays arrive in shared memory, unlinked when the last reference goes (in a
      # background thread). Copying them out releases each segment at once, so none is left
      # for the resource tracker to report when the trainer exits (os._exit) right after a step.
      yield _copied(batch) if num_workers else batch
  finally:
    close = getattr(iterator, 'close', None)  # Worker processes; threads stop with the buffer.
    if close is not None:
      close()


def _copied(batch: Any) -> Any:
  if isinstance(batch, dict):
    return {k: _copied(v) for k, v in batch.items()}
  return np.array(batch, copy=True) if isinstance(batch, np.ndarray) else batch


def _grain_flags_readable() -> None:
  """grain 0.2's `mp_prefetch` reads its absl flag `grain_enable_multiprocess_worker_profiling`
  directly, which raises UnparsedFlagAccessError in a program that never parsed absl flags
  (pytest, a notebook, the benchmarks). Marking the flag present makes it read its default, as
  grain itself does for its debug flags before it starts a worker; a parsed value is kept."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS['grain_enable_multiprocess_worker_profiling'].present = True

"""Many samples, batch by batch: what `sample.py --out_dir` and `python -m ldm_jax.evaluate`
draw 10,000+ images with.

  plan = BatchPlan(num_samples=10_000, batch_size=256, seed=0)
  for index, images, labels in sample_batches(pipe, plan, sampler="ddim", steps=50):
    ...                                         # uint8 [batch, H, W, C], labels or None

Batch i of a plan is a pure function of (seed, i) and the sampling settings: it samples with
seed `batch_seed(seed, i)` (batch 0 with `seed` itself, so a run of one batch is
`pipe.sample(n, seed=seed)`), and class-conditional models without given labels get the
balanced labels `global index % num_classes`. A run stopped after k batches and started again
therefore produces exactly the images of an uninterrupted run: `ImageSink`s skip the batches
already on disk. The last batch is sampled at full size and cut, so one program serves all.

The sinks that keep the images on disk, restartable, are `ldm_jax.sampling.sinks`.
"""
import dataclasses
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ldm_jax import console
from ldm_jax.errors import UserError

MAX_DEFAULT_BATCH = 256


def batch_seed(seed: int, index: int) -> int:
  """The seed of batch `index`: `seed` for batch 0, else drawn from (seed, index)."""
  if index == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)])
             .generate_state(1, np.uint32)[0] >> 1)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """`num_samples` images in batches of `batch_size` (the last one cut)."""
  num_samples: int
  batch_size: int
  seed: int = 0

  def __post_init__(self):
    if self.num_samples < 1:
      raise UserError(f"num_samples={self.num_samples} must be at least 1")
    if self.batch_size < 1:
      raise UserError(f"batch_size={self.batch_size} must be at least 1")

  @property
  def num_batches(self) -> int:
    return -(-self.num_samples // self.batch_size)

  def bounds(self, index: int) -> tuple[int, int]:
    """[start, stop) of batch `index` in the run's image numbering."""
    start = index * self.batch_size
    return start, min(start + self.batch_size, self.num_samples)


def _unet_widths(pipe) -> list:
  stages = getattr(pipe, "stages", None) or [pipe]
  return [(s.latent_shape, s.model.unet, s.image_size, s.autoencoder) for s in stages]


def device_memory_bytes() -> int:
  """Memory of the first local device (its allocator's limit), or of the host on a CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = None
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory statistics)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def estimated_bytes_per_sample(pipe) -> int:
  """A rough upper estimate of the memory one sample needs while it is drawn: the UNet's
  widest activations (both guidance branches, ~32 live tensors), its attention maps at full
  latent resolution, and the decoder's activations at image resolution. A heuristic (no
  program is compiled to measure it); `--batch_size` overrides what it implies."""
  total = 0
  for shape, unet, image_size, autoencoder in _unet_widths(pipe):
    pixels = shape[0] * shape[1]
    width = unet.model_channels * max(unet.channel_mult)
    unet_bytes = 2 * 4 * pixels * width * 32
    if 0 in tuple(unet.attention_levels):
      heads = max(unet.num_heads, 1) if unet.num_head_channels <= 0 else max(
          unet.model_channels // unet.num_head_channels, 1)
      unet_bytes += 2 * 4 * pixels * pixels * heads * 2
    decoder_bytes = 0
    if autoencoder is not None:
      decoder_bytes = 4 * image_size * image_size * autoencoder.ch * max(autoencoder.ch_mult) * 8
    total = max(total, unet_bytes + decoder_bytes)
  return max(total, 1)


def default_batch_size(pipe, num_samples: int, memory_bytes: Optional[int] = None) -> int:
  """The largest batch (at most 256, at most num_samples) whose estimated footprint fits a
  quarter of the device's memory."""
  memory = device_memory_bytes() if memory_bytes is None else int(memory_bytes)
  fit = memory // 4 // estimated_bytes_per_sample(pipe)
  return int(max(1, min(num_samples, MAX_DEFAULT_BATCH, fit)))


def _num_classes(pipe) -> int:
  model = pipe.model
  return int(model.unet.num_classes) if model.cond_kind == "class" else 0


def plan_labels(pipe, plan: BatchPlan, labels=None) -> Optional[np.ndarray]:
  """The label of every image of a class-conditional run ([num_samples] int32): `labels`
  (one int, or one per image), else balanced (index % num_classes). None otherwise."""
  n = _num_classes(pipe)
  if n == 0:
    if labels is not None:
      raise UserError("labels were given for a model that is not class-conditional")
    return None
  if labels is None:
    return (np.arange(plan.num_samples) % n).astype(np.int32)
  out = np.asarray(labels, np.int64)
  if out.ndim == 0:
    out = np.full((plan.num_samples,), int(out))
  if out.shape != (plan.num_samples,):
    raise UserError(f"{out.size} labels for {plan.num_samples} samples")
  if out.min() < 0 or out.max() >= n:
    raise UserError(f"label {int(out.max() if out.max() >= n else out.min())} is outside "
                    f"0..{n - 1}")
  return out.astype(np.int32)


def _take(values, start: int, stop: int, size: int):
  """values[start:stop] padded to `size` by repeating the run's cycle (the padded rows are
  sampled and dropped)."""
  rows = np.arange(start, start + size)
  rows = np.where(rows < stop, rows, start + (rows - start) % max(stop - start, 1))
  return [values[i] for i in rows] if isinstance(values, list) else np.asarray(values)[rows]


def sample_batches(pipe, plan: BatchPlan, *, labels=None, prompt=None,
                   skip: Callable[[int], bool] = lambda i: False,
                   batch_progress: Optional["BatchProgress"] = None,
                   **sample_kwargs) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
  """Yields (batch index, uint8 images [stop - start, H, W, C], labels or None) for every
  batch of `plan` that `skip(index)` does not skip. `prompt`: one string, or one per image.
  `sample_kwargs` go to `pipe.sample` (sampler, steps, guidance, eta, aug_level, its
  per-step `progress`, ...); `batch_progress` reports each batch."""
  all_labels = plan_labels(pipe, plan, labels)
  prompts = prompt if isinstance(prompt, (str, type(None))) else list(prompt)
  if isinstance(prompts, list) and len(prompts) != plan.num_samples:
    raise UserError(f"{len(prompts)} prompts for {plan.num_samples} samples")
  todo = [i for i in range(plan.num_batches) if not skip(i)]
  if batch_progress is not None:
    batch_progress.start(plan, done=plan.num_batches - len(todo))
  size = plan.batch_size if plan.num_batches > 1 else plan.num_samples
  for i in todo:
    start, stop = plan.bounds(i)
    kwargs = dict(sample_kwargs)
    if all_labels is not None:
      kwargs["labels"] = _take(all_labels, start, stop, size)
    if prompts is not None:
      kwargs["prompt"] = prompts if isinstance(prompts, str) else _take(prompts, start, stop,
                                                                        size)
    images = np.asarray(pipe.sample(size, seed=batch_seed(plan.seed, i), **kwargs))
    images = images[:stop - start]
    if batch_progress is not None:
      batch_progress.batch_done(i, stop - start)
    yield i, images, None if all_labels is None else all_labels[start:stop]


class BatchProgress:
  """The progress line of a batched run (console.Progress counting images: done / total,
  images/s, ETA); a resumed run first says how many batches are already on disk."""

  def __init__(self, stream=None, what: str = "sampling",
               clock: Callable[[], float] = time.monotonic):
    self._stream, self._what, self._clock = stream, what, clock
    self._line: Optional[console.Progress] = None

  def start(self, plan: BatchPlan, done: int = 0) -> None:
    done_images = sum(plan.bounds(i)[1] - plan.bounds(i)[0] for i in range(done))
    self._done = done_images
    self._line = console.Progress(self._what, plan.num_samples, start=done_images,
                                  unit="images", every_secs=0.0, stream=self._stream,
                                  clock=self._clock)
    if done:
      console.say(f"{self._what}: {done} of {plan.num_batches} batches already on disk, "
                   "resuming", stream=self._stream)
    self._line.update(done_images)
    if done_images >= plan.num_samples:  # everything already on disk: end the line
      self._line.close()

  def batch_done(self, index: int, count: int) -> None:
    del index
    self._done += count
    self._line.update(self._done)
    if self._done >= self._line.total:
      self._line.close()


def run_to_sink(pipe, plan: BatchPlan, sink, *,
                batch_progress: Optional[BatchProgress] = None, **kwargs) -> str:
  """Samples every batch the sink lacks, writes each as it comes, assembles; returns the
  sink's path."""
  for index, images, labels in sample_batches(pipe, plan, skip=sink.done,
                                              batch_progress=batch_progress, **kwargs):
    sink.write(index, images, labels)
  return sink.finish()


def settings_of(workdir: str, plan: BatchPlan, labels: Optional[Sequence[int]] = None,
                prompt=None, **sample_kwargs) -> dict:
  """What fixes a run's images: the workdir, the plan and the sampling keywords."""
  return {"workdir": os.path.abspath(workdir), "num_samples": plan.num_samples,
          "batch_size": plan.batch_size, "seed": plan.seed,
          "labels": None if labels is None else np.asarray(labels).tolist(),
          "prompt": prompt, **sample_kwargs}

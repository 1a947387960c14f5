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

Sinks: `PngDirSink` (one PNG per image, `<out_dir>/000123.png`) and `NpzSink` (one `.npz`
with `images` and `labels`, assembled from per-batch parts). Each keeps the settings of the
run in `sampling.json` and refuses to mix samples of other settings into its folder.
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ldm_jax import files
from ldm_jax.errors import UserError
from ldm_jax.evaluation.images import save_png

MANIFEST = "sampling.json"
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


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class BatchProgress:
  """One progress line per batch: images done / total, images/s and the ETA. On a terminal
  the line is rewritten in place; in a file or pipe each batch adds one line."""

  def __init__(self, stream=None, what: str = "sampling", clock: Callable[[], float] = time.time):
    self._stream = stream or sys.stderr
    self._what, self._clock = what, clock
    self._tty = bool(getattr(self._stream, "isatty", lambda: False)())

  def start(self, plan: BatchPlan, done: int = 0) -> None:
    self._plan, self._t0 = plan, self._clock()
    self._images = 0
    self._done_images = sum(plan.bounds(i)[1] - plan.bounds(i)[0] for i in range(done))
    self._left = plan.num_samples - self._done_images
    if done:
      self._write(f"{self._what}: {done} of {plan.num_batches} batches already on disk, "
                  "resuming", end=True)

  def batch_done(self, index: int, count: int) -> None:
    self._images += count
    elapsed = max(self._clock() - self._t0, 1e-9)
    rate = self._images / elapsed
    total_done = self._done_images + self._images
    left = self._left - self._images
    last = total_done >= self._plan.num_samples or left <= 0
    self._write(f"{self._what}: {total_done}/{self._plan.num_samples} images (batch "
                f"{index + 1}/{self._plan.num_batches})  {rate:.2f} images/s  "
                f"ETA {_hms(left / rate) if rate > 0 else '?'}", end=last)

  def _write(self, text: str, end: bool) -> None:
    if self._tty:
      self._stream.write("\r\033[K" + text + ("\n" if end else ""))
    else:
      self._stream.write(text + "\n")
    self._stream.flush()


# ---- sinks: the images on disk, restartable ------------------------------------------------
def _check_manifest(folder: str, settings: Mapping[str, Any]) -> None:
  """Writes folder/sampling.json, or checks that the one there has the same settings."""
  path = os.path.join(folder, MANIFEST)
  settings = json.loads(json.dumps(dict(settings)))  # plain JSON types
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): delete it or the folder") from e
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
      shown = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
      raise UserError(f"{folder} holds samples drawn with other settings ({shown}): use "
                      "another output path or delete it")
    return
  os.makedirs(folder, exist_ok=True)
  with files.replaced(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(settings, f, indent=2, sort_keys=True)


class PngDirSink:
  """One PNG per image, `<folder>/<index:06d>.png` (index in the run); a batch is done when
  all its files exist."""

  def __init__(self, folder: str, plan: BatchPlan, settings: Mapping[str, Any]):
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise UserError(f"out_dir={folder!r} is a file, not a folder")
    self.folder, self.plan = folder, plan
    _check_manifest(folder, settings)

  def path(self, index: int) -> str:
    return os.path.join(self.folder, f"{index:06d}.png")

  def done(self, batch: int) -> bool:
    start, stop = self.plan.bounds(batch)
    return all(os.path.exists(self.path(i)) for i in range(start, stop))

  def write(self, batch: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    del labels
    start, _ = self.plan.bounds(batch)
    for k, image in enumerate(images):
      save_png(self.path(start + k), image)

  def finish(self) -> str:
    return self.folder


class NpzSink:
  """One `.npz` (`images` uint8 [N, H, W, C], `labels` int32 [N] when class-conditional),
  assembled from `<path>.parts/batch_<i>.npz` when every batch is there."""

  def __init__(self, path: str, plan: BatchPlan, settings: Mapping[str, Any]):
    if not path.endswith(".npz"):
      raise UserError(f"{path!r}: the samples file must end in .npz")
    self.path, self.plan = path, plan
    self.parts = path + ".parts"
    self._settings = dict(settings)
    self._complete = os.path.exists(path) and self._same_settings(path)
    if not self._complete:
      _check_manifest(self.parts, settings)

  def _same_settings(self, path: str) -> bool:
    with np.load(path) as z:
      old = json.loads(str(z["settings"])) if "settings" in z.files else None
    if old != json.loads(json.dumps(self._settings)):
      raise UserError(f"{path} exists and holds samples drawn with other settings: use "
                      "another output path or delete it")
    return True

  def _part(self, batch: int) -> str:
    return os.path.join(self.parts, f"batch_{batch:06d}.npz")

  def done(self, batch: int) -> bool:
    return self._complete or os.path.exists(self._part(batch))

  def write(self, batch: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    with files.replaced(self._part(batch)) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, images=images, **({} if labels is None else {"labels": labels}))

  def finish(self) -> str:
    if self._complete:
      return self.path
    parts = [np.load(self._part(i)) for i in range(self.plan.num_batches)]
    arrays = {"images": np.concatenate([p["images"] for p in parts])}
    if "labels" in parts[0].files:
      arrays["labels"] = np.concatenate([p["labels"] for p in parts])
    for p in parts:
      p.close()
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with files.replaced(self.path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, settings=np.asarray(json.dumps(json.loads(json.dumps(self._settings)))),
                 **arrays)
    shutil.rmtree(self.parts)
    return self.path


def run_to_sink(pipe, plan: BatchPlan, sink, *,
                batch_progress: Optional[BatchProgress] = None, **kwargs) -> str:
  """Samples every batch the sink lacks, writes each as it comes, assembles; returns the
  sink's path."""
  for index, images, labels in sample_batches(pipe, plan, skip=sink.done,
                                              batch_progress=batch_progress, **kwargs):
    sink.write(index, images, labels)
  return sink.finish()


def read_samples(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(images uint8 [N, H, W, C], labels or None) of an NpzSink file."""
  with np.load(path) as z:
    return z["images"], (z["labels"] if "labels" in z.files else None)


def settings_of(workdir: str, plan: BatchPlan, labels: Optional[Sequence[int]] = None,
                prompt=None, **sample_kwargs) -> dict:
  """What fixes a run's images: the workdir, the plan and the sampling keywords."""
  return {"workdir": os.path.abspath(workdir), "num_samples": plan.num_samples,
          "batch_size": plan.batch_size, "seed": plan.seed,
          "labels": None if labels is None else np.asarray(labels).tolist(),
          "prompt": prompt, **sample_kwargs}


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def write_image(path: str, grid: np.ndarray) -> None:
  """A HWC uint8 image as PNG or JPEG (quality 95) by the file's extension, atomically; any
  other extension is refused."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in IMAGE_FORMATS:
    raise UserError(f"{path!r}: unknown image extension {ext or '(none)'!r}: use one of "
                    f"{sorted(IMAGE_FORMATS)}")
  if IMAGE_FORMATS[ext] == "PNG":
    save_png(path, grid)
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.replaced(path, ".tmp" + ext) as tmp:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="JPEG",
                                                                         quality=95)

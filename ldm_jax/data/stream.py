"""From a random-access source to fixed-shape float batches: preprocessing and sampling.

Training reads `BatchStream.get(step)` / `BatchStream.iterate(start_step)`: batch `step` is a
pure function of (seed, step), so resuming at a step needs no saved iterator state. Evaluation
reads `eval_batches`, one ordered pass with a padding mask. Both are made ahead by grain
(`loader.prefetched`: reader threads, optional worker processes).
"""
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image

from ldm_jax.data import loader
from ldm_jax.errors import UserError

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's convert('L').


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` config block read by `make_source`, `BatchStream` and `eval_batches`."""
  return ml_collections.ConfigDict({
      'source': 'fashion_mnist',  # 'fashion_mnist' | 'tfds' | 'folder'.
      'name': '',  # TFDS dataset name for source='tfds' (e.g. 'cifar10').
      'train_split': 'train',
      'eval_split': 'test',
      'data_dir': '',  # '' -> TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
      'folder': '',  # Image folder for source='folder'.
      # Folder images that do not decode: False -> stop with an error naming the file; True ->
      # skip them, named once in a warning (ldm_jax/data/folder.py).
      'skip_bad_images': False,
      'local_dir': '/usr/share/datasets/fashion-mnist',  # Debian dataset-fashion-mnist files.
      'image_key': 'image',
      'label_key': 'label',  # '' -> unlabeled (label 0, num_classes 0).
      'image_size': 32,
      'channels': 1,
      'random_crop': False,
      'random_flip': False,
      'download': False,  # Whether TFDS may download (and prepare) missing data.
      'num_threads': 4,  # Batches made at once (grain reader threads), in each process.
      'prefetch': 2,  # Batches made ahead (at least num_threads).
      # grain worker processes making batches (0: threads of the training process only). Each
      # spawned worker imports the data code and unpickles the source (a few seconds at start).
      'num_workers': 0,
  })


def preprocess(image: np.ndarray, image_size: int, channels: int, random_crop: bool = False,
               random_flip: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [image_size, image_size, channels] in [-1, 1].

  Resizes so the shorter side is `image_size` (bicubic up, Lanczos/antialiased down, nothing if
  equal), crops the center (or a random window if `random_crop` and `rng`), flips horizontally
  with probability 0.5 (if `random_flip` and `rng`), then converts to 1 channel (luminance) or
  3 channels (gray repeated). The crop offset is drawn before the flip coin.
  """
  if image_size <= 0:
    raise UserError(f'data.image_size={image_size} must be positive')
  if channels not in (1, 3):
    raise UserError(f'data.channels={channels} must be 1 or 3')
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
    raise ValueError(f'expected uint8 [H, W, 1|3|4], got {image.dtype} {image.shape}')
  image = image[..., :3]  # Drop alpha.
  h, w = image.shape[:2]
  scale = image_size / min(h, w)
  if scale != 1:
    size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))  # PIL: (w, h)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
    image = np.asarray(pil.resize(size, resample=resample)).reshape(size[1], size[0], -1)
    h, w = image.shape[:2]
  if random_crop and rng is not None:
    top = int(rng.integers(0, h - image_size + 1))
    left = int(rng.integers(0, w - image_size + 1))
  else:
    top, left = (h - image_size) // 2, (w - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  if random_flip and rng is not None and rng.random() < 0.5:
    image = image[:, ::-1]
  x = image.astype(np.float32)
  if channels == 1 and x.shape[-1] == 3:
    x = (x @ _LUMA)[..., None]
  elif channels == 3 and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x / 127.5 - 1.0


# Why not grain's IndexSampler (grain only runs the batches: loader.py): here the stream
# position of an example is simply `step * global_batch + j`, so the indices of any batch are a
# pure function of (seed, step).
# Resuming from a checkpoint at step k is exact by construction and the checkpoint stores no
# iterator state; tfds's `data_source` already gives the random access, and the function is
# trivially the same on every host. Epoch permutations are cached (they are O(N) to draw).
@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(num_records)
  perm.flags.writeable = False
  return perm


def global_indices(step: int, global_batch: int, num_records: int, seed: int,
                   shuffle: bool = True) -> np.ndarray:
  """Record indices (int64 [global_batch]) of global batch `step`.

  The stream is epoch 0, epoch 1, ... each a permutation of range(num_records) drawn from
  `np.random.default_rng([seed, epoch])` (identity order when not `shuffle`); batch k is stream
  positions [k * global_batch, (k + 1) * global_batch), so a batch that crosses an epoch boundary
  takes the tail of one epoch and the head of the next: no repeats, no gaps.
  """
  if global_batch <= 0:
    raise UserError(f'train.batch_size={global_batch} must be positive')
  if num_records <= 0:
    raise UserError(f'The dataset has {num_records} records; need at least one')
  if step < 0 or seed < 0:
    raise ValueError(f'step={step} and seed={seed} must be non-negative')
  positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_records)
  if not shuffle:
    return offsets
  out = np.empty_like(offsets)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _permutation(seed, int(epoch), num_records)[offsets[sel]]
  return out


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise UserError(f'train.batch_size={global_batch} must be a positive multiple of the '
                    f'process count {process_count}')
  return global_batch // process_count


def _read(source: Sequence[dict[str, Any]], indices: np.ndarray) -> list[dict[str, Any]]:
  """source[i] for i in indices, batched through `__getitems__` when the source has it."""
  indices = [int(i) for i in indices]
  if hasattr(source, '__getitems__'):
    return source.__getitems__(indices)
  return [source[i] for i in indices]


class BatchStream:
  """Training batches of `source`: `get(step)` / `iterate(start_step)`, identical results.

  Process p of `process_count` gets rows [p * B, (p + 1) * B) of each global batch, B =
  global_batch // process_count. Augmentation for the example at global stream position s uses
  `np.random.default_rng([seed, 1, s])`, so images do not depend on the process count. With
  `captions`, batches also hold 'caption': object [B] of the source's per-image captions.
  """

  def __init__(self, source: Sequence[dict[str, Any]], *, global_batch: int, image_size: int,
               channels: int, seed: int, random_crop: bool = False, random_flip: bool = False,
               process_index: int = 0, process_count: int = 1, num_threads: int = 4,
               prefetch: int = 2, num_workers: int = 0, captions: bool = False,
               worker_init: Optional[Callable[[int, int], None]] = None):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if seed < 0:
      raise UserError(f'seed={seed} must be non-negative')
    if captions and getattr(source, 'captions', None) is None:
      raise UserError(f'{source!r} has no captions (a folder needs <image>.txt caption files)')
    self.captions = captions
    self.source = source
    self.global_batch = global_batch
    self.local_batch = _local_batch(global_batch, process_count)
    self.image_size = image_size
    self.channels = channels
    self.seed = seed
    self.random_crop = random_crop
    self.random_flip = random_flip
    self.process_index = process_index
    self.num_threads = num_threads
    self.prefetch = prefetch
    self.num_workers = num_workers
    self.worker_init = worker_init
    self.num_records = len(source)
    global_indices(0, global_batch, self.num_records, seed)  # Validates early.

  def _local_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(record indices, global stream positions) of this process's rows of batch `step`."""
    start = self.process_index * self.local_batch
    rows = slice(start, start + self.local_batch)
    indices = global_indices(step, self.global_batch, self.num_records, self.seed)[rows]
    positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)[rows]
    return indices, positions

  def _decode(self, indices: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    images, labels, captions = [], [], []
    augment = self.random_crop or self.random_flip
    for example, position in zip(_read(self.source, indices), positions):
      rng = np.random.default_rng([self.seed, 1, int(position)]) if augment else None
      images.append(preprocess(example['image'], self.image_size, self.channels,
                               self.random_crop, self.random_flip, rng))
      labels.append(example['label'])
      if self.captions:
        captions.append(example['caption'])
    batch = {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}
    if self.captions:
      batch['caption'] = np.asarray(captions, dtype=object)
    return batch

  def get(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `step`: image f32 [B, H, W, C], label i32 [B]."""
    return self._decode(*self._local_rows(step))

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`get(start_step)`, `get(start_step + 1)`, ... made ahead by grain (`loader.prefetched`:
    `num_threads` threads, `num_workers` worker processes)."""
    return loader.prefetched(self.get, start_step, num_threads=self.num_threads,
                             prefetch=self.prefetch, num_workers=self.num_workers,
                             worker_init=self.worker_init)


def eval_batches(source: Sequence[dict[str, Any]], *, global_batch: int, image_size: int,
                 channels: int, process_index: int = 0, process_count: int = 1,
                 max_examples: int | None = None, num_threads: int = 4,
                 prefetch: int = 2, num_workers: int = 0,
                 worker_init: Optional[Callable[[int, int], None]] = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One in-order pass over `source` (its first `max_examples`), no augmentation, made ahead
  by `num_threads` threads and `num_workers` worker processes (`loader.prefetched`).

  Yields this process's rows of each global batch: 'image' f32 [B, H, W, C], 'label' i32 [B] and
  'mask' f32 [B] (0 for the zero padding that fills the last batch), so shapes never change.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  local_batch = _local_batch(global_batch, process_count)
  total = len(source) if max_examples is None else min(len(source), max_examples)
  num_batches = -(-total // global_batch)

  def decode(k):
    positions = (k * global_batch + process_index * local_batch
                 + np.arange(local_batch, dtype=np.int64))
    images = np.zeros((len(positions), image_size, image_size, channels), np.float32)
    labels = np.zeros((len(positions),), np.int32)
    mask = (positions < total).astype(np.float32)
    rows = np.flatnonzero(mask)
    for row, example in zip(rows, _read(source, positions[rows])):
      images[row] = preprocess(example['image'], image_size, channels)
      labels[row] = example['label']
    return {'image': images, 'label': labels, 'mask': mask}

  return loader.prefetched(decode, 0, num_batches, num_threads=num_threads, prefetch=prefetch,
                           num_workers=num_workers, worker_init=worker_init)

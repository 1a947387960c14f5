"""Stage-2 latent cache: the frozen autoencoder's posterior over the training set, encoded once.

A latent diffusion step needs x_0 = scale * (mean + std * noise) of the autoencoder's posterior
q(z | x) for each batch image. While the autoencoder is frozen that posterior never changes, so
one ordered pass over the training set (on the mesh) encodes every image once and stores the
posterior in `<workdir>/<stage>/latent_cache/`; each step then reads its rows and only draws the
noise, from the step rng (as maxdiffusion's cached latent distributions do), instead of decoding
images and running the encoder.

  manifest.json  what the cache was built from (`fingerprint`), its shapes and dtype
  moments.npy    float32 [N, V, h, w, 2c]: the posterior mean and (clipped) log-variance
                 concatenated on the last axis, unscaled (the latent scale is applied in the
                 step); V = 2 with data.random_flip (the image and its horizontal mirror)
  labels.npy     int32 [N]

Why float32: the cache of the default preset is 123 MB (60,000 x 8 x 8 x 8 x 4 bytes), so its
size does not matter there, and float32 keeps the cached step equal to the encoding step within
float32 rounding (the log-variance in float16 would move std by up to ~0.2%), which the tests
check. The memory map means only the rows a batch needs are read.

Batches keep the stream's contract (`ldm_jax.data.stream`): batch k holds the records
`global_indices(k, B, N, seed)` (this process's rows), and with random_flip the variant is the
stream's own coin for that stream position, so a cached batch is the encoding of exactly the
images `BatchStream` would produce, and a run resumed at step k reads the same batches. A
random crop cannot be cached (any window of any record): such data is encoded per step.

The cache is written atomically by process 0 (built in `latent_cache.partial/`, then renamed;
the workdir is shared by all processes, as for checkpoints) after all processes encoded their
rows of each batch on the mesh, and it is rebuilt, with a log line saying why, when its
fingerprint (the autoencoder's architecture and a hash of its parameters, the data source's
`fingerprint()`, the preprocessing keys) differs from the current one.
"""
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import data as data_lib
from ldm_jax.data import loader as data_loader
from ldm_jax import console, distributed, sharding
from ldm_jax.errors import UserError

FORMAT = 1
DIRNAME = "latent_cache"
MOMENTS, LABELS, MANIFEST = "moments.npy", "labels.npy", "manifest.json"


def params_digest(params: Any) -> str:
  """sha256 of a parameter tree: every leaf's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    value = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)} {value.dtype} {value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def fingerprint(codec, codec_params, source, data_cfg) -> dict:
  """What a cache is built from; any difference means rebuilding it."""
  return {
      "format": FORMAT,
      "autoencoder": hashlib.sha256(repr(codec.autoencoder).encode()).hexdigest()[:16],
      "autoencoder_params": params_digest(codec_params)[:16],
      "data": source.fingerprint(),
      "image_size": int(data_cfg.image_size), "channels": int(data_cfg.channels),
      "random_flip": bool(data_cfg.random_flip),
  }


def _changes(saved: dict, current: dict) -> str:
  """The fingerprint entries that differ, in words."""
  names = {"autoencoder": "the autoencoder's architecture",
           "autoencoder_params": "the autoencoder's parameters", "data": "the training data"}
  diffs = [f"{names.get(k, 'data.' + k)} ({saved.get(k)!r} -> {current.get(k)!r})"
           for k in current if saved.get(k) != current.get(k)]
  return ", ".join(diffs)


def num_variants(data_cfg) -> int:
  return 2 if data_cfg.random_flip else 1


def cache_bytes(num_records: int, variants: int, latent_shape) -> int:
  h, w, c = latent_shape
  return int(num_records) * variants * h * w * 2 * c * 4


def decide(block, codec, source, data_cfg, stage: str) -> tuple[bool, str]:
  """(whether stage `stage` caches its latents, why: one line for the log)."""
  key = f"config.{stage}.train"
  if codec.kind != "latent":
    return False, f"{stage}: {codec.kind} codec, nothing to cache"
  if not block.train.get("cache_latents", True):
    return False, f"{stage}: latent cache off ({key}.cache_latents=False)"
  if data_cfg.random_crop:
    return False, (f"{stage}: no latent cache: data.random_crop draws a new window every "
                   "epoch, so latents are encoded in every step")
  n = len(source)
  size = cache_bytes(n, num_variants(data_cfg), codec.shape)
  bound = float(block.train.get("latent_cache_max_gib", 4.0)) * 2 ** 30
  if size > bound:
    return False, (f"{stage}: no latent cache: {size / 2 ** 30:.2f} GiB for {n} records > "
                   f"{key}.latent_cache_max_gib={block.train.latent_cache_max_gib}")
  reads = int(block.train.num_steps) * int(block.train.batch_size)
  if reads < n:
    return False, (f"{stage}: no latent cache: the stage reads {reads} examples, fewer than "
                   f"the {n} records a cache would encode")
  return True, f"{stage}: latent cache of {n} records ({size / 2 ** 20:.1f} MiB)"


class LatentCache:
  """An opened cache: `moments` (memory-mapped float32 [N, V, h, w, 2c]), `labels` [N]."""

  def __init__(self, path: str):
    self.path = path
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      self.manifest = json.load(f)
    self.moments = np.load(os.path.join(path, MOMENTS), mmap_mode="r")
    self.labels = np.load(os.path.join(path, LABELS))

  def __len__(self) -> int:
    return self.moments.shape[0]


def _read_manifest(path: str) -> Optional[dict]:
  try:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("latent cache manifest %s/%s unreadable (%s)", path, MANIFEST, e)
    return {}


def _encode_fn(codec, flip: bool, mesh):
  """jit: (params, images [B, H, W, C], labels [B]) -> (moments [B, V, h, w, 2c], labels),
  replicated, so process 0 can write every row."""
  def encode(params, images, labels):
    variants = [codec.moments(params, images)]
    if flip:
      variants.append(codec.moments(params, images[:, :, ::-1]))
    return jnp.stack(variants, axis=1), labels
  return jax.jit(encode, out_shardings=sharding.replicated(mesh))


def build(path: str, codec, codec_params, source, data_cfg, mesh, batch_size: int,
          manifest: dict) -> None:
  """Encodes every record of `source` (in order, preprocessed as the training stream does,
  without augmentation) and writes the cache to `path` atomically. Every process runs it."""
  n, flip = len(source), bool(data_cfg.random_flip)
  h, w, c = codec.shape
  shape = (n, num_variants(data_cfg), h, w, 2 * c)
  writer = jax.process_index() == 0
  partial = path + ".partial"
  if writer:
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    moments = np.lib.format.open_memmap(os.path.join(partial, MOMENTS), mode="w+",
                                        dtype=np.float32, shape=shape)
    labels = np.zeros((n,), np.int32)
  encode = _encode_fn(codec, flip, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  start, done, t0 = 0, 0, time.time()
  batches = data_lib.eval_batches(
      source, global_batch=batch_size, image_size=data_cfg.image_size,
      channels=data_cfg.channels, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=data_cfg.num_threads,
      prefetch=data_cfg.prefetch, num_workers=data_cfg.get("num_workers", 0),
      worker_init=console.worker_init())
  for batch in batches:
    put = sharding.put_batch({"image": batch["image"], "label": batch["label"]}, batch_sh)
    out, lab = encode(codec_params, put["image"], put["label"])
    rows = min(batch_size, n - start)
    if writer:
      moments[start:start + rows] = np.asarray(out)[:rows]
      labels[start:start + rows] = np.asarray(lab)[:rows]
    start += rows
    if start * 10 // n > done:
      done = start * 10 // n
      logging.info("latent cache: %d / %d records encoded (%.0f s)", start, n, time.time() - t0)
  if writer:
    moments.flush()
    del moments
    np.save(os.path.join(partial, LABELS), labels)
    with open(os.path.join(partial, MANIFEST), "w", encoding="utf-8") as f:
      json.dump({**manifest, "shape": list(shape), "dtype": "float32"}, f, indent=2)
    stale = path + ".stale"
    shutil.rmtree(stale, ignore_errors=True)
    if os.path.exists(path):
      os.replace(path, stale)
    os.replace(partial, path)
    shutil.rmtree(stale, ignore_errors=True)
  logging.info("latent cache: %d records encoded in %.1f s -> %s", n, time.time() - t0, path)


def open_or_build(stage_dir: str, codec, codec_params, source, data_cfg, mesh,
                  batch_size: int) -> LatentCache:
  """The cache of `stage_dir`, (re)built first when missing or stale (logged with why)."""
  path = os.path.join(stage_dir, DIRNAME)
  current = fingerprint(codec, codec_params, source, data_cfg)
  saved = _read_manifest(path)
  if saved is not None and all(saved.get(k) == v for k, v in current.items()):
    logging.info("latent cache: reusing %s", path)
  else:
    why = "none yet" if saved is None else f"stale: {_changes(saved, current) or 'unreadable'}"
    logging.info("latent cache: building %s (%s)", path, why)
    distributed.barrier("latent_cache_decided")  # nobody still reads the old one
    build(path, codec, codec_params, source, data_cfg, mesh, batch_size, current)
  distributed.barrier("latent_cache_written")
  cache = LatentCache(path)
  expected = (len(source), num_variants(data_cfg)) + tuple(codec.shape[:2]) + (
      2 * codec.shape[2],)
  if tuple(cache.moments.shape) != expected:
    raise UserError(f"latent cache {path} holds {tuple(cache.moments.shape)}, expected "
                    f"{expected}; delete it to rebuild")
  return cache


def flip_coins(seed: int, positions: np.ndarray) -> np.ndarray:
  """Whether the training stream mirrors the example at each stream position: the first draw
  of its per-position rng (`BatchStream`; without random_crop nothing is drawn before the
  flip coin of `preprocess`)."""
  return np.asarray([np.random.default_rng([seed, 1, int(p)]).random() < 0.5
                     for p in positions], bool)


class CachedBatches:
  """Training batches read from a cache, in the stream of `data.BatchStream`: process p's
  rows of global batch `step`, as {"image": float32 [B, h, w, 2c] posterior moments,
  "label": int32 [B]} (+ "caption" with `captions`, the source's per-record captions)."""

  def __init__(self, cache: LatentCache, *, global_batch: int, seed: int, random_flip: bool,
               process_index: int = 0, process_count: int = 1,
               captions: Optional[list] = None):
    self.cache, self.seed, self.random_flip = cache, int(seed), bool(random_flip)
    self.global_batch = int(global_batch)
    if self.global_batch % process_count:
      raise UserError(f"train.batch_size={global_batch} must be a multiple of the process "
                      f"count {process_count}")
    self.local_batch = self.global_batch // process_count
    self.process_index = process_index
    self.captions = captions
    data_lib.global_indices(0, self.global_batch, len(cache), self.seed)  # validates early

  def get(self, step: int) -> dict:
    rows = slice(self.process_index * self.local_batch,
                 (self.process_index + 1) * self.local_batch)
    indices = data_lib.global_indices(step, self.global_batch, len(self.cache), self.seed)[rows]
    if self.random_flip:
      positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)[rows]
      variants = flip_coins(self.seed, positions).astype(np.int64)
    else:
      variants = np.zeros_like(indices)
    order = np.argsort(indices, kind="stable")  # memory-map reads in file order
    moments = np.empty((len(indices),) + self.cache.moments.shape[2:], np.float32)
    moments[order] = self.cache.moments[indices[order], variants[order]]
    batch = {"image": moments, "label": self.cache.labels[indices]}
    if self.captions is not None:
      batch["caption"] = np.asarray([self.captions[i] for i in indices], dtype=object)
    return batch

  def iterate(self, start_step: int = 0) -> Iterator[dict]:
    """`get(start_step)`, `get(start_step + 1)`, ... read ahead by grain reader threads (a
    memory-mapped read per batch: no worker processes, which would copy the mapped file)."""
    return data_loader.prefetched(self.get, start_step, num_threads=2, prefetch=2)

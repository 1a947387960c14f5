"""A diffusion stage with its I/O, for any codec: the latent scale of an autoencoder codec,
captions, the low-resolution stage of a super-resolution model, periodic sample grids."""
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import data as data_lib
from ldm_jax import sharding
from ldm_jax.models import codecs
from ldm_jax.sampling import load
from ldm_jax import workdir as workdir_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax import images as image_io
from ldm_jax.models.conditioning import CAPTION_TEMPLATES, Tokenizer, fashion_mnist_captions
from ldm_jax.evaluation import classifier as classifier_lib
from ldm_jax.evaluation import super_resolution
from ldm_jax.sampling import DiffusionPipeline, load_stages
from ldm_jax.sampling.cascade import PER_STAGE_SETTINGS
from ldm_jax.sampling.options import stage_sample_defaults, stage_thresholding
from ldm_jax.errors import UserError
from ldm_jax.models.builders import TEXT_KINDS
from ldm_jax.train import finetune, latent_cache
from ldm_jax.train import autoencoder_stage
from ldm_jax.train.diffusion_task import DiffusionTask
from ldm_jax.train.loop import train_stage


def caption_vocabulary(class_names) -> list[str]:
  """Every caption the training stream can produce (templates x class names)."""
  return [t.format(a=a, name=n.lower()) for t in CAPTION_TEMPLATES for n in class_names
          for a in ("a", "an")]


def training_captions(source, class_names) -> list[str]:
  """The captions the text encoder trains on: the source's own (caption files beside a
  folder's images), else every caption made from the class names."""
  if getattr(source, "captions", None) is not None:
    return list(source.captions)
  return caption_vocabulary(class_names)


def sample_prompts(captions: list[str], num_samples: int) -> list[str]:
  """`num_samples` prompts for the periodic sample grids: the distinct non-empty training
  captions in order, repeated to fill the grid."""
  distinct = list(dict.fromkeys(c for c in captions if c)) or [""]
  return (distinct * num_samples)[:num_samples]


def with_captions(batches, tokenizer: Tokenizer, class_names, max_length: int, seed: int):
  """Adds caption tokens to each batch. A batch with its own 'caption' strings (from caption
  files) is tokenized as it is; otherwise each example gets a random template with its class
  name, seeded by the step, so a resumed run sees the same captions."""
  def iterate(start_step):
    for step, batch in enumerate(batches(start_step), start_step):
      batch = dict(batch)
      captions = batch.pop("caption", None)
      if captions is None:
        rng = np.random.default_rng([seed, 2, step])
        captions = fashion_mnist_captions(batch["label"], class_names, rng)
      ids, mask = tokenizer.encode(list(captions), max_length)
      yield {**batch, "tokens": ids, "token_mask": mask}
  return iterate


def estimate_latent_scale(codec, codec_params, batches, num_batches: int, mesh) -> float:
  """1 / std of unscaled posterior samples over `num_batches` global batches (all processes)."""
  unit = codecs.with_scale(codec, 1.0)

  @jax.jit
  def moments(params, images, rng):
    z = unit.encode(params, images, rng)
    return jnp.stack([jnp.sum(z), jnp.sum(jnp.square(z)), jnp.float32(z.size)])

  total = np.zeros(3, np.float64)
  stream = batches(0)
  batch_sh = sharding.batch_sharding(mesh)
  for i in range(num_batches):
    batch = sharding.put_batch({"image": next(stream)["image"]}, batch_sh)
    total += np.asarray(moments(codec_params, batch["image"], jax.random.key(i)), np.float64)
  stream.close()
  mean = total[0] / total[2]
  std = float(np.sqrt(total[1] / total[2] - mean ** 2))
  return 1.0 / std


def check_microbatches(train_cfg, stage: str, mesh) -> int:
  """The microbatch size of `train.grad_accum_steps`; each microbatch must split evenly over
  the mesh's batch axes (or the scan would move rows between devices)."""
  k = int(train_cfg.get("grad_accum_steps", 1))
  micro, div = train_cfg.batch_size // k, sharding.batch_size_divisor(mesh)
  if micro % div:
    raise UserError(f"config.{stage}.train.grad_accum_steps={k}: microbatches of "
                    f"{train_cfg.batch_size} / {k} = {micro} examples do not split over the "
                    f"mesh's batch axes (data x fsdp = {div})")
  return micro


def _saved_meta(ckpt_dir: str):
  """The meta of the newest checkpoint of a stage (None before its first save)."""
  if not os.path.isdir(ckpt_dir):
    return None
  probe = Checkpointer(ckpt_dir, async_save=False)
  try:
    return probe.restore_meta() if probe.latest_step() is not None else None
  finally:
    probe.close()


def _lower_stages(config, stage: str, workdir: str):
  """The already trained stages below a super-resolution stage, as a sampler of its
  conditioning for the periodic sample grids (None for other stages)."""
  names = workdir_lib.diffusion_stages(config)
  below = names[:names.index(stage)]
  if not config[stage].lowres.stage:
    return None
  return load_stages(config, workdir, below)


def cond_is_class_or_none(block) -> bool:
  return block.conditioning.kind in ("class", "none")


def super_resolution_check(pipe: DiffusionPipeline, config, low_res: int, n: int) -> dict:
  """The stage against bicubic upsampling on the first `n` held-out images, sampled with the
  stage's own sampler, steps, guidance and thresholding at augmentation level 0: a real
  downsampled image has none of the base stage's artifacts that sampling augmentation is
  there to hide (summary keys sr_psnr, bicubic_psnr, sr_eval_images, sr_aug_level)."""
  images, labels = classifier_lib.test_split(config.data, n)
  r = super_resolution.stage_vs_bicubic(pipe, images, labels, low_res,
                                        settings=pipe.sample_defaults, seed=config.seed + 2)
  logging.info("%s: %s", pipe.name, super_resolution.describe(r))
  return {"sr_psnr": r["psnr_sr"], "bicubic_psnr": r["psnr_bicubic"],
          "sr_eval_images": r["num_images"], "sr_aug_level": 0.0}


def run_diffusion(config: ml_collections.ConfigDict, stage: str, workdir: str, mesh) -> None:
  """Trains diffusion stage `stage` (config[stage]) to its num_steps, resuming; its summary
  goes into summary.json."""
  block = config[stage]
  stage_dir = workdir_lib.stage_dir(workdir, stage)
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, stage)
  codec, codec_params = load.load_codec(config, stage, workdir)
  codec_params = sharding.replicate(jax.device_get(codec_params), mesh)
  low_res = load.lowres_resolution(config, stage)

  microbatch = check_microbatches(block.train, stage, mesh)

  train_source = data_lib.make_source(config.data, config.data.train_split)
  class_names = list(train_source.class_names)
  kind = block.conditioning.kind
  text = kind in TEXT_KINDS
  init = finetune.initial_params(config, stage) if finetune.is_finetune(config) else None
  if kind == "clip" and train_source.captions is None:
    raise UserError(f"config.data ({train_source.name}) has no captions: a CLIP-conditioned "
                    "model trains on captioned images (x.txt beside x.png, or a "
                    "metadata.jsonl with file_name and text)")
  captions = training_captions(train_source, class_names) if text else []
  source_captions = text and train_source.captions is not None
  image_batches = batches = autoencoder_stage.train_batches(
      config, train_source, block.train.batch_size, captions=source_captions)

  meta = _saved_meta(ckpt_dir)
  tokenizer = None
  if kind == "clip":
    tokenizer = load.tokenizer_of(config, stage, workdir, {})
  elif text:  # ldm_jax's own: the vocabulary of the first run (or of the model fine-tuned)
    known = meta or (init[1] if init is not None else None)
    tokenizer = (Tokenizer.from_json(known["tokenizer"]) if known else
                 Tokenizer.from_captions(captions, block.conditioning.max_vocab))
  if text:
    batches = with_captions(batches, tokenizer, class_names, block.conditioning.max_length,
                            config.seed)
  if codec.kind == "latent":
    if meta:
      scale = float(meta["latent_scale"])
    elif block.diffusion.latent_scale > 0:
      scale = float(block.diffusion.latent_scale)
    else:
      scale = estimate_latent_scale(codec, codec_params, image_batches,
                                    block.diffusion.scale_batches, mesh)
    codec = codecs.with_scale(codec, scale)
    block.diffusion.latent_scale = scale
    workdir_lib.write_config(config, workdir)
  else:
    scale = 1.0
  logging.info("%s: %s codec, scale %.5f, x_0 shape %s", stage, codec.kind, scale, codec.shape)

  cached, why = latent_cache.decide(block, codec, train_source, config.data, stage)
  logging.info("%s", why)
  if cached:
    cache = latent_cache.open_or_build(stage_dir, codec, codec_params, train_source,
                                       config.data, mesh, microbatch)
    batches = latent_cache.CachedBatches(
        cache, global_batch=block.train.batch_size, seed=config.seed,
        random_flip=config.data.random_flip, process_index=jax.process_index(),
        process_count=jax.process_count(),
        captions=list(train_source.captions) if source_captions else None).iterate
    if text:
      batches = with_captions(batches, tokenizer, class_names, block.conditioning.max_length,
                              config.seed)

  num_classes = len(class_names) if kind == "class" or init is None else 0
  if init is not None and kind == "class":
    finetune.check_classes(init[1], num_classes, f"config.data ({train_source.name})")
  task = DiffusionTask(config, stage, codec, num_classes, tokenizer, codec_params=codec_params,
                       lowres_resolution=low_res, cached_latents=cached)
  meta = {"latent_scale": scale, "latent_shape": list(codec.shape), "codec": codec.kind,
          "num_classes": num_classes, "class_names": class_names,
          "tokenizer": tokenizer.to_json() if kind == "text" else "",
          "data_fingerprint": train_source.fingerprint()}
  if init is not None:
    meta["init_from"] = f"{config.init_from}@{init[2]}"
  if task.lora_rank:
    if init is None:
      raise UserError(f"config.{stage}.lora.rank={task.lora_rank}: LoRA adapts a trained "
                      "model; give it with config.init_from (configs/finetune.py:lora)")
    task.set_lora_base(sharding.replicate(jax.device_get(init[0]), mesh))
    meta["lora"] = {"rank": task.lora_rank, "alpha": float(block.lora.alpha or task.lora_rank),
                    "targets": block.lora.targets, "base": meta["init_from"]}
  lower = _lower_stages(config, stage, workdir)
  grids = []

  def stage_pipeline(state) -> DiffusionPipeline:
    pipe = DiffusionPipeline(
        codec=codec, codec_params=codec_params, model=task.model,
        params=task.model_params(state.eval_params()),
        schedule=task.schedule, parameterization=block.diffusion.parameterization,
        class_names=class_names, sample_aug_level=block.lowres.sample_aug_level, name=stage,
        thresholding=stage_thresholding(block), sample_defaults=stage_sample_defaults(block))
    return pipe

  def on_eval(state, step, writer):
    pipe = stage_pipeline(state)
    s = block.sample
    n, ncols, row_labels = s.num_samples, int(np.ceil(np.sqrt(s.num_samples))), None
    prompt = sample_prompts(captions, n) if text else None
    kwargs = dict(pipe.sample_defaults, prompt=prompt)
    if block.conditioning.kind == "class" and 0 < num_classes <= n:
      # One row per class, labelled with its name.
      ncols = n // num_classes
      n = ncols * num_classes
      kwargs["labels"] = np.repeat(np.arange(num_classes), ncols)
      row_labels = class_names
    if lower is not None:
      low = lower.sample(n, seed=config.seed, as_uint8=False, **{
          k: v for k, v in kwargs.items() if k not in PER_STAGE_SETTINGS})
      images = pipe.sample(n, seed=config.seed + 1, lowres=low, **kwargs)
    else:
      images = pipe.sample(n, seed=config.seed, **kwargs)
    grid = image_io.make_grid(images, ncols=ncols, row_labels=row_labels)
    writer.write_images(step, {"samples": grid[None]})
    if jax.process_index() == 0:
      path = os.path.join(stage_dir, f"samples_{step:07d}.png")
      image_io.save_png(path, grid)
      grids.append(os.path.relpath(path, workdir))

  state, last = train_stage(task, train_cfg=block.train, seed=config.seed,
                            image_shape=(config.data.image_size, config.data.channels),
                            stage_dir=stage_dir, mesh=mesh, batches=batches, on_eval=on_eval,
                            meta=meta, train_key=f"{stage}.train",
                            initial_params=None if init is None or task.lora_rank
                            else init[0])
  if last:  # trained in this call (not only resumed at the end)
    sr = {}
    if low_res and block.train.get("sr_eval_images", 0) > 0 and cond_is_class_or_none(block):
      sr = super_resolution_check(stage_pipeline(state), config, low_res,
                                  int(block.train.sr_eval_images))
    workdir_lib.update_summary(workdir, stage, {**sr,
        "steps": int(state.step), "final_loss": last["loss"], "latent_scale": scale,
        "latent_shape": list(codec.shape), "codec": codec.kind,
        "sample_grid": grids[-1] if grids else ""})

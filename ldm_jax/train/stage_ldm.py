"""Stage 2 with its I/O: the frozen autoencoder, the latent scale, captions, sample grids, and
loading a trained workdir back into a sampling pipeline."""
import json
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import data as data_lib
from ldm_jax import sharding
from ldm_jax.checkpoint import Checkpointer, abstract_like
from ldm_jax.errors import UserError
from ldm_jax.evaluation import images as image_io
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.conditioning import CAPTION_TEMPLATES, Tokenizer, fashion_mnist_captions
from ldm_jax.train import stage_autoencoder
from ldm_jax.train.autoencoder import AutoencoderTask
from ldm_jax.train.diffusion import DiffusionTask
from ldm_jax.train.loop import train_stage
from ldm_jax.train.run import write_config
from ldm_jax.train.writers import update_summary


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


def estimate_latent_scale(autoencoder: AutoencoderKL, ae_params, batches, num_batches: int,
                          mesh) -> float:
  """1 / std of posterior samples over `num_batches` global batches (all processes)."""
  @jax.jit
  def moments(params, images, rng):
    z = autoencoder.apply({"params": params}, images, method=AutoencoderKL.encode).sample(rng)
    return jnp.stack([jnp.sum(z), jnp.sum(jnp.square(z)), jnp.float32(z.size)])

  total = np.zeros(3, np.float64)
  stream = batches(0)
  batch_sh = sharding.batch_sharding(mesh)
  for i in range(num_batches):
    batch = sharding.put_batch({"image": next(stream)["image"]}, batch_sh)
    total += np.asarray(moments(ae_params, batch["image"], jax.random.key(i)), np.float64)
  stream.close()
  mean = total[0] / total[2]
  std = float(np.sqrt(total[1] / total[2] - mean ** 2))
  return 1.0 / std


def _restore(task, directory: str, step: Optional[int], mesh=None):
  """Restores a task's train state from `directory`, replicated on `mesh` (every process takes
  part), or onto this process's first device when no mesh is given (for sampling)."""
  ckpt = Checkpointer(directory, async_save=False)
  if ckpt.latest_step() is None:
    raise UserError(f"no checkpoint in {directory}")
  target = (sharding.replicated(mesh) if mesh is not None else
            jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  state, meta = ckpt.restore(abstract_like(abstract, jax.tree.map(lambda _: target, abstract)),
                             step)
  ckpt.close()
  return state, meta


def autoencoder_source(config: ml_collections.ConfigDict, workdir: str):
  """(config holding the autoencoder blocks, its workdir): this run's or a pretrained one."""
  pretrained = config.ldm.autoencoder_workdir
  if not pretrained:
    return config, workdir
  path = os.path.join(pretrained, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"config.ldm.autoencoder_workdir={pretrained!r}: no config.json there")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f)), pretrained


def load_autoencoder(config, workdir, mesh=None):
  """(AutoencoderTask, evaluation params) of the trained first stage."""
  ae_config, ae_workdir = autoencoder_source(config, workdir)
  task = AutoencoderTask(ae_config)
  state, _ = _restore(task, os.path.join(ae_workdir, "autoencoder", "checkpoints"), None, mesh)
  return task, state.eval_params()


def run_ldm(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  """Stage 1 (unless done or pretrained), then stage 2; summaries into summary.json."""
  ldm = config.ldm
  if ldm.autoencoder_workdir:
    ae_task, ae_params = load_autoencoder(config, workdir, mesh)
  else:
    ae_task, ae_state = stage_autoencoder.run_autoencoder(config, workdir, mesh)
    ae_params = ae_state.eval_params()
  ae_params = sharding.replicate(ae_params, mesh)
  autoencoder = ae_task.model
  f = autoencoder.downsample_factor
  size = config.data.image_size // f
  latent_shape = (size, size, autoencoder.embed_dim)

  train_source = data_lib.make_source(config.data, config.data.train_split)
  class_names = list(train_source.class_names)
  stage_dir = os.path.join(workdir, "ldm")
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  text = ldm.conditioning.kind == "text"
  captions = training_captions(train_source, class_names) if text else []
  batches = stage_autoencoder.train_batches(
      config, train_source, ldm.train.batch_size,
      captions=text and train_source.captions is not None)

  resumed = Checkpointer(ckpt_dir, async_save=False)
  meta = resumed.restore_meta() if resumed.latest_step() is not None else None
  resumed.close()
  tokenizer = None
  if text:
    tokenizer = (Tokenizer.from_json(meta["tokenizer"]) if meta else
                 Tokenizer.from_captions(captions, ldm.conditioning.max_vocab))
    batches = with_captions(batches, tokenizer, class_names, ldm.conditioning.max_length,
                            config.seed)
  if meta:
    scale = float(meta["latent_scale"])
  elif ldm.diffusion.latent_scale > 0:
    scale = float(ldm.diffusion.latent_scale)
  else:
    scale = estimate_latent_scale(autoencoder, ae_params, batches,
                                  ldm.diffusion.scale_batches, mesh)
  logging.info("latent scale %.5f (latents %s)", scale, latent_shape)
  config.ldm.diffusion.latent_scale = scale
  write_config(config, workdir)

  num_classes = len(class_names)
  task = DiffusionTask(config, autoencoder, latent_shape, scale, num_classes, tokenizer,
                       ae_params=ae_params)
  meta = {"latent_scale": scale, "latent_shape": list(latent_shape),
          "num_classes": num_classes, "class_names": class_names,
          "tokenizer": tokenizer.to_json() if tokenizer else ""}
  grids = []

  def on_eval(state, step, writer):
    from ldm_jax.pipeline import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
    pipe = LatentDiffusionPipeline(
        autoencoder=autoencoder, ae_params=ae_params, model=task.model,
        params=state.eval_params(), schedule=task.schedule, latent_shape=latent_shape,
        latent_scale=scale, parameterization=ldm.diffusion.parameterization,
        class_names=class_names)
    s = ldm.sample
    prompt = sample_prompts(captions, s.num_samples) if text else None
    images = pipe.sample(s.num_samples, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                         eta=s.eta, seed=config.seed, prompt=prompt)
    grid = image_io.make_grid(images, ncols=int(np.ceil(np.sqrt(s.num_samples))))
    writer.write_images(step, {"samples": grid[None]})
    if jax.process_index() == 0:
      path = os.path.join(stage_dir, f"samples_{step:07d}.png")
      image_io.save_png(path, grid)
      grids.append(os.path.relpath(path, workdir))

  state, last = train_stage(task, train_cfg=ldm.train, seed=config.seed,
                            image_shape=(config.data.image_size, config.data.channels),
                            stage_dir=stage_dir, mesh=mesh, batches=batches, on_eval=on_eval,
                            meta=meta, train_key="ldm.train")
  if last:  # trained in this call (not only resumed at the end)
    update_summary(workdir, "ldm", {
        "steps": int(state.step), "final_loss": last["loss"], "latent_scale": scale,
        "latent_shape": list(latent_shape), "sample_grid": grids[-1] if grids else ""})


def load_pipeline(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None):
  """A LatentDiffusionPipeline with the EMA parameters of workdir/ldm/checkpoints."""
  from ldm_jax.pipeline import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "ldm", "checkpoints")
  probe = Checkpointer(ckpt_dir, async_save=False)
  if probe.latest_step() is None:
    probe.close()
    raise UserError(f"no LDM checkpoint in {workdir!r}: looked for {ckpt_dir}/<step>")
  meta = probe.restore_meta(step)
  probe.close()
  ae_task, ae_params = load_autoencoder(config, workdir)
  tokenizer = Tokenizer.from_json(meta["tokenizer"]) if meta.get("tokenizer") else None
  task = DiffusionTask(config, ae_task.model, meta["latent_shape"], meta["latent_scale"],
                       meta["num_classes"], tokenizer)
  state, _ = _restore(task, ckpt_dir, step)
  return LatentDiffusionPipeline(
      autoencoder=ae_task.model, ae_params=ae_params, model=task.model,
      params=state.eval_params(), schedule=task.schedule, latent_shape=meta["latent_shape"],
      latent_scale=meta["latent_scale"], parameterization=config.ldm.diffusion.parameterization,
      class_names=meta["class_names"])

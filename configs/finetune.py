"""Fine-tune any workdir's diffusion stage (trained here, or converted from diffusers / CompVis)
on your images:

  python train.py --config=configs/finetune.py --workdir=runs/ft \\
      --config.init_from=runs/sd15 --config.data.folder=my_images/

The data is an image folder: a caption per image (`cat.jpg` + `cat.txt`, or a Hugging Face
ImageFolder `metadata.jsonl` with `file_name` and `text`) for a text-to-image model, class
sub-folders (as many as the source has classes) for a class-conditional one. The
architecture, schedule and conditioning come from `init_from` (ldm_jax/train/finetune.py);
this file chooses the data and the stage's `train`, `optim` and `sample` settings, which
replace the source's. The autoencoder (always) and the text encoder (`optim.frozen`) are
frozen. Presets:

  default   diffusers' train_text_to_image defaults at a small batch: AdamW 1e-5 (weight
            decay 1e-2), constant rate, EMA 0.9999, random flips
  lora      LoRA (diffusers' train_text_to_image_lora defaults): rank-4 adapters on the UNet's
            attention projections (to_q, to_k, to_v, to_out), alpha = rank, AdamW 1e-4, no
            EMA; only the adapters are trained and saved, the base model stays in init_from
"""
import ml_collections

from ldm_jax.config_schema import mesh_block
from ldm_jax.data import default_data_config
from ldm_jax.errors import UserError
from ldm_jax.models import lora


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  preset = arg or "default"
  if preset not in ("default", "lora"):
    raise UserError(f"unknown preset {preset!r} for configs/finetune.py (default, lora)")
  c = ml_collections.ConfigDict()
  c.init_from = ""  # the workdir to start from (required)
  c.seed = 0
  c.data = default_data_config()
  # image_size / channels 0: the source model's (a different size is refused).
  c.data.update(source="folder", image_size=0, channels=0, random_flip=True)
  c.finetune = ml_collections.ConfigDict(dict(
      # Condition dropout for classifier-free guidance; < 0 keeps the source's (0 for a
      # converted Stable Diffusion, as diffusers' script).
      drop_prob=-1.0,
      train=dict(batch_size=8, num_steps=1000, grad_accum_steps=1, log_every=10,
                 eval_every=250, checkpoint_every=250, keep_checkpoints=2,
                 async_checkpoint=True, progress_every_secs=30.0, cache_latents=True,
                 sr_eval_images=0),
      optim=dict(lr=1e-5, warmup_steps=0, decay="constant", weight_decay=1e-2, b1=0.9,
                 b2=0.999, eps=1e-8, grad_clip=1.0, ema_decay=0.9999, frozen=("text",)),
      sample=dict(num_samples=4),
      # rank 0: no LoRA (the whole UNet trains). alpha 0: alpha = rank.
      lora=dict(rank=0, alpha=0.0, targets=lora.DEFAULT_TARGETS)))
  if preset == "lora":
    c.finetune.lora.update(rank=4, alpha=4.0)
    c.finetune.optim.update(lr=1e-4, ema_decay=0.0)
  c.mesh = mesh_block()
  return c

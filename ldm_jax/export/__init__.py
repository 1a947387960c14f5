"""Export a workdir to the PyTorch world: a diffusers folder.

  python -m ldm_jax.export --workdir=runs/ldm --out=exported/ [--step=N]

writes model_index.json, unet/, vae/, scheduler/ (and text_encoder/, tokenizer/ for a
CLIP-conditioned, converted Stable Diffusion workdir, which loads as StableDiffusionPipeline),
and ldm_jax_export.json (the source workdir and step, classes, null label, guidance). A LoRA
run (configs/finetune.py:lora) exports merged into its base model, or with --lora_only as
diffusers' pytorch_lora_weights.safetensors.
A class-conditional LDM trained here becomes a UNet2DModel with `num_class_embeds` = classes
+ 1 (the last row our null label for classifier-free guidance), an AutoencoderKL whose
`scaling_factor` is our latent scale, and the scheduler of the stage's sampler
(config.ldm.sample.sampler). Needs the `sd` extra (torch, diffusers, transformers).
"""
import json
import os
import shutil
from typing import Optional

import numpy as np

from ldm_jax import workdir as workdir_lib
from ldm_jax.errors import UserError
from ldm_jax.export import diffusers_format as fmt
from ldm_jax.sampling.load import load_stage
from ldm_jax.sampling.options import scheduler_options

EXPORT_INFO = "ldm_jax_export.json"  # the source workdir, step, classes and guidance
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _torch_model(cls, cfg: dict, state_dict: dict, folder: str):
  """Builds `cls` from `cfg`, loads `state_dict` strictly and saves it as safetensors."""
  import torch  # pylint: disable=g-import-not-at-top
  model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                        strict=True)
  model.save_pretrained(folder, safe_serialization=True)
  return model


def _shapes(cls, cfg: dict) -> dict:
  model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def export_lora(workdir: str, out: str, step: Optional[int] = None) -> str:
  """A LoRA run's adapters as diffusers' pytorch_lora_weights.safetensors in folder `out`
  (`pipe.load_lora_weights(out)`), alpha / rank folded into lora_B."""
  from ldm_jax.checkpoint import restore_eval_params  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import lora as lora_format  # pylint: disable=g-import-not-at-top
  config = workdir_lib.read_config(workdir)
  stages = workdir_lib.diffusion_stages(config)
  lora = config[stages[-1]].get("lora", None) if stages else None
  if lora is None or int(lora.rank) == 0:
    raise UserError(f"{workdir} is not a LoRA run (configs/finetune.py:lora): --lora_only "
                    "exports adapters")
  name = stages[-1]
  if os.path.exists(out):
    raise UserError(f"{out} exists: export into a new folder")
  adapters, _, _ = restore_eval_params(workdir_lib.checkpoint_dir(workdir, name), step)
  base, _, _ = restore_eval_params(workdir_lib.checkpoint_dir(config.init_from, name))
  scale = (float(lora.alpha) or int(lora.rank)) / int(lora.rank)
  state = lora_format.to_diffusers(adapters, base, len(config[name].unet.channel_mult), scale)
  os.makedirs(out)
  lora_format.write(os.path.join(out, lora_format.FILE_NAME), state)
  return "LoRA"


def export_single_file(workdir: str, out: str, step: Optional[int] = None) -> str:
  """The CompVis single-file checkpoint `out` (.safetensors) and its yaml of a CLIP-conditioned
  workdir (`ldm_jax.export.single_file`)."""
  from ldm_jax.export import single_file  # pylint: disable=g-import-not-at-top
  config = workdir_lib.read_config(workdir)
  stages = workdir_lib.diffusion_stages(config)
  if len(stages) != 1:
    raise UserError(f"{workdir}: a single file holds one latent stage, not {stages}")
  parts = load_stage(config, workdir, stages[0], step)
  single_file.export_single_file(config, stages[0], parts, os.path.abspath(out))
  return "CompVis single file"


def export_diffusers(workdir: str, out: str, step: Optional[int] = None) -> str:
  """Writes the diffusers folder of `workdir`'s LDM stage (checkpoint `step`, default the
  newest) into `out` (which must not exist yet). Returns the pipeline class it names."""
  import diffusers  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise UserError(f"{out} exists: export into a new folder")
  config = workdir_lib.read_config(workdir)
  stages = workdir_lib.diffusion_stages(config)
  if len(stages) != 1 or config[stages[0]].codec != "latent":
    raise UserError(f"{workdir}: only a latent diffusion workdir (one latent stage) exports to "
                    f"diffusers; this one has stages {stages} "
                    f"({', '.join(config[s].codec for s in stages)})")
  name = stages[0]
  parts = load_stage(config, workdir, name, step)
  block, kind = config[name], config[name].conditioning.kind
  if kind not in ("class", "clip", "none"):
    raise UserError(f"config.{name}.conditioning.kind={kind!r}: diffusers has no text encoder "
                    "of ldm_jax's own; only class, none and CLIP conditioning export")
  shape = tuple(parts.codec.shape)
  num_classes = int(parts.meta.get("num_classes", 0)) if kind == "class" else 0
  unet_cfg = dict(block.unet)
  if kind == "clip":
    unet_cfg["context_dim"] = int(unet_cfg.get("context_dim") or block.conditioning.text_width)
  unet_json = fmt.unet_config(unet_cfg, in_channels=shape[-1], out_channels=shape[-1],
                              sample_size=shape[0], num_classes=num_classes)
  ae = config.autoencoder if not block.get("autoencoder_workdir") else workdir_lib.read_config(
      block.autoencoder_workdir).autoencoder
  vae_json = fmt.vae_config(dict(ae), image_channels=int(config.data.channels),
                            image_size=int(config.data.image_size),
                            latent_scale=float(parts.codec.scale))
  sampler = block.sample.sampler
  sched_json = fmt.scheduler_config(dict(block.diffusion), scheduler_options(config, name),
                                    sampler)
  unet_cls = getattr(diffusers, unet_json["_class_name"])
  unet_params = parts.params["unet"]
  unet_sd = fmt.unet_state_dict(unet_params, unet_cfg, _shapes(unet_cls, unet_json),
                                f"diffusers {unet_json['_class_name']}")
  vae_sd = fmt.vae_state_dict(parts.codec_params, dict(ae),
                              _shapes(diffusers.AutoencoderKL, vae_json))
  tmp = out + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  _torch_model(unet_cls, unet_json, unet_sd, os.path.join(tmp, "unet"))
  _torch_model(diffusers.AutoencoderKL, vae_json, vae_sd, os.path.join(tmp, "vae"))
  sched_cls = getattr(diffusers, sched_json["_class_name"])
  sched_cls.from_config({k: v for k, v in sched_json.items() if not k.startswith("_")}
                        ).save_pretrained(os.path.join(tmp, "scheduler"))
  index = {"_diffusers_version": diffusers.__version__,
           "unet": ["diffusers", unet_json["_class_name"]],
           "vae": ["diffusers", "AutoencoderKL"],
           "scheduler": ["diffusers", sched_json["_class_name"]]}
  if kind == "clip":
    import transformers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    clip_cfg = dict(block.conditioning.clip)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg))
    sd = fmt.text_encoder_state_dict(parts.params["text"], int(clip_cfg["num_hidden_layers"]))
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5
      sd = {k[len("text_model."):]: v for k, v in sd.items()}
    missing, unexpected = text.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                               strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
      raise UserError(f"CLIP text encoder export: missing {missing[:8]}, unknown "
                      f"{unexpected[:8]}")
    text.save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=True)
    tok_dir = os.path.join(workdir, block.conditioning.get("tokenizer") or "tokenizer")
    os.makedirs(os.path.join(tmp, "tokenizer"))
    for f in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tok_dir, f)):
        shutil.copy2(os.path.join(tok_dir, f), os.path.join(tmp, "tokenizer", f))
    index.update(_class_name="StableDiffusionPipeline",
                 text_encoder=["transformers", "CLIPTextModel"],
                 tokenizer=["transformers", "CLIPTokenizer"], safety_checker=[None, None],
                 feature_extractor=[None, None], requires_safety_checker=False)
  else:
    # diffusers has no class-conditional KL-latent pipeline: the folder names its parts, which
    # load one by one (UNet2DModel.from_pretrained(out, subfolder="unet"), ...).
    index["_class_name"] = "LatentDiffusionPipeline"
  with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  # What diffusers' model_index.json has no key for (diffusers warns on unknown keys there).
  origin = {"workdir": os.path.abspath(workdir), "stage": name, "step": parts.step,
            "num_classes": num_classes, "null_label": num_classes if num_classes else None,
            "guidance": float(block.sample.guidance), "sampler": sampler,
            "class_names": list(parts.meta.get("class_names", []))}
  with open(os.path.join(tmp, EXPORT_INFO), "w", encoding="utf-8") as f:
    json.dump(origin, f, indent=2)
  os.replace(tmp, out)
  return index["_class_name"]

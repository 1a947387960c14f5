"""Converters refuse what they cannot reproduce (issue 11, items 15-17).

Every key of a diffusers Stable Diffusion folder's component configs is implemented, ignored
for a stated reason, or refused with one line naming the component, the key and the value
(`ldm_jax/convert/config_keys.py`). The table below gives each refused option the message it
must produce; the accepted cases check the converted values, and the last test samples a
converted "DPM++ 2M Karras" folder against diffusers.
"""
import inspect
import json
import math
import os

import numpy as np
import pytest

from ldm_jax.convert import clip as convert_clip
from ldm_jax.convert import config_keys
from ldm_jax.convert import diffusers_models as dm
from ldm_jax.convert import stable_diffusion as sd
from ldm_jax.errors import UserError

# Stable Diffusion 1.5's published scheduler/scheduler_config.json and text_encoder/config.json.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False}
SD15_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
DPM = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
       "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "sample_size": 8,
    "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 4, "norm_num_groups": 32}
PLAIN = {
    "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 1, "block_out_channels": [32, 64], "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "num_class_embeds": 11}
VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 32,
    "sample_size": 16, "scaling_factor": 0.18215, "force_upcast": True}

CONVERTERS = {
    "scheduler": sd.schedule_settings,
    "unet": dm.unet_config_from_diffusers,
    "vae": dm.vae_config_from_diffusers,
    "text": convert_clip.config_from_transformers,
}

# (converter, base config, changed keys, the message it must raise (a regex)).
REFUSALS = [
    # Schedulers: options of DPM-Solver++ and DDIM/DDPM that ldm_jax does not implement.
    ("scheduler", DPM, dict(solver_order=3), r"scheduler_config\.json solver_order=3 is not "
     r"supported \(only 2\)"),
    ("scheduler", DPM, dict(algorithm_type="sde-dpmsolver++"),
     r"algorithm_type='sde-dpmsolver\+\+' is not supported \(only 'dpmsolver\+\+'\)"),
    ("scheduler", DPM, dict(solver_type="heun"), r"solver_type='heun' is not supported"),
    ("scheduler", DPM, dict(use_lu_lambdas=True), r"use_lu_lambdas=True is not supported"),
    ("scheduler", DPM, dict(use_exponential_sigmas=True), r"use_exponential_sigmas=True"),
    ("scheduler", DPM, dict(euler_at_final=True), r"euler_at_final=True is not supported"),
    ("scheduler", DPM, dict(lambda_min_clipped=-5.1), r"lambda_min_clipped=-5\.1 is not "
     r"supported \(only -inf\)"),
    ("scheduler", DPM, dict(variance_type="learned_range"), r"variance_type='learned_range'"),
    ("scheduler", DPM, dict(final_sigmas_type="sigma_max"), r"final_sigmas_type='sigma_max'"),
    ("scheduler", dict(DPM, beta_schedule="squaredcos_cap_v2"), dict(use_karras_sigmas=True),
     r"use_karras_sigmas=True with beta_schedule='squaredcos_cap_v2' is not supported"),
    ("scheduler", SD15_SCHEDULER, dict(thresholding=True), r"thresholding=True is not "
     r"supported \(only False\)"),
    ("scheduler", SD15_SCHEDULER, dict(trained_betas=[0.1, 0.2]), r"trained_betas=\[0\.1, 0\.2\]"),
    ("scheduler", SD15_SCHEDULER, dict(_class_name="UniPCMultistepScheduler"),
     r"_class_name='UniPCMultistepScheduler' is not supported"),
    ("scheduler", SD15_SCHEDULER, dict(timestep_spacing="uniform"),
     r"timestep_spacing='uniform' is not supported"),
    ("scheduler", SD15_SCHEDULER, dict(steps_offset=1.5), r"steps_offset=1\.5 is not supported"),
    ("scheduler", SD15_SCHEDULER, dict(_class_name="LMSDiscreteScheduler"),
     r"_class_name='LMSDiscreteScheduler' is not supported: no ldm_jax sampler reproduces it"),
    ("scheduler", SD15_SCHEDULER, dict(skip_prk_steps=False),
     r"PNDMScheduler with skip_prk_steps=False is not supported"),
    ("scheduler", dict(SD15_SCHEDULER, _class_name="EulerDiscreteScheduler"),
     dict(interpolation_type="log_linear"), r"interpolation_type='log_linear' is not supported"),
    ("scheduler", dict(SD15_SCHEDULER, _class_name="EulerDiscreteScheduler"),
     dict(timestep_type="continuous"), r"timestep_type='continuous' is not supported"),
    ("scheduler", SD15_SCHEDULER, dict(disable_corrector=[0]), r"scheduler_config\.json "
     r"disable_corrector=\[0\] is an option this converter does not know"),
    # UNet2DConditionModel: the time_embedding_act_fn, SDXL's added conditioning, ...
    ("unet", UNET, dict(time_embedding_act_fn="silu"), r"diffusers UNet2DConditionModel config "
     r"time_embedding_act_fn='silu' is not supported \(only None\)"),
    ("unet", UNET, dict(addition_embed_type="text_time"), r"addition_embed_type='text_time'"),
    ("unet", UNET, dict(class_embed_type="timestep"), r"class_embed_type='timestep'"),
    ("unet", UNET, dict(num_class_embeds=10), r"UNet2DConditionModel config num_class_embeds=10"),
    ("unet", UNET, dict(conv_in_kernel=7), r"conv_in_kernel=7 is not supported \(only 3\)"),
    ("unet", UNET, dict(mid_block_type=None), r"mid_block_type=None is not supported"),
    ("unet", UNET, dict(resnet_out_scale_factor=2.0), r"resnet_out_scale_factor=2\.0"),
    ("unet", UNET, dict(downsample_padding=2), r"downsample_padding=2 is not supported \(0 or 1\)"),
    ("unet", UNET, dict(layers_per_block=[1, 2]), r"layers_per_block=\[1, 2\] is not supported"),
    ("unet", UNET, dict(cross_attention_dim=[32, 32]), r"cross_attention_dim=\[32, 32\]"),
    ("unet", UNET, dict(time_embedding_type="fourier"), r"time_embedding_type='fourier'"),
    ("unet", UNET, dict(brand_new_option=True), r"UNet2DConditionModel config "
     r"brand_new_option=True is an option this converter does not know"),
    ("unet", UNET, dict(_class_name="UNet2DConditionModelXL"), r"_class_name="
     r"'UNet2DConditionModelXL' is not supported"),
    # UNet2DModel.
    ("unet", PLAIN, dict(num_class_embeds=1), r"num_class_embeds=1 is not supported"),
    ("unet", PLAIN, dict(class_embed_type="identity"), r"UNet2DModel config "
     r"class_embed_type='identity' is not supported \(only None\)"),
    ("unet", PLAIN, dict(downsample_type="resnet"), r"downsample_type='resnet'"),
    ("unet", PLAIN, dict(time_embedding_type="learned"), r"time_embedding_type='learned'"),
    ("unet", PLAIN, dict(center_input_sample=True), r"center_input_sample=True"),
    # AutoencoderKL.
    ("vae", VAE, dict(shift_factor=0.1159), r"diffusers AutoencoderKL config shift_factor=0\.1159 "
     r"is not supported \(only None\)"),
    ("vae", VAE, dict(latents_mean=[0.1] * 4), r"latents_mean=\[0\.1, 0\.1, 0\.1, 0\.1\]"),
    ("vae", VAE, dict(act_fn="gelu"), r"act_fn='gelu' is not supported \(only 'silu'\)"),
    ("vae", VAE, dict(_class_name="AsymmetricAutoencoderKL"), r"_class_name="
     r"'AsymmetricAutoencoderKL' is not supported"),
    ("vae", VAE, dict(use_post_quant_conv=False), r"use_quant_conv=True with "
     r"use_post_quant_conv=False"),
    ("vae", VAE, dict(tiling_overlap=0.25), r"AutoencoderKL config tiling_overlap=0\.25 is an "
     r"option this converter does not know"),
    # The CLIP text encoder.
    ("text", SD15_TEXT, dict(architectures=["CLIPTextModelWithProjection"]),
     r"text encoder config\.json architectures=\['CLIPTextModelWithProjection'\] is not "
     r"supported"),
    ("text", SD15_TEXT, dict(model_type="t5"), r"model_type='t5' is not supported"),
    ("text", SD15_TEXT, dict(use_attention_mask=True), r"use_attention_mask=True"),
    ("text", SD15_TEXT, dict(pruned_heads={"0": [1]}), r"pruned_heads=\{'0': \[1\]\}"),
    ("text", SD15_TEXT, dict(hidden_act="relu"), r"hidden_act='relu' is not supported"),
    ("text", SD15_TEXT, dict(rope_theta=10000.0), r"text encoder config\.json "
     r"rope_theta=10000\.0 is an option this converter does not know"),
]


@pytest.mark.parametrize("converter,base,change,message", REFUSALS,
                         ids=[f"{c}-{'-'.join(ch)}" for c, _, ch, _ in REFUSALS])
def test_refused_with_one_line(converter, base, change, message):
  with pytest.raises(UserError, match=message) as info:
    CONVERTERS[converter](dict(base, **change))
  assert "\n" not in str(info.value)


def test_every_table_entry_is_classified_once():
  for keys in (config_keys.SCHEDULER, config_keys.UNET_CONDITION, config_keys.UNET_PLAIN,
               config_keys.VAE, config_keys.TEXT_ENCODER):
    parts = [set(keys.implemented), set(keys.fixed), set(keys.ignored)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))
    assert all(reason for reason in keys.ignored.values())


def test_every_diffusers_init_argument_is_classified():
  """Each __init__ argument of the reference classes is in its table, so a newer diffusers
  that adds one fails here (before a user's config meets it as an unknown key)."""
  diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
  # pylint: disable=g-import-not-at-top
  from diffusers.models.autoencoders import autoencoder_kl
  from diffusers.models.unets import unet_2d, unet_2d_condition
  cases = [(getattr(diffusers, name), config_keys.SCHEDULER)
           for name in config_keys.SCHEDULER_CLASS_DEFAULTS]
  cases += [(unet_2d_condition.UNet2DConditionModel, config_keys.UNET_CONDITION),
            (unet_2d.UNet2DModel, config_keys.UNET_PLAIN),
            (autoencoder_kl.AutoencoderKL, config_keys.VAE)]
  for cls, keys in cases:
    args = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert args <= keys.known, (cls.__name__, sorted(args - keys.known))


def test_accepted_scheduler_options():
  # SD 1.5's PNDM file: the class's defaults fill what the file leaves out.
  diff, opts = sd.schedule_settings(SD15_SCHEDULER)
  assert diff == dict(schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085,
                      beta_end=0.012, zero_terminal_snr=False, parameterization="eps")
  assert opts == dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      clip_sample=0.0)
  # "DPM++ 2M Karras", ending at sigma_min.
  _, opts = sd.schedule_settings(dict(DPM, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                      lambda_min_clipped=-math.inf, variance_type=None))
  assert opts == dict(timestep_spacing="linspace", steps_offset=0, set_alpha_to_one=False,
                      clip_sample=0.0, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                      lower_order_final=True)
  # A DDIM file without clip_sample / set_alpha_to_one: DDIMScheduler's defaults (True).
  _, opts = sd.schedule_settings(dict(DPM, _class_name="DDIMScheduler"))
  assert opts["clip_sample"] == 1.0 and opts["set_alpha_to_one"] is True


def test_accepted_component_configs():
  assert convert_clip.config_from_transformers(SD15_TEXT)["hidden_size"] == 768
  cfg, kind = dm.unet_config_from_diffusers(dict(UNET, upcast_attention=True))
  assert kind == "UNet2DConditionModel" and cfg["symmetric_downsample"] is True
  cfg, kind = dm.unet_config_from_diffusers(dict(PLAIN, downsample_padding=0))
  assert kind == "UNet2DModel" and cfg["symmetric_downsample"] is False
  assert dm.unet_num_classes(PLAIN) == 10
  assert dm.vae_config_from_diffusers(VAE)["z_channels"] == 4


def _config_folder(path, unet=None, vae=None, text=None, scheduler=None):
  """A Stable Diffusion folder of configs only (every check runs before weights are read)."""
  files = {"unet/config.json": unet or UNET, "vae/config.json": vae or VAE,
           "text_encoder/config.json": text or dict(SD15_TEXT, hidden_size=32),
           "scheduler/scheduler_config.json": scheduler or SD15_SCHEDULER,
           "model_index.json": {c: ["x", "y"] for c in sd.COMPONENTS}}
  os.makedirs(path / "tokenizer")
  for name, content in files.items():
    (path / name).parent.mkdir(exist_ok=True)
    (path / name).write_text(json.dumps(content))
  return str(path)


@pytest.mark.parametrize("unet,vae,message", [
    (dict(UNET, in_channels=9), VAE, r"unet/config\.json in_channels=9 != vae/config\.json "
     r"latent_channels=4"),
    (UNET, dict(VAE, latent_channels=16), r"unet/config\.json in_channels=4 != "
     r"vae/config\.json latent_channels=16"),
    (dict(UNET, out_channels=8), VAE, r"unet/config\.json out_channels=8 != "
     r"vae/config\.json latent_channels=4"),
    (dict(UNET, cross_attention_dim=64), VAE, r"cross_attention_dim=64 != "
     r"text_encoder/config\.json hidden_size=32"),
    (PLAIN, VAE, r"_class_name='UNet2DModel': a Stable Diffusion folder needs"),
    (UNET, dict(VAE, force_upcast=False, bogus=1), r"AutoencoderKL config bogus=1"),
])
def test_folder_refused_before_weights(tmp_path, unet, vae, message):
  folder = _config_folder(tmp_path / "sd", unet=unet, vae=vae)
  with pytest.raises(UserError, match=message):
    sd.convert_diffusers(folder, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.usefixtures("one_torch_thread")
def test_karras_folder_samples_like_diffusers(tmp_path):
  """A folder whose scheduler is "DPM++ 2M Karras" ending at sigma_min converts to a workdir
  that samples (dpmpp_2m, from its scheduler settings) the images diffusers' pipeline makes;
  the pipeline's keywords switch the options back (checked against diffusers too)."""
  torch = pytest.importorskip("torch", exc_type=ImportError)
  diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
  pytest.importorskip("transformers", exc_type=ImportError)
  import test_parity_pipeline as tpp  # pylint: disable=g-import-not-at-top
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  ref_pipe, folder = tpp.tiny_sd(tmp_path)
  karras = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", use_karras_sigmas=True, final_sigmas_type="sigma_min")
  karras.save_pretrained(os.path.join(folder, "scheduler"))
  workdir = str(tmp_path / "workdir")
  sd.convert_diffusers(folder, workdir)
  pipe = LatentDiffusionPipeline.from_workdir(workdir)
  assert pipe.sampler_options["use_karras_sigmas"] is True
  assert pipe.sampler_options["final_sigmas_type"] == "sigma_min"
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  steps = 8

  def pair(scheduler, **ours_kw):
    ref_pipe.scheduler = scheduler
    with torch.no_grad():
      ref = ref_pipe(tpp.PROMPTS, num_inference_steps=steps, guidance_scale=7.5,
                     output_type="np", latents=torch.from_numpy(latents)).images
    ours = pipe.sample(2, sampler="dpmpp_2m", steps=steps, guidance=7.5, prompt=tpp.PROMPTS,
                       latents=latents.transpose(0, 2, 3, 1), as_uint8=False, **ours_kw)
    return (np.asarray(ours) + 1.0) / 2.0, ref

  ours_k, ref_k = pair(karras)
  plain = diffusers.DPMSolverMultistepScheduler.from_config(
      karras.config, use_karras_sigmas=False, final_sigmas_type="zero")
  ours_p, ref_p = pair(plain, use_karras_sigmas=False, final_sigmas_type="zero")
  errs = [float(np.abs(ours_k - ref_k).max()), float(np.abs(ours_p - ref_p).max())]
  gap = float(np.abs(ref_k - ref_p).max())
  print(f"max |ours - diffusers| karras/plain: {errs}; karras vs plain images: {gap:.2e}")
  assert max(errs) <= 1e-3 and gap > 10 * max(errs)


def test_each_scheduler_class_becomes_its_own_sampler():
  classes = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm",
             "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler",
             "EulerAncestralDiscreteScheduler": "euler_a"}
  for kind, sampler in classes.items():
    sched = dict(SD15_SCHEDULER, _class_name=kind)
    sd.schedule_settings(sched)  # accepted
    assert sd.scheduler_sampler(sched) == sampler


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kind", ["EulerDiscreteScheduler", "PNDMScheduler", "DDIMScheduler"])
def test_scheduler_folder_samples_like_diffusers(tmp_path, kind):
  """A folder with Euler (Karras sigmas, v-prediction, guidance rescale), SD 1.x's PNDM, or DDIM
  with 'linspace' spacing converts to a workdir whose own sampler (no --sampler given) makes
  the images diffusers' pipeline makes with that scheduler."""
  torch = pytest.importorskip("torch", exc_type=ImportError)
  diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
  pytest.importorskip("transformers", exc_type=ImportError)
  import test_parity_pipeline as tpp  # pylint: disable=g-import-not-at-top
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  ref_pipe, folder = tpp.tiny_sd(tmp_path)
  common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")
  rescale = 0.0
  if kind == "EulerDiscreteScheduler":
    sched = diffusers.EulerDiscreteScheduler(**common, use_karras_sigmas=True,
                                             prediction_type="v_prediction")
    rescale = 0.7
  elif kind == "PNDMScheduler":
    sched = diffusers.PNDMScheduler(**common, skip_prk_steps=True, steps_offset=1,
                                    set_alpha_to_one=False)
  else:
    sched = diffusers.DDIMScheduler(**common, timestep_spacing="linspace", clip_sample=False,
                                    set_alpha_to_one=False)
  sched.save_pretrained(os.path.join(folder, "scheduler"))
  workdir = str(tmp_path / "workdir")
  sd.convert_diffusers(folder, workdir)
  pipe = LatentDiffusionPipeline.from_workdir(workdir)
  sampler = pipe.sample_defaults["sampler"]
  assert sampler == sd.config_keys.SCHEDULER_CLASS_SAMPLER[kind]
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  ref_pipe.scheduler = sched
  with torch.no_grad():
    ref = ref_pipe(tpp.PROMPTS, num_inference_steps=8, guidance_scale=7.5, output_type="np",
                   latents=torch.from_numpy(latents), guidance_rescale=rescale).images
  ours = pipe.sample(2, sampler=sampler, steps=8, guidance=7.5, prompt=tpp.PROMPTS,
                     latents=latents.transpose(0, 2, 3, 1), as_uint8=False,
                     guidance_rescale=rescale)
  err = float(np.abs((np.asarray(ours) + 1.0) / 2.0 - ref).max())
  # The same workdir sampled with DDIM instead: the gap the scheduler's class makes.
  ddim = pipe.sample(2, sampler="ddim", steps=8, guidance=7.5, prompt=tpp.PROMPTS,
                     latents=latents.transpose(0, 2, 3, 1), as_uint8=False)
  gap = float(np.abs((np.asarray(ddim) + 1.0) / 2.0 - ref).max())
  print(f"{kind}: max |ours ({sampler}) - diffusers| {err:.2e}; ddim instead: {gap:.2e}")
  assert err <= 1e-3
  if kind != "DDIMScheduler":
    assert gap > 10 * err

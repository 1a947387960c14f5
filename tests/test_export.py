"""`python -m ldm_jax.export` (issue 21 item 3): a workdir as a diffusers folder that diffusers
loads and samples with the images ldm_jax makes, and that our converter reads back to the
same parameters."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)

from ldm_jax import platform  # noqa: E402
from ldm_jax import workdir as workdir_lib  # noqa: E402
from ldm_jax.convert import diffusers_models as dm  # noqa: E402
from ldm_jax.convert.workdir import save_params  # noqa: E402
from ldm_jax.convert.weights import load_component  # noqa: E402
from ldm_jax.export.__main__ import main as export_main  # noqa: E402
from ldm_jax.sampling.load import build_model  # noqa: E402
from ldm_jax.models.builders import build_autoencoder  # noqa: E402
from ldm_jax.sampling import LatentDiffusionPipeline  # noqa: E402

from configs import ldm as ldm_configs
from configs import pixel as pixel_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NUM_CLASSES = 10


def _perturbed(params, seed):
  """Random parameters with every leaf non-zero (the UNet's last convolution starts at 0)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(
      np.float32) for x in leaves])


@pytest.fixture(scope="module")
def class_workdir(tfds_dir, tmp_path_factory):
  """configs/ldm.py:smoke shrunk, with self-attention at level 1 and in the middle, random
  parameters, saved as a parameters-only workdir."""
  workdir = str(tmp_path_factory.mktemp("export_class"))
  config = ldm_configs.get_config("smoke")
  config.data.data_dir = str(tfds_dir)
  config.autoencoder.update(ch=8, ch_mult=(1, 2), mid_attention=True, num_groups=8)
  config.ldm.unet.update(model_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                         mid_attention=True, num_groups=8, num_head_channels=8)
  config.ldm.sample.update(sampler="ddim")
  size, channels = config.data.image_size, config.data.channels
  ae = build_autoencoder(config.autoencoder, channels)
  once = platform.run_once_compiler_options()
  ae_params = jax.jit(ae.init, compiler_options=once)(
      jax.random.key(0), np.zeros((1, size, size, channels), np.float32))["params"]
  shape = (size // ae.downsample_factor,) * 2 + (ae.embed_dim,)
  model = build_model(config, "ldm", shape[-1], NUM_CLASSES)
  params = jax.jit(model.init, static_argnums=1, compiler_options=once)(jax.random.key(1), shape)
  save_params(workdir_lib.checkpoint_dir(workdir, "autoencoder"), _perturbed(ae_params, 0), {})
  save_params(workdir_lib.checkpoint_dir(workdir, "ldm"), _perturbed(params, 1),
              {"latent_scale": 0.7, "latent_shape": list(shape), "num_classes": NUM_CLASSES,
               "class_names": [f"class{i}" for i in range(NUM_CLASSES)], "tokenizer": ""})
  workdir_lib.write_config(config, workdir)
  return workdir


def test_class_conditional_ldm_exports_and_samples_like_ldm_jax(class_workdir, tmp_path):
  out = str(tmp_path / "exported")
  assert export_main([f"--workdir={class_workdir}", f"--out={out}"]) == 0
  assert export_main([f"--workdir={class_workdir}", f"--out={out}"]) == 1  # never overwrites
  index = json.load(open(os.path.join(out, "model_index.json"), encoding="utf-8"))
  assert index["unet"] == ["diffusers", "UNet2DModel"]
  assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
  info = json.load(open(os.path.join(out, "ldm_jax_export.json"), encoding="utf-8"))
  assert info["step"] == 0 and info["null_label"] == NUM_CLASSES
  unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
  vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").eval()
  sched = diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler")
  assert unet.config.num_class_embeds == NUM_CLASSES + 1
  assert vae.config.scaling_factor == pytest.approx(0.7)

  # Our converter reads the folder back to the same parameters.
  pipe = LatentDiffusionPipeline.from_workdir(class_workdir)
  cfg, back = dm.unet_from_diffusers(*load_component(os.path.join(out, "unet")))
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray,
                                                                  pipe.params["unet"]))
  _, back_ae = dm.vae_from_diffusers(*load_component(os.path.join(out, "vae")))
  jax.tree.map(np.testing.assert_array_equal, back_ae,
               jax.tree.map(np.asarray, pipe.codec_params))

  # The same guided DDIM chain in diffusers: latents, labels and the null label.
  n, steps, scale = 4, 6, 2.5
  labels = np.array([0, 3, 7, 9])
  latents = np.random.default_rng(2).standard_normal((n,) + pipe.latent_shape).astype(np.float32)
  ours = pipe.sample(n, sampler="ddim", steps=steps, guidance=scale, labels=labels,
                     latents=latents, as_uint8=False)
  sched.set_timesteps(steps)
  x = torch.from_numpy(latents.transpose(0, 3, 1, 2))
  both = torch.from_numpy(np.concatenate([labels, np.full(n, NUM_CLASSES)]))
  with torch.no_grad():
    for t in sched.timesteps:
      out_c, out_u = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
      x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    ref = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1).numpy()
  err = float(np.abs(np.asarray(ours) - ref.transpose(0, 2, 3, 1)).max())
  print(f"max |ours - diffusers| image error: {err:.2e} (image std {ref.std():.3f})")
  assert err <= 1e-4 and ref.std() > 0.05


def test_a_converted_stable_diffusion_round_trips_through_export(tmp_path):
  """A tiny random SD folder -> ldm_jax workdir -> exported folder: StableDiffusionPipeline
  loads it and makes the original folder's images."""
  pytest.importorskip("transformers", exc_type=ImportError)
  import test_parity_pipeline as tpp  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import stable_diffusion as sd  # pylint: disable=g-import-not-at-top
  ref_pipe, folder = tpp.tiny_sd(tmp_path)
  workdir, out = str(tmp_path / "workdir"), str(tmp_path / "exported")
  sd.convert_diffusers(folder, workdir)
  assert export_main([f"--workdir={workdir}", f"--out={out}"]) == 0
  again = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  again.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(
      np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
  with torch.no_grad():
    ref = ref_pipe(tpp.PROMPTS, num_inference_steps=6, guidance_scale=7.5, output_type="np",
                   latents=latents).images
    got = again(tpp.PROMPTS, num_inference_steps=6, guidance_scale=7.5, output_type="np",
                latents=latents).images
  err = float(np.abs(got - ref).max())
  print(f"exported SD vs the original folder: max image error {err:.2e}")
  assert type(again.scheduler).__name__ == "DDIMScheduler"
  assert err <= 1e-4


def test_what_diffusers_cannot_hold_is_refused(class_workdir, tmp_path):
  from ldm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from ldm_jax.export import diffusers_format as fmt  # pylint: disable=g-import-not-at-top
  unet = dict(workdir_lib.read_config(class_workdir).ldm.unet)
  with pytest.raises(UserError, match=r"num_head_channels > 0"):
    fmt.unet_config(dict(unet, num_head_channels=-1), in_channels=4, out_channels=4,
                    sample_size=8, num_classes=10)
  ae = dict(workdir_lib.read_config(class_workdir).autoencoder)
  with pytest.raises(UserError, match=r"embed_dim=8 != z_channels=4"):
    fmt.vae_config(dict(ae, embed_dim=8), image_channels=1, image_size=32, latent_scale=1.0)
  pixel = str(tmp_path / "pixel")
  os.makedirs(pixel)
  workdir_lib.write_config(pixel_configs.get_config("smoke"), pixel)
  assert export_main([f"--workdir={pixel}", f"--out={tmp_path / 'x'}"]) == 1
  assert not os.path.exists(tmp_path / "x")


def test_single_file_export_reads_back_through_our_compvis_converter(tmp_path):
  """A converted tiny SD -> `--format=single_file` (.safetensors + .yaml) -> `python -m
  ldm_jax.convert compvis` -> bit-identical parameters and the same images."""
  pytest.importorskip("transformers", exc_type=ImportError)
  pytest.importorskip("yaml", exc_type=ImportError)
  import test_parity_pipeline as tpp  # pylint: disable=g-import-not-at-top
  from ldm_jax.checkpoint import restore_eval_params  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import stable_diffusion as sd  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  _, folder = tpp.tiny_sd(tmp_path)
  workdir = str(tmp_path / "converted")
  sd.convert_diffusers(folder, workdir)
  path = str(tmp_path / "model.safetensors")
  assert export_main([f"--workdir={workdir}", f"--out={path}", "--format=single_file"]) == 0
  state = load_file(path)
  # CompVis layouts: SD 1.x's transformer proj_in and the VAE's attention are 1x1 convs.
  assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4
  assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
  assert state["model.diffusion_model.time_embed.0.weight"].ndim == 2
  back = str(tmp_path / "back")
  sd.convert_compvis(path, back, str(tmp_path / "model.yaml"), os.path.join(workdir, "tokenizer"))
  for stage in ("ldm", "autoencoder"):
    a, _, _ = restore_eval_params(os.path.join(workdir, stage, "checkpoints"))
    b, _, _ = restore_eval_params(os.path.join(back, stage, "checkpoints"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(sampler="ddim", steps=3, guidance=7.5, prompt=tpp.PROMPTS, latents=latents,
            as_uint8=False)
  x = np.asarray(LatentDiffusionPipeline.from_workdir(workdir).sample(2, **kw))
  y = np.asarray(LatentDiffusionPipeline.from_workdir(back).sample(2, **kw))
  np.testing.assert_array_equal(x, y)
  assert export_main([f"--workdir={workdir}", f"--out={path}", "--format=single_file"]) == 1

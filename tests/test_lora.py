"""LoRA (issue 21 item 2): diffusers-format LoRA files on a converted Stable Diffusion, with
parity against diffusers' `load_lora_weights`, and ours saved so that diffusers loads it."""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
peft = pytest.importorskip("peft", exc_type=ImportError)

from ldm_jax.convert import lora as lora_format  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.models import lora as lora_lib  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' LoRA scripts


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  import test_parity_pipeline as tpp  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import stable_diffusion  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("lora_sd")
  _, folder = tpp.tiny_sd(tmp)
  workdir = str(tmp / "converted")
  stable_diffusion.convert_diffusers(folder, workdir)
  return folder, workdir, tpp.PROMPTS


def _diffusers_images(folder, lora_dir, prompts, latents, scale=1.0):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  if lora_dir is not None:
    pipe.load_lora_weights(lora_dir)
  with torch.no_grad():
    return pipe(prompts, num_inference_steps=4, guidance_scale=7.5, output_type="np",
                latents=torch.from_numpy(latents),
                cross_attention_kwargs={"scale": scale}).images


def _ours(workdir, lora_file, prompts, latents, scale=1.0):
  from ldm_jax.pipeline import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  pipe = LatentDiffusionPipeline.from_workdir(workdir)
  if lora_file is not None:
    lora_format.apply_file(pipe, lora_file, scale)
  out = pipe.sample(len(prompts), sampler="ddim", steps=4, guidance=7.5, prompt=prompts,
                    latents=latents.transpose(0, 2, 3, 1), as_uint8=False)
  return (np.asarray(out) + 1.0) / 2.0


def _peft_lora_file(folder, out_dir, rank, alpha, metadata):
  """A random LoRA made with peft on the folder's UNet and saved by diffusers."""
  from peft.utils import get_peft_model_state_dict  # pylint: disable=g-import-not-at-top
  unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                           target_modules=TARGETS)
  unet.add_adapter(config)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  kwargs = {"unet_lora_adapter_metadata": config.to_dict()} if metadata else {}
  diffusers.StableDiffusionPipeline.save_lora_weights(
      out_dir, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True,
      **kwargs)
  return os.path.join(out_dir, lora_format.FILE_NAME)


@pytest.mark.parametrize("rank,alpha,metadata", [(4, 4, False), (4, 8, True)])
def test_a_diffusers_lora_file_samples_as_load_lora_weights(sd, tmp_path, rank, alpha,
                                                            metadata):
  folder, workdir, prompts = sd
  path = _peft_lora_file(folder, str(tmp_path / "lora"), rank, alpha, metadata)
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  ref = _diffusers_images(folder, str(tmp_path / "lora"), prompts, latents)
  plain = _diffusers_images(folder, None, prompts, latents)
  ours = _ours(workdir, path, prompts, latents)
  err, effect = float(np.abs(ours - ref).max()), float(np.abs(ref - plain).max())
  print(f"rank {rank} alpha {alpha}: max |ours - diffusers| {err:.2e}; LoRA effect {effect:.2e}")
  assert err <= 1e-4 and effect > 100 * err
  # --lora_scale 0.5 as diffusers' cross_attention_kwargs scale.
  half = _ours(workdir, path, prompts, latents, scale=0.5)
  ref_half = _diffusers_images(folder, str(tmp_path / "lora"), prompts, latents, scale=0.5)
  assert float(np.abs(half - ref_half).max()) <= 1e-4


def test_our_adapters_saved_in_diffusers_format_load_in_diffusers(sd, tmp_path):
  from ldm_jax.pipeline import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  folder, workdir, prompts = sd
  pipe = LatentDiffusionPipeline.from_workdir(workdir)
  adapters = lora_lib.init(pipe.params, 2, jax.random.key(0))
  adapters = jax.tree.map(lambda a: np.asarray(a) + 0.2 * np.random.default_rng(2).standard_normal(
      a.shape).astype(np.float32), adapters)
  n = len(pipe.model.unet.channel_mult)
  out_dir = tmp_path / "ours"
  out_dir.mkdir()
  lora_format.write(str(out_dir / lora_format.FILE_NAME),
                    lora_format.to_diffusers(adapters, pipe.params, n, scale=1.5))
  # Read back: the same adapters, the scale folded into up.
  back = lora_format.from_diffusers(*lora_format.read(str(out_dir)), pipe.params, n)
  for name, a in lora_lib.flat(adapters).items():
    np.testing.assert_allclose(lora_lib.flat(back)[name]["up"], 1.5 * a["up"], rtol=1e-6)
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  ref = _diffusers_images(folder, str(out_dir), prompts, latents)
  pipe.params = lora_lib.merge(pipe.params, adapters, 1.5)
  ours = pipe.sample(2, sampler="ddim", steps=4, guidance=7.5, prompt=prompts,
                     latents=latents.transpose(0, 2, 3, 1), as_uint8=False)
  err = float(np.abs((np.asarray(ours) + 1) / 2 - ref).max())
  print(f"ours saved, loaded by diffusers: max image error {err:.2e}")
  assert err <= 1e-4


def test_lora_files_that_do_not_fit_are_one_line(sd, tmp_path):
  from ldm_jax.pipeline import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  _, workdir, _ = sd
  pipe = LatentDiffusionPipeline.from_workdir(workdir)
  n = len(pipe.model.unet.channel_mult)
  a = np.zeros((2, 32), np.float32)
  cases = [({"text_encoder.x.lora_A.weight": a}, "is not a UNet adapter"),
           ({"unet.nope.to_q.lora_A.weight": a, "unet.nope.to_q.lora_B.weight": a.T},
            "adapts 'nope.to_q', which this model does not have"),
           ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a},
            "lacks its up matrix"),
           ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": a},
            "neither lora_A/lora_B nor lora.down/lora.up")]
  for state, message in cases:
    with pytest.raises(UserError, match=message):
      lora_format.from_diffusers(state, {}, pipe.params, n)
  with pytest.raises(UserError, match="no such file"):
    lora_format.read(str(tmp_path / "missing.safetensors"))

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
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
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
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
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
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
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


def test_lora_fine_tune_trains_and_saves_adapters_only(sd, tmp_path):
  """configs/finetune.py:lora on a captioned folder: the checkpoints hold the adapters alone,
  a resume is bit-identical, --lora_scale=0 samples the base model, and the adapters exported
  with --lora_only load into diffusers with our images."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from test_finetune import ROOT, _losses, captioned_folder  # pylint: disable=g-import-not-at-top
  from ldm_jax.checkpoint import restore_eval_params  # pylint: disable=g-import-not-at-top
  from ldm_jax.export.__main__ import main as export_main  # pylint: disable=g-import-not-at-top
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  folder, source, prompts = sd
  data = captioned_folder(tmp_path / "data")

  def train(workdir, steps):
    flags = {"init_from": source, "data.folder": data, "finetune.train.num_steps": steps,
             "finetune.train.batch_size": 8, "finetune.train.log_every": 1,
             "finetune.train.checkpoint_every": 4, "finetune.train.eval_every": 1000,
             "finetune.optim.lr": 1e-2, "finetune.train.async_checkpoint": False}
    return subprocess.run([sys.executable, str(ROOT / "train.py"),
                           f"--config={ROOT}/configs/finetune.py:lora", f"--workdir={workdir}",
                           *[f"--config.{k}={v}" for k, v in flags.items()]],
                          capture_output=True, text=True)

  straight, resumed = str(tmp_path / "lora"), str(tmp_path / "lora_resumed")
  done = train(straight, 8)
  assert done.returncode == 0, done.stderr[-3000:]
  adapters, meta, _ = restore_eval_params(os.path.join(straight, "ldm", "checkpoints"))
  leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]
  assert leaves and all(str(p[-1].key) in ("down", "up") for p, _ in leaves)
  assert meta["lora"]["rank"] == 4 and meta["lora"]["base"].endswith("@0")
  assert sum(np.asarray(x).size for _, x in leaves) < 0.2 * sum(
      np.asarray(x).size for x in jax.tree.leaves(restore_eval_params(
          os.path.join(source, "ldm", "checkpoints"))[0]["unet"]))
  assert train(resumed, 4).returncode == 0
  done = train(resumed, 8)
  assert done.returncode == 0 and "resumed from" in done.stderr, done.stderr[-3000:]
  assert _losses(resumed) == _losses(straight)
  again, _, _ = restore_eval_params(os.path.join(resumed, "ldm", "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, again, adapters)

  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  kw = dict(sampler="ddim", steps=4, guidance=7.5, prompt=prompts,
            latents=latents.transpose(0, 2, 3, 1), as_uint8=False)
  base = LatentDiffusionPipeline.from_workdir(source).sample(2, **kw)
  off = LatentDiffusionPipeline.from_workdir(straight, lora_scale=0.0).sample(2, **kw)
  on = np.asarray(LatentDiffusionPipeline.from_workdir(straight).sample(2, **kw))
  np.testing.assert_allclose(off, base, atol=1e-6)
  assert np.abs(on - np.asarray(base)).max() > 1e-3

  out = str(tmp_path / "exported_lora")
  assert export_main([f"--workdir={straight}", f"--out={out}", "--lora_only"]) == 0
  ref = _diffusers_images(folder, out, prompts, latents)
  err = float(np.abs((on + 1) / 2 - ref).max())
  print(f"trained LoRA exported, loaded by diffusers: max image error {err:.2e}")
  assert err <= 1e-4

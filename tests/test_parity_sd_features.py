"""Stable Diffusion pipeline features against diffusers on tiny random models: negative
prompts (StableDiffusionPipeline), image-to-image (StableDiffusionImg2ImgPipeline, DDIM and
DPM-Solver++), inpainting with a regular checkpoint (StableDiffusionInpaintPipelineLegacy),
batched prompts (num_images_per_prompt), the sample.py flags, and the same features on a
class-conditional LDM against a loop written with diffusers' scheduler API.

Both sides start from the same numbers: init latents and noise are drawn with torch's
generator exactly as the diffusers pipeline draws them, and given to ours as `init_latents`
and `latents`; our own VAE encoding is checked against diffusers' separately."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
pytest.importorskip("transformers", exc_type=ImportError)

from ldm_jax.models import codecs  # noqa: E402
from ldm_jax.sampling import inputs as sample_inputs
from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.images import make_grid, save_png, to_uint8  # noqa: E402
from ldm_jax.sampling import DiffusionPipeline  # noqa: E402
from ldm_jax.sampling.runs import sample_rows  # noqa: E402
from test_parity_pipeline import PROMPTS, tiny_sd  # noqa: E402  (the shared tiny model)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = pathlib.Path(__file__).parents[1]
NEGATIVE = ["the dog", "a red car"]
STEPS, GUIDANCE = 10, 7.5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """(diffusers pipeline, our pipeline) of one tiny random SD folder, converted by the CLI.
  Module-scoped: our pipeline keeps its compiled programs across the tests."""
  path = tmp_path_factory.mktemp("sd_features")
  torch_threads = torch.get_num_threads()
  torch.set_num_threads(1)
  ref, folder = tiny_sd(path)
  torch.set_num_threads(torch_threads)
  assert convert_main(["diffusers", folder, str(path / "workdir")]) == 0
  return ref, DiffusionPipeline.from_workdir(str(path / "workdir")), path / "workdir"


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def close(ours, ref, what, tol=1e-3):
  """ours: float images in [-1, 1] (NHWC); ref: diffusers' output_type='np' images."""
  ours = (np.asarray(ours) + 1.0) / 2.0
  err = np.abs(ours - ref).max()
  print(f"{what}: max |ours - diffusers| = {err:.2e} (image std {ref.std():.3f})")
  assert ours.shape == ref.shape and err <= tol


def generator_draws(shape, *, posterior=None, seed=0):
  """What a diffusers pipeline given `torch.Generator().manual_seed(seed)` draws: a posterior
  sample (when given the VAE's latent distribution) and then the noise."""
  g = torch.Generator().manual_seed(seed)
  z0 = None if posterior is None else posterior.sample(generator=g)
  return z0, torch.randn(shape, generator=g)


def test_negative_prompt_matches_diffusers(sd):
  ref_pipe, pipe, _ = sd
  latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  kw = dict(sampler="ddim", steps=STEPS, guidance=GUIDANCE, prompt=PROMPTS,
            latents=nhwc(latents), as_uint8=False)
  ours = pipe.sample(2, negative_prompt=NEGATIVE, **kw)
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                   output_type="np").images
  close(ours, ref, "negative prompt")
  assert np.abs(pipe.sample(2, **kw) - ours).max() > 1e-2  # the negative prompt matters
  assert len(pipe._compiled) == 1  # same program with and without it


@pytest.mark.parametrize("sampler,strength,karras", [("ddim", 0.6, None), ("dpmpp_2m", 0.5, True)])
def test_img2img_matches_diffusers(sd, sampler, strength, karras):
  """DPM-Solver++ starts with a first-order step (diffusers: after set_begin_index); with
  Karras sigmas the init latents are noised to the first Karras sigma that runs."""
  ref_pipe, pipe, _ = sd
  sched = ref_pipe.scheduler if sampler == "ddim" else \
      diffusers.DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config,
                                                        use_karras_sigmas=bool(karras))
  img2img = diffusers.StableDiffusionImg2ImgPipeline(
      vae=ref_pipe.vae, text_encoder=ref_pipe.text_encoder, tokenizer=ref_pipe.tokenizer,
      unet=ref_pipe.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  img2img.set_progress_bar_config(disable=True)
  # Init latents as a 4-channel `image`: diffusers then takes them as they are and draws
  # only the noise from the generator.
  z0 = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 4, 8, 8)) * 0.8).float()
  _, noise = generator_draws(z0.shape)
  with torch.no_grad():
    ref = img2img(PROMPTS, image=z0, strength=strength, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
  ours = pipe.sample(2, sampler=sampler, steps=STEPS, guidance=GUIDANCE, prompt=PROMPTS,
                     negative_prompt=NEGATIVE, init_latents=nhwc(z0), latents=nhwc(noise),
                     strength=strength, timestep_spacing=sched.config.timestep_spacing,
                     use_karras_sigmas=karras, as_uint8=False)
  close(ours, ref, f"img2img {sampler}{' Karras' if karras else ''} strength {strength}")


def test_our_vae_encoding_matches_diffusers_and_feeds_img2img(sd):
  ref_pipe, pipe, _ = sd
  images = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mode = ref_pipe.vae.encode(nchw(images)).latent_dist.mode() * 0.18215
  np.testing.assert_allclose(pipe.encode(images), nhwc(mode), atol=1e-4)
  # init_image draws its posterior sample as encode(images, seed) does.
  noise = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(sampler="ddim", steps=STEPS, guidance=GUIDANCE, prompt=PROMPTS, seed=5,
            negative_prompt=NEGATIVE, latents=noise, strength=0.6, as_uint8=False)
  np.testing.assert_allclose(pipe.sample(2, init_image=images, **kw),
                             pipe.sample(2, init_latents=pipe.encode(images, seed=5), **kw),
                             atol=1e-5)


def block_mask(size=16):
  """uint8 [size, size]: white (repaint) on the right half and the bottom-left quarter."""
  m = np.zeros((size, size), np.uint8)
  m[:, size // 2:] = 255
  m[size // 2:, :size // 2] = 255
  return m


def test_legacy_inpainting_matches_diffusers(sd):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ref_pipe, pipe, _ = sd
  legacy_cls = getattr(diffusers, "StableDiffusionInpaintPipelineLegacy", None)
  if legacy_cls is None:
    pytest.skip("this diffusers has no StableDiffusionInpaintPipelineLegacy; "
                "test_class_conditional_features_match_the_scheduler_loop checks the loop")
  legacy = legacy_cls(vae=ref_pipe.vae, text_encoder=ref_pipe.text_encoder,
                      tokenizer=ref_pipe.tokenizer, unet=ref_pipe.unet,
                      scheduler=ref_pipe.scheduler, safety_checker=None,
                      feature_extractor=None, requires_safety_checker=False)
  legacy.set_progress_bar_config(disable=True)
  images = np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mask = block_mask()
  with torch.no_grad():
    posterior = ref_pipe.vae.encode(nchw(images)).latent_dist
    z0, noise = generator_draws((2, 4, 8, 8), posterior=posterior)
    ref = legacy(PROMPTS, image=nchw(images), mask_image=Image.fromarray(mask), strength=0.7,
                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
  ours = pipe.sample(2, sampler="ddim", steps=STEPS, guidance=GUIDANCE, prompt=PROMPTS,
                     init_latents=nhwc(z0 * 0.18215), latents=nhwc(noise), mask=mask,
                     strength=0.7, as_uint8=False)
  close(ours, ref, "legacy inpainting")


def test_prompt_rows_match_num_images_per_prompt(sd):
  ref_pipe, pipe, _ = sd
  latents = np.random.default_rng(6).standard_normal((4, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():  # rows: PROMPTS[0] twice, then PROMPTS[1] twice
    ref = ref_pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                   output_type="np").images
  rows = sample_rows(pipe, PROMPTS, 2, sampler="ddim", steps=STEPS, guidance=GUIDANCE,
                     latents=nhwc(latents), as_uint8=False)
  close(np.concatenate(rows), ref, "prompt rows")


def test_sample_cli_prompts_file_img2img_mask_negative(sd, tmp_path, sample_cli):
  _, pipe, workdir = sd
  (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n", encoding="utf-8")
  init = to_uint8(np.random.default_rng(7).uniform(-1, 1, (16, 16, 3)))
  save_png(str(tmp_path / "init.png"), init)
  save_png(str(tmp_path / "mask.png"), block_mask()[..., None])
  flags = ["--num_samples=2", f"--prompts_file={tmp_path / 'prompts.txt'}",
           f"--init_image={tmp_path / 'init.png'}", f"--mask={tmp_path / 'mask.png'}",
           "--strength=0.5", "--negative_prompt=blue car"]
  sample_cli(workdir, tmp_path / "rows.png", *flags, steps=4)
  # The same rows in this process (sample_cli: DDIM, guidance 3, seed 3).
  rows = sample_rows(pipe, PROMPTS, 2, sampler="ddim", steps=4, guidance=3.0, seed=3,
                     init_image=init, mask=block_mask(), strength=0.5,
                     negative_prompt="blue car")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = np.asarray(Image.open(tmp_path / "rows.png")).astype(int)
  want = make_grid(np.concatenate(rows), ncols=2)  # a row of 2 per prompt
  assert grid.shape == want.shape and np.abs(grid - want).max() <= 1


# ---- the class-conditional LDM: labels instead of prompts --------------------------------------
def random_params(init_fn, seed: int):
  """Random parameters of the shapes `init_fn()` gives, without compiling it (eval_shape):
  kernels ~ N(0, 1 / fan_in), norm scales ~ 1 + N(0, 0.1^2), everything else ~ N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if "kernel" in name or "embedding" in name:
      return jnp.asarray(x / np.sqrt(max(1, int(np.prod(leaf.shape[:-1])))))
    return jnp.asarray(1.0 + 0.1 * x if "scale" in name else 0.1 * x)
  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init_fn))


@pytest.fixture(scope="module")
def class_pipe():
  """A random class-conditional LDM of the smoke preset's shape (32x32x1 images, 8x8x4
  latents) with a smaller UNet (two levels)."""
  from configs import ldm as ldm_configs
  from ldm_jax.sampling import load  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion.schedules import stage_schedule  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.builders import build_autoencoder  # pylint: disable=g-import-not-at-top
  config = ldm_configs.get_config("smoke")
  config.ldm.unet.update(channel_mult=(1, 2), attention_levels=(1,))
  size, channels = int(config.data.image_size), int(config.data.channels)
  ae = build_autoencoder(config.autoencoder, channels)
  x = jnp.zeros((1, size, size, channels))
  codec = codecs.LatentCodec(ae, 0.9, size)
  model = load.build_model(config, "ldm", codec.shape[-1], 10)
  return DiffusionPipeline(
      codec=codec, codec_params=random_params(lambda: ae.init(jax.random.key(0), x)["params"], 0),
      model=model, params=random_params(lambda: model.init(jax.random.key(0), codec.shape), 1),
      schedule=stage_schedule(config.ldm), class_names=[f"c{i}" for i in range(10)])


def scheduler_loop(eps_fn, scheduler, z0, noise, steps, strength, mask=None):
  """Image-to-image, and with `mask` (1 = repaint) the legacy inpainting blend, written with
  diffusers' scheduler API (set_timesteps, add_noise, step) on NCHW torch tensors."""
  scheduler.set_timesteps(steps)
  first = steps - min(int(steps * strength), steps)
  ts = scheduler.timesteps[first:]
  x = scheduler.add_noise(z0, noise, ts[:1])
  for t in ts:
    x = scheduler.step(eps_fn(x, t), t, x).prev_sample
    if mask is not None:
      x = mask * x + (1 - mask) * scheduler.add_noise(z0, noise, t.reshape(1))
  return x if mask is None else mask * x + (1 - mask) * z0


def test_class_conditional_features_match_the_scheduler_loop(class_pipe):
  pipe = class_pipe
  labels, negative, scale = np.array([3, 8]), np.array([1, 1]), 4.0
  model = jax.jit(lambda x, t, y: pipe.model(pipe.params, x, t, {"labels": y}))

  def eps_fn(x, t):  # guidance from two separate model calls
    x, t = jnp.asarray(nhwc(x.numpy())), jnp.full((2,), int(t), jnp.int32)
    c, u = model(x, t, jnp.asarray(labels)), model(x, t, jnp.asarray(negative))
    return nchw(np.asarray(u + scale * (c - u)))

  def decode(z):
    return np.clip(np.asarray(pipe.codec.decode(pipe.codec_params, jnp.asarray(nhwc(z)))), -1, 1)

  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
  rng = np.random.default_rng(8)
  z0 = torch.from_numpy(rng.standard_normal((2, 4, 8, 8))).float()
  noise = torch.from_numpy(rng.standard_normal((2, 4, 8, 8))).float()
  mask = sample_inputs.latent_mask(np.kron(np.eye(2), np.ones((16, 16))), 32, 8)  # [1,8,8,1]
  kw = dict(steps=8, guidance=scale, labels=labels, negative_labels=negative,
            init_latents=nhwc(z0), latents=nhwc(noise), as_uint8=False)
  for m, strength in ((None, 0.5), (mask, 0.75)):
    ref = scheduler_loop(eps_fn, sched, z0, noise, 8, strength,
                         None if m is None else nchw(m))
    ours = pipe.sample(2, strength=strength, mask=m, **kw)
    err = np.abs(ours - decode(ref)).max()
    print(f"class-conditional {'inpainting' if m is not None else 'img2img'}: {err:.2e}")
    assert err <= 1e-4
  # The kept (black) top-right quarter ends as the init latents themselves.
  np.testing.assert_array_equal(nhwc(ref)[:, :4, 4:], nhwc(z0)[:, :4, 4:])


def test_runtime_values_reuse_the_compiled_program(class_pipe):
  pipe = class_pipe
  programs = lambda: sum(f._cache_size() for f in pipe._compiled.values())  # noqa: E731
  z = np.random.default_rng(9).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(steps=8, labels=[2, 5], mask=block_mask(32), latents=z[:, ::-1], as_uint8=False)
  a = pipe.sample(2, guidance=2.0, seed=0, strength=0.75, init_latents=z, **kw)
  before = programs()
  # guidance, eta, seed, negative labels, other init latents and mask, and a strength that
  # runs the same number of steps (int(8 * 0.8) = int(8 * 0.75) = 6): no new program.
  b = pipe.sample(2, guidance=5.0, eta=0.5, seed=1, strength=0.8, negative_labels=4,
                  init_latents=z[::-1], **{**kw, "mask": 255 - block_mask(32)})
  assert programs() == before and np.abs(a - b).max() > 1e-2
  pipe.sample(2, guidance=2.0, seed=0, strength=1.0, init_latents=z, **kw)  # a longer scan
  assert programs() == before + 1


def test_bad_inputs_name_the_problem(class_pipe):
  pipe = class_pipe
  images = np.zeros((1, 32, 32, 1), np.float32)
  with pytest.raises(UserError, match="mask needs an init_image"):
    pipe.sample(2, steps=4, mask=block_mask(32))
  with pytest.raises(UserError, match=r"strength=0.1 runs int\(4 \* 0.1\) = 0 of 4 steps"):
    pipe.sample(2, steps=4, init_image=images, strength=0.1)
  with pytest.raises(UserError, match=r"init_image of shape \(1, 16, 16, 1\)"):
    pipe.sample(2, steps=4, init_image=np.zeros((1, 16, 16, 1), np.float32))
  with pytest.raises(UserError, match="mask of shape"):
    pipe.sample(2, steps=4, init_image=images, mask=np.zeros((12, 12)))
  with pytest.raises(UserError, match="give negative_labels, not a negative_prompt"):
    pipe.sample(2, steps=4, negative_prompt="a shoe")
  assert sample_inputs.parse_conditions(["3", "", "C7 "], "class", pipe.class_names) == [3, 7]
  with pytest.raises(UserError, match="line 2: 'boot' is neither a label nor a class name"):
    sample_inputs.parse_conditions(["1", "boot"], "class", pipe.class_names)


def test_image_and_mask_files_become_model_inputs(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("RGB", (40, 20), (200, 100, 50)).save(tmp_path / "wide.png")
  gray = sample_inputs.read_image(str(tmp_path / "wide.png"), 16, 1)  # squashed, luma
  assert gray.shape == (16, 16, 1) and np.all(gray == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50))
  rgb = sample_inputs.read_image(str(tmp_path / "wide.png"), 16, 3)
  assert rgb.shape == (16, 16, 3) and np.all(rgb == [200, 100, 50])
  pixels = np.random.default_rng(10).integers(0, 256, (32, 32), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "mask.png")
  mask = sample_inputs.read_mask(str(tmp_path / "mask.png"), 32)
  np.testing.assert_array_equal(mask, pixels)
  # At the latent resolution: Pillow's NEAREST resize (the centre pixel of each 4 x 4 block).
  want = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.NEAREST)) / 255.0
  np.testing.assert_allclose(sample_inputs.latent_mask(mask, 32, 8)[0, ..., 0], want, atol=1e-7)
  with pytest.raises(UserError, match="mask values must lie in"):
    sample_inputs.latent_mask(np.full((8, 8), 2.0), 32, 8)

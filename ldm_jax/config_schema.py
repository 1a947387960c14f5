"""The shape of a diffusion stage's config block, shared by every system.

A config holds `seed`, `data`, `mesh`, `stages` (the stage names in training order) and one
block per stage. The autoencoder stage keeps its blocks at the top level (`autoencoder`,
`discriminator`, `loss`, `optim`, `train`: the command-line contract `--config.train.*`);
every diffusion stage is one block of the shape below, whatever space it runs in:

  config.<stage>.codec        'latent' (the KL autoencoder of this run or of
                              `autoencoder_workdir`) or 'pixel' (images at `resolution`)
  config.<stage>.resolution   pixel codec: the stage's image size (0 = data.image_size)
  config.<stage>.lowres       super-resolution: the stage whose output conditions this one
                              ('' = none) and its noise-conditioning augmentation
  config.<stage>.unet / conditioning / diffusion / optim / train / sample

LDM: stages ('autoencoder', 'ldm'); pixel: ('pixel',); cascade: ('base', 'sr16', 'sr32').
"""
import ml_collections

AUTOENCODER = "autoencoder"
CODECS = ("latent", "pixel")


def mesh_block() -> ml_collections.ConfigDict:
  """config.mesh: axis sizes (-1 takes the remaining devices) and extra sharding rules."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2 ** 14,
                                        rules=()))


def lowres_block() -> ml_collections.ConfigDict:
  """Noise-conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models"; Imagen):
  in training the low-resolution conditioning is noised to a level s drawn uniformly from
  [0, aug_max] (a fraction of the stage's timesteps) and s is embedded; at sampling the level
  is a runtime value (`sample_aug_level`, overridable per call)."""
  return ml_collections.ConfigDict(dict(stage="", aug_max=0.5, sample_aug_level=0.1))


def diffusion_stage() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.codec = "latent"
  c.resolution = 0
  # A trained autoencoder workdir to use instead of training stage 1 here ('' = this run's).
  c.autoencoder_workdir = ""
  c.lowres = lowres_block()
  c.unet = ml_collections.ConfigDict(dict(
      model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
      num_heads=4, num_head_channels=32, dropout=0.0, scale_shift_norm=True,
      use_transformer=False, transformer_depth=1, num_groups=32, remat=False,
      # Reference-layout options (ldm_jax.convert sets them for LDM / diffusers weights):
      # GroupNorm eps, (1, 1)-padded downsampling, timestep embedding layout, middle
      # attention, per-level heads / transformer depth (() = num_heads / transformer_depth),
      # cross-attention width (0 = conditioning.text_width).
      norm_eps=1e-6, symmetric_downsample=False, flip_sin_to_cos=True, freq_shift=0.0,
      mid_attention=True, level_heads=(), level_transformer_depth=(), context_dim=0))
  c.conditioning = ml_collections.ConfigDict(dict(
      kind="class",            # 'class', 'text' or 'none'
      drop_prob=0.1,           # condition dropout for classifier-free guidance
      text_width=128, text_depth=2, text_heads=4, max_length=12, max_vocab=1000))
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      zero_terminal_snr=False, parameterization="eps", min_snr_gamma=0.0,
      latent_scale=0.0,        # latent codec: 0 = estimate from data before training (stored)
      scale_batches=8))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
      decay="cosine", ema_decay=0.999))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=2000, compute_dtype="float32", log_every=50,
      eval_every=1000, checkpoint_every=1000, keep_checkpoints=2, async_checkpoint=True,
      progress_every_secs=30.0, profile=False, nonfinite="stop",
      # In-step gradient accumulation: the global batch runs as this many microbatches
      # through one lax.scan (gradients summed, one optimizer update); it must divide
      # batch_size, and batch_size / grad_accum_steps the mesh's batch axes.
      grad_accum_steps=1,
      # Latent codec: encode the training set once with the frozen autoencoder and store
      # the posterior's mean and log-variance (float32) in <workdir>/<stage>/latent_cache/;
      # each step then samples mean + std * noise instead of running the encoder. Used when
      # True and the data has no random crop, the cache fits latent_cache_max_gib and the
      # stage reads at least one epoch (num_steps * batch_size >= records; otherwise
      # encoding on the fly is cheaper); every skip is logged with its reason. Rebuilt when
      # the autoencoder, the data or its preprocessing change (ldm_jax/train/latent_cache.py).
      cache_latents=True, latent_cache_max_gib=4.0,
      # A super-resolution stage: at the end of training, sample this many held-out images
      # from their real downsampled versions (the stage's sampling settings, augmentation
      # level 0) and report PSNR against bicubic upsampling (summary.json sr_psnr /
      # bicubic_psnr, the stage's result line; 0 = skip).
      sr_eval_images=500))
  # The stage's own sampling settings (sample.py / evaluate / a cascade use them per stage
  # unless given): thresholding of the predicted x_0 at every step ('none', 'static': clip
  # to +-sample_max_value, 'dynamic': Imagen's percentile `dynamic_ratio` of |x_0| per
  # sample, s clipped to [1, sample_max_value], 0 = no upper bound); 'none' for latents.
  c.sample = ml_collections.ConfigDict(dict(
      sampler="ddim", steps=50, guidance=3.0, eta=0.0, num_samples=64, thresholding="none",
      dynamic_ratio=0.995, sample_max_value=1.0))
  return c

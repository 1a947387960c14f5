"""sample.py's flags and work (`python sample.py --help`): a grid, rows per prompt, a
trajectory, or many samples streamed to files in restartable batches. Heavy modules are
imported inside `main`, after the flags are checked, so a bad flag fails at once."""

import os
import sys

from absl import app, flags

from ldm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained workdir: LDM, pixel-space model or cascade "
                    "(train.py --config=configs/{ldm,pixel,cascade}.py), or a converted one.")
flags.DEFINE_integer("num_samples", 16, "Number of images.")
flags.DEFINE_integer("step", None, "Checkpoint step to sample (a cascade: of its last stage; "
                     "default: the newest complete one).")
# Per-stage settings: one value for every stage, or a comma list with one per stage (a
# cascade's base first); absent: each stage's own config.<stage>.sample.
flags.DEFINE_list("sampler", None, "Reverse-process sampler: ddpm, ddim, dpmpp_2m, euler or "
                  "euler_a (default: the stage's sample.sampler; per stage: ddim,ddpm,ddpm).")
flags.DEFINE_list("steps", None, "Sampler steps (default: the stage's sample.steps; per "
                  "stage: 50,20,20).")
flags.DEFINE_list("guidance", None, "Classifier-free guidance scale, 1 = conditional only "
                  "(default: the stage's sample.guidance; per stage: 3,1,1).")
flags.DEFINE_list("eta", None, "DDIM stochasticity (default: the stage's sample.eta).")
flags.DEFINE_string("lora", None, "A diffusers-format LoRA file (pytorch_lora_weights."
                    "safetensors, or its folder) added to the UNet.")
flags.DEFINE_float("lora_scale", 1.0, "Weight of the LoRA adapters: --lora's, or a LoRA "
                   "workdir's own (configs/finetune.py:lora); 0 samples the base model.")
flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi in [0, 1] (Lin et al. 2023; "
                   "diffusers' guidance_rescale, for zero-terminal-SNR models); 0: off.")
flags.DEFINE_list("thresholding", None, "What each step does to the predicted x_0: none, "
                  "static (clip to [-1, 1]) or dynamic (Imagen) (default: the stage's "
                  "sample.thresholding: static for pixel stages, none for latents).")
flags.DEFINE_integer("seed", 0, "Random seed: same seed, same images.")
flags.DEFINE_integer("label", None, "Class label for every sample (class-conditional models).")
flags.DEFINE_string("prompt", None, "Text prompt (text-conditional models).")
flags.DEFINE_string("negative_prompt", None, "Prompt for the unconditional branch of guidance "
                    "(text models; default: the empty prompt).")
flags.DEFINE_integer("negative_label", None, "Class label for the unconditional branch of "
                     "guidance (class-conditional models; default: the null label).")
flags.DEFINE_string("init_image", None, "Image-to-image: start from this image file (resized "
                    "to the model's size), noised to --strength.")
flags.DEFINE_float("strength", None, "With --init_image: the fraction of the --steps schedule "
                   "that runs (1: all of it, from the image noised to the first timestep); "
                   "default 0.8.")
flags.DEFINE_string("mask", None, "With --init_image: inpaint; a mask image file, WHITE = "
                    "repaint, black = keep (the known region is re-noised at every step).")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt (class models: a label "
                    "or class name) per line: a grid with a row of --num_samples images each.")
flags.DEFINE_boolean("per_prompt_files", False, "With --prompts_file: one PNG per line, "
                     "<out>_<line index>.png, instead of one grid.")
flags.DEFINE_boolean("trajectory", False, "Write the decoded z_T ... z_0 of each sample instead.")
flags.DEFINE_integer("trajectory_frames", 10, "Frames shown per trajectory.")
flags.DEFINE_enum("timestep_spacing", None, ["leading", "linspace", "trailing"],
                  "Timestep spacing (default: the workdir's scheduler settings, else the "
                  "sampler's own default).")
flags.DEFINE_integer("steps_offset", None, "Offset added to 'leading' timesteps (default: the "
                     "workdir's scheduler settings).")
flags.DEFINE_list("aug_level", None, "Cascades: noise level of each super-resolution stage's "
                  "low-resolution input, a fraction of the timesteps in [0, 1): one value, or "
                  "one per super-resolution stage (default: the stage's "
                  "lowres.sample_aug_level).")
flags.DEFINE_string("out", "samples.png", "Output: a grid (.png or .jpg), or every sample in "
                    "one .npz (images, labels; sampled in batches, restartable).")
flags.DEFINE_string("out_dir", None, "Write every sample as its own PNG into this folder "
                    "(sampled in batches; a restarted run skips the batches already there).")
flags.DEFINE_integer("batch_size", None, "Images per sampling batch (default: sized to the "
                     "device's memory, at most 256). Batch i samples with a seed drawn from "
                     "(--seed, i), so the batch size is part of what fixes the images.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ldm_jax.errors import UserError
  try:
    _check_flags()  # before anything heavy is imported: a bad flag fails at once
  except UserError as e:
    sys.exit(f"error: {e}")
  cli.start(argv, FLAGS.verbosity)
  from ldm_jax.sampling import LatentDiffusionPipeline
  from ldm_jax.sampling.runs import StepProgress, sample_grid
  from ldm_jax.images import write_image
  from ldm_jax.sampling import settings as stage_settings
  try:
    pipe = LatentDiffusionPipeline.from_workdir(FLAGS.workdir, FLAGS.step, FLAGS.lora_scale)
    if FLAGS.lora:
      from ldm_jax.convert import lora as lora_format
      lora_format.apply_file(pipe, FLAGS.lora, FLAGS.lora_scale)
    edit = _edit_kwargs(pipe)
    per_stage = stage_settings.sample_kwargs(pipe, _per_stage_flags())
    kwargs = dict(
        **per_stage, seed=FLAGS.seed, timestep_spacing=FLAGS.timestep_spacing,
        steps_offset=FLAGS.steps_offset,
        negative_prompt=FLAGS.negative_prompt, negative_labels=FLAGS.negative_label,
        guidance_rescale=FLAGS.guidance_rescale,
        progress=StepProgress(_steps_run(edit, stage_settings.total_steps(per_stage))),
        **edit)
    if FLAGS.prompts_file:
      _write_rows(pipe, kwargs)
      return
    if FLAGS.per_prompt_files:
      raise UserError("--per_prompt_files needs --prompts_file")
    if FLAGS.trajectory:
      grid = sample_grid(pipe, FLAGS.num_samples, labels=FLAGS.label, prompt=FLAGS.prompt,
                         trajectory_frames=FLAGS.trajectory_frames, **kwargs)
    else:
      grid = _sample_in_batches(pipe, kwargs)
      if grid is None:
        return
    write_image(FLAGS.out, grid)
    print(f"wrote {FLAGS.out}")
  except UserError as e:
    sys.exit(f"error: {e}")


def _check_flags() -> None:
  """Every numeric flag in range and finite, and an output we can write, before anything
  loads (one line naming the flag)."""
  import math
  from ldm_jax.errors import UserError
  from ldm_jax.images import IMAGE_FORMATS
  _per_stage_flags()
  at_least = {"num_samples": 1, "trajectory_frames": 1, "batch_size": 1,
              "label": 0, "negative_label": 0, "steps_offset": 0}
  for name, low in at_least.items():
    value = getattr(FLAGS, name)
    if value is not None and value < low:
      raise UserError(f"--{name}={value} must be at least {low}")
  if FLAGS.strength is not None and not math.isfinite(FLAGS.strength):
    raise UserError(f"--strength={FLAGS.strength} must be a finite number")
  if not 0 <= FLAGS.seed < 2**32:
    raise UserError(f"--seed={FLAGS.seed} must be in [0, 2^32)")
  ext = os.path.splitext(FLAGS.out)[1].lower()
  if ext != ".npz" and ext not in IMAGE_FORMATS:
    raise UserError(f"--out={FLAGS.out}: unknown extension {ext or '(none)'!r}: a grid "
                    f"({', '.join(sorted(IMAGE_FORMATS))}) or every sample in one .npz")
  streamed = FLAGS.out_dir is not None or ext == ".npz"
  if streamed and (FLAGS.trajectory or FLAGS.prompts_file):
    raise UserError("--out_dir and --out=*.npz write plain samples: drop --trajectory and "
                    "--prompts_file")


def _sample_in_batches(pipe, kwargs: dict):
  """The samples in batches (--batch_size): the grid for --out=*.png/jpg, else None after
  streaming them to --out_dir (PNGs) or --out=*.npz, skipping batches already there."""
  import numpy as np
  from ldm_jax.sampling import batches as sb
  from ldm_jax.sampling import sinks
  from ldm_jax.images import make_grid
  kwargs = dict(kwargs)
  seed, step_progress = kwargs.pop("seed"), kwargs.pop("progress")
  batch_size = FLAGS.batch_size or sb.default_batch_size(pipe, FLAGS.num_samples)
  plan = sb.BatchPlan(FLAGS.num_samples, batch_size, seed)
  if plan.num_batches == 1:
    kwargs["progress"] = step_progress
  progress = sb.BatchProgress() if plan.num_batches > 1 else None
  if FLAGS.out_dir is None and not FLAGS.out.endswith(".npz"):
    batches = list(sb.sample_batches(pipe, plan, labels=FLAGS.label, prompt=FLAGS.prompt,
                                     batch_progress=progress, **kwargs))
    images = np.concatenate([batch for _, batch, _ in batches])
    n = FLAGS.num_samples
    names = list(getattr(pipe, "class_names", None) or [])
    if FLAGS.label is None and batches[0][2] is not None and names and n % len(names) == 0:
      # Balanced labels (index % classes): shown one row per class, labelled with its name.
      labels = np.concatenate([b[2] for b in batches])
      order = np.argsort(labels, kind="stable")
      return make_grid(images[order], ncols=n // len(names), row_labels=names)
    return make_grid(images, ncols=int(np.ceil(np.sqrt(n))))
  from ldm_jax.sampling import settings as stage_settings
  named = {k: v for k, v in kwargs.items() if k not in ("init_image", "mask", "progress")}
  # The rule each stage applied to its x_0 (resolved: kind, percentile, bound).
  named["x0_thresholding"] = stage_settings.recorded(pipe, kwargs)["thresholding"]
  # The checkpoint steps too: a restart after a newer checkpoint was saved is refused rather
  # than mixing the images of two models in one folder.
  settings = sb.settings_of(FLAGS.workdir, plan, FLAGS.label, FLAGS.prompt,
                            init_image=FLAGS.init_image, mask=FLAGS.mask,
                            checkpoint_steps=pipe.checkpoint_steps, **named)
  sink = (sinks.PngDirSink(FLAGS.out_dir, plan, settings) if FLAGS.out_dir is not None else
          sinks.NpzSink(FLAGS.out, plan, settings))
  path = sb.run_to_sink(pipe, plan, sink, labels=FLAGS.label, prompt=FLAGS.prompt,
                        batch_progress=progress, **kwargs)
  print(f"wrote {FLAGS.num_samples} samples to {path}")
  return None


def _edit_kwargs(pipe) -> dict:
  """init_image / mask / strength keywords from the image-to-image and inpainting flags."""
  from ldm_jax.sampling import inputs as sample_inputs
  from ldm_jax.errors import UserError
  if FLAGS.init_image is None:
    for name in ("mask", "strength"):
      if getattr(FLAGS, name) is not None:
        raise UserError(f"--{name} needs --init_image (the image to start from)")
    return {}
  if not hasattr(pipe, "encode"):
    raise UserError("--init_image: image-to-image and inpainting run on one stage (an LDM or "
                    "pixel-space workdir), not on a cascade")
  edit = {"init_image": sample_inputs.read_image(FLAGS.init_image, pipe.image_size,
                                                 pipe.image_channels),
          "strength": 0.8 if FLAGS.strength is None else FLAGS.strength}
  if FLAGS.mask is not None:
    edit["mask"] = sample_inputs.read_mask(FLAGS.mask, pipe.image_size)
  return edit


def _per_stage_flags() -> dict:
  """The per-stage flags parsed ({name: list of values or None}); one line for a bad one."""
  from ldm_jax.sampling import settings as stage_settings
  return stage_settings.parse_all(**{name: getattr(FLAGS, name)
                                     for name in stage_settings.PARSERS})


def _steps_run(edit: dict, steps: int) -> int:
  from ldm_jax.errors import UserError
  from ldm_jax.sampling.pipeline import steps_run
  try:
    return steps_run(steps, edit.get("strength"))
  except ValueError as e:
    raise UserError(f"--strength: {e}") from e


def _write_rows(pipe, kwargs: dict) -> None:
  """--prompts_file: a row of --num_samples images per line, as one grid or a file each."""
  import numpy as np
  from ldm_jax.sampling import inputs as sample_inputs
  from ldm_jax.errors import UserError
  from ldm_jax.images import make_grid
  from ldm_jax.sampling.runs import sample_rows
  from ldm_jax.images import write_image
  for name in ("prompt", "label", "trajectory"):
    if getattr(FLAGS, name):
      raise UserError(f"--prompts_file gives the prompts (or labels): drop --{name}")
  conditions = sample_inputs.read_conditions(FLAGS.prompts_file, pipe.model.cond_kind,
                                             pipe.class_names)
  rows = sample_rows(pipe, conditions, FLAGS.num_samples, **kwargs)
  if not FLAGS.per_prompt_files:
    write_image(FLAGS.out, make_grid(np.concatenate(rows), ncols=FLAGS.num_samples))
    print(f"wrote {FLAGS.out} ({len(rows)} rows)")
    return
  stem, ext = os.path.splitext(FLAGS.out)
  for i, row in enumerate(rows):
    path = f"{stem}_{i:03d}{ext or '.png'}"
    write_image(path, make_grid(row, ncols=FLAGS.num_samples))
    print(f"wrote {path}")


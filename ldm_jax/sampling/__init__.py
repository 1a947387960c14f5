"""Sampling: everything between a trained (or converted) workdir and images on disk.

  pipe = ldm_jax.sampling.from_workdir("runs/ldm")        # also runs/pixel, runs/cascade
  images = pipe.sample(16, sampler="ddim", steps=50, guidance=3.0, seed=0, labels=[7] * 16)

Rooms: `load` (a stage's codec, denoiser and EMA parameters from a workdir), `options` (what a
stage's config says about sampling), `program` (one call as one jitted program), `pipeline`
(`DiffusionPipeline`, one stage; `from_workdir`), `cascade` (`CascadePipeline`), `inputs`
(init images, masks, prompt files), `settings` (per-stage settings from a command line),
`runs` (rows and grids for a person), `batches` and `sinks` (many samples, restartable),
`cli` (what sample.py runs).
"""
from ldm_jax.sampling.cascade import CascadePipeline
from ldm_jax.sampling.pipeline import (DiffusionPipeline, LatentDiffusionPipeline, from_workdir,
                                       load_stages)

__all__ = ["CascadePipeline", "DiffusionPipeline", "LatentDiffusionPipeline", "from_workdir",
           "load_stages"]

"""Diffusion math: schedules, training objectives and samplers, as pure JAX functions."""
from ldm_jax.diffusion import euler, pndm
from ldm_jax.diffusion.chain import SPACINGS, Trajectory, dpm_solver_timesteps, timesteps
from ldm_jax.diffusion.objectives import (PARAMETERIZATIONS, augment, ddpm_posterior,
                                          diffusion_loss, extract, min_snr_weights,
                                          predict_x0_and_eps, q_sample, snr, target)
from ldm_jax.diffusion.samplers import (EULER, SAMPLERS, cfg_denoise, ddim_invert, ddim_sample,
                                        ddpm_sample, dpm_solver_pp_2m_sample, guided, sample)
from ldm_jax.diffusion.schedules import (BETA_SCHEDULES, DiffusionSchedule, beta_schedule,
                                         make_schedule, rescale_zero_terminal_snr,
                                         schedule_from_betas, stage_schedule)

__all__ = [
    "BETA_SCHEDULES", "DiffusionSchedule", "EULER", "PARAMETERIZATIONS", "SAMPLERS", "SPACINGS",
    "Trajectory", "augment", "beta_schedule", "cfg_denoise", "ddim_invert", "ddim_sample",
    "ddpm_posterior", "ddpm_sample", "diffusion_loss", "dpm_solver_pp_2m_sample",
    "dpm_solver_timesteps", "euler", "extract", "guided", "make_schedule", "min_snr_weights",
    "pndm", "predict_x0_and_eps", "q_sample", "rescale_zero_terminal_snr", "sample",
    "schedule_from_betas", "snr", "stage_schedule", "target", "timesteps",
]

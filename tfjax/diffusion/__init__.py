"""Noise schedule, forward noising and reverse samplers. Pure JAX."""
from tfjax.diffusion.noising import add_noise, sample_timesteps
from tfjax.diffusion.samplers import (cfg_combine, ddim_step, ddpm_step,
                                      dual_cfg_combine, flow_step, predict_x0,
                                      sampling_timesteps)
from tfjax.diffusion.schedule import cosine_alphas_cumprod, signal_noise

__all__ = ["add_noise", "sample_timesteps", "cfg_combine", "dual_cfg_combine", "ddim_step",
           "ddpm_step", "flow_step", "predict_x0", "sampling_timesteps", "cosine_alphas_cumprod",
           "signal_noise"]

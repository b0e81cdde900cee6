"""Diffusion maths shared by the prior, decoder and upsamplers: no parameters, no Lightning/Hydra."""
from .gaussian import GaussianDiffusion, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .guidance import classifier_free_guidance
from .respace import space_timesteps
from .samplers import (
                       SAMPLERS,
                       SeededNoise,
                       ddim_invert,
                       get_sampler,
                       initial_noise,
                       sample_ddim,
                       sample_ddpm,
                       sample_dpmpp_2m,
                       step_generator,
)
from .schedule import get_betas
from .seeds import derive_seed, row_seeds, stream_name

__all__ = [
    "SAMPLERS", "GaussianDiffusion", "SeededNoise", "classifier_free_guidance", "ddim_invert", "derive_seed",
    "discretized_gaussian_log_likelihood", "get_betas", "get_sampler", "initial_noise", "mean_flat", "normal_kl",
    "row_seeds", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "space_timesteps", "step_generator", "stream_name",
]

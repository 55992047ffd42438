"""Diffusion world foundation models (Cosmos-style): EDM, the DiT, samplers, conditioning."""

from cupola.collections.world.diffusion.dit import DIT_FLAVORS, DiT, DiTConfig, dit_config
from cupola.collections.world.diffusion.edm import EDMConfig, edm_loss_weight, edm_scalings, karras_sigmas
from cupola.collections.world.diffusion.model import Conditioning, DiffusionWFM, WFMConfig
from cupola.collections.world.diffusion.samplers import guided, sample_heun, sample_multistep

__all__ = [
    "DIT_FLAVORS",
    "Conditioning",
    "DiT",
    "DiTConfig",
    "DiffusionWFM",
    "EDMConfig",
    "WFMConfig",
    "dit_config",
    "edm_loss_weight",
    "edm_scalings",
    "guided",
    "karras_sigmas",
    "sample_heun",
    "sample_multistep",
]

"""Image autoencoders: AutoencoderKL and VQ-VAE in Flax, diffusers import.

`load(path)` returns a ready `LoadedVAE` (jit-compiled `encode`/`decode`, plus
`scale`, `shift`, `downsample`, `latent_channels`; `encode_tokens` /
`decode_tokens` for a VQ-VAE) from a tfjax VAE directory or a diffusers one.
Training lives in `tfjax.vae.train` (imported on demand: it pulls in data).
"""
from tfjax.vae.io import LoadedVAE, load

__all__ = ["LoadedVAE", "load"]

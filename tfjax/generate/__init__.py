"""Generation from a trained Transfusion model.

  gen = tfjax.export.load_pretrained("EXPORT_OR_WORKDIR")   # a mixed.Generator
  outs = gen.generate([["a red circle above a blue square"]], rng=jax.random.key(0),
                      mode="image")                          # or "text" / "auto"
  pixels = gen.decode_latents(np.stack([o.images[0] for o in outs]))

Modules: `sampling` (greedy / temperature / top-k / top-p), `lm` (prefill and
KV-cache decoding), `diffusion` (prefix-cached DDPM / DDIM / flow sampling
with batched CFG), `mixed` (the mode-switching decoder), `context` (the
decoded sequence on the host), `files` (what `tfjax-generate` writes).
"""
from tfjax.generate.diffusion import DiffusionParams
from tfjax.generate.mixed import Generation, Generator, Latents
from tfjax.generate.sampling import SamplingParams

__all__ = ["DiffusionParams", "Generation", "Generator", "Latents", "SamplingParams"]

"""Generation: LM decoding with a KV cache, diffusion with the prefix cache, mixed-modal decoding."""

"""Input side: shapes dataset, tokenizer, latent cache, Grain packing pipeline."""

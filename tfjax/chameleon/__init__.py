"""The Chameleon baseline: the same transformer on VQ-VAE image tokens, LM loss only.

Image tokens join the vocabulary after the text tokens (token id =
`image_token_offset(config) + code`); BOI/EOI stay. A Chameleon batch is an
ordinary `tfjax.batch.Batch` with no image slots: the image's codes sit in
`tokens` and are scored by `text_loss_mask` like text, so the unchanged
Transfusion loss reduces to next-token prediction.

  tokens.py    VQ token cache (the latent-cache format holding code ids)
  batches.py   Transfusion-layout batch -> Chameleon batch; data factories
  generate.py  text->image (CFG on logits) and image->text sampling
The stages (data, VQ-VAE, tokens, train, eval) are tfjax/jobs/chameleon.py.
"""

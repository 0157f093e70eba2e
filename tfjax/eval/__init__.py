"""Evaluation: shapes accuracy, captioning (CIDEr-D), perplexity, FID, CLIP score."""

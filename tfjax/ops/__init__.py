"""Pure-JAX operations that know nothing of models: the mask and attention."""
from tfjax.ops.attention import attention, xla_attention
from tfjax.ops.mask import causal_mask, key_ranges, transfusion_mask

__all__ = ["attention", "xla_attention", "transfusion_mask", "causal_mask", "key_ranges"]

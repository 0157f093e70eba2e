"""Pure-JAX operations that know nothing of models: the mask and attention."""
from tfjax.ops.attention import attention, attention_plan, xla_attention
from tfjax.ops.mask import causal_mask, key_ranges, transfusion_mask

__all__ = ["attention", "attention_plan", "xla_attention", "transfusion_mask", "causal_mask", "key_ranges"]

"""tfjax configs: the schema, the special token ids, derived sizes, overrides, checks.

  defaults.py     default_config(): every key, its default and what it means
  tokens.py       PAD/BOS/EOS/BOI/EOI ids every vocabulary starts with
  sizes.py        sizes derived from the model section (mlp_dim, patches_per_image)
  overrides.py    ConfigError, "section.key=value" overrides (sweeps, tfjax-eval)
  validation.py   validate(config): the key that makes a config impossible
  files.py        load_config_file("PATH[:ARG]"): a config file read as --config reads it

Recipes (the paper sizes, the tiny VAE) are config files under `configs/`.
"""
from tfjax.config.defaults import default_config
from tfjax.config.files import load_config_file
from tfjax.config.overrides import ConfigError, UnknownConfigKey, apply_overrides
from tfjax.config.sizes import mlp_dim, patches_per_image
from tfjax.config.tokens import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID
from tfjax.config.validation import validate

__all__ = ["BOI_ID", "BOS_ID", "EOI_ID", "EOS_ID", "PAD_ID", "ConfigError", "UnknownConfigKey",
           "apply_overrides", "default_config", "load_config_file", "mlp_dim", "patches_per_image",
           "validate"]

"""tfjax-info: parameter counts (and shapes) of a config's model, without allocating it.

  tfjax-info --config=configs/transfusion_7b.py [--config.model.num_layers=8] [--shapes]
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import load_config, run
from tfjax.config import mlp_dim, patches_per_image

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override any key with --config.KEY=VALUE.")
_SHAPES = flags.DEFINE_bool("shapes", False, "Also print every parameter's shape and logical axes.")


def _human(n: int) -> str:
  for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= div:
      return f"{n / div:.2f}{unit}"
  return str(n)


def report(config, shapes: bool = False) -> str:
  # Local: JAX loads after the flags parse (--help answers at once).
  import flax.linen as nn
  import jax
  from tfjax.model import abstract_params, count_params
  params = abstract_params(config.model)
  counts = count_params(params)
  m = config.model
  lines = [f"config: {config.name}",
           f"model: {m.num_layers} layers, dim {m.dim}, {m.num_heads} heads "
           f"({m.num_kv_heads} kv), mlp {mlp_dim(m)}, vocab {m.vocab_size}, "
           f"{m.patch_type} patches of {m.patch_size}x{m.patch_size} latents "
           f"({patches_per_image(m)} per image)",
           "", f"{'part':<14}{'parameters':>16}{'':>10}"]
  for part in ("transformer", "embeddings", "patch", "total"):
    label = "patch enc/dec" if part == "patch" else part
    lines.append(f"{label:<14}{counts[part]:>16,}{_human(counts[part]):>10}")
  if shapes:
    specs = nn.get_partition_spec(params)
    lines.append("")
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: x is None or
                                           type(x).__name__ == "PartitionSpec")
    for (path, leaf), spec in zip(flat, flat_specs):
      name = "/".join(str(getattr(p, "key", p)) for p in path)
      lines.append(f"{name:<60}{str(tuple(leaf.shape)):<28}{spec}")
  return "\n".join(lines)


def _main(argv) -> None:
  del argv
  print(report(load_config(_CONFIG.value), shapes=_SHAPES.value))


def main() -> None:
  run(_main, __name__)


if __name__ == "__main__":
  main()

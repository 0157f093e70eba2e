"""The profile table: trace events mapped to model parts through the HLO's op names."""
import jax
import jax.numpy as jnp

from tfjax.train import profile


def test_parts_follow_module_paths_and_named_scopes():
  assert profile.part_of("jit(train_step)/jvp(transfusion)/transformer/layers/mlp/dot_general"
                         ) == "MLP (SwiGLU)"
  assert profile.part_of("jit(train_step)/transpose(jvp(transfusion))/transformer/layers/"
                         "attention/attention_core/pallas_call") == "attention core, backward"
  assert profile.part_of("jit(train_step)/optimizer/mul") == "optimizer + metrics"
  assert profile.part_of("jit(train_step)/jvp(lm_head)/reduce_max") == "LM head + cross-entropy"
  assert profile.part_of("copy.3") == "unattributed"


def test_breakdown_of_a_traced_function(tmp_path):
  @jax.jit
  def step(x, w):
    with jax.named_scope("mlp"):
      h = jnp.tanh(x @ w)
    with jax.named_scope("optimizer"):
      return h @ w.T + 1.0

  x, w = jnp.ones((256, 256)), jnp.ones((256, 256))
  step(x, w).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      step(x, w).block_until_ready()
  names = profile.op_metadata(step.lower(x, w).compile().as_text())
  assert any("/mlp/" in n for n in names.values())
  rows = profile.step_breakdown(str(tmp_path), step.lower(x, w).compile().as_text(), "step",
                                steps=2, wall_s=10.0)
  parts = {name for name, ms, _ in rows if ms > 0}
  assert "MLP (SwiGLU)" in parts or "optimizer + metrics" in parts
  assert rows[-1][0] == "host gaps (device idle)" and rows[-1][1] > 0
  assert "| part | ms / step | share |" in profile.format_table(rows)

"""Where a jitted step's time goes: a `jax.profiler` trace, summed by model part.

`step_breakdown(trace_dir, hlo_text, module, steps, wall_s)` reads the trace's
XPlane file, keeps the device work of the step's HLO module (GPU kernels, or
the CPU backend's thunks where there is no device plane), maps each HLO op to
the JAX operation it came from (the compiled HLO's `op_name` and source file
metadata) and sums the durations by part. Host gaps are the wall time the
device was idle.
"""
from __future__ import annotations

import collections
import glob
import os
import re

# (part, test on "op_name | source_file | hlo_op"), first match wins.
PARTS = (
    ("attention kernel, backward", lambda s: "pallas" in s and "transpose(" in s),
    ("attention kernel, forward", lambda s: "pallas" in s or "mosaic" in s),
    ("attention (XLA reference / plan)", lambda s: "/ops/" in s),
    ("attention projections + RoPE", lambda s: "/attention/" in s),
    ("MLP (SwiGLU)", lambda s: "/mlp/" in s),
    ("norms", lambda s: "norm" in s and "/transformer/" in s),
    ("patch encoder / decoder", lambda s: any(n in s for n in ("patch_", "timestep_embedding"))),
    ("LM head + cross-entropy", lambda s: "lm_loss" in s or "final_norm" in s
     or "bsd,dv" in s or "losses.py" in s and "text" in s),
    ("diffusion noise + loss", lambda s: "diffusion" in s or "losses.py" in s),
    ("optimizer + metrics", lambda s: "jvp(" not in s and "transpose(" not in s),
    ("other model work", lambda s: True),
)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)="([^"]*)"')


def op_metadata(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "op_name | source_file" from compiled HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      fields = dict(_FIELD.findall(m.group(2)))
      out[m.group(1)] = f"{fields.get('op_name', '')} | {fields.get('source_file', '')}"
  return out


def part_of(description: str) -> str:
  for name, test in PARTS:
    if test(description):
      return name
  return PARTS[-1][0]


def _events(trace_dir: str, module: str):
  """(hlo_op, duration_s) of the module's device work in the newest trace."""
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
  data = ProfileData.from_file(files[-1])
  device_planes = [p for p in data.planes if p.name.startswith("/device:")
                   and "CUSTOM" not in p.name]
  planes = device_planes or [p for p in data.planes if p.name == "/host:CPU"]
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats and module in str(stats.get("hlo_module", "")):
          yield str(stats["hlo_op"]), event.duration_ns * 1e-9


def step_breakdown(trace_dir: str, hlo_text: str, module: str, steps: int,
                   wall_s: float) -> list[tuple[str, float, float]]:
  """[(part, ms per step, share of the step)], largest first, host gaps last.

  wall_s: wall time of the `steps` traced steps.
  """
  meta = op_metadata(hlo_text)
  totals: dict[str, float] = collections.defaultdict(float)
  for op, seconds in _events(trace_dir, module):
    totals[part_of(f"{meta.get(op, '')} | {op}".lower())] += seconds
  busy = sum(totals.values())
  step_s = wall_s / steps
  rows = sorted(((k, v / steps) for k, v in totals.items()), key=lambda r: -r[1])
  rows.append(("host gaps (device idle)", max(0.0, wall_s - busy) / steps))
  return [(name, 1e3 * s, s / step_s) for name, s in rows]


def format_table(rows: list[tuple[str, float, float]]) -> str:
  lines = ["| part | ms / step | share |", "|---|---|---|"]
  lines += [f"| {name} | {ms:.2f} | {100 * share:.1f}% |" for name, ms, share in rows]
  return "\n".join(lines)

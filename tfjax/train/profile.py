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

from jax.profiler import ProfileData

# (part, test on "op_name | hlo_op", lower case), first match wins. The op
# names carry the Flax module path and the named scopes of tfjax/losses.py,
# tfjax/model/transfusion.py and tfjax/train/step.py.
PARTS = (
    ("attention core, backward", lambda s: "attention_core" in s and "transpose(" in s),
    ("attention core, forward", lambda s: "attention_core" in s),
    ("attention plan (key intervals, work lists)", lambda s: "attention_plan" in s),
    ("attention projections + RoPE", lambda s: "/attention/" in s),
    ("MLP (SwiGLU)", lambda s: "/mlp/" in s),
    ("norms", lambda s: "norm" in s and "/transformer/" in s),
    ("patch encoder / decoder", lambda s: "patch_" in s or "timestep_embedding" in s),
    ("LM head + cross-entropy", lambda s: "lm_head" in s or "final_norm" in s),
    ("diffusion noise + loss", lambda s: "diffusion" in s),
    ("optimizer + metrics", lambda s: "optimizer" in s),
    ("embedding, residuals, layer scan", lambda s: "jvp(" in s),
    ("unattributed", lambda s: True),
)

_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def op_metadata(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op name it came from (compiled HLO text).

  A fusion without metadata of its own takes the first op name inside the
  computation it calls.
  """
  names, calls, first_in = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    if (m := _COMPUTATION.match(line.strip())):
      computation = m.group(1)
      continue
    if not (m := _INSTR.match(line)):
      continue
    op = _OP_NAME.search(line)
    if op and "/" in op.group(1):
      names[m.group(1)] = op.group(1)
      first_in.setdefault(computation, op.group(1))
    if (c := _CALLS.search(line)):
      calls[m.group(1)] = c.group(1)
  for instr, comp in calls.items():
    if instr not in names and comp in first_in:
      names[instr] = first_in[comp]
  return names


def part_of(description: str) -> str:
  for name, test in PARTS:
    if test(description):
      return name
  return PARTS[-1][0]


def _events(trace_dir: str, module: str):
  """(hlo_op, duration_s) of the module's device work in the newest trace."""
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


def print_unattributed(trace_dir: str, hlo_text: str, module: str, top: int = 8) -> None:
  """The longest device ops no part claims, with what the HLO says of them."""
  meta = op_metadata(hlo_text)
  totals: dict[str, float] = collections.defaultdict(float)
  for op, seconds in _events(trace_dir, module):
    if part_of(f"{meta.get(op, '')} | {op}".lower()) == "unattributed":
      totals[op] += seconds
  for op, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  unattributed {1e3 * seconds:9.3f} ms  {op}  {meta.get(op, '(no op name)')[:120]}")

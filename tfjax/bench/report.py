"""How every benchmark ends: a two-column table, then its JSON on the last line."""
from __future__ import annotations

import json


def print_result(result: dict, out_path: str | None = None) -> None:
  """Prints `result` as a metric/value table, then as one JSON line (also
  written to `out_path` when given)."""
  width = max(len(k) for k in result) + 2
  print(f"{'metric':<{width}}{'value':>16}")
  for k, v in result.items():
    shown = v if isinstance(v, str) else (f"{v:.3f}" if isinstance(v, float) else json.dumps(v))
    print(f"{k:<{width}}{shown:>16}")
  line = json.dumps(result)
  if out_path:
    with open(out_path, "w") as f:
      f.write(line + "\n")
  print(line)

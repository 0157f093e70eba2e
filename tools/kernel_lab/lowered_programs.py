"""Hash the lowered program of every attention-kernel test case (CPU only).

  python tools/kernel_lab/lowered_programs.py --check tools/kernel_lab/lowered_programs.json
  python tools/kernel_lab/lowered_programs.py --write tools/kernel_lab/lowered_programs.json

Shows whether a change to tfjax/ops/kernels/ changed a kernel, and which:
each case of `lowering.cases()` (this folder) is lowered on this machine for
the platform its kernels run on and its normalised program hashed. --check
reports every case as identical, changed, new (not in the file) or missing
(in the file, no longer a case) and fails on a changed or missing one.
Hashes depend on the JAX version (recorded in the file; --check refuses
another). tests/test_kernel_lowering.py checks a subset in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

if __name__ == "__main__":  # lowering only: no accelerator is needed or probed
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from lowering import case_digest, cases  # noqa: E402  (this script's folder)


def compare(got: dict, want: dict) -> dict:
  """Case names by verdict: identical, changed, new (not in `want`), missing
  (in `want`, not in `got`)."""
  return {"identical": [n for n in got if want.get(n) == got[n]],
          "changed": [n for n in got if n in want and want[n] != got[n]],
          "new": [n for n in got if n not in want],
          "missing": [n for n in want if n not in got]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--write", help="record the hashes into this JSON file")
  group.add_argument("--check", help="compare with the hashes in this JSON file")
  parser.add_argument("-k", default="", help="only cases whose name contains this (--check)")
  parser.add_argument("--dump", help="write each case's normalised text into this folder")
  args = parser.parse_args()
  if args.check:
    with open(args.check) as f:
      want = json.load(f)
    if want["jax"] != jax.__version__:
      sys.exit(f"{args.check} holds hashes for JAX {want['jax']}, this is {jax.__version__}")
  elif args.k:
    sys.exit("--write records every case: drop -k")
  got, t0 = {}, time.time()
  for name, (_, build) in cases().items():
    if args.k not in name:
      continue
    got[name], text = case_digest(build)
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      with open(os.path.join(args.dump, re.sub(r"[^\w.+-]+", "_", name) + ".mlir"), "w") as f:
        f.write(text)
    print(f"{got[name]}  {name}", flush=True)
  print(f"{len(got)} cases in {time.time() - t0:.0f} s")
  if args.write:  # written whole, then renamed: never a half-written file
    with open(args.write + ".tmp", "w") as f:
      json.dump({"jax": jax.__version__, "cases": got}, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(args.write + ".tmp", args.write)
    return
  verdicts = compare(got, {n: h for n, h in want["cases"].items() if args.k in n})
  print("; ".join(f"{verdict}: {len(names)}" for verdict, names in verdicts.items()))
  for verdict in ("changed", "new", "missing"):
    for name in verdicts[verdict]:
      print(f"{verdict.upper():8} {name}")
  sys.exit(1 if verdicts["changed"] or verdicts["missing"] else 0)


if __name__ == "__main__":
  main()

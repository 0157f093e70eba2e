#!/usr/bin/env bash
# Downloads, on this (networked) machine, the wheels that benchmarks/gpu_run.sh
# installs on the offline GPU machine (Python 3.12, x86-64): .whl_app for the
# app stack the GPU image lacks, .whl for tokamax and what it imports (the
# attention table's tokamax row). Both folders are git-ignored; name them in
# the device tool's `carry`. About 48 MiB together (xprof alone is 32).
#
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
get() { local dir=$1; shift; python3 -m pip download -q "${plat[@]}" -d "$dir" "$@"; }

get .whl_app grain==0.2.18 ml_collections==1.1.0 tensorflow-datasets==4.9.10 \
  array_record==0.8.6 portpicker dm-tree simple_parsing docstring-parser \
  tensorflow-metadata googleapis-common-protos termcolor toml immutabledict
# promise (imported by tensorflow-datasets) is published only as an sdist.
python3 -m pip wheel -q --no-deps -w .whl_app promise==2.3

get .whl tokamax==0.0.17 fire einshape qwix tensorboardx xprof pydantic pydantic-core \
  annotated-types typing-inspection typing-extensions
du -sh .whl_app .whl

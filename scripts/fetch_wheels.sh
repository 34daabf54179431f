#!/usr/bin/env bash
# The Python 3.12 wheels that the GPU machine lacks, into .whl/ (untracked), for `scripts/device.sh` to install there:
#   bash scripts/fetch_wheels.sh            (GSPLAT=1 adds gsplat 1.5.3, the rasterizer anchor: only for `rasterizer`)
# The list is what a fresh GPU machine was found to need (docs/benchmarks.md, sessions 8 and 27: each missing one
# cost a call): grain, ml-collections, tensorflow-datasets and what it imports (tensorflow-metadata, promise, toml,
# immutabledict, simple-parsing, docstring-parser, termcolor, dm-tree), array-record, etils, portpicker,
# cloudpickle, tensorboardX, imageio-ffmpeg (0.7.0: 0.8.1's wheel is 68 MB of the 64 MiB a call carries),
# espeakng-loader. promise has no wheel on the registry, so pip builds one (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" -d .whl \
  grain ml-collections tensorflow-datasets tensorflow-metadata array-record etils portpicker cloudpickle \
  imageio-ffmpeg==0.7.0 espeakng-loader toml immutabledict simple-parsing docstring-parser termcolor dm-tree \
  tensorboardX $([ "${GSPLAT:-0}" = 1 ] && echo gsplat==1.5.3)
python3 -m pip wheel -q --no-deps promise -w .whl
du -sh .whl

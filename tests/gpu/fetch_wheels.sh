#!/usr/bin/env bash
# Run HERE (a machine with the package index), from anywhere in the repository: gathers into .whl/
# (git-ignored) the wheels the GPU machine lacks, for its Python 3.12 (cp312, manylinux x86_64):
# megatron-core, DeepSpeed (a pure-Python wheel built from its sdist, no ops prebuilt: it JIT-builds
# what it needs there) and DeepSpeed's needs that machine does not have (hjson, pydantic and its own, and the
# typing-extensions >= 4.16 pydantic 2.14 asks for: the image's may be older).
# Everything else they need (torch, numpy, packaging, psutil, py-cpuinfo, msgpack, ninja, einops, tqdm)
# is on a CUDA image with torch already. About 8 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
out=.whl
rm -rf "$out"
mkdir -p "$out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" megatron-core==0.16.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
ls -la "$out"
du -sh "$out"

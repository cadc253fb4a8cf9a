#!/usr/bin/env bash
# Builds .whl/site.tar.xz: what the GPU machine lacks for bench/ and tests/gpu, unpacked and
# trimmed to fit the device tool's 64 MiB carry (it has torch, transformers, peft, accelerate,
# no bitsandbytes and no network). Run here, in the repo root; on the device:
#   mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:src
# Contents: bitsandbytes (CPU + CUDA 13 libraries only), gguf, and Unsloth 2026.10.9 with what
# its import needs (the studio/ web app it ships beside it left out), for bench/train.py's Unsloth rows.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
plat=""
for p in manylinux_2_35 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  plat="$plat --platform ${p}_x86_64"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plat --platform any -d "$work/wheels" \
  bitsandbytes==0.50.2 gguf unsloth==2026.10.9 unsloth_zoo==2026.10.9 "trl<=1.15" "datasets<5" \
  torchao cut_cross_entropy tyro msgspec dill multiprocess hf_transfer json5 nest-asyncio \
  structlog docstring_parser shtab typeguard 2> >(grep -v "is ignored" >&2)
# unzipped, not pip-installed: pip refuses a cp312 wheel under this machine's Python
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
rm -rf "$work"/site/studio "$work"/site/unsloth/studio "$work"/site/bin
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' \
  ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda130.so' -delete
mkdir -p .whl
grep -qx '/.whl/' .gitignore 2>/dev/null || echo '/.whl/' >> .gitignore
tar cJf .whl/site.tar.xz -C "$work/site" .
# llama.cpp's own converter (the reference row of bench/export.py) from the llama-cpp-python
# source distribution agiasi builds: the script, its conversion/ package and gguf-py (~1 MB)
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')" -d "$work/sdist" 2> >(grep -v "is ignored" >&2)
tar xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work/sdist"
vendor=$(echo "$work"/sdist/llama_cpp_python-*/vendor/llama.cpp)
tar cJf .whl/llama-convert.tar.xz -C "$vendor" convert_hf_to_gguf.py conversion gguf-py
rm -rf "$work"
ls -la .whl/site.tar.xz

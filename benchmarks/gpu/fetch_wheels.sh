#!/usr/bin/env bash
# Here (with PyPI), from the repository root: fill benchmarks/gpu/wheels/ (git-ignored) with what the GPU image
# lacks or has in another version than the one chatsft is tested with, for its Python 3.12 on x86-64 Linux.
# The image has torch 2.11, accelerate, peft, safetensors, tokenizers, pyarrow, pandas, triton, ninja, psutil,
# py-cpuinfo, msgpack, nvidia-ml-py, einops (see the device notes); it lacks datasets, trl, liger-kernel and
# deepspeed, and has transformers 5.17 where we test 5.24. About 21 MB in all (the device carries 64 MiB).
# DeepSpeed ships only a source archive: its wheel is built here without ops (DS_BUILD_OPS=0, pure Python; it
# compiles ops with the image's nvcc when one is used; the test uses none). flash-attn has no wheel on PyPI and
# cannot be built within the time: the flash_attention_2 test skips.
set -euo pipefail
dest=benchmarks/gpu/wheels
pip=${PIP:-python3 -m pip}
mkdir -p "$dest"
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
  transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
tmp=$(mktemp -d)
$pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
DS_BUILD_OPS=0 $pip wheel -q --no-deps --no-build-isolation -w "$dest" "$tmp"/deepspeed-0.19.8.tar.gz
rm -rf "$tmp"
du -sh "$dest" && ls "$dest"

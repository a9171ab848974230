#!/usr/bin/env bash
# On the GPU machine, from anywhere: install the carried wheels (benchmarks/gpu/wheels/, filled by
# fetch_wheels.sh) into /tmp/chatsft-site, put them and src/ first on the path, then run run.py with the
# arguments given (e.g. --out "$OUT"). Nothing is fetched: the machine has no network.
set -euo pipefail
cd "$(dirname "$0")/../.."
site=/tmp/chatsft-site
if compgen -G "benchmarks/gpu/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    benchmarks/gpu/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "benchmarks/gpu/wheels/ holds no wheels: using the image's packages only (no trl, deepspeed, liger)" >&2
fi
export PYTHONPATH="$PWD/src:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 benchmarks/gpu/run.py "$@"

#!/usr/bin/env bash
# The GPU check on a bare GPU machine holding a copy of this working tree: find a Python with CUDA torch,
# add the few packages it lacks from local wheels (no network needed), run `python -m benchmarks --gpu`.
#
#   bash benchmarks/gpu_check.sh fetch-wheels   # HERE, where PyPI is reachable: wheels -> build/wheels
#   bash benchmarks/gpu_check.sh [--quick]      # THERE, on the GPU machine, from the repository root
#
# The device machine of this workplace (one H200, 16 cores, no network) has python3 with torch, torchvision,
# timm, accelerate, safetensors, numpy, pillow, rich, matplotlib and pytest, but not webdataset, braceexpand,
# tomli-w or pydicom: `fetch-wheels` downloads those (pure Python, ~3 MB) at the versions this checkout's
# environment uses. build/ is git-ignored, so name it when the tree is copied over (the device tool's
# `carry: ["build/wheels"]`). A venv is not used on such a machine: its torch lives in its own venv
# (/opt/torch/.venv), which `python -m venv --system-site-packages` would not see; the missing wheels go to
# a --target folder on PYTHONPATH instead (seconds). Only where no Python has torch does the script make
# a venv and `pip install -e .[dev]` (that needs PyPI, or PIP_FIND_LINKS with every wheel).
#
# Environment: PYTHON (default: the first of python3, python with CUDA torch), CXRDIST_WHEELS (default
# build/wheels), OUT (results folder; default: a new temp folder), CHECK_TIMEOUT_S (default 540: the check
# must end within the device tool's 10-minute command limit, install included).
# Writes to OUT: gpu-check.json, gpu-check.md (the table for BENCHMARKS.md), cuda-tests.log, gpu-check.log,
# profile-resnet18.txt. On one H200 (2026-12-04) the check took 276 s plus about 10 s of set-up here, so
# CHECK_TIMEOUT_S=400 and a device-tool timeout_s of 430 leave room.
# Exit code: the check's (0 ok; 1 a test failed or an error, CUDA's included; 124 timed out).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${CXRDIST_WHEELS:-$ROOT/build/wheels}
# import name -> distribution name, for everything the check imports that an image may lack
PACKAGES="webdataset:webdataset braceexpand:braceexpand tomli_w:tomli-w pydicom:pydicom"

if [[ ${1:-} == fetch-wheels ]]; then
    mkdir -p "$WHEELS"
    for pair in $PACKAGES; do
        dist=${pair#*:}
        version=$(python3 -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null \
            || .venv/bin/python -c "import importlib.metadata as m; print(m.version('$dist'))")
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
            -d "$WHEELS" "$dist==$version"
    done
    ls -l "$WHEELS"
    exit 0
fi

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && has_cuda_torch "$candidate"; then PY=$candidate; break; fi
    done
fi
if [[ -z $PY ]]; then
    echo "no Python with CUDA torch found: making .venv-gpu and installing -e .[dev] (needs PyPI or PIP_FIND_LINKS)"
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q -e '.[dev]'
    PY=$ROOT/.venv-gpu/bin/python
fi

SITE=$(mktemp -d /tmp/cxrdist-site.XXXXXX)
for pair in $PACKAGES; do
    module=${pair%%:*} dist=${pair#*:}
    "$PY" -c "import $module" 2>/dev/null && continue
    wheel=$(ls "$WHEELS"/"${dist//-/_}"-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z $wheel ]]; then
        echo "error: $PY cannot import $module and $WHEELS holds no $dist wheel;" \
            "run 'bash benchmarks/gpu_check.sh fetch-wheels' where PyPI is reachable and bring build/wheels along" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel"
done
export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

OUT=${OUT:-$(mktemp -d /tmp/cxrdist-gpu-check.XXXXXX)}
mkdir -p "$OUT"
"$PY" -c "import cxrdist, shard_tools, torch, accelerate, webdataset, timm, tomli_w; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__)"
set +e
timeout "${CHECK_TIMEOUT_S:-540}" "$PY" -m benchmarks --gpu "$@" --out "$OUT/gpu-check.json" 2>&1 | tee "$OUT/gpu-check.log"
code=${PIPESTATUS[0]}
set -e
echo "gpu_check.sh: exit $code; results in $OUT"
exit "$code"

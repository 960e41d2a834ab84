#!/usr/bin/env bash
# The GPU check in one command on a lent GPU machine, which has torch, onnx and onnxruntime but no package
# registry and no fpt-deploy: the checkout is installed in place (no dependencies fetched), or, where the
# machine's setuptools cannot, made importable through a folder of links that maps training/, export/ and
# serving/ into the fpt_deploy namespace (pyproject.toml's package-dir). MiniLM travels as .whl/minilm-fp16
# (`python -m bench.gpu_check --save-fp16-weights .whl/minilm-fp16` here; the device tool carries .whl).
#
#     bash bench/gpu_run.sh                      # serving + tensorrt sections; results in $OUT
#     bash bench/gpu_run.sh --sections serving   # any bench.gpu_check options
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
if ! python3 -c "import fpt_deploy.serving" 2>/dev/null; then
    if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
        shim=/tmp/fpt-shim/fpt_deploy
        rm -rf /tmp/fpt-shim && mkdir -p "$shim"
        ln -s "$PWD"/fpt_deploy/* "$shim"/
        for folder in training export serving; do ln -s "$PWD/$folder" "$shim/$folder"; done
        export PYTHONPATH="/tmp/fpt-shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "pip could not install the checkout (see install.log): importing it through $shim" >>"$out/install.log"
    fi
fi
backbone=minilm
[ -d .whl/minilm-fp16 ] && backbone=.whl/minilm-fp16
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
python3 -m bench.gpu_check --backbone "$backbone" "$@" 2>&1 | tee "$out/gpu_check.log"

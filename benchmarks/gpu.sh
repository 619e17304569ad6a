#!/usr/bin/env bash
# The GPU report in one script: within 8 minutes on one H100/H200, Markdown on stdout (progress on stderr).
#
#   bash benchmarks/gpu.sh > gpu-report.md      # on a CUDA machine
#   bash benchmarks/gpu.sh --smoke              # every part at a tiny shape on the CPU, in seconds (the tests run it)
#
# Each part is its own entry point with its own --smoke; run one alone to look closer:
#   1. bf16 parity of model.py with transformers, 256M / 500M / 2.2B shapes (logits, greedy)   bench_parity.py
#   2. torch.compile of the hypernetwork and of decoding (compile time, speedup)                bench_compile.py
#   3. the TTFT sweep, 8 -> 1024 frames, 384 and 1024 px, 500M and 2.2B shapes: in context,
#      kept KV cache, adapter, text; with the memory a ready video takes                       bench_ttft.py
#   4. the hypernetwork's peak memory at 1024 frames, all layers vs layer chunks               bench_hypernet.py
#   5. one 500M training step, bf16 base + bf16 autocast (step time, samples/s, peak memory)   bench_train.py
# Every part runs under a time limit (the seconds below) so the whole stays within budget: a part cut short says
# so, and the TTFT sweep keeps the frame counts it finished. Random weights throughout: nothing is downloaded.
# Environment: PYTHON (default python), OUT (scratch folder for clips and tables; default a fresh temp folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "error: unknown argument $1 (use --smoke or nothing)" >&2; exit 2 ;;
esac
if [[ $SMOKE == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device visible to $PY (bash benchmarks/gpu.sh --smoke runs the CPU smoke test)" >&2
  exit 1
fi
mkdir -p "$OUT"
START=$SECONDS

part() {  # part TITLE LIMIT_S SHOW CMD...: SHOW "-" puts CMD's stdout in the report, else CMD's stdout goes to
          # stderr and the file SHOW is printed after it ends, however it ends (what a sweep cut short finished)
  local title=$1 limit=$2 show=$3 t0=$SECONDS rc
  shift 3
  printf '\n## %s\n\n' "$title"
  if [[ $show == - ]]; then
    timeout --kill-after=10 "$limit" "$@"
  else
    timeout --kill-after=10 "$limit" "$@" >&2
  fi
  rc=$?
  [[ $show == - ]] || cat "$show" 2>/dev/null || echo "(nothing finished)"
  if [[ $rc == 124 || $rc == 137 ]]; then
    printf '\n(cut at its %s s limit)\n' "$limit"
  elif [[ $rc != 0 ]]; then
    printf '\n(failed with exit status %s; its error is on stderr)\n' "$rc"
  fi
  printf '\n_%s s_\n' "$((SECONDS - t0))"
  echo "gpu.sh: $title: $((SECONDS - t0)) s, exit $rc, $((SECONDS - START)) s so far" >&2
}

ttft() {  # ttft TITLE LIMIT_S SIZE ARGS...: the sweep writes its tables after every frame count
  local title=$1 limit=$2 size=$3
  shift 3
  part "$title" "$limit" "$OUT/ttft-$size/results.md" "$PY" benchmarks/bench_ttft.py --size "$size" \
    --workdir "$OUT/work" --out "$OUT/ttft-$size" "$@"
}

printf '# Video2LoRA GPU report\n\n'
"$PY" - <<'EOF'
import subprocess, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (smoke run on the CPU)"
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"{gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}; commit {rev or 'unknown'}")
EOF

if [[ $SMOKE == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""
  part "1. Parity with transformers (smoke)" 60 - "$PY" benchmarks/bench_parity.py --smoke
  part "2. torch.compile (smoke)" 90 - "$PY" benchmarks/bench_compile.py --smoke
  ttft "3. TTFT sweep (smoke)" 90 tiny --device cpu --frames 2,4 --max-frames 4 --sizes 64 --repeats 1 --budget-s 0 \
    --decode-tokens 2 --matmul-n 128 --threads 1
  part "4. Hypernetwork peak memory (smoke)" 60 - "$PY" benchmarks/bench_hypernet.py --smoke --chunks all,1
  part "5. Training step (smoke)" 60 - "$PY" benchmarks/bench_train.py --smoke
else
  SWEEP=(--device cuda --frames 8,64,256,1024 --max-frames 1024 --sizes 384,1024 --repeats 3 --budget-s 3
         --decode-tokens 16 --layer-chunk 4)
  part "1. bf16 parity with transformers" 70 - "$PY" benchmarks/bench_parity.py --sizes 256M,500M,2.2B
  part "2. torch.compile" 110 - "$PY" benchmarks/bench_compile.py --size 500M
  ttft "3a. TTFT sweep, 500M" 100 500M "${SWEEP[@]}"
  ttft "3b. TTFT sweep, 2.2B" 110 2.2B "${SWEEP[@]}"
  part "4. Hypernetwork peak memory at 1024 frames" 35 - "$PY" benchmarks/bench_hypernet.py --device cuda \
    --frames 1024 --chunks all,8,4,1
  part "5. Training step, 500M" 45 - "$PY" benchmarks/bench_train.py --device cuda --steps 4
fi
printf '\n_total: %s s_\n' "$((SECONDS - START))"

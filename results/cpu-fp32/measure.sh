#!/usr/bin/env bash
# The CPU path in fp32, as a CPU without bf16 units runs it, beside the default precision
# of this CPU, measured on one machine in one go (absolute speeds differ by up to 2x between
# machines of one kind: compare within this folder only).
#
#   bash results/cpu-fp32/measure.sh DATA_DIR        # from the repository root; writes results/cpu-fp32/
#   bash results/cpu-fp32/measure.sh DATA_DIR avx2   # writes results/cpu-avx2/
#
# With avx2, PyTorch's and oneDNN's kernels are held to AVX2, as on a CPU without AVX-512 (AMD Zen 2
# and 3, most laptops), which has no bf16 units either: fp32 only.
set -eu
data=${1:?usage: bash results/cpu-fp32/measure.sh DATA_DIR [avx2]}
isa=${2:-native}
out=results/cpu-fp32 precisions="fp32 default"
if [ "$isa" = avx2 ]; then
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    out=results/cpu-avx2 precisions=fp32
    mkdir -p "$out"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
{
    date -u
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) cores;" \
         "bf16 units: $(grep -o -m1 -E 'avx512_bf16|amx_bf16' /proc/cpuinfo || echo none)"
    python -c "import torch; print('torch', torch.__version__, '- kernels:', torch.backends.cpu.get_cpu_capability())"
} > "$out/machine.txt"

seconds() {  # run a command into $out/$name.log; append "$name <seconds>" to times.txt
    local start=$EPOCHREALTIME
    "$@" > "$out/$name.log" 2>&1
    awk -v name="$name" -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%s %.1f\n", name, b - a }' >> "$out/times.txt"
}
: > "$out/times.txt"

# Where an fp32 training step's time goes, and the DataLoader reference in the same run
name=bench-fp32 seconds python bench.py --data-dir "$data" --device cpu --no-amp --batch-size 128 --steps 5 \
    --windows 2 --ref-workers 0 --json "$out/bench-fp32.json" --profile "$out/profile-fp32.json"
# torch.compile on the CPU (inductor's fused BatchNorm and ReLU), the same step
name=bench-fp32-compile seconds python bench.py --data-dir "$data" --device cpu --no-amp --batch-size 128 \
    --steps 5 --windows 2 --skip-reference --compile --json "$out/bench-fp32-compile.json"

# The README's "Try it in 2 minutes" block, in fp32 and in this CPU's default precision
for precision in $precisions; do
    flag=$([ $precision = fp32 ] && echo --no-amp || true)
    run=/tmp/quick-$precision
    rm -rf "$run"
    name=quick-train-$precision seconds python train.py --epochs 2 --limit-train 1536 --batch-size 64 \
        --limit-test 500 --data-dir "$data" --no-download --out "$run" $flag
    name=quick-gradcam-$precision seconds python gradcam.py --ckpt "$run/best.pt" --limit-test 500 --data-dir "$data" \
        --no-download
    name=quick-lr-range-$precision seconds python lr_range.py --limit-train 1536 --batch-size 64 --num-iter 12 \
        --data-dir "$data" --no-download --out "$run/lr_range" $flag
    cp "$run/metrics.json" "$out/quick-$precision-metrics.json"
done
cat "$out/times.txt"

#!/usr/bin/env bash
# The GPU results under results/gpu/, made on the lent GPU machine from the repository root:
#
#   bash results/gpu/run.sh OUT STEP...
#
# CIFAR-10 (JPEG copy) is rebuilt into .data/ from .data/cifar10-jpeg.npz and
# .data/build_batches.py (copied there from ../shared/cifar10). Each STEP writes OUT/STEP/ and
# appends to OUT/log.txt; after every step OUT/results.tar.gz is refreshed with everything but
# checkpoints. A step that would start later than DEADLINE seconds (default 540) after the
# start is skipped, so a call under a 10-minute cap always returns its finished steps.
# TRAIN_ARGS (for example "--epochs 1 --limit-train 1024") is appended to every train.py call.
set -u
out=${1:?usage: bash results/gpu/run.sh OUT STEP...}
shift
mkdir -p "$out"
log="$out/log.txt"
deadline=${DEADLINE:-540}
start=$SECONDS
export PYTHONUNBUFFERED=1
spec_flags="--optimizer adam --label-smoothing 0 --no-flip"

in_time() {  # run a command, killed at the deadline
    local left=$((deadline - (SECONDS - start)))
    timeout $((left > 1 ? left : 1)) "$@"
}

train() {  # train STEP [train.py flags...], then Grad-CAM on its best checkpoint
    local name=$1
    shift
    # shellcheck disable=SC2086
    in_time python3 train.py --data-dir .data --out "$out/$name" --overwrite "$@" ${TRAIN_ARGS:-} &&
        in_time python3 gradcam.py --ckpt "$out/$name/best.pt" --data-dir .data
}

run_step() {
    case $1 in
        default) train default ;;
        default-compile) train default-compile --compile ;;
        default-seed1) train default-seed1 --seed 1 ;;
        default-seed2) train default-seed2 --seed 2 ;;
        default-ls0) train default-ls0 --label-smoothing 0 ;;
        default-lr0.1) train default-lr0.1 --max-lr 0.1 ;;
        default-lr0.4) train default-lr0.4 --max-lr 0.4 ;;
        default-seed3) train default-seed3 --seed 3 ;;
        default-cut0.5) train default-cut0.5 --cutout-p 0.5 ;;
        default-cut0.5-seed1) train default-cut0.5-seed1 --cutout-p 0.5 --seed 1 ;;
        default-cut0.5-seed2) train default-cut0.5-seed2 --cutout-p 0.5 --seed 2 ;;
        default-cut0.5-lr0.4) train default-cut0.5-lr0.4 --cutout-p 0.5 --max-lr 0.4 ;;
        spec-cut0.5) train spec-cut0.5 $spec_flags --max-lr 0.027 --wd 0 --cutout-p 0.5 ;;
        spec-cut0.5-seed1) train spec-cut0.5-seed1 $spec_flags --max-lr 0.027 --wd 0 --cutout-p 0.5 --seed 1 ;;
        spec-auto-wd0-cut0.5) train spec-auto-wd0-cut0.5 $spec_flags --max-lr auto --wd 0 --cutout-p 0.5 ;;
        spec) train spec $spec_flags --max-lr auto --wd 1e-4 ;;
        spec-lr) train spec-lr $spec_flags --max-lr 0.027 --wd 1e-4 ;;
        spec-lr-wd0) train spec-lr-wd0 $spec_flags --max-lr 0.027 --wd 0 ;;
        bench) mkdir -p "$out/bench" &&
            in_time python3 bench.py --batch-size 512 --data-dir .data --steps 20 --windows 5 --ref-workers 8 \
                --peak-tflops 790 --json "$out/bench/bench.json" ;;
        bench-1024) mkdir -p "$out/bench-1024" &&
            in_time python3 bench.py --batch-size 1024 --data-dir .data --steps 20 --windows 5 --skip-reference \
                --peak-tflops 790 --json "$out/bench-1024/bench.json" ;;
        bench-compile) mkdir -p "$out/bench-compile" &&
            in_time python3 bench.py --batch-size 512 --data-dir .data --steps 20 --windows 5 --compile \
                --skip-reference --peak-tflops 790 --json "$out/bench-compile/bench.json" ;;
        *) echo "unknown step $1" ; return 2 ;;
    esac
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    [ -d .data/cifar-10-batches-py ] || python3 .data/build_batches.py .data
} 2>&1 | tee -a "$log"

for step in "$@"; do
    left=$((deadline - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then
        echo "== $step: skipped, ${left}s left before the deadline" | tee -a "$log"
        continue
    fi
    echo "== $step (at ${SECONDS}s, ${left}s left)" | tee -a "$log"
    step_start=$SECONDS
    lines=$(wc -l <"$log")
    run_step "$step" >>"$log" 2>&1
    status=$?
    tail -n +$((lines + 1)) "$log" | grep -E "^(Best test|LR range test suggests|default |reference|speed-up|model:)|rror"
    echo "== $step: exit $status after $((SECONDS - step_start))s" | tee -a "$log"
    tar --exclude='*.pt' --exclude=results.tar.gz -czf /tmp/results.tar.gz -C "$out" . &&
        mv /tmp/results.tar.gz "$out/results.tar.gz"
done

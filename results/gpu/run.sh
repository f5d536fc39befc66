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
spec_flags="--optimizer adam --label-smoothing 0 --no-flip"  # with --max-lr, --wd and --cutout-p below

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

bench() {  # bench STEP [bench.py flags...]: 5 timed windows of 20 steps
    local name=$1
    shift
    mkdir -p "$out/$name" &&
        in_time python3 bench.py --data-dir .data --steps 20 --windows 5 "$@" --peak-tflops 790 \
            --json "$out/$name/bench.json"
}

run_step() {  # STEP[-seedN]: the recipe below, with --seed N (default 0)
    local name=$1 recipe=$1 seed=0 flags
    if [[ $name =~ ^(.+)-seed([0-9]+)$ ]]; then
        recipe=${BASH_REMATCH[1]}
        seed=${BASH_REMATCH[2]}
    fi
    case $recipe in
        default) flags="" ;;
        default-lr0.4) flags="--max-lr 0.4" ;;
        default-compile) flags="--compile" ;;
        cutout1) flags="--cutout-p 1" ;;
        cutout1-lr0.4) flags="--cutout-p 1 --max-lr 0.4" ;;
        cutout1-ls0) flags="--cutout-p 1 --label-smoothing 0" ;;
        cutout1-compile) flags="--cutout-p 1 --compile" ;;
        ls0.2) flags="--label-smoothing 0.2" ;;
        nobnwd) flags="--no-bn-wd" ;;
        cutout0.25) flags="--cutout-p 0.25" ;;
        altflip) flags="--alternate-flip" ;;
        lr0.4-ls0.2-nobnwd) flags="--max-lr 0.4 --label-smoothing 0.2 --no-bn-wd" ;;
        spec-recipe) flags="$spec_flags --max-lr 0.027 --wd 0 --cutout-p 0.5" ;;
        spec-recipe-auto) flags="$spec_flags --max-lr auto --wd 0 --cutout-p 0.5" ;;
        spec-cutout1) flags="$spec_flags --max-lr 0.027 --wd 0 --cutout-p 1" ;;
        spec-cutout1-wd1e-4) flags="$spec_flags --max-lr 0.027 --wd 1e-4 --cutout-p 1" ;;
        spec-cutout1-wd1e-4-auto) flags="$spec_flags --max-lr auto --wd 1e-4 --cutout-p 1" ;;
        bench) bench "$name" --batch-size 512 --ref-workers 8; return ;;
        bench-1024) bench "$name" --batch-size 1024 --skip-reference; return ;;
        bench-compile) bench "$name" --batch-size 512 --compile --skip-reference; return ;;
        bench-compile-max) bench "$name" --batch-size 512 --compile --compile-mode max-autotune-no-cudagraphs \
            --skip-reference; return ;;
        gpu-tests) CIFAR10_SHARED=$PWD/.data in_time python3 -m pytest -q tests/test_train.py -k "never_waits or fit_learns"; return ;;
        profile) bench "$name" --batch-size 512 --skip-reference --profile "$out/$name/profile.json"; return ;;
        *) echo "unknown step $1"; return 2 ;;
    esac
    # shellcheck disable=SC2086
    train "$name" --seed "$seed" $flags
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "kernel $(uname -r); host CPU: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
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
    tail -n +$((lines + 1)) "$log" | grep -E "^(Best test|LR range test suggests|default |reference|speed-up|model:|profile:| +[0-9.]+% )|rror"
    echo "== $step: exit $status after $((SECONDS - step_start))s" | tee -a "$log"
    tar --exclude='*.pt' --exclude=results.tar.gz -czf /tmp/results.tar.gz -C "$out" . &&
        mv /tmp/results.tar.gz "$out/results.tar.gz"
done

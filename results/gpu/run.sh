#!/usr/bin/env bash
# The GPU results under results/gpu/, made in one run on a GPU machine from the repository root:
#
#   bash results/gpu/run.sh OUT [run.py options: --solo STEP... --parallel STEP... --jobs N --deadline S]
#
# Needs .data/ holding cifar10-jpeg.npz and build_batches.py (prepare.sh puts them there), from
# which CIFAR-10 is rebuilt there (./data links to it, as the notebook reads it), and for the
# notebook step .whl/ holding its wheels (results/README.md says which). Logs the machine, then
# hands over to run.py; OUT gets log.txt and results.tar.gz.
set -u
out=${1:?usage: bash results/gpu/run.sh OUT [run.py options]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "kernel $(uname -r); host CPU: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) cores"
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    [ -d .data/cifar-10-batches-py ] || python3 .data/build_batches.py .data
    [ -e data ] || ln -s .data data
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
            echo "installed $(ls .whl | wc -l) wheels for the notebook into /tmp/site"
    fi
} 2>&1 | tee -a "$out/log.txt"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 results/gpu/run.py "$@"

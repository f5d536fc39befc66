#!/usr/bin/env bash
# Before a call of the lent GPU machine, from the repository root: what run.sh needs, in the
# git-ignored .data/, and the tree small enough to travel (64 MiB with what is carried).
#
#   bash results/gpu/prepare.sh FOLDER                 # FOLDER holds cifar10-jpeg.npz and build_batches.py
#   (the call: carry .data, run `bash results/gpu/run.sh $OUT ...`)
#   git ls-files -d -z | xargs -0 git checkout --      # afterwards: the committed figures back
#
# The committed figures (results/**/*.png, about 14 MB) stay behind: no step reads them.
set -eu
shared=${1:?usage: bash results/gpu/prepare.sh FOLDER (the one holding cifar10-jpeg.npz and build_batches.py)}
for file in cifar10-jpeg.npz build_batches.py; do
    [ -f "$shared/$file" ] || { echo "no $shared/$file: pass the folder holding the JPEG copy of CIFAR-10" >&2; exit 1; }
done
mkdir -p .data
cp "$shared/cifar10-jpeg.npz" "$shared/build_batches.py" .data/
git ls-files -z 'results/*.png' | xargs -0 rm -f
bytes=$(( $( (git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null; cat .data/*) | wc -c) ))
echo "travels: $(( bytes / 1048576 )) MiB of 64 (the tree and .data/)"
[ "$bytes" -lt $(( 64 * 1048576 )) ] || { echo "over the limit: leave more behind" >&2; exit 1; }

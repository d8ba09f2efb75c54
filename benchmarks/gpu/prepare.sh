#!/usr/bin/env bash
# Prepare the one GPU call of benchmarks/gpu/run_all.sh. Run this on the development machine (it
# needs PyPI), from anywhere in the checkout:
#
#     bash benchmarks/gpu/prepare.sh /path/to/InfinityStar
#
# It fills two folders that git ignores (listed in .git/info/exclude, never committed):
#   .whl/       wheels of the official code's import-time dependencies that the GPU image lacks
#               (typed-argument-parser + docstring-parser, pytz) and the timm version it pins;
#               all pure Python, for CPython 3.12 on x86-64 Linux
#   .official/  a copy of the official checkout without its git history, images and evaluation data
# and prints the arguments of the device call. Both folders travel with the working tree only when
# the call names them in `carry`; together they stay well under the 64 MiB limit.
set -euo pipefail

OFFICIAL=${1:-${INFINITYSTAR_OFFICIAL_PATH:-}}
if [ -z "$OFFICIAL" ] || [ ! -f "$OFFICIAL/infinity/models/infinity.py" ]; then
    echo "usage: bash benchmarks/gpu/prepare.sh /path/to/InfinityStar  (an official checkout)" >&2
    exit 2
fi
OFFICIAL=$(cd "$OFFICIAL" && pwd)
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
PYTHON=${PYTHON:-python3}

# Versions the official code was run with on the CPU (benchmarks/README.md); keep one of each.
WHEELS=(typed-argument-parser==1.12.0 docstring-parser==0.18.0 pytz==2026.6 timm==0.9.6)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for p in /.whl/ /.official/; do
    grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"
done

rm -rf .whl .official
mkdir -p .whl .official
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
tar -C "$OFFICIAL" -cf - --exclude=./.git --exclude=./assets --exclude=./evaluation --exclude=./data . \
    | tar -C .official -xf -
{
    echo "official checkout: $(git -C "$OFFICIAL" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "ours at prepare time: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- benchmarks infinitystar || echo ' + uncommitted changes')"
} >.official/PREPARED

for p in .whl .official; do
    if ! git check-ignore -q "$p/"; then
        echo "error: $p is not ignored by git; it would be committed or travel twice" >&2
        exit 1
    fi
done
ls -1 .whl
# what travels: tracked + untracked-not-ignored files, plus the carried folders
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null || true) \
    | awk '/\ttotal$/ {s += $1} END {print s + 0}')
carry_bytes=$(du -sb .whl .official | awk '{s += $1} END {print s}')
echo "working tree ${tree_bytes} B + carried ${carry_bytes} B = $(( (tree_bytes + carry_bytes) / 1048576 )) MiB (limit 64 MiB)"
if (( tree_bytes + carry_bytes > 60 * 1048576 )); then
    echo "error: too large to travel" >&2
    exit 1
fi

cat <<'EOF'

Ready. Device call (one call, about 9 minutes of device time plus the machine's start):
  run(command="bash benchmarks/gpu/run_all.sh", carry=[".whl", ".official"], timeout_s=590)
Results come back under $OUT (summary.txt first); see benchmarks/README.md, "Running on a GPU".
EOF

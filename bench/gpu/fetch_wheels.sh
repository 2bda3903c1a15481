#!/usr/bin/env bash
# Fetch the wheels of bench/gpu/wheels.txt for the device machines (x86-64, CPython 3.12) into .whl/.
# Run here, from the repository root, before a GPU session: the device machine cannot reach PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip=${PIP:-.venv/bin/pip}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^\s*#' bench/gpu/wheels.txt | grep -v '^\s*$' | while read -r req; do
  "$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$req"
done
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"

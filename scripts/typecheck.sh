#!/usr/bin/env bash
# mypy --strict over the whole package, hms_deploy with hms_deploy.export and
# hms_deploy.runtime included. mypy maps modules to files by folder, and export/ and
# runtime/ install as hms_deploy.export / hms_deploy.runtime (package-dir), so the check
# runs on a tree of links (build/mypy-src/hms_deploy: hms_deploy/*, export, runtime) that
# has the installed layout. TensorRT is read from tensorrt-stubs, patched by
# tests/trt_stubs.py so that mypy reads them. Modules listed under "not yet strict-clean" in
# pyproject.toml are skipped.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python tests/trt_stubs.py build/trt-stubs
src=build/mypy-src
rm -rf "$src"
mkdir -p "$src/hms_deploy"
for entry in hms_deploy/*; do
  [ "$(basename "$entry")" = __pycache__ ] || ln -s "$repo/$entry" "$src/hms_deploy/"
done
ln -s "$repo/export" "$src/hms_deploy/export"
ln -s "$repo/runtime" "$src/hms_deploy/runtime"
cd "$src"
MYPYPATH="$repo/build/trt-stubs" mypy --strict --config-file "$repo/pyproject.toml" -p hms_deploy

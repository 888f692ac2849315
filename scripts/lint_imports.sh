#!/usr/bin/env bash
# Check the import contracts in pyproject.toml ([tool.importlinter]) with lint-imports.
# grimp (lint-imports' import graph) finds a package's modules on disk under the package's
# folder; an editable install maps hms_deploy.export and hms_deploy.runtime to export/ and
# runtime/ by an import hook that grimp does not follow, so the check runs against a regular
# install of a copy of the sources (a copy: a stale build/ folder would add deleted modules) in a
# temporary folder, from outside the repository.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/hms_deploy" "$repo/export" "$repo/runtime" "$dir/src/"
find "$dir/src" -name __pycache__ -prune -exec rm -rf {} +
pip install --quiet --no-deps --no-build-isolation --target "$dir/site" "$dir/src" > "$dir/pip.log" 2>&1 \
  || { cat "$dir/pip.log" >&2; exit 1; }
cd "$dir"
PYTHONPATH="$dir/site" lint-imports --no-cache --no-logo "$repo/pyproject.toml"

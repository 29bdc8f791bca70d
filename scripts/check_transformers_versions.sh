#!/usr/bin/env bash
# The conversion tests against other transformers releases than the one the set-up installs (the
# pyproject floor, 5.4, by default): each version goes into its own --target folder ahead of the
# venv's on PYTHONPATH, with its own dependencies. Needs the package registry.
#   bash scripts/check_transformers_versions.sh            # 5.4.0
#   bash scripts/check_transformers_versions.sh 5.4.0 5.17.0
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VENV:-$REPO/.venv}/bin/python"
versions=("$@")
(( ${#versions[@]} )) || versions=(5.4.0)
status=0
for v in "${versions[@]}"; do
    dir="${TMPDIR:-/tmp}/hedgehog-transformers-$v"
    [[ -d "$dir/transformers" ]] || "$PY" -m pip install -q --target "$dir" "transformers==$v"
    echo "[transformers $v]"
    (cd "$REPO" && PYTHONPATH="$dir" "$PY" -m pytest -q tests/test_convert.py) || status=1
done
exit $status

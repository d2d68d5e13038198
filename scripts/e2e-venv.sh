#!/usr/bin/env bash
# Creates (or reuses) target/e2e-venv with the pinned MLflow and scikit-learn, and prints the
# path of its python on the last line. pip runs only when the installed versions differ from the
# pins; a cold install takes a few minutes (PyPI).
#
# Used by scripts/e2e-mlflow.sh (the end-to-end scenario) and tests/fixtures/mlflow/generate.sh
# (the model fixtures), so that both run the same MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MLFLOW_VERSION=3.17.2   # the version that wrote tests/fixtures/mlflow
SKLEARN_VERSION=1.9.1
VENV=$ROOT/target/e2e-venv

if [ -d "$VENV" ] && ! "$VENV/bin/python" -c pass 2>/dev/null; then
    echo "venv $VENV is broken (its python does not run): recreating" >&2
    rm -rf "$VENV"
fi
if [ ! -d "$VENV" ]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo "python3 venv module missing: installing python3-venv" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$VENV"
fi
if "$VENV/bin/python" - "$MLFLOW_VERSION" "$SKLEARN_VERSION" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = version("mlflow") == sys.argv[1] and version("scikit-learn") == sys.argv[2]
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
then
    echo "venv: reusing $VENV (mlflow==$MLFLOW_VERSION scikit-learn==$SKLEARN_VERSION)" >&2
else
    echo "venv: pip install mlflow==$MLFLOW_VERSION scikit-learn==$SKLEARN_VERSION (cold: a few minutes)" >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        "mlflow==$MLFLOW_VERSION" "scikit-learn==$SKLEARN_VERSION" >&2
fi
echo "$VENV/bin/python"

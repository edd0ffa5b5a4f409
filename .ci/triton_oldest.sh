#!/usr/bin/env bash
# CI: run the given Triton test files against the oldest supported Triton (3.6.0, the GPU machine's),
# on the CPU under the Triton interpreter. Run after .ci/run has installed the package: a throwaway
# venv (--system-site-packages) reuses that torch and the editable explaind_fast, with its own triton.
#
#     .ci/triton_oldest.sh tests/ops/test_ops_triton.py tests/bench/test_kernel_grid_smoke.py
set -euo pipefail
cd "$(dirname "$0")/.."

TRITON_VERSION=3.6.0
if [ "$#" -eq 0 ]; then
  echo "usage: $0 TEST_PATH... (the Triton test files, relative to the repository root)" >&2
  exit 2
fi

venv="$(mktemp -d)/venv-triton-oldest"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "triton==$TRITON_VERSION"

# The venv's own triton must shadow the system one, and the package must be this checkout's.
"$venv/bin/python" - "$TRITON_VERSION" "$PWD" <<'EOF'
import os, sys
import numpy, torch, triton
import explaind_fast.kernels as kernels
want, root = sys.argv[1], sys.argv[2]
if triton.__version__ != want:
    sys.exit(f"triton {triton.__version__} from {triton.__file__} shadows the venv's triton {want}")
if not os.path.realpath(kernels.__file__).startswith(os.path.realpath(root) + os.sep):
    sys.exit(f"explaind_fast.kernels comes from {kernels.__file__}, not this checkout ({root})")
print(f"testing triton {triton.__version__} (numpy {numpy.__version__}, torch {torch.__version__})")
EOF

TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q "$@"
echo "tested triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"

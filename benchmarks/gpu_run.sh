#!/usr/bin/env bash
# A lent GPU's one command: install sstl, optionally run tests, then `gpu_check` with the
# remaining arguments, e.g.
#   bash benchmarks/gpu_run.sh --only recipe --data .data/cxr-dev-gray224
#   bash benchmarks/gpu_run.sh --tests "tests/test_graphs.py tests/test_host_sync.py" --only cuda
# Results go to $OUT (the lent machine's return folder), else ./gpu-check. Run from anywhere:
# relative paths in the arguments are read from the repository root. When this Python's
# setuptools cannot build the package (pyproject's SPDX `license` needs setuptools >= 77, and
# --no-build-isolation uses the machine's own), sstl runs from the checkout through a path
# shim instead of losing the lease to an install error. Exit status: the tests' if they
# fail, else gpu_check's.
set -u
cd "$(dirname "$0")/.."
tests=""
if [ "${1:-}" = "--tests" ]; then
    tests="${2:?--tests takes a quoted list of test files}"
    shift 2
fi
python -c "import setuptools, torch; print('setuptools', setuptools.__version__, '| torch', \
torch.__version__, '| cuda', torch.cuda.is_available())"
if ! python -m pip install -q --no-deps --no-build-isolation -e . ; then
    shim=$(mktemp -d)
    ln -s "$PWD" "$shim/sstl"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_run: install failed; running sstl from $PWD through $shim" >&2
fi
if [ -n "$tests" ]; then
    # shellcheck disable=SC2086  # a list of test files, split on spaces
    python -m pytest -q $tests || exit $?
fi
exec python -m sstl.benchmarks.gpu_check --out "${OUT:-gpu-check}" "$@"

#!/usr/bin/env bash
# A lent GPU's one command: install sstl, optionally run tests, then `gpu_check` with the
# remaining arguments, e.g.
#   bash benchmarks/gpu_run.sh --only recipe --data .data/cxr-dev-gray224
#   bash benchmarks/gpu_run.sh --tests "tests/test_graphs.py tests/test_host_sync.py" --only cuda
# Results go to $OUT (the lent machine's return folder), else ./gpu-check. Run from anywhere:
# relative paths in the arguments are read from the repository root. When this Python's
# setuptools cannot build the package (pyproject's SPDX `license` needs setuptools >= 77, and
# --no-build-isolation uses the machine's own), sstl runs from the checkout through a path
# shim instead of losing the lease to an install error. The tests' output goes to
# $OUT/tests.log and a failing test does not cancel the measurements; gpu_check's --budget
# (480 s, or $BUDGET) counts from this script's start. $OUT gets two files at most
# (gpu-check.json, tests.log): a lent machine sends back 8. Python: $PYTHON, else python3
# (the lent machines' interpreter with torch). Exit status: the tests' if they failed, else
# gpu_check's.
set -u
py="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
tests=""
if [ "${1:-}" = "--tests" ]; then
    tests="${2:?--tests takes a quoted list of test files}"
    shift 2
fi
"$py" -c "import setuptools, torch; print('setuptools', setuptools.__version__, '| torch', \
torch.__version__, '| cuda', torch.cuda.is_available())"
if ! "$py" -m pip install -q --no-deps --no-build-isolation --no-index \
        --disable-pip-version-check -e . ; then
    shim=$(mktemp -d)
    ln -s "$PWD" "$shim/sstl"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_run: install failed; running sstl from $PWD through $shim" >&2
fi
test_rc=0
if [ -n "$tests" ]; then
    # shellcheck disable=SC2086  # a list of test files, split on spaces
    "$py" -m pytest -q $tests 2>&1 | tee "$out/tests.log"
    test_rc=${PIPESTATUS[0]}
fi
budget=$(( ${BUDGET:-480} - SECONDS ))  # a later --budget in the arguments wins
"$py" -m sstl.benchmarks.gpu_check --out "$out" --budget "$budget" "$@"
rc=$?
[ "$test_rc" -ne 0 ] && exit "$test_rc"
exit "$rc"

#!/usr/bin/env bash
# A lent GPU's one command: install sstl, then `gpu_check` with the arguments given, e.g.
#   bash benchmarks/gpu_run.sh --only recipe --data .data/cxr-dev-gray224
# Results go to $OUT (the lent machine's return folder), else ./gpu-check. When this Python's
# setuptools cannot build the package (pyproject's SPDX `license` needs setuptools >= 77, and
# --no-build-isolation uses the machine's own), sstl runs from the checkout through a path
# shim instead of losing the lease to an install error.
set -u
cd "$(dirname "$0")/.."
python -c "import setuptools, torch; print('setuptools', setuptools.__version__, '| torch', \
torch.__version__, '| cuda', torch.cuda.is_available())"
if ! python -m pip install -q --no-deps --no-build-isolation -e . ; then
    shim=$(mktemp -d)
    ln -s "$PWD" "$shim/sstl"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_run: install failed; running sstl from $PWD through $shim" >&2
fi
exec python -m sstl.benchmarks.gpu_check --out "${OUT:-gpu-check}" "$@"

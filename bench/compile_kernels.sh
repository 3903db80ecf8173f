#!/usr/bin/env bash
# Compile every Triton kernel specialization the engine launches for sm_80 and sm_90, with the
# installed Triton and with the GPU image's (3.6.0), on a machine without a GPU. .ci/run runs it
# after the test suite; a developer runs it the same way:
#
#   bash bench/compile_kernels.sh
#
# It records the engine's launches once (tests/test_kernel_compile.py, RMSERVE_KERNEL_COMPILE=1)
# and compiles them with this python's Triton and with a venv holding only triton==$TRITON_GPU
# (its other packages, torch and rmserve included, come from this python's site-packages through
# a .pth file; the venv's own Triton comes first). The venv is kept in $TRITON_VENV for the next run.
# TRITON_GPU= (empty) compiles with the installed Triton only.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
gpu_triton=${TRITON_GPU-3.6.0}
pythons=""
if [ -n "$gpu_triton" ]; then
  venv=${TRITON_VENV:-${TMPDIR:-/tmp}/rmserve-triton-$gpu_triton}
  start=$SECONDS
  if [ "$("$venv/bin/python" -c 'import triton; print(triton.__version__)' 2>/dev/null)" != "$gpu_triton" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "triton==$gpu_triton"
  fi
  here=$("$py" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$here')" >"$venv_site/zz_rmserve_env.pth"
  "$venv/bin/python" -c "import triton, torch, rmserve; print('triton', triton.__version__, 'from', triton.__file__)"
  echo "triton $gpu_triton venv ready in $((SECONDS - start)) s: $venv"
  pythons="$venv/bin/python"
fi
echo "+ RMSERVE_KERNEL_COMPILE=1 RMSERVE_COMPILE_PYTHON=$pythons $py -m pytest -q -s tests/test_kernel_compile.py"
RMSERVE_KERNEL_COMPILE=1 RMSERVE_COMPILE_PYTHON="$pythons" "$py" -m pytest -q -s -p no:cacheprovider \
  tests/test_kernel_compile.py --durations=5

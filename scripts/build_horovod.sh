#!/usr/bin/env bash
# Builds Horovod 0.28.1 (PyTorch + Gloo, no MPI/TensorFlow/MXNet) into the
# project's .venv, so AllreduceConfig(backend="horovod") / MONOLITH_WITH_HOROVOD=1
# and `horovodrun -np 2 --gloo -H localhost:2 ...` work. CPU only.
#
# Why a script and not a pip extra: horovod 0.28.1's CMake files pin C++14,
# and torch 2.13's headers require C++17 ("#error C++17 or later compatible
# compiler is required to use PyTorch"). CXXFLAGS does not help (CMake strips
# -std=), so CXX points to a two-line wrapper (in a temp dir, removed on exit)
# that calls the real g++ with its arguments followed by -std=c++17; the last
# -std= wins. The build is --no-build-isolation so it compiles against the
# venv's torch.
#
# Needs: g++ (C++17), cmake >= 3.13, make; about 3.5 minutes on 2 cores.
# Idempotent: does nothing when `import horovod.torch` already works.
# Usage: scripts/build_horovod.sh   (env: CXX_REAL=/path/to/g++, HOROVOD_VERSION)
MT_EXTRAS=test
source "$(dirname "$0")/_venv.sh"
PYBIN="$VENV/bin/python"
VERSION="${HOROVOD_VERSION:-0.28.1}"

if "$PYBIN" -c 'import horovod.torch' >/dev/null 2>&1; then
  echo "horovod.torch already importable in $VENV ($("$PYBIN" -c 'import horovod; print(horovod.__version__)')); nothing to do" >&2
  exit 0
fi

CXX_REAL="${CXX_REAL:-$(command -v g++ || true)}"
if [ -z "$CXX_REAL" ]; then
  echo "error: g++ not found (set CXX_REAL=/path/to/a C++17 compiler)" >&2
  exit 2
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "error: cmake not found; horovod's build needs cmake >= 3.13" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/cxx17" <<WRAP
#!/bin/sh
exec "$CXX_REAL" "\$@" -std=c++17
WRAP
chmod +x "$tmp/cxx17"

# --no-build-isolation: the build runs in the venv, so its build requirements
# must already be there.
"$PYBIN" -m pip install --quiet --disable-pip-version-check "setuptools>=68" wheel

start=$(date +%s)
echo "building horovod==$VERSION into $VENV (several minutes)" >&2
CXX="$tmp/cxx17" \
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  "$PYBIN" -m pip install --disable-pip-version-check --no-build-isolation --no-cache-dir \
  "horovod==$VERSION"

"$PYBIN" -c 'import horovod.torch as hvd; assert hvd.gloo_built(), "horovod built without Gloo"'
echo "horovod $VERSION built in $(( $(date +%s) - start ))s; horovod.torch imports" >&2

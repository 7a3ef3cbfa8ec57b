#!/usr/bin/env bash
# Build LAMMPS with ML-IAP's Python "unified" interface, MPI and the PYTHON package, for
# allegro_fast.lammps and tests/test_lammps.py.
#
# What it does (all outside the repository):
#   1. fetches the LAMMPS 4Feb2025 source release as Debian packages it (trixie's lammps
#      20250204+dfsg.1 orig tarball, checked against its sha256);
#   2. installs the build and run dependencies into the *current* Python environment from PyPI:
#      cython (ML-IAP's Python coupling is Cython), mpich (an MPI with mpicc/mpiexec) and mpi4py;
#   3. configures with CMake (ML-IAP, ML-SNAP, PYTHON, MLIAP_ENABLE_PYTHON, MPI; shared library)
#      and builds with Ninja;
#   4. installs into $PREFIX: bin/lmp, lib/liblammps.so, and python/lammps (LAMMPS's Python module
#      with a copy of liblammps.so beside it). Put $PREFIX/python on PYTHONPATH to use it; the
#      tests do this themselves.
#
# Usage:  . /path/to/venv/bin/activate && bash scripts/build_lammps.sh
# Environment:
#   ALLEGRO_FAST_LAMMPS  install prefix (default ~/.cache/allegro-fast/lammps)
#   PYTHON               the interpreter LAMMPS will be used from (default: python on PATH); it must
#                        be the one with torch and allegro_fast, since LAMMPS embeds it
#   JOBS                 parallel compile jobs (default 2)
#   LAMMPS_SOURCE_URL    override where the source tarball comes from (same sha256 required)
# A 2-core build takes about 10-20 minutes. Re-running reuses the download and the build folder.
set -euo pipefail

PREFIX="${ALLEGRO_FAST_LAMMPS:-$HOME/.cache/allegro-fast/lammps}"
PYTHON="${PYTHON:-python}"
JOBS="${JOBS:-2}"
CACHE="$(dirname "$PREFIX")"
DEB_VERSION="20250204+dfsg.1"
TARBALL="lammps_${DEB_VERSION}.orig.tar.xz"
SHA256="3671165bd52fad36734e0a9136c5bc5ecb225e03988f8c89aa13366a8b53b1c7"
SOURCE_URL="${LAMMPS_SOURCE_URL:-http://deb.debian.org/debian/pool/main/l/lammps/${TARBALL}}"
SOURCE_DIR="$CACHE/src/lammps-4Feb2025"
BUILD_DIR="$CACHE/build-lammps-4Feb2025"

PYTHON="$(command -v "$PYTHON")"
PY_PREFIX="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
echo "LAMMPS for allegro-fast: prefix $PREFIX, Python $PYTHON ($("$PYTHON" -V 2>&1))"
"$PYTHON" -c 'import torch, allegro_fast' \
  || { echo "error: $PYTHON cannot import torch and allegro_fast; activate the project's environment first" >&2; exit 1; }

# 1. Source.
mkdir -p "$CACHE/src"
if [ ! -f "$CACHE/src/$TARBALL" ]; then
  echo "downloading $SOURCE_URL"
  curl -fSL --retry 3 -o "$CACHE/src/$TARBALL.part" "$SOURCE_URL"
  mv "$CACHE/src/$TARBALL.part" "$CACHE/src/$TARBALL"
fi
echo "$SHA256  $CACHE/src/$TARBALL" | sha256sum -c -
if [ ! -f "$SOURCE_DIR/doc/lammps.1" ]; then
  # The examples, manual and tests are not needed to build (and are most of the unpacked size);
  # the man pages are (cmake --install copies them).
  tar -C "$CACHE/src" -xJf "$CACHE/src/$TARBALL" \
    --exclude='*/examples/*' --exclude='*/doc/*' --exclude='*/bench/*' --exclude='*/unittest/*'
  tar -C "$CACHE/src" -xJf "$CACHE/src/$TARBALL" --wildcards '*/doc/*.1'
fi

# 2. Dependencies from PyPI, into the environment LAMMPS will run in.
"$PYTHON" -m pip install --quiet "cython>=3" mpich mpi4py numpy
export PATH="$PY_PREFIX/bin:$PATH"   # mpicxx and mpiexec from the mpich wheel
MPICXX="$PY_PREFIX/bin/mpicxx"
[ -x "$MPICXX" ] || { echo "error: no mpicxx at $MPICXX after installing the mpich wheel" >&2; exit 1; }
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

# 3. Configure and build.
start=$(date +%s)
cmake -S "$SOURCE_DIR/cmake" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -D CMAKE_BUILD_TYPE=Release \
  -D CMAKE_INSTALL_PREFIX="$PREFIX" \
  -D BUILD_SHARED_LIBS=on \
  -D BUILD_MPI=on -D MPI_CXX_COMPILER="$MPICXX" -D MPI_C_COMPILER="$PY_PREFIX/bin/mpicc" \
  -D BUILD_OMP=off \
  -D Python_EXECUTABLE="$PYTHON" \
  -D PKG_PYTHON=on -D PKG_ML-IAP=on -D PKG_ML-SNAP=on -D MLIAP_ENABLE_PYTHON=on \
  -D WITH_JPEG=off -D WITH_PNG=off -D WITH_FFMPEG=off -D WITH_GZIP=off -D WITH_CURL=off \
  -D LAMMPS_INSTALL_RPATH=on
cmake --build "$BUILD_DIR" --parallel "$JOBS"
cmake --install "$BUILD_DIR"
end=$(date +%s)

# 4. LAMMPS's Python module next to its own copy of the library (found first by lammps.core).
rm -rf "$PREFIX/python.tmp"
mkdir -p "$PREFIX/python.tmp"
cp -r "$SOURCE_DIR/python/lammps" "$PREFIX/python.tmp/lammps"
cp -P "$BUILD_DIR"/liblammps.so* "$PREFIX/python.tmp/lammps/"
rm -rf "$PREFIX/python"
mv "$PREFIX/python.tmp" "$PREFIX/python"

echo "built in $((end - start)) s"
PYTHONPATH="$PREFIX/python" "$PYTHON" - <<'EOF'
import lammps
lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
packages = lmp.installed_packages
assert {"ML-IAP", "ML-SNAP", "PYTHON"} <= set(packages), packages
print("LAMMPS", lmp.version(), "packages", packages, "MPI", lmp.has_mpi_support)
lmp.close()
EOF
echo "done: use PYTHONPATH=$PREFIX/python (tests find it at this prefix or at \$ALLEGRO_FAST_LAMMPS)"

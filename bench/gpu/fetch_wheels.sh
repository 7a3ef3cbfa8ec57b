#!/usr/bin/env bash
# Downloads the wheels that the bare GPU image lacks into .wheels/ (git-ignored), for an offline install there:
#   ase, vesin, pyyaml, tqdm, scipy, matplotlib and matplotlib's dependencies (allegro-fast's own needs),
#   pytest-xdist and execnet (the CUDA tests compile their kernels in parallel processes), and,
#   unless --no-nequip, nequip-allegro 0.8.3 with the dependencies the image lacks (nequip, hydra-core,
#   omegaconf, antlr4-python3-runtime, lmdb, matscipy), so that bench/gpu/run_suite.sh can time the authors'
#   package beside ours. torch, triton, e3nn and numpy are never downloaded: the image's builds stay.
#
#   bash bench/gpu/fetch_wheels.sh                       # CPython 3.11 and 3.12, linux x86_64
#   bash bench/gpu/fetch_wheels.sh --python 312          # only 3.12 (the GPU image's python; smaller carry)
#   bash bench/gpu/fetch_wheels.sh --no-scipy            # scipy is ~35 MB per Python version and is on the image
#
# Unless --no-data, it also copies the two small datasets the end-to-end cases read (rMD17 aspirin train split,
# 1 MB; water data_0, 0.5 MB) from ../shared/data into .wheels/data/ (git-ignored, never committed), because the
# device tool carries only the repository: run_suite.sh points ALLEGRO_FAST_DATA there when ../shared/data is absent.
#
# The device tool carries at most 64 MiB with the working tree: fetch for 3.12 only, and leave out scipy where
# the image has it (bench/gpu/run_suite.sh installs only the packages that are missing there).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${WHEELS_DIR:-.wheels}
pythons="311 312"
with_scipy=1
with_nequip=1
with_data=1
while [ $# -gt 0 ]; do
  case "$1" in
    --python) pythons="$2"; shift 2 ;;
    --no-scipy) with_scipy=0; shift ;;
    --no-nequip) with_nequip=0; shift ;;
    --no-data) with_data=0; shift ;;
    --dest) dest="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

packages="ase==3.29.0 vesin==0.6.2 pyyaml==6.0.3 tqdm==4.70.1 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1
fonttools==4.68.0 kiwisolver==1.5.1 pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six packaging
pytest-xdist==3.8.0 execnet==2.1.2"
[ "$with_scipy" = 1 ] && packages="$packages scipy==1.17.1"
[ "$with_nequip" = 1 ] && packages="$packages nequip==0.19.1 nequip-allegro==0.8.3 hydra-core==1.3.8 omegaconf==2.3.1
lmdb matscipy==1.3.1"

mkdir -p "$dest"
pip=${PIP:-"python3 -m pip"}
for version in $pythons; do
  # --no-deps: exactly the list above (the image provides numpy, torch, e3nn, lightning, requests, ...)
  $pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
    --implementation cp --python-version "$version" --abi "cp$version" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any $packages
done
# antlr4-python3-runtime 4.9.3 (hydra-core's pin) is a source distribution only: build its pure-python wheel here.
if [ "$with_nequip" = 1 ] && ! ls "$dest"/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then
  $pip wheel --quiet --no-deps --wheel-dir "$dest" antlr4-python3-runtime==4.9.3
fi
if [ "$with_data" = 1 ]; then
  source_data=${ALLEGRO_FAST_DATA:-../shared/data}
  if [ -d "$source_data" ]; then
    mkdir -p "$dest/data/rmd17" "$dest/data/water"
    cp "$source_data/rmd17/rmd17_aspirin_train_01.npz" "$dest/data/rmd17/"
    cp -r "$source_data/water/data_0" "$dest/data/water/"
  else
    echo "no dataset folder at $source_data: the aspirin and water cases will be skipped there" >&2
  fi
fi
du -sh "$dest"
ls "$dest"

#!/usr/bin/env bash
# The whole GPU suite in one call on a bare GPU machine (torch, triton, e3nn, pytest, pytest-benchmark there):
#   1. pip-installs, offline and without dependencies, the carried wheels (.wheels/, see fetch_wheels.sh) of
#      the packages that the machine's python cannot import yet (torch, triton, e3nn, numpy stay untouched);
#   2. installs this package editable without dependencies (pip install --no-deps -e .);
#   3. runs bench/gpu/suite.py: CUDA tests, end to end, roofline, kernel profiles, plots, all into one folder.
#
#   bash bench/gpu/run_suite.sh                      # writes to $OUT (device tool) or ./suite-out
#   bash bench/gpu/run_suite.sh --out /tmp/s --device cpu --quick     # dry run on a CPU machine
#
# With the device tool (one call, < 10 minutes; fetch the wheels first, here, with network):
#   bash bench/gpu/fetch_wheels.sh --python 312 --no-scipy
#   run(command="bash bench/gpu/run_suite.sh", carry=[".wheels"], timeout_s=600)
set -uo pipefail
export ALLEGRO_SUITE_STARTED=${ALLEGRO_SUITE_STARTED:-$(date +%s)}  # suite.py's budget counts the install too
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
out=${OUT:-suite-out}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$out"
if [ -z "${ALLEGRO_FAST_DATA:-}" ] && [ ! -d ../shared/data ] && [ -d .wheels/data ]; then
  export ALLEGRO_FAST_DATA="$PWD/.wheels/data"  # the datasets fetch_wheels.sh carried along
fi
log=$(mktemp /tmp/allegro_install.XXXXXX.log)  # not in $out: the device tool brings back at most 8 files
{
  echo "+ python: $($python -c 'import sys; print(sys.version)')"
  # import name -> distribution name; only what cannot be imported is installed
  missing=$($python - <<'PY'
import importlib.util
wanted = {"ase": "ase", "vesin": "vesin", "yaml": "pyyaml", "tqdm": "tqdm", "scipy": "scipy",
          "matplotlib": "matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil",
          "dateutil": "python-dateutil", "six": "six", "packaging": "packaging",
          "nequip": "nequip", "allegro": "nequip-allegro", "hydra": "hydra-core", "omegaconf": "omegaconf",
          "antlr4": "antlr4-python3-runtime", "lmdb": "lmdb", "matscipy": "matscipy",
          "xdist": "pytest-xdist execnet"}
print(" ".join(sorted({d for module, dists in wanted.items() if importlib.util.find_spec(module) is None
                       for d in dists.split()})))
PY
)
  if [ -n "$missing" ]; then
    echo "+ installing from .wheels: $missing"
    for dist in $missing; do  # one at a time: a wheel missing from .wheels must not stop the others
      $python -m pip install --quiet --no-deps --no-index --find-links .wheels "$dist" || echo "! could not install $dist"
    done
  fi
  echo "+ pip install --no-deps -e ."
  $python -m pip install --quiet --no-deps --no-build-isolation -e . \
    || $python -m pip install --quiet --no-deps -e . \
    || echo "! editable install failed (the stages below will say what could not be imported)"
} >"$log" 2>&1
tail -5 "$log"
exec $python bench/gpu/suite.py --out "$out" --install-log "$log" "${args[@]}"

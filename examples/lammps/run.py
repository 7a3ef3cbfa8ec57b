"""Run a LAMMPS input file with this Python embedded, so that the model's torch and allegro_fast are the ones
of the current environment (a venv works; the lmp executable would need PYTHONPATH set by hand).

    mpiexec -n 2 python examples/lammps/run.py examples/lammps/in.allegro -var model model.mliap.pkl

Arguments after the input file go to LAMMPS as command-line flags (-var, -log, -screen, ...). LAMMPS's
Python module is taken from the build of scripts/build_lammps.sh ($ALLEGRO_FAST_LAMMPS or
~/.cache/allegro-fast/lammps) when it is not importable already. Use OMP_NUM_THREADS=1 with several ranks per
node, so that each rank's torch does not start one thread per core.
"""

import sys

from allegro_fast.lammps import lammps_python_path

try:
    import lammps
except ImportError:
    if lammps_python_path() is None:
        sys.exit("LAMMPS's Python module was not found: build it with scripts/build_lammps.sh")
    sys.path.insert(0, str(lammps_python_path()))
    import lammps
import lammps.mliap

if len(sys.argv) < 2:
    sys.exit(__doc__)
lmp = lammps.lammps(cmdargs=["-nocite", *sys.argv[2:]])
lammps.mliap.activate_mliappy(lmp)  # make ML-IAP's Python coupling importable before the pair_style line
lmp.file(sys.argv[1])
lmp.close()
lmp.finalize()

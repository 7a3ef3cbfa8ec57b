"""Dataset statistics that set a model's normalisation before training (DESIGN section 1, item 5).

- avg_num_neighbors: mean number of neighbours within r_max over all atoms of the training set;
- per-species energy shift mu_Z: least-squares fit of total energies on species counts, E_s ~ sum_Z N_sZ mu_Z
  (the minimum-norm solution when compositions do not determine every mu_Z, e.g. one molecule);
- energy scale sigma_Z: the root mean square of all force components (one value used for every species).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from ase import Atoms

from .config import AllegroConfig
from .graph import AtomicGraph


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
    avg_num_neighbors: float
    per_species_energy_shift: tuple[float, ...]
    force_rms: float
    num_structures: int

    def apply(self, config: AllegroConfig) -> AllegroConfig:
        """The config with these statistics filled in."""
        return config.replace(
            avg_num_neighbors=self.avg_num_neighbors,
            per_species_energy_shift=self.per_species_energy_shift,
            per_species_energy_scale=(self.force_rms,) * config.num_types,
        )


def _labels(atoms: Atoms, index: int) -> tuple[float, np.ndarray]:
    if atoms.calc is None:
        raise ValueError(f"structure {index} has no energy and forces attached (atoms.calc is None)")
    try:
        return float(atoms.get_potential_energy()), np.asarray(atoms.get_forces())
    except Exception as error:  # ASE raises several kinds for a missing property
        raise ValueError(f"structure {index}: cannot read energy and forces ({error})") from error


def fit_statistics(structures: Sequence[Atoms], config: AllegroConfig, chunk: int = 64) -> DatasetStatistics:
    """Statistics of labelled structures (ASE Atoms carrying energy and forces) for the given config."""
    if len(structures) == 0:
        raise ValueError("cannot fit statistics on an empty dataset")
    index_of = {z: i for i, z in enumerate(config.atomic_numbers)}
    counts = np.zeros((len(structures), config.num_types))
    energies = np.zeros(len(structures))
    squared_force_sum, num_force_components = 0.0, 0
    for s, atoms in enumerate(structures):
        energies[s], forces = _labels(atoms, s)
        for atom, z in enumerate(atoms.numbers):
            if z not in index_of:
                raise ValueError(
                    f"atom {atom} of structure {s} is {atoms.get_chemical_symbols()[atom]}, "
                    f"not one of type_names {list(config.type_names)}"
                )
            counts[s, index_of[z]] += 1
        squared_force_sum += float(np.sum(forces**2))
        num_force_components += forces.size

    num_edges, num_atoms = 0, 0
    for start in range(0, len(structures), chunk):
        graph = AtomicGraph.from_ase(list(structures[start:start + chunk]), r_max=config.r_max)
        num_edges += graph.num_edges
        num_atoms += graph.num_nodes

    shift, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    force_rms = float(np.sqrt(squared_force_sum / max(num_force_components, 1)))
    return DatasetStatistics(
        avg_num_neighbors=max(num_edges / num_atoms, 1e-3),
        per_species_energy_shift=tuple(float(x) for x in shift),
        force_rms=force_rms if force_rms > 0 else 1.0,
        num_structures=len(structures),
    )

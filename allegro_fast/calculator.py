"""ASE calculator for any Allegro model (the torch backend, the reference, or a loaded model).

Neighbour list with a Verlet skin
---------------------------------
A fresh neighbour list (``AtomicGraph.from_ase``) costs a cell-list search every call. During MD atoms
move little per step, so the calculator keeps a list of *candidate* pairs found once with the larger
cutoff r_max + skin, and on every call keeps those candidates whose current distance is below r_max:

    |r_ij(now)| <= |r_ij(build)| + |Δr_i| + |Δr_j|,

so while no atom has moved more than skin / 2 from where it was at the build, every pair now closer than
r_max was closer than r_max + skin at the build and is among the candidates. The filter recomputes the
distances from the positions as given with the same float64 formula as ``graph.py`` and keeps the
candidates' (i, j, S) order, which is the order of a fresh list; so the model sees exactly the edges of a
fresh list, in the same order, and the results agree with ``skin=0`` to the last bit (up to the order in
which the torch kernels happen to sum).

The candidates are rebuilt when an atom has moved more than skin / 2 (minus a round-off margin), when
the cell, pbc, atomic numbers or number of atoms change, or when the filter finds two coinciding atoms
(the rebuild then raises graph.py's error naming them). ``skin=0`` builds a fresh list on every call.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .allocator import retain_freed_memory
from .graph import DUPLICATE_DISTANCE, AtomicGraph, _times_3x3
from .potential import AllegroPotential

__all__ = ["AllegroCalculator"]

# Relative margin on the skin / 2 displacement test, so that round-off in the distances can never let a
# pair at exactly the cutoff slip through.
_SKIN_ROUNDOFF_MARGIN = 1e-9


class _CandidateList:
    """Candidate pairs (i, j, S) within r_max + skin of one structure, and the state they were built from."""

    def __init__(self, atoms, search_cutoff: float, type_names) -> None:
        graph = AtomicGraph.from_ase(atoms, r_max=search_cutoff, type_names=type_names)
        self.positions = np.array(atoms.get_positions(), dtype=np.float64)
        self.cell = np.array(atoms.cell.array, dtype=np.float64)
        self.pbc = np.array(atoms.pbc, dtype=bool)
        self.numbers = np.array(atoms.numbers, dtype=np.int64)
        self.centers, self.neighbours = graph.edge_index.numpy()
        self.shifts = graph.edge_shift.numpy()

    def still_valid(self, atoms, max_displacement: float) -> bool:
        if len(atoms) != len(self.numbers):
            return False
        if not (np.array_equal(atoms.numbers, self.numbers) and np.array_equal(atoms.pbc, self.pbc)):
            return False
        if not np.array_equal(atoms.cell.array, self.cell):
            return False
        displacement = atoms.get_positions() - self.positions
        return float(np.einsum("ac,ac->a", displacement, displacement).max(initial=0.0)) <= max_displacement**2

    def edges_within(self, positions: np.ndarray, r_max: float):
        """(centers, neighbours, shifts) of the candidates closer than r_max, in (i, j, S) order, and
        whether two atoms coincide (closer than DUPLICATE_DISTANCE)."""
        vectors = (
            np.take(positions, self.neighbours, axis=0)
            - np.take(positions, self.centers, axis=0)
            + _times_3x3(self.shifts, self.cell)
        )
        distances = np.sqrt(np.einsum("ec,ec->e", vectors, vectors))  # as graph.py computes them
        kept = np.flatnonzero(distances < r_max)
        coinciding = bool(len(distances)) and float(distances.min()) < DUPLICATE_DISTANCE
        return self.centers[kept], self.neighbours[kept], self.shifts[kept], coinciding


def graph_from_edges(positions, atomic_numbers, cell, pbc, centers, neighbours, shifts, r_max: float) -> AtomicGraph:
    """One-structure AtomicGraph from a precomputed edge list (numpy arrays, edges sorted by center).

    Nothing is checked here: the edges must follow graph.py's conventions (directed, (i, j, S) order).
    """
    num_atoms = positions.shape[0]
    edges_per_center = np.bincount(centers, minlength=num_atoms)
    center_ptr = np.concatenate([[0], np.cumsum(edges_per_center)]).astype(np.int64)
    return AtomicGraph(
        positions=torch.as_tensor(positions, dtype=torch.float64),
        atomic_numbers=torch.as_tensor(atomic_numbers, dtype=torch.int64),
        edge_index=torch.as_tensor(np.stack([centers, neighbours]), dtype=torch.int64),
        edge_shift=torch.as_tensor(shifts, dtype=torch.int64),
        cell=torch.as_tensor(cell, dtype=torch.float64).reshape(1, 3, 3),
        pbc=torch.as_tensor(pbc, dtype=torch.bool).reshape(1, 3),
        batch=torch.zeros(num_atoms, dtype=torch.int64),
        num_atoms=torch.tensor([num_atoms], dtype=torch.int64),
        center_ptr=torch.as_tensor(center_ptr),
        r_max=float(r_max),
    )


class AllegroCalculator(Calculator):
    """energy, free_energy, forces and (for fully periodic cells) stress in ASE units (eV, eV/Å, eV/Å^3).

    ``skin`` (Å, default 1.0): the neighbour list is searched with r_max + skin and reused between calls
    while it is exact (see the module docstring); 0 rebuilds it on every call. ``neighbor_list_builds``
    counts the searches and ``neighbor_list_reuses`` the calls that reused one. On the CPU,
    ``retain_memory`` (default True) calls `allegro_fast.retain_freed_memory()`, which keeps freed memory in
    the process so that every MD step reuses the last step's pages (15-20% faster on small systems).
    ``compile`` (default False): run the model through `export.compile_model` (torch.compile; a string names
    the torch.compile backend, True is inductor). The first call compiles (about a minute on 2 CPU cores),
    later calls of any size reuse the program; on 2 CPU cores it was 1.2x faster than eager on 256-atom Ag
    and 2.4x on a 31-atom cell (README, "torch.compile, torch.export and AOTInductor").
    ``cuda_graphs`` (default False; CUDA only): compile for static shapes with the edges padded to a capacity
    (`export.CUDA_GRAPHS`: `compile_model(mode="reduce-overhead", dynamic=False, edge_headroom="auto")`) and replay
    one CUDA graph per step instead of launching every kernel from Python, which bounds small systems on a GPU
    (bench/README, GPU). The first step compiles and captures; a step with more edges than the capacity raises it
    (one more compilation).
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: AllegroPotential,
        device: str | torch.device | None = None,
        skin: float = 1.0,
        retain_memory: bool = True,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        skin = float(skin)
        if not (np.isfinite(skin) and skin >= 0.0):
            raise ValueError(f"AllegroCalculator: skin must be a finite number >= 0 Å, got {skin!r}")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        if retain_memory and self.device.type == "cpu":
            retain_freed_memory()
        self.skin = skin
        self.r_max = float(model.config.r_max)
        self.neighbor_list_builds = 0
        self.neighbor_list_reuses = 0
        self._candidates: _CandidateList | None = None
        self._compiled = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"AllegroCalculator: cuda_graphs needs a CUDA device, the model is on {self.device}")
            if compile not in (False, True, "inductor"):
                raise ValueError(f"AllegroCalculator: cuda_graphs compiles with inductor, got compile={compile!r}")
            from .export import CUDA_GRAPHS, compile_model

            self._compiled = compile_model(self.model, **CUDA_GRAPHS)
        elif compile:
            from .export import compile_model

            self._compiled = compile_model(self.model, backend="inductor" if compile is True else str(compile))

    @classmethod
    def from_file(cls, path, backend: str | None = None, **kwargs) -> AllegroCalculator:
        """The calculator of a model file written by training or `allegro_fast.save` (`allegro_fast.load`; backend
        "torch", "triton" or "reference" overrides the saved one); kwargs as for the constructor, e.g.
        ``AllegroCalculator.from_file("model.pt", backend="triton", device="cuda", cuda_graphs=True)``."""
        from .serialization import load

        return cls(load(path, backend=backend), **kwargs)

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """ASE's answer (`compare_atoms`), found faster where nothing changed: ASE asks two to three times per MD
        step with the same atoms, and exact equality of the cell, pbc and every array implies its answer, [] (its
        tolerance only lets more through). Anything else goes to ASE's comparison. Checked: the arrays that ASE
        checks (`all_changes`: positions, numbers, initial charges and magnetic moments), not momenta."""
        old = self.atoms
        if old is not None and np.array_equal(old.pbc, atoms.pbc) and np.array_equal(old.cell.array, atoms.cell.array):
            checked = [key for key in all_changes if key in old.arrays or key in atoms.arrays]
            if all(key in old.arrays and key in atoms.arrays and np.array_equal(old.arrays[key], atoms.arrays[key])
                   for key in checked):
                return []
        return super().check_state(atoms, tol)

    def _graph(self, atoms) -> AtomicGraph:
        type_names = self.model.config.type_names
        if self.skin == 0.0:
            self.neighbor_list_builds += 1
            return AtomicGraph.from_ase(atoms, r_max=self.r_max, type_names=type_names)
        max_displacement = 0.5 * self.skin - _SKIN_ROUNDOFF_MARGIN * (self.r_max + self.skin)
        candidates = self._candidates
        if candidates is not None and candidates.still_valid(atoms, max_displacement):
            self.neighbor_list_reuses += 1
        else:
            self._candidates = None  # a failed build must not leave a stale list behind
            candidates = _CandidateList(atoms, self.r_max + self.skin, type_names)
            self._candidates = candidates
            self.neighbor_list_builds += 1
        positions = np.array(atoms.get_positions(), dtype=np.float64)
        centers, neighbours, shifts, coinciding = candidates.edges_within(positions, self.r_max)
        if coinciding:
            self._candidates = None
            return AtomicGraph.from_ase(atoms, r_max=self.r_max, type_names=type_names)  # raises, naming the atoms
        return graph_from_edges(
            positions, candidates.numbers, candidates.cell, candidates.pbc, centers, neighbours, shifts, self.r_max
        )

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        graph = self._graph(self.atoms).to(device=self.device)
        want_stress = "stress" in properties and bool(self.atoms.pbc.all())
        if self._compiled is not None:
            out = self._compiled(graph)  # energy, forces and stress (zero without a volume), detached
        else:
            out = self.model(graph, compute_forces=True, compute_stress=want_stress, create_graph=False)
        energy = float(out["energy"].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if want_stress:
            stress = out["stress"].detach().cpu().double().numpy()[0]
            self.results["stress"] = np.array(
                [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]]
            )

"""Atomic graphs: a batch of structures with a directed, periodic neighbour list.

Conventions
-----------
N atoms in B structures, E directed edges.

* ``positions`` (N, 3) float, Å, exactly as given (never wrapped into the cell).
* ``cell`` (B, 3, 3) float; the rows are the lattice vectors a, b, c. A structure
  without a cell (a molecule) has an all-zero cell.
* ``pbc`` (B, 3) bool; periodicity along each lattice vector.
* ``edge_index`` (2, E) int64; row 0 is the center atom i, row 1 the neighbour j,
  both global atom indices (the atoms of structure b are offset by the number of
  atoms in structures 0 .. b-1).
* ``edge_shift`` (E, 3) int64 integer lattice shifts S_ij, such that the edge vector is

      r_ij = positions[j] - positions[i] + S_ij @ cell[batch[i]]

  S_ij is zero along non-periodic directions.
* An edge (i, j, S_ij) exists for every ordered pair with 0 < |r_ij| < r_max
  (strictly below r_max), including an atom and its own periodic images, and the
  same pair with several shifts when the cell is smaller than the cutoff. Both
  directions are present: (i, j, S) and (j, i, -S).
* Edges are sorted by (i, j, S_0, S_1, S_2) lexicographically, so the graph is the
  same from run to run, and ``center_ptr`` (N + 1,) holds the CSR row pointers:
  the edges of center i are ``edge_index[:, center_ptr[i]:center_ptr[i + 1]]``.

The edge set is found in float64 from the positions as given, whatever dtype the
graph is then stored in.

Neighbour search
----------------
vesin (a cell list in C++) finds the candidate pairs. It was the fastest library
that is correct on every case measured by ``bench/neighborlist.py`` (results in
``bench/results/neighborlist_cpu.json``): bulk fcc Ag, triclinic cells smaller than
the cutoff, mixed periodic/open boundaries, molecules without a cell, positions
outside the cell. Around it, so that the result never depends on its internals:

* vesin always gets a fully periodic box. A non-periodic direction becomes a
  periodic one, orthogonal to the periodic lattice vectors and longer than the
  extent of the atoms along it plus the cutoff, so no image along it comes within
  the cutoff (pairs with a shift along it are dropped in any case). vesin's own
  open-boundary path is correct but can take seconds for sparse structures with
  mixed boundaries and a small cutoff.
* For boxes very thin along one vector and very wide along another, where vesin's
  cell list would divide by zero and kill the process, vesin searches with a
  larger cutoff (see ``_cutoff_safe_for_vesin``).
* Atoms are moved into that box by whole box vectors before the search (vesin
  gets slow when atoms lie many cells away), and the shifts are corrected back so
  that they refer to the positions as given.
* vesin is asked for a slightly larger cutoff; the final edge set, the strict
  ``< r_max`` test and the check for coinciding atoms use distances recomputed here
  from the positions as given, with the formula above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import ase
import ase.data
import numpy as np
import torch
import vesin

__all__ = ["AtomicGraph", "DUPLICATE_DISTANCE"]

# Two atoms (or an atom and a periodic image) closer than this are an input error, Å.
DUPLICATE_DISTANCE = 1e-6

# A periodic cell whose vectors span less than this fraction of the volume (area,
# for two periodic directions) of a box with the same edge lengths is singular.
_SINGULAR_CELL_TOLERANCE = 1e-8

# Refuse cells so small compared to r_max that each atom would need more periodic
# images than this to be searched (about half of them end up as edges).
_MAX_PERIODIC_IMAGES = 10**6

# vesin is asked for r_max * (1 + margin); the exact cutoff is applied afterwards.
_SEARCH_MARGIN = 1e-8

# Most cells in vesin's cell list before it scales their number down.
_VESIN_MAX_CELLS = 1e5

_NUM_CHEMICAL_SYMBOLS = 119  # Z = 0 ('X', dummy) to 118


@dataclasses.dataclass
class AtomicGraph:
    """A batch of B structures with N atoms and E directed edges (see module docstring)."""

    positions: torch.Tensor  # (N, 3) float, Å
    atomic_numbers: torch.Tensor  # (N,) int64
    edge_index: torch.Tensor  # (2, E) int64: (center i, neighbour j)
    edge_shift: torch.Tensor  # (E, 3) int64: r_ij = r_j - r_i + S_ij @ cell
    cell: torch.Tensor  # (B, 3, 3) float, rows are lattice vectors
    pbc: torch.Tensor  # (B, 3) bool
    batch: torch.Tensor  # (N,) int64 structure index of each atom
    num_atoms: torch.Tensor  # (B,) int64
    center_ptr: torch.Tensor  # (N + 1,) int64 CSR row pointers over edges
    r_max: float

    # The torch backend's neighbour-slot count K, where a traced program (export.ForceField) is given it by its
    # caller, as a symbolic size; None lets the model choose from center_ptr. A class attribute, not a field.
    fixed_slots = None

    @property
    def num_structures(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def edge_vectors(self, positions: Optional[torch.Tensor] = None, cell: Optional[torch.Tensor] = None) -> torch.Tensor:
        """r_ij = positions[j] - positions[i] + S_ij @ cell[batch[i]], shape (E, 3) (a transposed view).

        ``positions`` and ``cell`` default to the graph's own; pass others (e.g. strained, or in another
        dtype, with requires_grad) to differentiate with respect to them.
        """
        positions = self.positions if positions is None else positions
        cell = self.cell if cell is None else cell
        centers, neighbours = self.edge_index
        # Computed component-major, (3, E), and returned as its (E, 3) transpose (a view): on a CPU an op over
        # rows of three costs many times one over long contiguous rows, and the model reads x, y, z apart.
        # index_select, whose backward is an index_add (indexing's is a slower accumulating index_put).
        columns = positions.t().contiguous()
        differences = columns.index_select(1, neighbours) - columns.index_select(1, centers)
        shifts = self.edge_shift.t().to(positions.dtype, memory_format=torch.contiguous_format)  # (3, E)
        if cell.shape[0] == 1:
            return torch.addmm(differences, cell[0].t(), shifts).t()
        # Per edge, the cell of its structure: (3 k, 3 c, E) entries cell[b, k, c], then sum_k S_k cell[k, c].
        edge_cell = cell.reshape(-1, 9).t().index_select(1, self.batch.index_select(0, centers)).view(3, 3, -1)
        return (differences + (shifts.unsqueeze(1) * edge_cell).sum(0)).t()

    # ------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------
    @classmethod
    def from_ase(
        cls,
        atoms,
        r_max: float,
        type_names: Optional[Sequence[str]] = None,
        dtype: torch.dtype = torch.float64,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "AtomicGraph":
        """Build the graph of one ``ase.Atoms`` or of a list of them (a batch).

        ``type_names`` (chemical symbols): if given, every atom's species must be one of
        them. Atoms without a cell and pbc all False are molecules (no periodic images).
        """
        if isinstance(atoms, ase.Atoms):
            structures = [atoms]
        else:
            try:
                structures = list(atoms)
            except TypeError:
                raise TypeError(
                    f"from_ase expects an ase.Atoms or a list of them, got {type(atoms).__name__}"
                ) from None
        if len(structures) == 0:
            raise ValueError("from_ase got an empty list: a batch needs at least one structure")

        arrays = []
        for structure_index, structure in enumerate(structures):
            if not isinstance(structure, ase.Atoms):
                raise TypeError(
                    f"structure {structure_index} is a {type(structure).__name__}, not an ase.Atoms"
                )
            arrays.append(
                (
                    np.array(structure.get_positions(), dtype=np.float64),
                    np.array(structure.numbers, dtype=np.int64),
                    np.array(structure.cell.array, dtype=np.float64),
                    np.array(structure.pbc, dtype=bool),
                )
            )
        return cls._from_structures(arrays, r_max, type_names, dtype, device)

    @classmethod
    def from_arrays(
        cls,
        positions,
        atomic_numbers,
        r_max: float,
        cell=None,
        pbc=None,
        dtype: torch.dtype = torch.float64,
        device: Optional[Union[str, torch.device]] = None,
        *,
        type_names: Optional[Sequence[str]] = None,
    ) -> "AtomicGraph":
        """Build the graph of one structure from numpy arrays or torch tensors.

        positions (N, 3) in Å, atomic_numbers (N,) integers, cell (3, 3) with lattice
        vectors as rows (None: no cell), pbc a bool or three bools (None: periodic along
        all three directions if a cell is given, not periodic otherwise).
        """
        positions = _as_numpy(positions)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise ValueError(
                f"structure 0: positions must have shape (N, 3), got {positions.shape}"
            )
        if not _is_real(positions):
            raise ValueError(
                f"structure 0: positions must be real numbers, got dtype {positions.dtype}"
            )
        positions = positions.astype(np.float64)
        num_atoms = positions.shape[0]

        atomic_numbers = _as_numpy(atomic_numbers)
        if atomic_numbers.ndim != 1:
            raise ValueError(
                f"structure 0: atomic_numbers must have shape (N,), got {atomic_numbers.shape}"
            )
        if atomic_numbers.shape[0] != num_atoms:
            raise ValueError(
                f"structure 0: atomic_numbers has {atomic_numbers.shape[0]} entries but positions "
                f"has {num_atoms} atoms"
            )
        if num_atoms > 0 and not np.issubdtype(atomic_numbers.dtype, np.integer):
            raise ValueError(
                f"structure 0: atomic_numbers must be integers, got dtype {atomic_numbers.dtype}"
            )
        atomic_numbers = atomic_numbers.astype(np.int64)

        has_cell = cell is not None
        if cell is None:
            cell = np.zeros((3, 3))
        cell = _as_numpy(cell)
        if cell.shape != (3, 3):
            raise ValueError(
                "structure 0: cell must have shape (3, 3) with lattice vectors as rows, "
                f"got {cell.shape}"
            )
        if not _is_real(cell):
            raise ValueError(f"structure 0: cell must be real numbers, got dtype {cell.dtype}")
        cell = cell.astype(np.float64)

        if pbc is None:
            pbc = np.full(3, has_cell)
        pbc = _as_numpy(pbc)
        if pbc.ndim == 0:
            pbc = np.full(3, pbc.item())
        if pbc.shape != (3,):
            raise ValueError(
                f"structure 0: pbc must be a bool or three bools, got shape {pbc.shape}"
            )
        if pbc.dtype != np.bool_:
            if np.issubdtype(pbc.dtype, np.integer) and np.isin(pbc, (0, 1)).all():
                pbc = pbc.astype(bool)
            else:
                raise ValueError(f"structure 0: pbc must be booleans, got {pbc.tolist()}")

        return cls._from_structures(
            [(positions, atomic_numbers, cell, pbc)], r_max, type_names, dtype, device
        )

    @classmethod
    def _from_structures(cls, structures, r_max, type_names, dtype, device) -> "AtomicGraph":
        """structures: list of (positions, atomic_numbers, cell, pbc) numpy arrays."""
        r_max = _checked_r_max(r_max)
        _check_float_dtype(dtype)
        allowed_numbers = _allowed_atomic_numbers(type_names)

        edge_indices, edge_shifts = [], []
        atom_offset = 0
        for structure_index, (positions, atomic_numbers, cell, pbc) in enumerate(structures):
            _check_structure(structure_index, positions, atomic_numbers, cell)
            if allowed_numbers is not None:
                _check_species(structure_index, atomic_numbers, allowed_numbers, type_names)
            centers, neighbours, shifts = _structure_edges(
                structure_index, positions, cell, pbc, r_max
            )
            edge_indices.append(np.stack([centers, neighbours]) + atom_offset)
            edge_shifts.append(shifts)
            atom_offset += positions.shape[0]

        num_atoms = np.array([s[0].shape[0] for s in structures], dtype=np.int64)
        edge_index = np.concatenate(edge_indices, axis=1)
        edges_per_center = np.bincount(edge_index[0], minlength=atom_offset)
        center_ptr = np.concatenate([[0], np.cumsum(edges_per_center)]).astype(np.int64)

        def float_tensor(array):
            return torch.as_tensor(array, dtype=dtype, device=device)

        def int_tensor(array):
            return torch.as_tensor(array, dtype=torch.int64, device=device)

        return cls(
            positions=float_tensor(np.concatenate([s[0] for s in structures])),
            atomic_numbers=int_tensor(np.concatenate([s[1] for s in structures])),
            edge_index=int_tensor(edge_index),
            edge_shift=int_tensor(np.concatenate(edge_shifts)),
            cell=float_tensor(np.stack([s[2] for s in structures])),
            pbc=torch.as_tensor(
                np.stack([s[3] for s in structures]), dtype=torch.bool, device=device
            ),
            batch=int_tensor(np.repeat(np.arange(len(structures)), num_atoms)),
            num_atoms=int_tensor(num_atoms),
            center_ptr=int_tensor(center_ptr),
            r_max=r_max,
        )

    def to(
        self,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "AtomicGraph":
        """A copy on ``device``; ``dtype`` applies to the float tensors (positions, cell) only."""
        if dtype is not None:
            _check_float_dtype(dtype)
        moved = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            moved[field.name] = value
        return AtomicGraph(**moved)


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_real(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)


def _checked_r_max(r_max) -> float:
    try:
        value = float(r_max)
    except (TypeError, ValueError):
        raise ValueError(f"r_max must be a positive finite number, got {r_max!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"r_max must be a positive finite number, got {r_max!r}")
    return value


def _check_float_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a torch floating-point dtype, got {dtype!r}")


def _allowed_atomic_numbers(type_names) -> Optional[np.ndarray]:
    if type_names is None:
        return None
    if isinstance(type_names, str):
        raise ValueError(
            f"type_names must be a list of chemical symbols, got the string {type_names!r}"
        )
    numbers = []
    for name in type_names:
        if name not in ase.data.atomic_numbers:
            raise ValueError(f"type_names contains {name!r}, which is not a chemical symbol")
        numbers.append(ase.data.atomic_numbers[name])
    return np.array(numbers, dtype=np.int64)


def _symbol(atomic_number: int) -> str:
    if 0 <= atomic_number < _NUM_CHEMICAL_SYMBOLS:
        return ase.data.chemical_symbols[atomic_number]
    return f"Z={atomic_number}"


def _check_species(structure_index, atomic_numbers, allowed_numbers, type_names) -> None:
    unknown = np.flatnonzero(~np.isin(atomic_numbers, allowed_numbers))
    if len(unknown) > 0:
        atom = int(unknown[0])
        number = int(atomic_numbers[atom])
        others = f" (and {len(unknown) - 1} more atoms)" if len(unknown) > 1 else ""
        raise ValueError(
            f"structure {structure_index}, atom {atom}: species {_symbol(number)!r} (Z={number}) "
            f"is not in type_names {list(type_names)}{others}"
        )


def _check_structure(structure_index, positions, atomic_numbers, cell) -> None:
    """Non-empty, finite positions and cell, valid atomic numbers."""
    if positions.shape[0] == 0:
        raise ValueError(f"structure {structure_index} is empty (0 atoms)")
    bad_atoms = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if len(bad_atoms) > 0:
        atom = int(bad_atoms[0])
        others = f" (and {len(bad_atoms) - 1} more atoms)" if len(bad_atoms) > 1 else ""
        raise ValueError(
            f"structure {structure_index}, atom {atom}: non-finite position "
            f"{positions[atom].tolist()}{others}"
        )
    if not np.isfinite(cell).all():
        raise ValueError(f"structure {structure_index}: non-finite cell {cell.tolist()}")
    bad_numbers = np.flatnonzero((atomic_numbers < 0) | (atomic_numbers >= _NUM_CHEMICAL_SYMBOLS))
    if len(bad_numbers) > 0:
        atom = int(bad_numbers[0])
        raise ValueError(
            f"structure {structure_index}, atom {atom}: atomic number {int(atomic_numbers[atom])} "
            f"is not between 0 and {_NUM_CHEMICAL_SYMBOLS - 1}"
        )


_AXIS_NAMES = "abc"


def _periodic_lattice_box(structure_index, cell, pbc) -> np.ndarray:
    """The cell with its non-periodic rows replaced by an orthonormal completion.

    The completion vectors are orthogonal to the periodic lattice vectors and to each
    other (the identity when nothing is periodic). Checks that the periodic lattice
    vectors are non-zero and linearly independent.
    """
    periodic = np.flatnonzero(pbc)
    if len(periodic) == 0:
        return np.eye(3)

    box = np.array(cell, dtype=np.float64)
    lattice = box[periodic]
    lengths = np.linalg.norm(lattice, axis=1)
    for direction, length in zip(periodic, lengths):
        if length == 0.0:
            raise ValueError(
                f"structure {structure_index}: singular cell, lattice vector "
                f"{_AXIS_NAMES[direction]} (row {direction}) is zero but pbc is True along it "
                f"(pbc={pbc.tolist()})"
            )
    # sqrt(det(L L^T)) is the length / area / volume spanned by the periodic vectors
    spanned = math.sqrt(max(float(np.linalg.det(lattice @ lattice.T)), 0.0))
    if spanned <= _SINGULAR_CELL_TOLERANCE * float(np.prod(lengths)):
        names = ", ".join(_AXIS_NAMES[d] for d in periodic)
        measure = ["length", "area", "volume"][len(periodic) - 1]
        raise ValueError(
            f"structure {structure_index}: singular cell, the periodic lattice vectors ({names}) "
            f"are linearly dependent ({measure} {spanned:.3g}, cell={cell.tolist()}, "
            f"pbc={pbc.tolist()})"
        )

    if len(periodic) == 1:
        axis = lattice[0] / lengths[0]
        helper = np.eye(3)[np.argmin(np.abs(axis))]
        first = np.cross(axis, helper)
        first /= np.linalg.norm(first)
        completion = [first, np.cross(axis, first)]
    elif len(periodic) == 2:
        normal = np.cross(lattice[0], lattice[1])
        completion = [normal / np.linalg.norm(normal)]
    else:
        completion = []
    for direction, vector in zip(np.flatnonzero(~pbc), completion):
        box[direction] = vector

    # A lattice vector v with a non-zero component n_k along direction k has
    # |v| >= |n_k| * spacing_k, so spacings >= DUPLICATE_DISTANCE rule out an atom
    # coinciding with one of its own images.
    for direction, length in zip(periodic, lengths):
        if length < DUPLICATE_DISTANCE:
            shift = [int(k == direction) for k in range(3)]
            raise ValueError(
                f"structure {structure_index}: atom 0 coincides with its own periodic image "
                f"(shift {shift}, distance {length:.3g} Å < {DUPLICATE_DISTANCE} Å), and so "
                f"does every atom: lattice vector {_AXIS_NAMES[direction]} is {length:.3g} Å long"
            )
    spacing = _plane_spacings(box)
    for direction in periodic:
        if spacing[direction] < DUPLICATE_DISTANCE:
            raise ValueError(
                f"structure {structure_index}: singular cell, lattice planes along "
                f"{_AXIS_NAMES[direction]} are {spacing[direction]:.3g} Å apart "
                f"(< {DUPLICATE_DISTANCE} Å; cell={cell.tolist()}, pbc={pbc.tolist()})"
            )
    return box


def _plane_spacings(box: np.ndarray) -> np.ndarray:
    """Distance between consecutive lattice planes along each of the three box vectors."""
    return 1.0 / np.linalg.norm(np.linalg.inv(box), axis=0)


def _check_number_of_images(structure_index, cell, pbc, box, search_cutoff, r_max) -> None:
    """Refuse cells so small that each atom has an absurd number of periodic images."""
    spacing = _plane_spacings(box)[pbc]
    images = float(np.prod(2.0 * np.ceil(search_cutoff / spacing) + 1.0))
    if images > _MAX_PERIODIC_IMAGES:
        raise ValueError(
            f"structure {structure_index}: cell too small for r_max={r_max}: lattice plane "
            f"spacings {spacing.tolist()} Å would need ~{images:.3g} periodic images of "
            f"each atom (cell={cell.tolist()}, pbc={pbc.tolist()})"
        )


def _cutoff_safe_for_vesin(box: np.ndarray, cutoff: float) -> float:
    """``cutoff``, or a larger one where vesin's cell list would crash the process.

    vesin (checked with 0.6.2) uses max(1, floor(spacing / cutoff)) cells along each box
    vector and, above 1e5 cells in total, scales the three counts down by a common
    factor; a direction that falls to zero cells makes it divide by zero, which kills
    the process with SIGFPE (for example a 4 x 4000 x 4000 Å box with a 5 Å cutoff).
    For such boxes, very thin along one vector and very wide along another, search
    with a cutoff large enough that no scaling is needed: more candidate pairs, which
    the exact ``< r_max`` filter removes afterwards.
    """

    def number_of_cells(search_cutoff):
        return np.maximum(1.0, np.floor(_plane_spacings(box) / search_cutoff))

    cells = number_of_cells(cutoff)
    total = float(np.prod(cells))
    if total <= _VESIN_MAX_CELLS or cells.min() * np.cbrt(_VESIN_MAX_CELLS / total) >= 2.0:
        return cutoff  # no scaling, or scaling keeps at least ~2 cells per direction
    while np.prod(number_of_cells(cutoff)) > _VESIN_MAX_CELLS / 2:
        cutoff *= 1.05
    return cutoff


def _padded_search_box(positions, lattice_box, pbc, search_cutoff) -> np.ndarray:
    """A fully periodic box for the neighbour search.

    Non-periodic directions (unit rows of ``lattice_box`` orthogonal to everything
    else) are stretched to the extent of the atoms along them plus the cutoff plus
    1 Å of padding, so that no periodic image along them comes within the cutoff
    (any that would, are dropped after the search anyway).
    """
    box = lattice_box.copy()
    for direction in np.flatnonzero(~pbc):
        coordinates = positions @ box[direction]
        extent = float(coordinates.max() - coordinates.min())
        box[direction] *= extent + search_cutoff + 1.0
    return box


# ----------------------------------------------------------------------------------
# Neighbour search
# ----------------------------------------------------------------------------------
def _structure_edges(structure_index, positions, cell, pbc, r_max):
    """(centers, neighbours, shifts) of one structure, sorted by (i, j, S), local indices."""
    search_cutoff = max(r_max, 2.0 * DUPLICATE_DISTANCE) * (1.0 + _SEARCH_MARGIN)
    lattice_box = _periodic_lattice_box(structure_index, cell, pbc)
    box = _padded_search_box(positions, lattice_box, pbc, search_cutoff)
    search_cutoff = _cutoff_safe_for_vesin(box, search_cutoff)
    _check_number_of_images(structure_index, cell, pbc, box, search_cutoff, r_max)

    # move atoms into the box by whole box vectors, so vesin sees wrapped positions
    box_offsets = np.floor(_times_3x3(positions, np.linalg.inv(box))).astype(np.int64)
    wrapped_positions = positions - _times_3x3(box_offsets, box)

    neighbour_list = vesin.NeighborList(cutoff=search_cutoff, full_list=True)
    centers, neighbours, shifts = neighbour_list.compute(
        wrapped_positions, box, True, quantities="ijS", copy=True
    )
    centers = centers.astype(np.int64)
    neighbours = neighbours.astype(np.int64)
    # r_j' - r_i' + S' box with r' = r - offset box  =>  S = S' - offset_j + offset_i
    shifts = shifts.astype(np.int64) - box_offsets[neighbours] + box_offsets[centers]
    # images across a padded (non-periodic) direction are artefacts of the search box;
    # the padding keeps them out of reach unless the cutoff was enlarged for vesin
    real = ~shifts[:, ~pbc].any(axis=1)
    if not real.all():
        centers, neighbours, shifts = centers[real], neighbours[real], shifts[real]

    # exact distances from the positions as given
    vectors = (
        np.take(positions, neighbours, axis=0)
        - np.take(positions, centers, axis=0)
        + _times_3x3(shifts, cell)
    )
    distances = np.sqrt(np.einsum("ec,ec->e", vectors, vectors))

    coinciding = np.flatnonzero(distances < DUPLICATE_DISTANCE)
    if len(coinciding) > 0:
        _raise_coinciding(structure_index, centers, neighbours, shifts, distances, coinciding)

    kept = np.flatnonzero(distances < r_max)
    order = kept[
        _lexicographic_order(centers[kept], neighbours[kept], shifts[kept], positions.shape[0])
    ]
    return centers[order], neighbours[order], shifts[order]


def _times_3x3(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """rows (M, 3) @ matrix (3, 3) in float64, as three broadcast products.

    Avoids BLAS, whose thread start-up dominates (and varies wildly on a busy machine)
    for such thin products.
    """
    rows = rows.astype(np.float64, copy=False)
    return rows[:, 0:1] * matrix[0] + rows[:, 1:2] * matrix[1] + rows[:, 2:3] * matrix[2]


def _lexicographic_order(centers, neighbours, shifts, num_atoms) -> np.ndarray:
    """Permutation sorting the edges by (i, j, S_0, S_1, S_2); (i, j, S) are unique."""
    if len(centers) == 0:
        return np.zeros(0, dtype=np.int64)
    shift_min = shifts.min(axis=0)
    shift_span = shifts.max(axis=0) - shift_min + 1
    if num_atoms * num_atoms * float(np.prod(shift_span)) < 2.0**62:
        # one int64 key per edge (mixed radix), several times faster than lexsort
        key = centers * num_atoms + neighbours
        for axis in range(3):
            key = key * shift_span[axis] + (shifts[:, axis] - shift_min[axis])
        return np.argsort(key)
    return np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], neighbours, centers))


def _raise_coinciding(structure_index, centers, neighbours, shifts, distances, coinciding):
    """ValueError naming the first (by atom index) pair of atoms closer than DUPLICATE_DISTANCE."""
    order = np.lexsort((neighbours[coinciding], centers[coinciding]))
    first = coinciding[order[0]]
    i, j = int(centers[first]), int(neighbours[first])
    shift = shifts[first].tolist()
    if i == j:
        raise ValueError(
            f"structure {structure_index}: atom {i} coincides with its own periodic image "
            f"(shift {shift}, distance {distances[first]:.3g} Å < {DUPLICATE_DISTANCE} Å)"
        )
    through_image = ""
    if any(shift):
        through_image = f", atom {j} through its periodic image shifted by {shift}"
    raise ValueError(
        f"structure {structure_index}: atoms {i} and {j} are at the same place{through_image} "
        f"(distance {distances[first]:.3g} Å < {DUPLICATE_DISTANCE} Å)"
    )

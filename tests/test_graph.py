"""Tests of allegro_fast.graph.AtomicGraph.

The neighbour list is compared with a brute-force search over periodic images (the
oracle below) as a SET of (i, j, S) with distances, on bulk, small triclinic cells
(atoms see their own images), mixed boundaries, molecules, batches and random
structures; then ordering, CSR pointers, determinism, the strict cutoff, and the
ValueError raised for every kind of bad input.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ase
import ase.build
import numpy as np
import pytest
import torch

from allegro_fast.graph import AtomicGraph

R_MAX = 5.0


# --------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------
def brute_force_edges(positions, cell, pbc, r_max) -> dict:
    """{(i, j, S0, S1, S2): distance} for all 0 < |r_j - r_i + S @ cell| < r_max.

    Every atom is first moved next to the origin by a whole lattice vector (and the
    shifts corrected back at the end). For the periodic lattice vectors L and their
    pseudo-inverse L+, (d + n L) L+ = d L+ + n, so |n_k + (d L+)_k| <= |d + n L| |L+_k|:
    enumerating n_k within r_max |L+_k| of -(d L+)_k, over all pairs, finds every image.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    periodic = np.flatnonzero(pbc)
    offsets = np.zeros((len(positions), 3), dtype=np.int64)
    shift_ranges = [np.zeros(1, dtype=np.int64)] * 3
    if len(periodic) > 0:
        pseudo_inverse = np.linalg.pinv(cell[periodic])
        offsets[:, periodic] = np.round(positions @ pseudo_inverse).astype(np.int64)
        positions = positions - offsets @ cell
        fractional = ((positions[None] - positions[:, None]).reshape(-1, 3)) @ pseudo_inverse
        reach = r_max * np.linalg.norm(pseudo_inverse, axis=0)
        for column, direction in enumerate(periodic):
            low = np.floor(np.min(-fractional[:, column]) - reach[column]) - 1
            high = np.ceil(np.max(-fractional[:, column]) + reach[column]) + 1
            shift_ranges[direction] = np.arange(int(low), int(high) + 1)
    shifts = np.stack(np.meshgrid(*shift_ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    vectors = positions[None, :, None] - positions[:, None, None] + (shifts @ cell)[None, None]
    distances = np.linalg.norm(vectors, axis=-1)  # (i, j, shift)
    edges = {}
    for i, j, s in zip(*np.nonzero((distances > 0) & (distances < r_max))):
        shift = shifts[s] - offsets[j] + offsets[i]
        edges[(int(i), int(j), *map(int, shift))] = float(distances[i, j, s])
    return edges


def expected_batch_edges(structures, r_max) -> dict:
    """Oracle for a batch: structures are (positions, cell, pbc); global atom indices."""
    edges, offset = {}, 0
    for positions, cell, pbc in structures:
        for (i, j, *shift), distance in brute_force_edges(positions, cell, pbc, r_max).items():
            edges[(i + offset, j + offset, *shift)] = distance
        offset += len(positions)
    return edges


def graph_edges(graph: AtomicGraph) -> dict:
    """{(i, j, S0, S1, S2): |r_ij|} with r_ij from the documented formula."""
    distances = graph.edge_vectors().norm(dim=1).tolist()
    keys = torch.cat([graph.edge_index.T, graph.edge_shift], dim=1).tolist()
    edges = {tuple(key): distance for key, distance in zip(keys, distances)}
    assert len(edges) == graph.num_edges, "duplicate edges"
    return edges


def as_structure(atoms: ase.Atoms):
    return atoms.positions, atoms.cell.array, atoms.pbc


def assert_graph_invariants(graph: AtomicGraph):
    num_nodes, num_edges = graph.num_nodes, graph.num_edges
    assert graph.positions.shape == (num_nodes, 3)
    assert graph.atomic_numbers.shape == (num_nodes,)
    assert graph.edge_index.shape == (2, num_edges)
    assert graph.edge_shift.shape == (num_edges, 3)
    assert graph.cell.shape == (graph.num_structures, 3, 3)
    assert graph.pbc.shape == (graph.num_structures, 3) and graph.pbc.dtype == torch.bool
    for tensor in (graph.atomic_numbers, graph.edge_index, graph.edge_shift, graph.batch,
                   graph.num_atoms, graph.center_ptr):
        assert tensor.dtype == torch.int64
    assert int(graph.num_atoms.sum()) == num_nodes
    assert torch.equal(graph.batch, torch.repeat_interleave(graph.num_atoms))

    centers, neighbours = graph.edge_index
    shift = graph.edge_shift
    # sorted lexicographically by (i, j, S0, S1, S2)
    keys = torch.cat([graph.edge_index.T, shift], dim=1).tolist()
    assert keys == sorted(keys)
    # CSR pointers
    assert graph.center_ptr.shape == (num_nodes + 1,)
    assert graph.center_ptr[0] == 0 and graph.center_ptr[-1] == num_edges
    counts = torch.bincount(centers, minlength=num_nodes)
    assert torch.equal(graph.center_ptr[1:] - graph.center_ptr[:-1], counts)
    for atom in range(num_nodes):
        start, stop = graph.center_ptr[atom], graph.center_ptr[atom + 1]
        assert (centers[start:stop] == atom).all()
    # edges stay inside their structure, no shift along non-periodic directions
    assert torch.equal(graph.batch[centers], graph.batch[neighbours])
    assert not (shift.ne(0) & ~graph.pbc[graph.batch[centers]]).any()
    # strictly inside the cutoff, never zero length
    distances = graph.edge_vectors().norm(dim=1)
    assert (distances < graph.r_max).all() and (distances > 0).all()
    # both directions: (i, j, S) and (j, i, -S)
    forward = set(map(tuple, keys))
    backward = {(j, i, -a, -b, -c) for i, j, a, b, c in forward}
    assert forward == backward


def assert_matches_brute_force(graph: AtomicGraph, structures, r_max=R_MAX):
    assert_graph_invariants(graph)
    expected = expected_batch_edges(structures, r_max)
    found = graph_edges(graph)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    keys = sorted(expected)
    np.testing.assert_allclose(
        [found[k] for k in keys], [expected[k] for k in keys], rtol=0, atol=1e-10
    )


# --------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------
def fcc_silver(repeat=(2, 2, 2), seed=0) -> ase.Atoms:
    atoms = ase.build.bulk("Ag", "fcc", a=4.09, cubic=True) * repeat
    atoms.rattle(0.05, seed=seed)
    return atoms


def random_cell(rng, min_plane_spacing, max_length) -> np.ndarray:
    """Random triclinic cell (rows) with every lattice plane spacing >= min_plane_spacing."""
    while True:
        cell = rng.uniform(-1.0, 1.0, size=(3, 3)) * max_length / 2 + np.eye(3) * max_length / 2
        if abs(np.linalg.det(cell)) < 1e-3:
            continue
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
        if spacing.min() >= min_plane_spacing:
            return cell


def small_triclinic(rng, num_atoms=3) -> ase.Atoms:
    """Cell with plane spacings between ~1.5 and r_max: atoms see their own images."""
    cell = random_cell(rng, min_plane_spacing=1.5, max_length=4.0)
    fractional = rng.uniform(0.0, 1.0, size=(num_atoms, 3))
    return ase.Atoms(numbers=rng.integers(1, 30, num_atoms), scaled_positions=fractional,
                     cell=cell, pbc=True)


def silver_slab(zero_vacuum_vector=False) -> ase.Atoms:
    atoms = ase.build.fcc111("Ag", size=(3, 3, 3), a=4.09, vacuum=6.0)
    atoms.rattle(0.05, seed=1)
    atoms.pbc = (True, True, False)
    if zero_vacuum_vector:
        cell = atoms.cell.array.copy()
        cell[2] = 0.0
        atoms.set_cell(cell, scale_atoms=False)
    return atoms


def random_molecule(rng, num_atoms=13, box=6.0) -> ase.Atoms:
    positions = rng.uniform(-box / 2, box / 2, size=(num_atoms, 3))
    return ase.Atoms(numbers=rng.integers(1, 10, num_atoms), positions=positions)


# --------------------------------------------------------------------------------------
# Against brute force
# --------------------------------------------------------------------------------------
def test_fcc_silver_supercell():
    atoms = fcc_silver((2, 2, 2))  # cell 8.18 Å < 2 r_max: some pairs have several shifts
    graph = AtomicGraph.from_ase(atoms, R_MAX)
    assert_matches_brute_force(graph, [as_structure(atoms)])
    assert graph.num_nodes == 32 and graph.num_structures == 1
    pairs = graph.edge_index.T.tolist()
    assert len({tuple(p) for p in pairs}) < len(pairs), "expected pairs with several shifts"


def test_fcc_primitive_cell_one_atom_sees_its_own_images():
    atoms = ase.build.bulk("Ag", "fcc", a=4.09)  # 1 atom, triclinic primitive cell
    graph = AtomicGraph.from_ase(atoms, R_MAX)
    assert_matches_brute_force(graph, [as_structure(atoms)])
    # first shell 12 at a/sqrt2 = 2.89 Å, second 6 at a = 4.09 Å; third at 5.01 Å > r_max
    assert graph.num_edges == 18
    assert (graph.edge_index == 0).all()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_triclinic_cell_smaller_than_cutoff(seed):
    rng = np.random.default_rng(seed)
    atoms = small_triclinic(rng, num_atoms=int(rng.choice([1, 3, 5])))
    graph = AtomicGraph.from_ase(atoms, R_MAX)
    assert_matches_brute_force(graph, [as_structure(atoms)])
    centers, neighbours = graph.edge_index
    assert (centers == neighbours).any(), "an atom must see its own periodic images"


@pytest.mark.parametrize("zero_vacuum_vector", [False, True])
def test_slab_mixed_pbc(zero_vacuum_vector):
    atoms = silver_slab(zero_vacuum_vector)
    graph = AtomicGraph.from_ase(atoms, R_MAX)
    assert_matches_brute_force(graph, [as_structure(atoms)])
    assert (graph.edge_shift[:, 2] == 0).all()
    assert torch.equal(graph.cell[0], torch.as_tensor(atoms.cell.array))


@pytest.mark.parametrize("pbc", [(True, False, False), (False, True, False), (False, True, True),
                                 (True, False, True)])
def test_random_mixed_pbc_tilted_cells(pbc):
    rng = np.random.default_rng(sum(2**k for k, p in enumerate(pbc) if p))
    cell = random_cell(rng, min_plane_spacing=1.5, max_length=5.0)
    num_atoms = 7
    fractional = rng.uniform(-0.5, 1.5, size=(num_atoms, 3))
    positions = fractional @ cell
    graph = AtomicGraph.from_arrays(positions, np.full(num_atoms, 14), R_MAX, cell=cell, pbc=pbc)
    assert_matches_brute_force(graph, [(positions, cell, np.array(pbc))])


def test_molecule_without_cell():
    atoms = ase.build.molecule("CH3CH2OH")
    assert not atoms.pbc.any() and not atoms.cell.array.any()
    graph = AtomicGraph.from_ase(atoms, 2.5)
    assert_matches_brute_force(graph, [as_structure(atoms)], r_max=2.5)
    assert (graph.edge_shift == 0).all()
    assert not graph.cell.any() and not graph.pbc.any()


def test_random_molecule_with_far_away_atoms():
    rng = np.random.default_rng(21)
    atoms = random_molecule(rng, num_atoms=11)
    atoms.positions[3] += [500.0, -300.0, 1e4]  # isolated, far outside
    graph = AtomicGraph.from_ase(atoms, 3.0)
    assert_matches_brute_force(graph, [as_structure(atoms)], r_max=3.0)
    assert graph.center_ptr[3] == graph.center_ptr[4]


def test_positions_outside_the_cell():
    rng = np.random.default_rng(31)
    atoms = fcc_silver((1, 2, 1), seed=3)
    wrapped = AtomicGraph.from_ase(atoms, R_MAX)
    lattice_offsets = rng.integers(-40, 41, size=(len(atoms), 3))
    atoms.positions = atoms.positions + lattice_offsets @ atoms.cell.array
    graph = AtomicGraph.from_ase(atoms, R_MAX)
    assert_matches_brute_force(graph, [as_structure(atoms)])
    # positions kept as given, shifts compensate the lattice offsets
    assert torch.equal(graph.positions, torch.as_tensor(atoms.positions))
    assert torch.equal(graph.edge_index, wrapped.edge_index)
    centers, neighbours = graph.edge_index
    offsets = torch.as_tensor(lattice_offsets)
    expected_shift = wrapped.edge_shift - offsets[neighbours] + offsets[centers]
    assert torch.equal(graph.edge_shift, expected_shift)


def test_batch_of_mixed_structures_has_right_offsets():
    rng = np.random.default_rng(41)
    structures = [
        fcc_silver((1, 1, 2)),
        random_molecule(rng, num_atoms=5),
        silver_slab(),
        ase.Atoms("H", positions=[[0.0, 0.0, 0.0]]),  # lone atom: no edges
        small_triclinic(rng, num_atoms=3),
    ]
    graph = AtomicGraph.from_ase(structures, R_MAX)
    assert_matches_brute_force(graph, [as_structure(a) for a in structures])
    assert graph.num_structures == 5
    assert graph.num_atoms.tolist() == [len(a) for a in structures]
    all_numbers = np.concatenate([a.numbers for a in structures])
    assert torch.equal(graph.atomic_numbers, torch.as_tensor(all_numbers))
    assert graph.pbc.tolist() == [a.pbc.tolist() for a in structures]
    # each structure's block equals its own graph, offset by the atoms before it
    offset, edge_start = 0, 0
    for structure in structures:
        alone = AtomicGraph.from_ase(structure, R_MAX)
        block = slice(edge_start, edge_start + alone.num_edges)
        assert torch.equal(graph.edge_index[:, block], alone.edge_index + offset)
        assert torch.equal(graph.edge_shift[block], alone.edge_shift)
        assert graph.center_ptr[offset] == edge_start
        offset += len(structure)
        edge_start += alone.num_edges
    assert edge_start == graph.num_edges


def test_isolated_atom_and_atom_with_exactly_one_neighbour():
    positions = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [9.0, 0.0, 0.0]])
    graph = AtomicGraph.from_arrays(positions, [1, 1, 8], 2.0)
    assert_matches_brute_force(graph, [(positions, np.zeros((3, 3)), np.zeros(3, bool))], r_max=2.0)
    assert graph.edge_index.tolist() == [[0, 1], [1, 0]]
    assert graph.center_ptr.tolist() == [0, 1, 2, 2]


@pytest.mark.parametrize(
    "cell, pbc",
    [(None, None), (np.eye(3) * 20.0, (True, True, True)), (np.eye(3) * 20.0, (True, False, True))],
)
def test_single_atom_alone_is_valid(cell, pbc):
    graph = AtomicGraph.from_arrays(np.array([[1.0, 2.0, 3.0]]), [29], R_MAX, cell=cell, pbc=pbc)
    assert graph.num_nodes == 1 and graph.num_edges == 0
    assert graph.edge_index.shape == (2, 0) and graph.edge_shift.shape == (0, 3)
    assert graph.center_ptr.tolist() == [0, 0]


def test_single_atom_in_small_cell_sees_its_images():
    graph = AtomicGraph.from_arrays(np.zeros((1, 3)), [29], 2.5, cell=np.eye(3) * 2.0)
    assert graph.pbc.tolist() == [[True, True, True]]  # pbc defaults to periodic with a cell
    # |S| < 1.25 with S != 0: 6 faces (2.0 Å) + 12 edges (2.83 Å > 2.5: no) -> 6
    assert sorted(map(tuple, graph.edge_shift.tolist())) == sorted(
        [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    )


@pytest.mark.parametrize("seed", range(6))
def test_random_structures(seed):
    rng = np.random.default_rng(100 + seed)
    pbc = rng.random(3) < 0.5
    num_atoms = int(rng.choice([1, 2, 5, 9, 17]))
    cell = random_cell(rng, min_plane_spacing=1.2, max_length=float(rng.uniform(2.0, 9.0)))
    if seed % 2:
        cell[~pbc] = 0.0  # no vector along open directions
    frame = np.where(pbc[:, None], cell, np.eye(3) * 6)  # atoms also spread along open directions
    positions = rng.uniform(-1.0, 2.0, size=(num_atoms, 3)) @ frame
    r_max = float(rng.uniform(1.0, 6.0))
    numbers = rng.integers(1, 90, num_atoms)
    graph = AtomicGraph.from_arrays(positions, numbers, r_max, cell=cell, pbc=pbc)
    assert_matches_brute_force(graph, [(positions, cell, pbc)], r_max=r_max)


# --------------------------------------------------------------------------------------
# Cutoff, ordering, determinism, dtypes
# --------------------------------------------------------------------------------------
def test_thin_and_wide_box_does_not_crash_the_process():
    """vesin 0.6 divides by zero (SIGFPE) for such boxes unless the search is adapted.

    Run in a subprocess so that a regression fails this test instead of killing pytest.
    """
    cell = np.diag([4.0, 4000.0, 4000.0])
    positions = np.array([[0.5, 1.0, 2.0], [2.5, 3.0, 2.0], [1.0, 3990.0, 2.0]])
    code = textwrap.dedent(
        f"""
        import json
        import numpy as np
        import torch
        from allegro_fast.graph import AtomicGraph
        graph = AtomicGraph.from_arrays(
            np.array({positions.tolist()}), [1, 1, 1], {R_MAX}, cell=np.array({cell.tolist()})
        )
        print(json.dumps(torch.cat([graph.edge_index.T, graph.edge_shift], dim=1).tolist()))
        """
    )
    repo_root = Path(__file__).resolve().parents[1]
    python_path = os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        timeout=120,
    )
    assert result.returncode == 0, f"return code {result.returncode}: {result.stderr[-2000:]}"
    found = {tuple(edge) for edge in json.loads(result.stdout.strip().splitlines()[-1])}
    assert found == set(brute_force_edges(positions, cell, np.ones(3, bool), R_MAX))


def test_cutoff_is_strict():
    positions = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert AtomicGraph.from_arrays(positions, [1, 1], 2.0).num_edges == 0
    assert AtomicGraph.from_arrays(positions, [1, 1], np.nextafter(2.0, 3.0)).num_edges == 2
    # own images at exactly r_max in a simple cubic cell
    cell = np.eye(3) * 2.5
    origin = np.zeros((1, 3))
    assert AtomicGraph.from_arrays(origin, [1], 2.5, cell=cell).num_edges == 0
    assert AtomicGraph.from_arrays(origin, [1], np.nextafter(2.5, 3.0), cell=cell).num_edges == 6


def test_deterministic_and_sorted():
    rng = np.random.default_rng(51)
    structures = [fcc_silver((2, 1, 2), seed=5), small_triclinic(rng, 5), silver_slab()]
    first = AtomicGraph.from_ase(structures, R_MAX)
    second = AtomicGraph.from_ase([s.copy() for s in structures], R_MAX)
    for field in ("positions", "atomic_numbers", "edge_index", "edge_shift", "cell", "pbc", "batch",
                  "num_atoms", "center_ptr"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field
    assert_graph_invariants(first)


def test_from_arrays_accepts_numpy_and_torch_and_matches_from_ase():
    atoms = fcc_silver((1, 1, 1), seed=7)
    reference = AtomicGraph.from_ase(atoms, R_MAX)
    from_numpy = AtomicGraph.from_arrays(
        atoms.positions, atoms.numbers, R_MAX, cell=atoms.cell.array, pbc=atoms.pbc
    )
    from_torch = AtomicGraph.from_arrays(
        torch.tensor(atoms.positions),
        torch.tensor(atoms.numbers),
        R_MAX,
        cell=torch.tensor(atoms.cell.array),
        pbc=torch.tensor(atoms.pbc),
    )
    for graph in (from_numpy, from_torch):
        assert torch.equal(graph.edge_index, reference.edge_index)
        assert torch.equal(graph.edge_shift, reference.edge_shift)
        assert torch.equal(graph.positions, reference.positions)


def test_dtype_and_to():
    atoms = fcc_silver((1, 1, 1), seed=8)
    graph = AtomicGraph.from_ase(atoms, R_MAX, dtype=torch.float32)
    assert graph.positions.dtype == torch.float32 and graph.cell.dtype == torch.float32
    assert graph.edge_index.dtype == torch.int64
    double = graph.to(dtype=torch.float64)
    assert double.positions.dtype == torch.float64 and double.cell.dtype == torch.float64
    assert double.edge_shift.dtype == torch.int64 and double.pbc.dtype == torch.bool
    assert double.r_max == graph.r_max
    moved = graph.to("cpu")
    assert moved.positions.dtype == torch.float32 and moved.positions.device.type == "cpu"
    with pytest.raises(ValueError, match="dtype must be a torch floating-point dtype"):
        graph.to(dtype=torch.int32)


def test_edge_vectors_are_differentiable():
    atoms = fcc_silver((1, 1, 1), seed=9)
    graph = AtomicGraph.from_ase(atoms, R_MAX)
    graph.positions.requires_grad_(True)
    graph.cell.requires_grad_(True)
    graph.edge_vectors().norm(dim=1).sum().backward()
    assert graph.positions.grad is not None and graph.cell.grad is not None


def test_type_names_accepts_known_species():
    graph = AtomicGraph.from_ase([fcc_silver((1, 1, 1)), ase.build.molecule("H2O")], R_MAX,
                                 type_names=["H", "O", "Ag"])
    assert graph.num_structures == 2


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------
def test_non_finite_position_names_atom_and_structure():
    atoms = fcc_silver((1, 1, 1))
    bad = atoms.copy()
    bad.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"structure 1, atom 2: non-finite position"):
        AtomicGraph.from_ase([atoms, bad], R_MAX)
    positions = np.zeros((3, 3))
    positions[:, 0] = [0.0, 1.0, 2.0]
    positions[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"structure 0, atom 1: non-finite position"):
        AtomicGraph.from_arrays(positions, [1, 1, 1], R_MAX)


def test_non_finite_cell():
    with pytest.raises(ValueError, match=r"structure 0: non-finite cell"):
        AtomicGraph.from_arrays(np.zeros((1, 3)), [1], R_MAX, cell=np.diag([3.0, np.nan, 3.0]))


def test_coinciding_atoms_name_both_atoms():
    molecule = ase.Atoms("H4", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"structure 1: atoms 1 and 3 are at the same place"):
        AtomicGraph.from_ase([fcc_silver((1, 1, 1)), molecule], R_MAX)
    almost = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 5e-7]])
    with pytest.raises(ValueError, match=r"structure 0: atoms 0 and 1 are at the same place"):
        AtomicGraph.from_arrays(almost, [1, 1], R_MAX)


def test_atom_coinciding_with_periodic_image_of_another():
    cell = np.eye(3) * 3.0
    positions = np.array([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5], [3.0, 0.0, 0.0]])
    message = (
        r"structure 0: atoms 0 and 2 are at the same place, "
        r"atom 2 through its periodic image shifted by \[-1, 0, 0\]"
    )
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_arrays(positions, [1, 1, 1], R_MAX, cell=cell)


@pytest.mark.parametrize("r_max", [R_MAX, 1e-7])
def test_atom_coinciding_with_its_own_image(r_max):
    cell = np.diag([3.0, 5e-7, 3.0])
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 1]], cell=cell, pbc=True)
    message = r"structure 1: atom 0 coincides with its own periodic image \(shift \[0, 1, 0\]"
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_ase([fcc_silver((1, 1, 1)), atoms], r_max)


def test_lattice_planes_closer_than_duplicate_distance():
    # long lattice vectors, but a short combination of them: b - a = (0, 1e-7, 0)
    cell = np.array([[3.0, 0.0, 0.0], [3.0, 1e-7, 0.0], [0.0, 0.0, 3.0]])
    with pytest.raises(ValueError, match=r"structure 0: singular cell, lattice planes along . are"):
        AtomicGraph.from_arrays(np.zeros((1, 3)), [1], R_MAX, cell=cell)


def test_unknown_species_names_symbol_atom_structure_and_valid_names():
    copper = fcc_silver((1, 1, 1))
    copper.numbers[2] = 29
    message = r"structure 1, atom 2: species 'Cu' \(Z=29\) is not in type_names \['Ag', 'O'\]"
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_ase([fcc_silver((1, 1, 1)), copper], R_MAX, type_names=["Ag", "O"])
    with pytest.raises(ValueError, match=r"structure 0, atom 0: species 'Ag'"):
        AtomicGraph.from_arrays(np.zeros((1, 3)), [47], R_MAX, type_names=["H"])
    message = r"type_names contains 'Xy', which is not a chemical symbol"
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_ase(copper, R_MAX, type_names=["Ag", "Xy"])


def test_empty_structures():
    with pytest.raises(ValueError, match=r"structure 1 is empty \(0 atoms\)"):
        AtomicGraph.from_ase([fcc_silver((1, 1, 1)), ase.Atoms()], R_MAX)
    with pytest.raises(ValueError, match=r"structure 0 is empty"):
        AtomicGraph.from_arrays(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), R_MAX)
    with pytest.raises(ValueError, match=r"empty list"):
        AtomicGraph.from_ase([], R_MAX)


@pytest.mark.parametrize(
    "cell, pbc, message",
    [
        (
            np.zeros((3, 3)),
            (True, True, True),
            r"structure 0: singular cell, lattice vector a \(row 0\) is zero",
        ),
        (None, True, r"structure 0: singular cell, lattice vector a \(row 0\) is zero"),
        (np.diag([3.0, 0.0, 3.0]), (True, True, False), r"lattice vector b \(row 1\) is zero"),
        (np.array([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]]), (True, True, True),
         r"structure 0: singular cell, the periodic lattice vectors \(a, b, c\) "
         r"are linearly dependent \(volume"),
        (np.array([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 0]]), (True, True, False),
         r"the periodic lattice vectors \(a, b\) are linearly dependent \(area"),
    ],
)
def test_singular_cell(cell, pbc, message):
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_arrays(np.array([[0.5, 0.5, 0.5]]), [1], R_MAX, cell=cell, pbc=pbc)


def test_singular_cell_names_structure_in_batch():
    flat = ase.Atoms("H", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 6, 0]], pbc=True)
    with pytest.raises(ValueError, match=r"structure 2: singular cell"):
        AtomicGraph.from_ase([fcc_silver((1, 1, 1)), ase.build.molecule("H2O"), flat], R_MAX)


def test_open_direction_may_have_any_cell_vector():
    # only periodic directions have to be independent
    cell = np.array([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]])
    positions, pbc = np.array([[0.5, 0.5, 0.5]]), np.array([True, True, False])
    graph = AtomicGraph.from_arrays(positions, [1], R_MAX, cell=cell, pbc=pbc)
    assert_matches_brute_force(graph, [(positions, cell, pbc)])


def test_cell_too_small_for_cutoff():
    with pytest.raises(ValueError, match=r"structure 0: cell too small for r_max=5.0"):
        AtomicGraph.from_arrays(np.zeros((1, 3)), [1], R_MAX, cell=np.eye(3) * 0.01)


@pytest.mark.parametrize(
    "positions, atomic_numbers, kwargs, message",
    [
        (np.zeros((2, 2)), [1, 1], {}, r"positions must have shape \(N, 3\), got \(2, 2\)"),
        (np.zeros(3), [1], {}, r"positions must have shape \(N, 3\), got \(3,\)"),
        (np.array([["a", "b", "c"]]), [1], {}, r"positions must be real numbers"),
        (np.zeros((2, 3)), [1, 1, 1], {}, r"atomic_numbers has 3 entries but positions has 2"),
        (np.zeros((2, 3)), [[1, 1]], {}, r"atomic_numbers must have shape \(N,\)"),
        (np.zeros((1, 3)), [1.5], {}, r"atomic_numbers must be integers, got dtype float64"),
        (np.zeros((1, 3)), [200], {}, r"structure 0, atom 0: atomic number 200 is not between"),
        (np.zeros((1, 3)), [-1], {}, r"atomic number -1"),
        (np.zeros((1, 3)), [1], {"cell": np.eye(3)[:2]}, r"cell must have shape \(3, 3\).*2, 3"),
        (np.zeros((1, 3)), [1], {"cell": np.ones(3)}, r"cell must have shape \(3, 3\)"),
        (np.zeros((1, 3)), [1], {"cell": np.eye(3), "pbc": [True, True]}, r"pbc must be a bool or"),
        (np.zeros((1, 3)), [1], {"cell": np.eye(3), "pbc": [2, 0, 0]}, r"pbc must be booleans"),
        (np.zeros((1, 3)), [1], {"dtype": torch.int64}, r"dtype must be a torch floating-point"),
    ],
)
def test_from_arrays_rejects_bad_shapes_and_dtypes(positions, atomic_numbers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_arrays(positions, atomic_numbers, R_MAX, **kwargs)


@pytest.mark.parametrize("r_max", [0.0, -1.0, float("nan"), float("inf"), "five", None])
def test_bad_r_max(r_max):
    message = re.escape(f"r_max must be a positive finite number, got {r_max!r}")
    with pytest.raises(ValueError, match=message):
        AtomicGraph.from_arrays(np.zeros((1, 3)), [1], r_max)


def test_from_ase_rejects_non_atoms():
    with pytest.raises(TypeError, match=r"structure 1 is a ndarray, not an ase.Atoms"):
        AtomicGraph.from_ase([fcc_silver((1, 1, 1)), np.zeros((2, 3))], R_MAX)

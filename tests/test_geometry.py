"""The torch backend's edge geometry (`allegro_fast.geometry`) against e3nn and `radial`, and the
component-major `AtomicGraph.edge_vectors` against the plain formula."""

import pytest
import torch
from ase.build import bulk, molecule
from e3nn.o3 import spherical_harmonics

import allegro_fast as af
from allegro_fast.geometry import edge_geometry, harmonic_matrix
from allegro_fast.radial import bessel_basis, initial_bessel_frequencies, polynomial_envelope


def reference_geometry(vectors, frequencies, r_max, p, l_max):
    lengths = torch.linalg.norm(vectors, dim=1)
    harmonics = spherical_harmonics(list(range(l_max + 1)), vectors, normalize=True, normalization="component")
    return (bessel_basis(lengths, frequencies, r_max), polynomial_envelope(lengths, r_max, p).unsqueeze(1),
            harmonics)


def random_vectors(num_edges: int, r_max: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_edges, 3, dtype=torch.float64, generator=generator)
    lengths = 0.3 + (r_max - 0.3) * torch.rand(num_edges, 1, dtype=torch.float64, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True) * lengths


@pytest.mark.parametrize("l_max", [0, 1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "component-major"])
def test_edge_geometry_matches_e3nn_and_radial(l_max, layout):
    r_max, p = 4.5, 6
    vectors = random_vectors(157, r_max, seed=l_max)
    vectors[3] *= 1.3 * r_max / vectors[3].norm()  # beyond the cutoff: envelope exactly zero
    if layout == "component-major":
        vectors = vectors.t().contiguous().t()
    frequencies = initial_bessel_frequencies(7, torch.float64) * 1.1
    ours = edge_geometry(vectors, frequencies, r_max, p, torch.as_tensor(harmonic_matrix(l_max)))
    reference = reference_geometry(vectors, frequencies, r_max, p, l_max)
    for name, a, b in zip(("bessel", "envelope", "harmonics"), ours, reference):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert ours[1][3, 0] == 0.0
    assert torch.all(ours[2][:, 0] == 1.0)


def test_edge_geometry_gradients_float64():
    vectors = random_vectors(11, 4.0, seed=5).requires_grad_(True)
    frequencies = initial_bessel_frequencies(5, torch.float64).requires_grad_(True)

    coefficients = torch.as_tensor(harmonic_matrix(3))

    def function(v, w):
        return edge_geometry(v, w, 4.0, 6, coefficients)

    assert torch.autograd.gradcheck(function, (vectors, frequencies))
    assert torch.autograd.gradgradcheck(function, (vectors, frequencies))


def plain_edge_vectors(graph, positions, cell):
    center, neighbor = graph.edge_index
    shifts = graph.edge_shift.to(positions.dtype)
    return positions[neighbor] - positions[center] + torch.einsum("ek,ekc->ec", shifts, cell[graph.batch[center]])


@pytest.mark.parametrize("structures", ["one periodic", "two periodic", "molecules"])
def test_edge_vectors_component_major(structures):
    if structures == "molecules":
        frames = [molecule("CH4"), molecule("H2O")]
    else:
        silver = bulk("Ag", "fcc", a=4.09, cubic=True).repeat(2)
        silver.rattle(0.05, seed=1)
        copper = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)
        copper.rattle(0.05, seed=2)
        frames = [silver] if structures == "one periodic" else [silver, copper]
    graph = af.AtomicGraph.from_ase(frames, r_max=4.0)
    vectors = graph.edge_vectors()
    assert vectors.shape == (graph.num_edges, 3)
    torch.testing.assert_close(vectors, plain_edge_vectors(graph, graph.positions, graph.cell), rtol=0, atol=1e-13)
    # Differentiable in positions and cell (forces, stress).
    positions = graph.positions.clone().requires_grad_(True)
    cell = graph.cell.clone().requires_grad_(True)
    weights = torch.randn(graph.num_edges, 3, dtype=torch.float64)
    ours = torch.autograd.grad((graph.edge_vectors(positions, cell) * weights).sum(), (positions, cell))
    expected = torch.autograd.grad((plain_edge_vectors(graph, positions, cell) * weights).sum(), (positions, cell))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

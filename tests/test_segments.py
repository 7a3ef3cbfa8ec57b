"""The segment sums (kernels/segments.py) against index_add, their gradcheck and gradgradcheck, and that the
triton backend's energies, forces and stress go through no float accumulation whose order can vary (CUDA's
index_add and accumulating index_put add atomically: the same call gives different last bits)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import TRITON_DEVICES, ethanol, lonely_and_pair, periodic_cho, small_config
from torch.utils._python_dispatch import TorchDispatchMode

import allegro_fast as af

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


DEVICES = TRITON_DEVICES

# empty segments, segments of one row, one longer than a block of rows (64), at the start and the end
LENGTHS = [0, 3, 1, 0, 70, 2, 1, 0, 5, 0]


def segments(device, lengths=LENGTHS):
    counts = torch.tensor(lengths)
    ptr = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(device)
    index = torch.repeat_interleave(torch.arange(len(lengths)), counts).to(device)
    return ptr, index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("columns", [1, 3, 9])
def test_segment_sum_and_expand_match_index_add_and_indexing(device, dtype, columns):
    from allegro_fast.kernels.segments import segment_expand, segment_sum

    ptr, index = segments(device)
    generator = torch.Generator().manual_seed(columns)
    values = torch.randn(index.shape[0], columns, generator=generator, dtype=dtype).to(device)
    expected = torch.zeros(len(LENGTHS), columns, dtype=dtype, device=device).index_add(0, index, values)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(segment_sum(values, ptr, index), expected, rtol=tolerance, atol=tolerance)
    per_segment = torch.randn(len(LENGTHS), columns, generator=generator, dtype=dtype).to(device)
    assert torch.equal(segment_expand(per_segment, ptr, index), per_segment[index])
    assert torch.equal(segment_sum(values, ptr, index), segment_sum(values, ptr, index))  # the same bits every time
    # long segments (4 x 64 rows or more on average: 1024 rows a step): 1100 rows in an empty, a long, a short one
    rows = torch.randn(1100, columns, generator=generator, dtype=dtype).to(device)
    long_ptr = torch.tensor([0, 0, 1099, 1100], device=device)
    long_index = torch.tensor([1] * 1099 + [2], device=device)
    torch.testing.assert_close(segment_sum(rows, long_ptr, long_index), torch.stack(
        [rows[:0].sum(0), rows[:1099].sum(0), rows[1099:].sum(0)]), rtol=tolerance, atol=10 * tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_segment_ops_gradcheck_and_gradgradcheck(device):
    from allegro_fast.kernels.segments import gather_rows, segment_expand, segment_sum, sorted_order

    ptr, index = segments(device, [2, 0, 1, 4, 0])
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(index.shape[0], 3, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    per_segment = torch.randn(5, 3, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    unsorted = torch.tensor([3, 0, 3, 4, 1, 0, 3], device=device)
    _, inverse, unsorted_ptr, sorted_index = sorted_order(unsorted, 5)
    assert torch.equal(sorted_index, unsorted.sort(stable=True).values)
    assert torch.equal(gather_rows(per_segment, inverse, unsorted_ptr, sorted_index), per_segment[unsorted])
    for function, inputs in ((lambda x: segment_sum(x, ptr, index), (rows,)),
                             (lambda x: segment_expand(x, ptr, index), (per_segment,)),
                             (lambda x: gather_rows(x, inverse, unsorted_ptr, sorted_index), (per_segment,))):
        assert torch.autograd.gradcheck(function, inputs)
        assert torch.autograd.gradgradcheck(function, inputs)


class AccumulatingOps(TorchDispatchMode):
    """Records every aten op that adds into its output at indices (index_add, accumulating index_put,
    scatter_add, ...): (name, destination shape, whether the indices repeat)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...], bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        index = None
        if "index_add" in name:
            index = args[2]
        elif "scatter_add" in name or "scatter_reduce" in name or "index_reduce" in name:
            index = args[2]
        elif "index_put" in name and (kwargs.get("accumulate") or (len(args) > 3 and args[3])):
            index = torch.stack([i.flatten() for i in args[1] if i is not None]).t()
        if index is not None:
            flat = index.reshape(index.shape[0], -1) if index.dim() > 1 else index
            repeats = torch.unique(flat, dim=0).shape[0] < flat.shape[0]
            self.ops.append((name, tuple(args[0].shape), repeats))
        return func(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_triton_model_adds_in_a_fixed_order(device):
    """Energies, forces and stress of a batch (several structures, periodic and not, an atom without neighbours)
    and the parameter gradients of a force-training step through them go through no accumulation at repeated
    indices (per-species-pair tables included: three species, per-edge species scales). The values match the
    torch backend's."""
    torch.manual_seed(0)
    config = small_config(num_layers=2, num_tensor_features=3, per_edge_species_scale=True)
    model = af.Allegro(config, backend="triton").double().to(device)
    reference = af.Allegro(config, backend="torch").double().to(device)
    reference.load_state_dict(model.state_dict())
    graph = af.AtomicGraph.from_ase([periodic_cho(1), ethanol(2), lonely_and_pair()], r_max=config.r_max)
    graph = graph.to(device=device, dtype=torch.float64)
    with AccumulatingOps() as recorded:
        out = model(graph, compute_stress=True)
    assert not [op for op in recorded.ops if op[2]], recorded.ops
    expected = reference(graph, compute_stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-10, atol=1e-12)

    model.train()
    with AccumulatingOps() as recorded:
        out = model(graph, compute_stress=True, create_graph=True)
        (out["energy"].sum() + out["forces"].square().sum() + out["stress"].square().sum()).backward()
    assert not [op for op in recorded.ops if op[2]], recorded.ops
    gradients = {name: p.grad for name, p in model.named_parameters()}
    assert gradients["edge_species_scale"] is not None and gradients["two_body_mlp.layer0.weight"] is not None
    reference.train()
    expected = reference(graph, compute_stress=True, create_graph=True)
    (expected["energy"].sum() + expected["forces"].square().sum() + expected["stress"].square().sum()).backward()
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(gradients[name], p.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_model_repeats_bitwise(device):
    """Two identical calls give the same bits (on CUDA the point of the segment sums; float32, a periodic cell
    whose atoms have many neighbours)."""
    from ase.build import bulk

    torch.manual_seed(0)
    config = small_config(type_names=("Ag",), per_species_energy_shift=(-2.5,), per_species_energy_scale=(1.1,),
                          l_max=1, num_layers=1, num_tensor_features=3, r_max=4.5)
    model = af.Allegro(config, backend="triton").to(device)
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    graph = af.AtomicGraph.from_ase([atoms], r_max=config.r_max).to(device=device)
    first = model(graph, compute_stress=True)
    second = model(graph, compute_stress=True)
    for key in ("energy", "atomic_energy", "forces", "stress"):
        assert torch.equal(first[key], second[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_triton_force_field_adds_in_a_fixed_order(device):
    """export.ForceField, the program that compile_model, torch.export and compiled training trace, uses the
    triton backend's fixed-order sums too: no accumulation at repeated indices in the energies, forces and
    stress of a batch, nor in the parameter gradients of a force loss through them (create_graph)."""
    from allegro_fast.export import ForceField, graph_inputs

    torch.manual_seed(0)
    config = small_config(num_layers=2, num_tensor_features=3, per_edge_species_scale=True)
    model = af.Allegro(config, backend="triton").double().to(device)
    graph = af.AtomicGraph.from_ase([periodic_cho(1), ethanol(2), lonely_and_pair()], r_max=config.r_max)
    graph = graph.to(device=device, dtype=torch.float64)
    expected = model(graph, compute_stress=True, create_graph=False)
    for create_graph in (False, True):
        force_field = ForceField(model, create_graph=create_graph)
        with AccumulatingOps() as recorded:
            out = force_field(*graph_inputs(graph))
            if create_graph:
                (out["energy"].sum() + out["forces"].square().sum() + out["stress"].square().sum()).backward()
        assert not [op for op in recorded.ops if op[2]], (create_graph, recorded.ops)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(out[key].detach(), expected[key].detach(), rtol=1e-10, atol=1e-12)

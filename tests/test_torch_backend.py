"""The torch backend against the reference: outputs, parameter gradients of a force loss, state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

import allegro_fast as af
from allegro_fast.testing import TOLERANCE, assert_close, assert_equivariant

from conftest import ethanol, lonely_and_pair, periodic_cho, randomize_edge_scale, small_config

CONFIGS = {
    "default": dict(),
    "l1-1layer": dict(l_max=1, num_layers=1),
    "l3-3layers": dict(l_max=3, num_layers=3, num_tensor_features=3),
    "se3": dict(parity=False),
    "se3-l3-2layers": dict(l_max=3, parity=False),
    "trainable-bessel": dict(bessel_trainable=True, per_edge_species_scale=False, num_tensor_features=1),
}


def pair(overrides: dict, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    config = small_config(**overrides)
    ref = af.reference.ReferenceAllegro(config).to(torch.float64)
    randomize_edge_scale(ref, seed)
    fast = af.Allegro(config, backend="torch").to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def energy_force_loss(model, graph):
    out = model(graph, compute_stress=False, create_graph=True)
    return out["energy"].pow(2).sum() + out["forces"].pow(2).sum(), out


@pytest.mark.parametrize("layout", ["slots", "edge-list"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_parameter_gradients_match_reference_float64(name, layout, structures):
    ref, fast = pair(CONFIGS[name], seed=len(name))
    graph = af.AtomicGraph.from_ase(structures, r_max=ref.config.r_max)
    if layout == "edge-list":
        fast.max_slot_padding = 0.0  # never pad: the edge-list layout, as in traced programs
        fast.edge_chunk_size = 37  # several chunks of unequal size: chunking must not change the function
    else:
        fast.max_slot_padding = float("inf")  # pad however uneven the neighbour counts (0 to 30 here)
    assert (fast.neighbor_slots(graph) is None) == (layout == "edge-list")
    expected, actual = ref(graph), fast(graph)
    for key in ("energy", "atomic_energy", "forces", "stress"):
        assert_close(actual[key], expected[key], f"{name}: {key}", TOLERANCE[torch.float64])

    loss_ref, _ = energy_force_loss(ref.train(), graph)
    loss_fast, _ = energy_force_loss(fast.train(), graph)
    grads_ref = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss_ref, list(ref.parameters()))))
    grads_fast = dict(zip([n for n, _ in fast.named_parameters()], torch.autograd.grad(loss_fast, list(fast.parameters()))))
    assert set(grads_fast) == set(grads_ref)
    for parameter, grad in grads_fast.items():
        assert_close(grad, grads_ref[parameter], f"{name}: gradient of {parameter}", TOLERANCE[torch.float64])


@pytest.mark.parametrize("name", ["default", "l3-3layers"])
def test_float32_matches_float64_reference(name, structures):
    ref, fast = pair(CONFIGS[name], dtype=torch.float32, seed=3)
    graph = af.AtomicGraph.from_ase(structures, r_max=ref.config.r_max)
    expected, actual = ref(graph), fast(graph)
    assert actual["forces"].dtype == torch.float32
    for key in ("energy", "forces", "stress"):
        assert_close(actual[key], expected[key], f"float32 {key}", TOLERANCE[torch.float32])


def test_state_dict_moves_back_to_reference(structures):
    ref, fast = pair({}, seed=4)
    with torch.no_grad():
        for parameter in fast.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    ref2 = af.reference.ReferenceAllegro(ref.config).double()
    ref2.load_state_dict(fast.state_dict())
    graph = af.AtomicGraph.from_ase(structures, r_max=ref.config.r_max)
    assert_close(ref2(graph)["forces"], fast(graph)["forces"], "forces after fast -> reference", TOLERANCE[torch.float64])


def test_equivariance_of_torch_backend(structures):
    _, fast = pair({"l_max": 3}, seed=5)
    assert max(assert_equivariant(fast, structures, trials=3).values()) <= TOLERANCE[torch.float64]


def test_graph_without_edges():
    _, fast = pair({}, seed=6)
    atoms = lonely_and_pair()[:2]  # two atoms 10 Å apart: no edges at all
    out = {k: v.detach() for k, v in fast(af.AtomicGraph.from_ase(atoms, r_max=fast.config.r_max)).items()}
    expected = fast.per_species_energy_shift[[2, 0]].sum()
    assert float(out["energy"][0]) == pytest.approx(float(expected), abs=1e-14)
    assert float(out["forces"].abs().max()) == 0.0


def test_uneven_neighbour_counts_choose_the_edge_list_layout_and_agree():
    # A dense cluster next to a sparse chain: padding every atom to the largest count would more than
    # double the edges, so the edge-list layout is used; forcing the slot layout gives the same function.
    from ase import Atoms

    rng = np.random.default_rng(8)
    cluster = rng.uniform(0.0, 3.0, size=(16, 3))
    chain = np.array([[9.0 + 2.6 * k, 0.0, 0.0] for k in range(30)])  # two neighbours each
    atoms = Atoms(["C"] * 16 + ["H"] * 30, positions=np.concatenate([cluster, chain]))
    ref, fast = pair({}, seed=9)
    graph = af.AtomicGraph.from_ase(atoms, r_max=fast.config.r_max)
    assert fast.neighbor_slots(graph) is None
    expected = ref(graph)
    edge_list = fast(graph)
    fast.max_slot_padding = float("inf")
    assert fast.neighbor_slots(graph) == int((graph.center_ptr[1:] - graph.center_ptr[:-1]).max())
    slots = fast(graph)
    for key in ("energy", "forces"):
        assert_close(edge_list[key], expected[key], f"edge-list {key}", TOLERANCE[torch.float64])
        assert_close(slots[key], expected[key], f"slots {key}", TOLERANCE[torch.float64])


def test_backend_choice_is_explicit():
    config = small_config()
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        af.Allegro(config, backend="jax")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(structures):
    ref, fast = pair({}, seed=7)
    graph = af.AtomicGraph.from_ase(structures, r_max=ref.config.r_max)
    expected = ref(graph)
    actual = fast.cuda()(graph.to(device="cuda"))
    for key in ("energy", "forces", "stress"):
        assert_close(actual[key].cpu(), expected[key], f"CUDA {key}", TOLERANCE[torch.float64])


@pytest.mark.parametrize("preset", ["default", "speed"])
def test_full_size_presets_match_reference(preset):
    """The authors' default sizes (64 scalar / 16 tensor features, 2 layers, l_max 2) and the speed model."""
    torch.manual_seed(11)
    config = af.AllegroConfig.preset(preset, ["H", "C", "O"], avg_num_neighbors=9.0)
    ref = af.reference.ReferenceAllegro(config).double()
    randomize_edge_scale(ref, 11)
    fast = af.Allegro(config).double()
    fast.load_state_dict(ref.state_dict())
    graph = af.AtomicGraph.from_ase([ethanol(3), periodic_cho(4)], r_max=config.r_max)
    expected, actual = ref(graph), fast(graph)
    for key in ("energy", "forces", "stress"):
        assert_close(actual[key], expected[key], f"{preset}: {key}", TOLERANCE[torch.float64])


@pytest.mark.parametrize("shape", [(3, 5, 4, 7), (3, 7, 4, 2)], ids=["wide result", "tall result (transposed)"])
def test_batched_matmul_values_and_gradients(shape):
    from allegro_fast.torch_ops import batched_matmul

    batch, rows, inner, columns = shape
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(batch, rows, inner, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(batch, inner, columns, dtype=torch.float64, generator=generator, requires_grad=True)
    torch.testing.assert_close(batched_matmul(a, b), torch.bmm(a, b), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(batched_matmul, (a, b))
    assert torch.autograd.gradgradcheck(batched_matmul, (a, b))


def test_traced_index_functions_match_index_select_with_gradients():
    """The gathers that traced programs use instead of index_select (their backward avoids index_add, which
    inductor compiles to atomic adds): the same values, gradients and second gradients, float64."""
    from allegro_fast.torch_ops import _RepeatColumns, _SelectUnique, column_readers

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    unique = torch.tensor([5, 0, 3, 2])  # columns 1 and 4 unread: their gradient is zero
    for dim in (0, 1):
        index = torch.tensor([3, 0]) if dim == 0 else unique
        torch.testing.assert_close(_SelectUnique.apply(x, dim, index), x.index_select(dim, index), rtol=0, atol=0)
        assert torch.autograd.gradcheck(lambda t, d=dim, i=index: _SelectUnique.apply(t, d, i), (x,))
        assert torch.autograd.gradgradcheck(lambda t, d=dim, i=index: _SelectUnique.apply(t, d, i), (x,))
    repeated = [0, 2, 2, 5, 0, 2, 3]
    index, readers = torch.tensor(repeated), column_readers(repeated, x.shape[1])
    assert readers == ((0, 4), (), (1, 2, 5), (6,), (), (3,))
    torch.testing.assert_close(_RepeatColumns.apply(x, index, readers), x.index_select(1, index), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: _RepeatColumns.apply(t, index, readers), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _RepeatColumns.apply(t, index, readers), (x,))


def test_float32_model_returns_float64_energies_with_exact_shifts():
    # DFT-sized per-species shifts (aspirin's total is about -17,500 eV): float32 spacing there is 2 meV, so
    # the shift is added and the energies summed in float64; the float32 model then agrees with the float64
    # one to float32 round-off of the network's own O(1) eV part.
    config = af.AllegroConfig(type_names=["H", "C", "O"], r_max=4.0, num_scalar_features=16, num_tensor_features=4,
                              two_body_mlp_hidden=(16,), latent_mlp_hidden=(16,), readout_mlp_hidden=(8,),
                              avg_num_neighbors=8.0, per_species_energy_shift=(-13.61, -1030.47, -2040.29))
    torch.manual_seed(11)
    model64 = af.Allegro(config).double()
    model32 = af.Allegro(config).float()
    model32.load_state_dict(model64.state_dict())
    frames = [molecule("CH3CH2OH"), molecule("CH3COOH")]
    graph = af.AtomicGraph.from_ase(frames, r_max=config.r_max)
    out64, out32 = model64(graph), model32(graph)
    assert out32["energy"].dtype == torch.float64 and out32["atomic_energy"].dtype == torch.float64
    assert out32["forces"].dtype == torch.float32
    assert float(out64["energy"].abs().min()) > 4000.0
    assert float((out32["energy"] - out64["energy"]).abs().max()) < 1e-4
    # The shift survives float32 <-> float64 round trips exactly.
    assert model32.double().float().energy_shift_float64.tolist() == [-13.61, -1030.47, -2040.29]


@pytest.mark.parametrize("name", ["default", "l3-3layers", "se3-l3-2layers"])
def test_folded_last_layers_match_the_layers_as_written(name, structures):
    """FoldedScalarPaths (the penultimate layer's product and mixing folded into the last layer's scalar paths,
    slot layout) against the same two layers run as written: outputs and the parameter gradients of an
    energy + force loss (a double backward through the fold), float64."""
    _, fast = pair(CONFIGS[name], seed=7)
    fast.max_slot_padding = float("inf")
    assert fast.folded_scalars is not None
    graph = af.AtomicGraph.from_ase(structures, r_max=fast.config.r_max)
    assert fast.neighbor_slots(graph) is not None
    results = {}
    for unfolded in (False, True):
        fast.unfolded = unfolded
        loss, out = energy_force_loss(fast.train(), graph)
        results[unfolded] = out, torch.autograd.grad(loss, list(fast.parameters()))
    (folded, folded_grads), (plain, plain_grads) = results[False], results[True]
    for key in ("energy", "atomic_energy", "forces"):
        assert_close(folded[key], plain[key], f"{name}: folded {key}", TOLERANCE[torch.float64])
    for (parameter, _), grad, expected in zip(fast.named_parameters(), folded_grads, plain_grads):
        assert_close(grad, expected, f"{name}: folded gradient of {parameter}", TOLERANCE[torch.float64])


def test_fold_is_used_where_its_cost_estimate_says_it_pays_off():
    assert af.Allegro(af.AllegroConfig.preset("default", ["Ag"])).folded_scalars is not None
    assert af.Allegro(af.AllegroConfig.preset("rmd17", ["H", "C", "O"])).folded_scalars is None  # n = 128
    assert af.Allegro(af.AllegroConfig.preset("speed", ["H"])).folded_scalars is None  # one layer


@pytest.mark.parametrize("name", ["default", "l3-3layers"])
def test_every_constant_table_survives_a_float32_round_trip_exactly(name):
    """Non-persistent floating-point buffers are tables built in float64 (Clebsch-Gordan contractions, the
    folded paths' table, masks); after float32 and back they must hold their float64 values bitwise, whatever
    their names (a table named outside the marker list once kept float32 round-off: errors of 1e-10)."""
    torch.manual_seed(0)
    model = af.Allegro(small_config(**CONFIGS[name])).double()
    tables = {
        f"{prefix}.{buffer}" if prefix else buffer: module.get_buffer(buffer).clone()
        for prefix, module in model.named_modules() for buffer in module._non_persistent_buffers_set
        if module.get_buffer(buffer).is_floating_point()
    }
    assert "folded_scalars.clebsch_gordan" in tables
    model.float().double()
    for table, value in tables.items():
        assert torch.equal(model.get_buffer(table), value), table


def test_silu_keeps_only_the_gradient_for_the_double_backward():
    """The MLPs' silu (`model._SiLU`): its first three derivatives are torch's silu's, gradcheck and gradgradcheck
    pass, and the force pass (a backward with create_graph) saves the incoming gradient and nothing else beyond the
    forward's x (torch's silu saves sigmoid(x), 1 - sigmoid(x) and products: five tensors)."""
    from allegro_fast.model import _SiLU

    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(11, 6, dtype=torch.float64, generator=generator)).requires_grad_(True)
    cotangent = torch.randn(11, 6, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(_SiLU.apply, (x,))
    assert torch.autograd.gradgradcheck(_SiLU.apply, (x,))

    def derivatives(silu):
        first, = torch.autograd.grad(silu(x), x, cotangent, create_graph=True)
        second, = torch.autograd.grad(first.square().sum(), x, create_graph=True)
        third, = torch.autograd.grad(second.pow(3).sum(), x)
        return first, second, third

    for ours, torch_silu in zip(derivatives(_SiLU.apply), derivatives(torch.nn.functional.silu)):
        assert_close(ours, torch_silu, "silu derivative", 1e-14)

    def saved_storages(silu):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            torch.autograd.grad(silu(x), x, cotangent, create_graph=True)
        return {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}

    assert len(saved_storages(_SiLU.apply)) == 2  # x and the incoming gradient
    assert len(saved_storages(torch.nn.functional.silu)) >= 4

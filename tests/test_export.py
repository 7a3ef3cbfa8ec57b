"""ForceField (plain tensors in and out), torch.compile, torch.export and AOTInductor packages: parity with
the eager model, one program for systems of different sizes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from ase import Atoms
from conftest import TRITON_DEVICES, diamond, ethanol, lonely_and_pair, periodic_cho, small_config

import allegro_fast as af
from allegro_fast.export import (
    OUTPUT_KEYS,
    EdgePadding,
    ForceField,
    compile_model,
    export_model,
    graph_inputs,
    load_exported,
    load_package,
    package_model,
    slot_template,
)
from allegro_fast.testing import TOLERANCE, assert_close


def tiny_model(dtype: torch.dtype) -> af.Allegro:
    """One layer, l_max 1: few kernels, so that code generation stays short."""
    torch.manual_seed(0)
    return af.Allegro(small_config(num_layers=1, l_max=1)).to(dtype)


def graphs(r_max: float) -> list[af.AtomicGraph]:
    """Systems of different sizes: periodic (7 atoms), a molecule (9), atoms with 0 and 1 neighbours, a batch."""
    return [
        af.AtomicGraph.from_ase(periodic_cho(2), r_max=r_max),
        af.AtomicGraph.from_ase(ethanol(3), r_max=r_max),
        af.AtomicGraph.from_ase(lonely_and_pair(), r_max=r_max),
    ]


def assert_matches_model(out: dict, model, graph: af.AtomicGraph, label: str) -> None:
    expected = model(graph, compute_stress=True, create_graph=False)
    tolerance = TOLERANCE[model.dtype]
    for key in ("energy", "atomic_energy", "forces", "stress"):
        # Energies are float64 for every model dtype (AllegroPotential.atomic_energies).
        dtype = torch.float64 if key in ("energy", "atomic_energy") else model.dtype
        assert out[key].dtype == expected[key].dtype == dtype, f"{label}: {key} dtype"
        assert_close(out[key], expected[key].detach(), f"{label}: {key}", tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_force_field_matches_the_model(dtype):
    torch.manual_seed(0)
    model = af.Allegro(small_config()).to(dtype)
    force_field = ForceField(model)
    batch = af.AtomicGraph.from_ase([ethanol(1), periodic_cho(2), lonely_and_pair()], r_max=model.config.r_max)
    for graph in [*graphs(model.config.r_max), batch]:
        out = force_field(*graph_inputs(graph))
        assert set(out) == set(OUTPUT_KEYS)
        assert all(not value.requires_grad for value in out.values())
        assert_matches_model(out, model, graph, f"ForceField, {graph.num_nodes} atoms")
        volume = torch.linalg.det(graph.cell.to(dtype)).abs()
        periodic = volume > 0  # molecules have a virial but no stress
        assert_close(out["virial"][periodic], -out["stress"][periodic] * volume[periodic].view(-1, 1, 1),
                     "virial = -stress * volume", TOLERANCE[dtype])
    # it shares the model's weights (and does not change how the model itself runs)
    with torch.no_grad():
        model.readout_mlp.layer0.weight.mul_(2.0)
    assert_matches_model(force_field.evaluate(batch), model, batch, "after a weight update")
    assert "_chunk_sizes" not in vars(model)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["slots", "edge-list"])
def test_compile_traces_one_graph_for_all_sizes(layout):
    """backend="aot_eager": Dynamo + AOTAutograd tracing without code generation (quicker than inductor).
    One program serves every number of atoms, edges and neighbour slots (K = 1 to 8 here)."""
    model = tiny_model(torch.float32)
    model.max_slot_padding = float("inf") if layout == "slots" else 0.0
    compiled = compile_model(model, backend="aot_eager")
    first, *others = graphs(model.config.r_max)
    for graph in (first, *others):
        template = slot_template(model, graph.edge_index, graph.num_nodes)
        assert (template is None) == (layout == "edge-list")
    assert_matches_model(compiled(first), model, first, "compiled, first call")
    with torch.compiler.set_stance("fail_on_recompile"):
        for graph in others:
            assert_matches_model(compiled(graph), model, graph, f"compiled, {graph.num_nodes} atoms")


@pytest.mark.parametrize("headroom", [0.0, 0.3, 3.0, "auto"])
def test_edge_padding_leaves_the_real_atoms_alone(headroom):
    """EdgePadding's ghost structure (the padding edges, between ghost atoms only) changes nothing for the real
    atoms: ForceField on padded inputs, cut back, gives the model's energies, forces and stress; the padded
    edges stay sorted by center, and no ghost holds more than its share of them."""
    model = tiny_model(torch.float64)
    force_field = ForceField(model)
    batch = af.AtomicGraph.from_ase([periodic_cho(4), lonely_and_pair(), ethanol(5)], r_max=model.config.r_max)
    for graph in [*graphs(model.config.r_max), batch]:
        padding = EdgePadding(model.config.r_max, atomic_number=1, headroom=headroom, multiple=16, edges_per_ghost=5)
        padded = padding.pad(*graph_inputs(graph))
        positions, cell, numbers, edge_index, edge_shift, batch_index = padded
        ghosts = positions.shape[0] - graph.num_nodes
        assert edge_index.shape[1] == padding.capacity >= graph.num_edges and padding.capacity % 16 == 0
        assert ghosts == padding.ghosts >= 2 and cell.shape[0] == graph.num_structures + 1
        assert torch.equal(batch_index[graph.num_nodes:], torch.full((ghosts,), graph.num_structures))
        assert bool((edge_index[0].diff() >= 0).all()), "edges sorted by center"
        ghost_edges = edge_index[:, graph.num_edges:]
        assert bool((ghost_edges >= graph.num_nodes).all()) and bool((ghost_edges[0] != ghost_edges[1]).all())
        padding_edges = padding.capacity - graph.num_edges
        degrees = torch.bincount(ghost_edges[0] - graph.num_nodes, minlength=ghosts)
        assert int(degrees.max()) <= -(-padding_edges // ghosts)
        out = EdgePadding.unpad(force_field(*padded), graph.num_nodes, graph.num_structures)
        assert_matches_model(out, model, graph, f"padded by {padding_edges} edges, {graph.num_nodes} atoms")


def test_auto_headroom_shrinks_with_the_count_from_20_to_2_percent():
    """headroom="auto" (CUDA_GRAPHS'): 20 / sqrt(count) between 0.02 and 0.2, so a million edges pay ~2 % of padding,
    a small system 20 %; the capacity follows it, and a bad headroom is an error that says what it got."""
    from allegro_fast.export import CUDA_GRAPHS, auto_headroom

    assert CUDA_GRAPHS["edge_headroom"] == "auto"
    assert auto_headroom(1) == auto_headroom(7_314) == 0.2
    assert auto_headroom(58_494) == pytest.approx(20 / 58_494**0.5) and 0.08 < auto_headroom(58_494) < 0.09
    assert auto_headroom(915_724) == pytest.approx(0.0209, abs=1e-4) and auto_headroom(10**8) == 0.02
    padding = EdgePadding(5.0, atomic_number=1, headroom="auto")
    for edges, fraction in ((915_724, 0.0209), (100, 0.2)):
        padding.capacity = 0
        edge_index = torch.zeros(2, edges, dtype=torch.long)
        padding.pad(torch.zeros(2, 3), torch.zeros(1, 3, 3), torch.ones(2, dtype=torch.long), edge_index,
                    torch.zeros(edges, 3), torch.zeros(2, dtype=torch.long))
        assert edges * (1 + fraction) <= padding.capacity <= edges * (1 + fraction) + 256 + 1
    for bad in (-0.1, "big", None):
        with pytest.raises(ValueError, match="headroom must be a number >= 0 or 'auto', got"):
            EdgePadding(5.0, atomic_number=1, headroom=bad)


def test_edge_padding_of_atoms_gives_batches_of_other_sizes_one_shape():
    """EdgePadding(pad_atoms=True): structures of different sizes (a batch, a periodic cell, a molecule, atoms with
    0 and 1 neighbours), padded after the largest, all get the same input shapes; the real atoms' outputs are the
    model's."""
    model = tiny_model(torch.float64)
    force_field = ForceField(model)
    r_max = model.config.r_max
    largest = af.AtomicGraph.from_ase([periodic_cho(4), lonely_and_pair(), ethanol(5)], r_max=r_max)
    others = [af.AtomicGraph.from_ase(atoms, r_max=r_max) for atoms in ([periodic_cho(2), ethanol(3), ethanol(4)],
                                                                         [lonely_and_pair(), periodic_cho(6), ethanol(7)])]
    padding = EdgePadding(r_max, atomic_number=1, headroom=0.5, multiple=16, edges_per_ghost=5, pad_atoms=True)
    shapes = set()
    for graph in [largest, *others]:
        padded = padding.pad(*graph_inputs(graph))
        shapes.add(tuple(tuple(x.shape) for x in padded))
        assert padded[0].shape[0] == padding.atom_capacity >= graph.num_nodes + 2 and padding.atom_capacity % 8 == 0
        out = EdgePadding.unpad(force_field(*padded), graph.num_nodes, graph.num_structures)
        assert_matches_model(out, model, graph, f"atoms padded, {graph.num_nodes} atoms")
    assert len(shapes) == 1 and padding.resizes == 2


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_edge_padding_with_the_triton_backend(device):
    """The same for the triton backend (segment sums over the padded CSR). On CUDA also the path padding is for:
    compile_model(mode="reduce-overhead", dynamic=False, edge_headroom) replays one CUDA graph per MD step."""
    torch.manual_seed(0)
    model = af.Allegro(small_config(num_layers=2, l_max=1, num_tensor_features=3), backend="triton").double()
    model = model.to(device)
    r_max = model.config.r_max
    batch = af.AtomicGraph.from_ase([periodic_cho(4), lonely_and_pair(), ethanol(5)], r_max=r_max).to(device=device)
    padding = EdgePadding(r_max, atomic_number=1, headroom=0.3, multiple=16, edges_per_ghost=5)
    out = EdgePadding.unpad(ForceField(model)(*padding.pad(*graph_inputs(batch))), batch.num_nodes, 3)
    assert_matches_model(out, model, batch, "triton backend, padded batch")
    if device == "cuda":
        compiled = compile_model(model, mode="reduce-overhead", dynamic=False, edge_headroom=1.0)
        steps = [af.AtomicGraph.from_ase(periodic_cho(seed), r_max=r_max).to(device=device) for seed in (2, 5, 6, 7)]
        for index, graph in enumerate(steps * 2):  # the first calls record, the later ones replay
            assert_matches_model(compiled(graph), model, graph, f"CUDA graphs, call {index}")
        assert compiled.padding.resizes == 1


@pytest.mark.slow
def test_padded_compile_serves_an_md_run_with_one_static_program():
    """compile_model(dynamic=False, edge_headroom=...): the steps of an MD run (same atoms, other positions, so
    other edge counts) reuse the program of the first step until one has more edges than the capacity, which
    raises it (new shapes: one more compilation); every step matches the eager model. The shapes CUDA graphs
    (mode="reduce-overhead") need are these."""
    model = tiny_model(torch.float64)
    compiled = compile_model(model, backend="aot_eager", dynamic=False, edge_headroom=1.0)
    steps = [af.AtomicGraph.from_ase(periodic_cho(seed), r_max=model.config.r_max) for seed in (2, 5, 6, 7)]
    assert len({graph.num_edges for graph in steps}) > 1
    assert_matches_model(compiled(steps[0]), model, steps[0], "padded, first step")
    with torch.compiler.set_stance("fail_on_recompile"):
        for index, graph in enumerate(steps[1:], 2):
            assert graph.num_edges <= compiled.padding.capacity
            assert_matches_model(compiled(graph), model, graph, f"padded, step {index}")
    crowded = periodic_cho(2)
    crowded.set_cell(crowded.cell * 0.6, scale_atoms=True)  # far more neighbours: beyond the capacity
    graph = af.AtomicGraph.from_ase(crowded, r_max=model.config.r_max)
    assert graph.num_edges > compiled.padding.capacity
    assert_matches_model(compiled(graph), model, graph, "padded, after raising the capacity")
    assert compiled.padding.resizes == 2


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    """Inductor guards on a lower bound of the edge count (26 edges for this model; a graph with fewer edges
    compiles again), so both graphs here have more."""
    model = tiny_model(torch.float64)
    compiled = compile_model(model)
    _, molecule, _ = graphs(model.config.r_max)
    # enough atoms for vectorized loops with tails (their scatter code once failed to compile)
    periodic = af.AtomicGraph.from_ase(diamond(4).repeat((2, 2, 3)), r_max=model.config.r_max)
    assert_matches_model(compiled(periodic), model, periodic, "inductor, first call")
    with torch.compiler.set_stance("fail_on_recompile"):
        assert_matches_model(compiled(*graph_inputs(molecule)), model, molecule, "inductor, another molecule")


@pytest.mark.slow
def test_export_round_trip(tmp_path):
    model = tiny_model(torch.float64)
    example, *others = graphs(model.config.r_max)
    path = export_model(model, example, tmp_path / "model.pt2")
    loaded = load_exported(path)
    assert loaded.r_max == model.config.r_max and loaded.type_names == list(model.config.type_names)
    assert af.AllegroConfig.from_dict(json.loads(loaded.metadata["allegro_fast_config"])) == model.config
    isolated = af.AtomicGraph.from_ase(Atoms("O", positions=[[0.0, 0.0, 0.0]]), r_max=model.config.r_max)
    for graph in [example, *others, isolated]:
        assert_matches_model(loaded(graph), model, graph, f"exported, {graph.num_nodes} atoms")


def test_export_needs_an_example_with_two_atoms_and_two_edges(tmp_path):
    model = tiny_model(torch.float64)
    isolated = af.AtomicGraph.from_ase(Atoms("O", positions=[[0.0, 0.0, 0.0]]), r_max=model.config.r_max)
    with pytest.raises(ValueError, match="at least 2 atoms and 2 edges"):
        export_model(model, isolated, tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_round_trip(tmp_path):
    model = tiny_model(torch.float64)
    example, *others = graphs(model.config.r_max)
    path = package_model(model, example, tmp_path / "model.pt2")
    loaded = load_package(path)
    assert loaded.r_max == model.config.r_max and loaded.type_names == list(model.config.type_names)
    for graph in [example, *others]:
        assert_matches_model(loaded(graph), model, graph, f"AOTInductor package, {graph.num_nodes} atoms")


# Loads an exported program and an AOTInductor package of the triton backend in a process that has not imported
# the kernels, and prints their energies and forces for ethanol(3).
LOAD_IN_A_FRESH_PROCESS = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[3])
from conftest import ethanol
import allegro_fast as af
from allegro_fast.export import load_exported, load_package
assert "allegro_fast.kernels.segments" not in sys.modules
result = {}
for name, load in (("exported", load_exported), ("package", load_package)):
    program = load(sys.argv[1 if name == "exported" else 2])
    out = program(af.AtomicGraph.from_ase(ethanol(3), r_max=program.r_max))
    result[name] = {key: out[key].tolist() for key in ("energy", "forces")}
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="AOTInductor needs a C++ compiler")
def test_a_fresh_process_loads_the_triton_backends_programs(tmp_path):
    """Their ops are found by name, and the layer ops take the key of a layer form that the model registers when
    it runs: torch failed to load both ("could not find schema for allegro_fast::segment_expand") until the
    loaders registered our ops, and then the programs failed on the unknown key until they registered the forms
    of the model in the metadata."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from allegro_fast.kernels._common import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = af.Allegro(small_config(num_layers=1, l_max=1), backend="triton").double()
    example = af.AtomicGraph.from_ase(periodic_cho(2), r_max=model.config.r_max)
    exported = export_model(model, example, tmp_path / "exported.pt2")
    package = package_model(model, example, tmp_path / "package.pt2")
    tests = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, exported, package, tests], cwd=tmp_path,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    graph = af.AtomicGraph.from_ase(ethanol(3), r_max=model.config.r_max)
    expected = model(graph)
    for name in ("exported", "package"):
        for key in ("energy", "forces"):
            error = af.testing.relative_error(torch.tensor(loaded[name][key], dtype=torch.float64),
                                              expected[key].detach().double())
            assert error < TOLERANCE[torch.float64], (name, key, error)


def test_training_force_field_gradients_match_eager():
    """TrainingForceField: one traced program for graphs of several sizes, whose energy, forces and stress
    have the eager model's parameter gradients (float64; aot_eager, the graph inductor would compile)."""
    from allegro_fast.export import TrainingForceField

    torch.manual_seed(0)
    model = af.Allegro(small_config()).double()
    training = TrainingForceField(model, backend="aot_eager")
    parameters = list(model.parameters())

    def loss(out):
        return out["energy"].pow(2).sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()

    for structures in ([periodic_cho(2)], [ethanol(3), ethanol(4)], [ethanol(5), ethanol(6)]):
        graph = af.AtomicGraph.from_ase(structures, r_max=model.config.r_max)
        out = training(graph)
        expected = model(graph, compute_stress=True, create_graph=True)
        for key in ("energy", "forces", "stress"):
            assert_close(out[key], expected[key], f"{len(structures)} structures: {key}", TOLERANCE[torch.float64])
        ours = torch.autograd.grad(loss(out), parameters, allow_unused=True)
        reference = torch.autograd.grad(loss(expected), parameters, allow_unused=True)
        for name, a, b in zip([n for n, _ in model.named_parameters()], ours, reference):
            if b is not None:
                assert_close(a, b, f"{len(structures)} structures: d loss / d {name}", TOLERANCE[torch.float64])
    assert sorted(training._programs) == [1, 2]  # one program per number of structures, any sizes
    with pytest.raises(ValueError, match="at least 2 atoms and 2 edges"):
        training(af.AtomicGraph.from_ase(lonely_and_pair()[:2], r_max=model.config.r_max))


@pytest.mark.parametrize("device", ["torch-cpu", *TRITON_DEVICES])
def test_static_padded_training_force_field_matches_eager(device):
    """TrainingForceField(dynamic=False, edge_headroom=...), the training step CUDA graphs replay: the edges and
    atoms are padded in a ghost structure, the program is traced for static shapes, and the loss's parameter
    gradients are the eager model's (the ghosts reach neither the outputs nor the gradients); batches with other
    edge and atom counts under the capacities reuse the program. The torch backend and the triton one (interpreter, aot_eager) on the CPU; on
    CUDA the triton backend with mode="reduce-overhead", i.e. CUDA graphs through our Triton ops."""
    from allegro_fast.export import TrainingForceField

    backend, device = ("torch", "cpu") if device == "torch-cpu" else ("triton", device)
    torch.manual_seed(0)
    model = af.Allegro(small_config(num_layers=2, l_max=1, num_tensor_features=3), backend=backend).double()
    model = model.to(device)
    options = {"mode": "reduce-overhead"} if device == "cuda" else {"backend": "aot_eager"}
    training = TrainingForceField(model, dynamic=False, edge_headroom=1.0, **options)
    parameters = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]

    def loss(out):
        return out["energy"].pow(2).sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()

    # other edge counts and (the molecule) another atom count: one program for all, within the capacities
    steps = [af.AtomicGraph.from_ase(atoms, r_max=model.config.r_max).to(device=device)
             for atoms in (periodic_cho(2), ethanol(3), periodic_cho(5))]
    assert len({graph.num_edges for graph in steps}) > 1 and len({graph.num_nodes for graph in steps}) > 1
    if device == "cpu" and backend == "triton":
        steps = steps[:2]  # the interpreter: 40 s a step
    for index, graph in enumerate(steps * (2 if device == "cuda" else 1)):  # CUDA: the first calls record
        out = training(graph)
        expected = model(graph, compute_stress=True, create_graph=True)
        label = f"step {index}"
        for key in ("energy", "forces", "stress"):
            assert out[key].shape == expected[key].shape, f"{label}: {key} shape"
            assert_close(out[key], expected[key], f"{label}: {key}", TOLERANCE[torch.float64])
        ours = torch.autograd.grad(loss(out), parameters, allow_unused=True)
        reference = torch.autograd.grad(loss(expected), parameters, allow_unused=True)
        for name, a, b in zip(names, ours, reference):
            if b is not None:
                assert_close(a, b, f"{label}: d loss / d {name}", TOLERANCE[torch.float64])
    assert training.padding.resizes == 2 and len(training._programs) == 1  # edges and atoms, set once


def test_training_force_field_activation_memory_budget_reaches_the_partitioner():
    """TrainingForceField(activation_memory_budget=0): inductor's min-cut partitioner (without its code generation)
    keeps fewer tensors for the loss backward than with the default budget, and the gradients stay the same;
    PyTorch's setting is back as it was after the call."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from allegro_fast.export import TrainingForceField

    kept = {}

    def backend(name):
        def forward_compiler(graph_module, _):
            outputs = next(node for node in graph_module.graph.nodes if node.op == "output").args[0]
            kept[name] = len(outputs)  # the step's three outputs and what it keeps for the backward
            return make_boxed_func(graph_module)

        return aot_autograd(fw_compiler=forward_compiler,
                            bw_compiler=lambda graph_module, _: make_boxed_func(graph_module),
                            partition_fn=min_cut_rematerialization_partition)

    torch.manual_seed(0)
    model = af.Allegro(small_config()).double()
    graph = af.AtomicGraph.from_ase([ethanol(3)], r_max=model.config.r_max)
    parameters = list(model.parameters())
    default_budget = torch._functorch.config.activation_memory_budget
    gradients = {}
    for name, budget in (("default", None), ("zero", 0.0)):
        out = TrainingForceField(model, backend=backend(name), activation_memory_budget=budget)(graph)
        loss = out["energy"].sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
        gradients[name] = torch.autograd.grad(loss, parameters, allow_unused=True)
        assert torch._functorch.config.activation_memory_budget == default_budget
    assert kept["zero"] < kept["default"], kept  # 35 and 126 when written
    for a, b in zip(gradients["zero"], gradients["default"]):
        if b is not None:
            assert_close(a, b, "parameter gradient", TOLERANCE[torch.float64])
    with pytest.raises(ValueError, match=r"activation_memory_budget must lie in \[0, 1\], got -0.5"):
        TrainingForceField(model, activation_memory_budget=-0.5)


def test_training_force_field_with_inductor_one_species():
    """The inductor-compiled training program for a one-species model (whose per-edge species scale has one
    entry: inductor's CPU code for a gather's backward into one element fails, so the model broadcasts it)."""
    from ase.build import bulk

    from allegro_fast.export import TrainingForceField

    torch.manual_seed(0)
    config = af.AllegroConfig(type_names=["Ag"], r_max=3.5, l_max=1, num_layers=1, num_scalar_features=8,
                              num_tensor_features=3, num_bessels=4, two_body_mlp_hidden=(8,), latent_mlp_hidden=(8,),
                              readout_mlp_hidden=(5,), avg_num_neighbors=12.0)
    model = af.Allegro(config).double()
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True)
    atoms.rattle(0.05, seed=2)
    graph = af.AtomicGraph.from_ase([atoms], r_max=config.r_max)
    out = TrainingForceField(model)(graph)
    expected = model(graph, compute_stress=True, create_graph=True)
    parameters = list(model.parameters())
    loss = out["energy"].sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
    reference = expected["energy"].sum() + expected["forces"].pow(2).sum() + expected["stress"].pow(2).sum()
    for a, b in zip(torch.autograd.grad(loss, parameters), torch.autograd.grad(reference, parameters)):
        assert_close(a, b, "parameter gradient", TOLERANCE[torch.float64])

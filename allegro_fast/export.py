"""torch.compile, torch.export and AOTInductor packages of an Allegro model.

All three go through `ForceField`, a module that takes plain tensors and returns plain tensors, with the
force and stress derivatives (autograd) inside, so that the whole computation is one traceable graph:

    forward(positions (N, 3) float, cell (B, 3, 3) float, atomic_numbers (N,) int64,
            edge_index (2, E) int64, edge_shift (E, 3) int64, batch (N,) int64)
      -> {"energy": (B,), "atomic_energy": (N,), "forces": (N, 3), "stress": (B, 3, 3), "virial": (B, 3, 3)}
         (energies float64, the rest in the model's dtype)

with graph.py's conventions (edges sorted by center; r_ij = r_j - r_i + S_ij @ cell[batch[i]]), forces
-dE/dr in eV/Å, stress (1/V) dE/d(strain) in eV/Å^3 (zero where the cell has no volume) and virial
-dE/d(strain) in eV. `graph_inputs(graph)` gives these tensors for an AtomicGraph. Inputs are not
validated (atomic numbers outside the model's type_names give wrong results, not errors): build them with
AtomicGraph, which checks everything. Outputs are detached: these are for inference (MD, deployment);
training uses the eager model, whose forces can be differentiated again.

What works where (torch 2.11 and 2.13, CPU; see the tests and the lead's README for timings):

* `compile_model(model)`: torch.compile(fullgraph=True, dynamic=True) of ForceField. Dynamo only traces
  torch.autograd.grad with ``torch._dynamo.config.trace_autograd_ops=True``, which the returned module
  sets while it runs; outputs must not carry requires_grad (hence detached). Dynamo in torch 2.11 cannot
  trace requires_grad_, so the compiled program is `ForceField.derivatives`, and the returned module makes
  the positions and the strain that require grad (`ForceField.leaves`) before each call. One compiled program serves
  any number of atoms and edges; a new number of structures B specializes (B = 1 is always special).
  The wrapper computes the torch backend's neighbour-slot count K before each call (`slot_template`) and
  passes it as a symbolic size, so the program runs the slot layout, as eager calls do, for every K; on
  Ag 256 that made it 1.2x faster than the edge-list program (graphs that the slots would pad by more
  than 2x still use the edge list, in a second program).
* `export_model(model, example_graph, path)`: torch.export in non-strict mode (the default): autograd runs
  while tracing, so the exported graph holds the forward and the backward as aten ops. Strict mode fails
  (Dynamo without trace_autograd_ops). Saved with torch.export.save to a .pt2 file; `load_exported(path)`.
* `package_model(model, example_graph, path)`: AOTInductor (`torch._inductor.aoti_compile_and_package`)
  compiles the exported program to a shared library inside a .pt2 package, loadable from Python
  (`load_package`) or C++ without Python. Needs a C++ compiler at package time.

torch.compile's disk caches (inductor's FX graph cache and AOTAutograd's cache) key a program on the graph that
Dynamo traced, not on the Python behind a custom op's registered derivative: a training step compiled before an
upgrade of this package would be read back after it, with the old double backward (seen on torch 2.13). So every
program compiled here compiles with `compile_cache_tag()`, a digest of this package's source, in its cache keys.

Number of atoms N and edges E are dynamic in exported programs, the number of structures B is fixed to the
example's (1 for MD); exported programs use the edge-list layout. The Allegro torch backend's edge
chunking (a Python loop over chunk sizes computed from E) cannot be traced with symbolic E, so ForceField
runs the model on one chunk, and it reads the atom count from shapes instead of `AtomicGraph.num_nodes`
(which calls int() and would specialize N).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .graph import AtomicGraph
from .potential import AllegroPotential

__all__ = [
    "OUTPUT_KEYS",
    "CompiledForceField",
    "EdgePadding",
    "ForceField",
    "TrainingForceField",
    "auto_headroom",
    "compile_cache_tag",
    "compile_model",
    "export_model",
    "graph_inputs",
    "load_exported",
    "load_package",
    "package_model",
    "slot_template",
]

OUTPUT_KEYS = ("energy", "atomic_energy", "forces", "stress", "virial")
INPUT_NAMES = ("positions", "cell", "atomic_numbers", "edge_index", "edge_shift", "batch")
# Strings stored with exported programs and packages (see _metadata)
METADATA_KEYS = ("allegro_fast_config", "r_max", "type_names", "dtype", "inputs", "outputs")


class _TracedGraph(AtomicGraph):
    """An AtomicGraph whose atom count stays symbolic under tracing (num_nodes without int())."""

    @property
    def num_nodes(self):
        return self.positions.shape[0]


def _one_chunk(num_edges):
    return [num_edges]


def _traceable_copy(model: AllegroPotential, parameter_gradients: bool = True) -> AllegroPotential:
    """A shallow copy sharing parameters and buffers with ``model``, that processes all edges in one chunk.

    ``parameter_gradients=False`` (inference: only the inputs' gradients are taken) tells the triton backend's
    layers so, as `AllegroPotential.forward` does for its calls: traced, a custom op's backward cannot ask the
    autograd engine (`kernels._common.gradient_wanted`), and Dynamo would trace the mixing weights' gradient
    (which AOTAutograd then drops) with guards on the edge count (its ranges of edges)."""
    traceable = copy.copy(model)
    if hasattr(model, "_chunk_sizes"):
        object.__setattr__(traceable, "_chunk_sizes", _one_chunk)
    if not parameter_gradients:
        object.__setattr__(traceable, "parameter_gradients", False)
    return traceable


def graph_inputs(graph: AtomicGraph, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """(positions, cell, atomic_numbers, edge_index, edge_shift, batch) of a graph, floats in ``dtype``."""
    return (
        graph.positions.to(dtype) if dtype is not None else graph.positions,
        graph.cell.to(dtype) if dtype is not None else graph.cell,
        graph.atomic_numbers,
        graph.edge_index,
        graph.edge_shift,
        graph.batch,
    )


class ForceField(nn.Module):
    """Energy, per-atom energy, forces, stress and virial of plain tensors (see the module docstring).

    Shares its parameters with ``model``; computes in the model's dtype. Outputs are detached (inference)
    unless ``create_graph``: then forces and stress can be differentiated again, for force training.
    ``edge_list``: the torch backend always uses the edge-list layout (for tracing with static shapes, where
    choosing the neighbour-slot count would read data).
    """

    def __init__(self, model: AllegroPotential, create_graph: bool = False, edge_list: bool = False) -> None:
        super().__init__()
        self.model = _traceable_copy(model, parameter_gradients=create_graph)
        self.r_max = float(model.config.r_max)
        self.create_graph = create_graph
        self.edge_list = edge_list

    def forward(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shift: torch.Tensor,
        batch: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``slots``: None, or an empty tensor of shape (K,) that fixes the torch backend's neighbour-slot
        count K (see `slot_template`); a size rather than an int, so that traced programs keep K symbolic and
        serve every K. Without it, traced programs use the edge-list layout."""
        positions, strain, cell = self.leaves(positions, cell)
        return self.derivatives(positions, strain, cell, atomic_numbers, edge_index, edge_shift, batch, slots)

    def leaves(self, positions: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, strain, cell) in the model's dtype, cut from the caller's graph; positions and the zero
        strain (B, 3, 3) require grad: the tensors that `derivatives` differentiates the energy with respect to."""
        dtype = self.model.dtype
        with torch.enable_grad():
            positions = positions.detach().to(dtype).requires_grad_(True)
            cell = cell.detach().to(dtype)
            strain = torch.zeros_like(cell).requires_grad_(True)
        return positions, strain, cell

    def derivatives(
        self,
        positions: torch.Tensor,
        strain: torch.Tensor,
        cell: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shift: torch.Tensor,
        batch: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`forward` given the leaves that `leaves` makes. torch.compile traces this method, not `forward`:
        Dynamo in torch 2.11 cannot trace requires_grad_ (nor a factory with requires_grad=True), so the
        tensors that autograd.grad differentiates with respect to are made outside the compiled program."""
        model = self.model
        num_structures = cell.shape[0]
        with torch.enable_grad():
            # CSR row pointers of the edges (sorted by center) and of the atoms (sorted by structure)
            atom_range = torch.arange(positions.shape[0] + 1, device=positions.device, dtype=edge_index.dtype)
            center_ptr = torch.searchsorted(edge_index[0].contiguous(), atom_range)
            structure_range = torch.arange(num_structures + 1, device=positions.device, dtype=batch.dtype)
            num_atoms = torch.searchsorted(batch.contiguous(), structure_range).diff()
            graph = _TracedGraph(
                positions=positions, atomic_numbers=atomic_numbers, edge_index=edge_index, edge_shift=edge_shift,
                cell=cell, pbc=torch.ones_like(cell[:, 0], dtype=torch.bool), batch=batch, num_atoms=num_atoms,
                center_ptr=center_ptr, r_max=self.r_max,
            )
            if slots is not None:
                graph.fixed_slots = slots.shape[0]
            elif self.edge_list:
                graph.fixed_slots = 0  # AllegroPotential.neighbor_slots: the edge-list layout
            # The gathers and sums over atoms and structures are the model's own: the triton backend's run in a
            # fixed order (segment sums), so its energies, forces and stress repeat bitwise on CUDA here too.
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            graph.positions = positions + torch.bmm(positions.unsqueeze(1),
                                                    model.per_atom(symmetric, graph)).squeeze(1)
            graph.cell = cell + torch.bmm(cell, symmetric)
            species = model.type_of_atomic_number[atomic_numbers]
            edge_vectors = model.edge_vectors(graph, graph.positions, graph.cell)
            atomic_energy = model.atomic_energies(edge_vectors, species, graph)
            if num_structures == 1:  # a plain sum: inductor's CPU code for a scatter into one element fails
                energy = atomic_energy.sum().unsqueeze(0)
            else:
                energy = model.sum_to_structures(atomic_energy, graph)
            position_grad, strain_grad = torch.autograd.grad(energy.sum(), [positions, strain],
                                                             create_graph=self.create_graph)
        # |a . (b x c)|: elementwise, unlike linalg.det, which AOTInductor has no C shim for
        volume = (cell[:, 0] * torch.linalg.cross(cell[:, 1], cell[:, 2], dim=-1)).sum(-1).abs()
        has_volume = (volume > 0).view(-1, 1, 1)
        stress = strain_grad / torch.where(volume > 0, volume, torch.ones_like(volume)).view(-1, 1, 1)
        out = {
            "energy": energy,
            "atomic_energy": atomic_energy,
            "forces": -position_grad,
            "stress": torch.where(has_volume, stress, torch.zeros_like(stress)),
            "virial": -strain_grad,
        }
        return out if self.create_graph else {key: value.detach() for key, value in out.items()}

    def evaluate(self, graph: AtomicGraph) -> dict[str, torch.Tensor]:
        """Run on an AtomicGraph (its float tensors cast to the model's dtype)."""
        return self(*graph_inputs(graph))


def slot_template(model: AllegroPotential, edge_index: torch.Tensor, num_atoms: int) -> torch.Tensor | None:
    """ForceField's ``slots`` argument for these edges: an empty (K,) tensor where the model would use the
    neighbour-slot layout with K slots (`Allegro.slot_count`), else None. Computed outside the traced program:
    K is the largest neighbour count, a data-dependent value."""
    slot_count = getattr(model, "slot_count", None)
    if slot_count is None or getattr(model, "backend", None) == "triton":
        return None  # the triton backend always takes the edge list: no bincount (on CUDA a host sync per call)
    slots = slot_count(torch.bincount(edge_index[0], minlength=num_atoms), edge_index.shape[1])
    # At least 2 (a spare zero slot where every atom has one neighbour): tracing specializes sizes 0 and 1.
    return None if slots is None else edge_index.new_empty(max(slots, 2))


def auto_headroom(count: int) -> float:
    """EdgePadding's headroom="auto": 20 / sqrt(count), between 0.02 and 0.2. The edge count of an MD run fluctuates
    by about 0.4 / sqrt(E) (relative standard deviation; EMT MD of fcc Ag, 256 and 2048 atoms, r_max 5, 300 and
    1500 K, after equilibration: 0.48 % of 7,447 and 0.17 % of 59,475 edges), so this is ~50 of them, while large
    systems, whose GPU time grows with the padded edges, pay ~2 % instead of 20 %. A run that starts far from
    equilibrium (a perfect lattice with a shell at the cutoff: Ag from 4,608 to ~7,450 edges) raises the capacity
    once, as with any fixed headroom."""
    return min(0.2, max(0.02, 20.0 / math.sqrt(max(count, 1))))


class EdgePadding:
    """Pads ForceField's six inputs to sizes that stay fixed from call to call, so that one program compiled for
    static shapes (or one CUDA graph) serves every step of an MD run, whose edge count changes at every step.

    The edges are padded to a capacity: the first call's count times 1 + `headroom`, rounded up to a multiple of
    `multiple`, raised the same way when a call has more edges (then the shapes change once). `headroom="auto"`
    scales it with the count E: 20 / sqrt(E), between 2 % and 20 % (`auto_headroom`). The padding edges
    live in a ghost structure appended to the batch: `ghosts` atoms (of the model's first species) on a line half
    a cutoff apart, each padding edge joining a ghost to the next one (the last to the one before), spread evenly
    over the ghosts, so no center gets a long run of edges. The real atoms' edges and CSR segments are unchanged
    and the ghost structure shares no edge with them: their energies, forces and stress are the unpadded ones
    (the matmuls see more rows, so equal to rounding, not bitwise). `unpad` cuts the ghosts off the outputs.

    With `pad_atoms` the atoms are padded to a capacity as well (the first call's count times 1 + `headroom`, plus
    two ghosts at least, rounded up to a multiple of 8): the ghosts fill it, so batches of other atom counts (training
    on structures of different sizes) keep the same shapes. Ghosts beyond the padding edges' share have no edge."""

    def __init__(self, r_max: float, atomic_number: int, headroom: float | str = 0.2, multiple: int = 256,
                 edges_per_ghost: int = 32, pad_atoms: bool = False) -> None:
        if headroom != "auto" and not (isinstance(headroom, (int, float)) and headroom >= 0):
            raise ValueError(f"EdgePadding: headroom must be a number >= 0 or 'auto', got {headroom!r}")
        self.r_max, self.atomic_number = float(r_max), int(atomic_number)
        self.headroom = headroom if headroom == "auto" else float(headroom)
        self.multiple, self.edges_per_ghost = int(multiple), int(edges_per_ghost)
        self.pad_atoms = pad_atoms
        self.capacity = 0  # edges
        self.atom_capacity = 0  # real atoms + ghosts (pad_atoms)
        self.ghosts = 0  # atoms of the ghost structure
        self.resizes = 0  # how often a capacity was raised (each time, new shapes)

    def pad(self, positions: torch.Tensor, cell: torch.Tensor, atomic_numbers: torch.Tensor, edge_index: torch.Tensor,
            edge_shift: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        num_atoms, num_structures, num_edges = positions.shape[0], cell.shape[0], edge_index.shape[1]
        if num_edges > self.capacity:
            wanted = int(num_edges * (1.0 + self.fraction(num_edges))) + 1
            self.capacity = -(-wanted // self.multiple) * self.multiple
            self.ghosts = max(2, -(-(self.capacity - num_edges) // self.edges_per_ghost))
            self.resizes += 1
        if self.pad_atoms:
            if num_atoms + 2 > self.atom_capacity:
                wanted = int(num_atoms * (1.0 + self.fraction(num_atoms))) + 2
                self.atom_capacity = -(-wanted // 8) * 8
                self.resizes += 1
            self.ghosts = self.atom_capacity - num_atoms
        padding, ghosts, device = self.capacity - num_edges, self.ghosts, positions.device
        ghost_index = torch.arange(ghosts, device=device)
        ghost_positions = torch.zeros(ghosts, 3, dtype=positions.dtype, device=device)
        ghost_positions[:, 0] = ghost_index.to(positions.dtype) * (0.5 * self.r_max)
        # padding edge p belongs to ghost p * ghosts // padding: sorted by center, at most ceil(padding / ghosts) each
        center = torch.arange(padding, device=device) * ghosts // max(padding, 1)
        neighbour = torch.where(center + 1 < ghosts, center + 1, center - 1)
        ghost_edges = torch.stack([center, neighbour]).to(edge_index.dtype) + num_atoms
        return (
            torch.cat([positions, ghost_positions]),
            torch.cat([cell, torch.zeros_like(cell[:1])]),  # no volume: zero stress, and no periodic image
            torch.cat([atomic_numbers, atomic_numbers.new_full((ghosts,), self.atomic_number)]),
            torch.cat([edge_index, ghost_edges], dim=1),
            torch.cat([edge_shift, edge_shift.new_zeros(padding, 3)]),
            torch.cat([batch, batch.new_full((ghosts,), num_structures)]),
        )

    def fraction(self, count: int) -> float:
        """The headroom for a capacity of `count` edges (or atoms)."""
        return auto_headroom(count) if self.headroom == "auto" else self.headroom

    @staticmethod
    def unpad(out: dict[str, torch.Tensor], num_atoms: int, num_structures: int) -> dict[str, torch.Tensor]:
        per_atom = ("atomic_energy", "forces")
        return {key: value[:num_atoms] if key in per_atom else value[:num_structures] for key, value in out.items()}


def source_digest(roots) -> str:
    """sha256 (hex) of the .py files under the folders ``roots``: their names (relative to their root) and bytes."""
    digest = hashlib.sha256()
    files = {path.resolve(): root for root in map(Path, roots) for path in root.rglob("*.py")}
    for path, root in sorted(files.items()):
        digest.update(path.relative_to(root.resolve()).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def compile_cache_tag() -> str:
    """"allegro_fast-" and the first 16 hex digits of `source_digest` over this package's Python source (the
    allegro_fast, kernels and reference folders, wherever they are installed): a different tag for any change."""
    names = ("allegro_fast", "allegro_fast.kernels", "allegro_fast.reference")
    roots = [Path(next(iter(importlib.util.find_spec(name).submodule_search_locations))) for name in names]
    return "allegro_fast-" + source_digest(roots)[:16]


class _CompileSettings:
    """Config values that hold while a compiled program of this module runs (it compiles at its first call, and
    again for new shapes), put back after it: the cache tag (`compile_cache_tag`, after the user's own
    torch.compiler.config.cache_key_tag, if any) and ``settings``, (config module, name, value) triples. Set by
    plain setattr: on the CPU here torch's config.patch cost ~17 us a call for one value, this ~10 us for two and
    the tag."""

    def __init__(self, *settings: tuple[object, str, object]) -> None:
        tag = compile_cache_tag()
        config = getattr(torch.compiler, "config", None)
        if config is not None and hasattr(config, "cache_key_tag"):
            user = config.cache_key_tag  # kept in front; ours is not added twice (a program called in another)
            ours = user if user == tag or user.endswith("+" + tag) else f"{user}+{tag}" if user else tag
            settings += ((config, "cache_key_tag", ours),)
        else:  # torch before 2.7 has no tag to add: compile without the caches
            settings += ((torch._inductor.config, "force_disable_caches", True),)
        self.settings = settings

    def __enter__(self) -> None:
        self.saved = [getattr(module, name) for module, name, _ in self.settings]
        for module, name, value in self.settings:
            setattr(module, name, value)

    def __exit__(self, *exc_info) -> None:
        for (module, name, _), value in zip(self.settings, self.saved):
            setattr(module, name, value)


class CompiledForceField(nn.Module):
    """torch.compile'd ForceField; call it with an AtomicGraph or with the six tensors. With `padding`
    (an EdgePadding) every call's inputs are padded to fixed sizes first, and its outputs cut back."""

    def __init__(self, force_field: ForceField, compiled, padding: EdgePadding | None = None) -> None:
        super().__init__()
        self.force_field = force_field
        self._compiled = compiled
        self.padding = padding
        self._slots = 0  # with padding: the largest neighbour-slot count so far (None: the edge-list layout)

    def forward(self, *inputs) -> dict[str, torch.Tensor]:
        if len(inputs) == 1 and isinstance(inputs[0], AtomicGraph):
            inputs = graph_inputs(inputs[0])
        num_atoms, num_structures = inputs[0].shape[0], inputs[1].shape[0]
        if self.padding is not None:
            inputs = self.padding.pad(*inputs)
        slots = slot_template(self.force_field.model, inputs[3], inputs[0].shape[0])
        if self.padding is not None:
            slots = self._static_slots(slots)
        positions, cell, *rest = inputs
        positions, strain, cell = self.force_field.leaves(positions, cell)
        with _CompileSettings((torch._dynamo.config, "trace_autograd_ops", True)):
            out = self._compiled(positions, strain, cell, *rest, slots=slots)
        return out if self.padding is None else EdgePadding.unpad(out, num_atoms, num_structures)

    def _static_slots(self, slots: torch.Tensor | None) -> torch.Tensor | None:
        """The slot count only grows under padding (any count >= the largest neighbour count is right), and the
        layout chosen first stays, so that shapes change only with the capacity."""
        if self._slots is None or slots is None:
            self._slots = None
            return None
        self._slots = max(self._slots, slots.shape[0])
        return slots.new_empty(self._slots)


def compile_model(
    model: AllegroPotential,
    *,
    dynamic: bool | None = True,
    fullgraph: bool = True,
    backend: str = "inductor",
    mode: str | None = None,
    options: dict | None = None,
    edge_headroom: float | str | None = None,
) -> CompiledForceField:
    """torch.compile of ``ForceField(model)``. Compilation happens at the first call (and again for a new
    number of structures, or for new sizes when dynamic=False). ``backend``, ``mode`` and ``options`` go
    to torch.compile (e.g. backend="aot_eager" traces without code generation).

    ``edge_headroom`` (e.g. 0.2, or "auto": 20 / sqrt(E) between 2 % and 20 %, `auto_headroom`): pad every call's
    edges to a capacity of (1 + edge_headroom) times the first call's, in a ghost structure (`EdgePadding`), so
    that the shapes stay fixed across the steps of an MD run: with dynamic=False one program serves them all, and
    mode="reduce-overhead" replays one CUDA graph per step instead of launching every kernel from Python. A call
    with more edges raises the capacity (new shapes)."""
    force_field = ForceField(model.eval())
    # the method, not the module: its inputs already require grad (see ForceField.derivatives)
    compiled = torch.compile(force_field.derivatives, fullgraph=fullgraph, dynamic=dynamic, backend=backend,
                             mode=mode, options=options)
    padding = None if edge_headroom is None else _ghost_padding(model, edge_headroom)
    return CompiledForceField(force_field, compiled, padding)


# compile_model's and TrainingForceField's options for CUDA graphs: static shapes, edges (and, training, atoms) padded
# to (1 + auto_headroom) times the first call's counts (20 % for small systems, 2 % from a million edges), one graph
# replayed per call (training.cuda_graphs, AllegroCalculator(cuda_graphs), the benchmark's "triton-graphs")
CUDA_GRAPHS = {"mode": "reduce-overhead", "dynamic": False, "edge_headroom": "auto"}


def _ghost_padding(model: AllegroPotential, edge_headroom: float | str, pad_atoms: bool = False) -> EdgePadding:
    number = int(torch.nonzero(model.type_of_atomic_number == 0)[0, 0])  # the ghosts: the first species
    return EdgePadding(model.config.r_max, number, headroom=edge_headroom, pad_atoms=pad_atoms)


class TrainingForceField:
    """Energy, forces and stress of AtomicGraphs from one compiled program, differentiable with respect to the
    model's parameters: a force-training step without a double backward through eager ops.

    make_fx traces ``ForceField(model, create_graph=True)`` (the forward and the force backward, as aten ops)
    with the parameters as inputs and symbolic numbers of atoms and edges; torch.compile (dynamic shapes)
    compiles that graph, and the loss backward is then a first-order backward of it. One trace per number of
    structures in a batch (the last, smaller batch of an epoch gets its own). It uses the edge-list layout:
    the neighbour-slot layout (`CompiledForceField`'s) took as long on Ag 256 and 1.17x as long on an aspirin
    batch, whose slots pad the edges by 1.4x. ``backend`` goes to torch.compile ("inductor"; "aot_eager"
    traces without code generation). Graphs need at least 2 atoms and 2 edges (sizes 0 and 1 are specialized while tracing).

    For CUDA graphs: ``mode="reduce-overhead", dynamic=False, edge_headroom="auto"`` (`CUDA_GRAPHS`) traces and
    compiles for static shapes, with the edges and the atoms padded to capacities in a ghost structure
    (`EdgePadding` with pad_atoms, cut off the outputs, so nothing of it reaches the loss), and torch.compile
    replays the forward and the loss backward as CUDA graphs: one program per number of structures in a batch and
    pair of capacities (raised, with a new program, when a batch exceeds them).

    ``activation_memory_budget`` (0 to 1; None: PyTorch's default, 1): what the compiled programs keep for the loss
    backward, as a fraction of what they would keep, the rest recomputed there
    (``torch._functorch.config.activation_memory_budget``, set while this object's programs compile). The default
    model's compiled step on the CPU (Ag 108 atoms, float32, the triton backend): 12.4 KB per edge at its peak, 11.0
    KB with 0.5 (`bench/training_memory.py`); what the recomputation costs in time on a GPU is not measured.
    """

    def __init__(self, model: AllegroPotential, backend: str = "inductor", *, mode: str | None = None,
                 dynamic: bool = True, edge_headroom: float | str | None = None,
                 activation_memory_budget: float | None = None) -> None:
        if activation_memory_budget is not None and not 0.0 <= activation_memory_budget <= 1.0:
            raise ValueError(f"TrainingForceField: activation_memory_budget must lie in [0, 1], got "
                             f"{activation_memory_budget}")
        self.model = model
        self.force_field = ForceField(model, create_graph=True, edge_list=True)
        self.backend, self.mode, self.dynamic = backend, mode, dynamic
        self.activation_memory_budget = activation_memory_budget
        # training batches change their atom count too: both are padded
        self.padding = None if edge_headroom is None else _ghost_padding(model, edge_headroom, pad_atoms=True)
        self._names = [name for name, _ in self.force_field.named_parameters()]
        self._programs: dict[object, object] = {}

    def _outputs(self, parameters: list[torch.Tensor], *inputs: torch.Tensor):
        from torch.nn.utils.stateless import _reparametrize_module

        with _reparametrize_module(self.force_field, dict(zip(self._names, parameters))):
            out = self.force_field(*inputs)
        return out["energy"], out["forces"], out["stress"]

    def __call__(self, graph: AtomicGraph) -> dict[str, torch.Tensor]:
        from torch.fx.experimental.proxy_tensor import make_fx

        if graph.num_nodes < 2 or graph.num_edges < 2:
            raise ValueError(f"compiled training needs graphs with at least 2 atoms and 2 edges, got "
                             f"{graph.num_nodes} atoms and {graph.num_edges} edges")
        inputs = graph_inputs(graph, self.model.dtype)
        if self.padding is not None:
            inputs = self.padding.pad(*inputs)
        parameters = [parameter for _, parameter in self.force_field.named_parameters()]
        # dynamic: one program per number of structures; static: one per set of shapes (with padding, one per
        # capacity)
        key = graph.num_structures if self.dynamic else tuple(tuple(x.shape) for x in inputs)
        program = self._programs.get(key)
        if program is None:
            traced = make_fx(self._outputs, tracing_mode="symbolic" if self.dynamic else "fake",
                             _allow_non_fake_inputs=True)([parameter.detach() for parameter in parameters], *inputs)
            _views_to_reshapes(traced)
            program = self._programs[key] = torch.compile(traced, dynamic=self.dynamic, backend=self.backend,
                                                          mode=self.mode)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed by now
        # a program compiles at its first call: the partitioner reads the budget then
        budget = () if self.activation_memory_budget is None else (
            (torch._functorch.config, "activation_memory_budget", self.activation_memory_budget),)
        with _CompileSettings(*budget):
            energy, forces, stress = program(parameters, *inputs)
        out = {"energy": energy, "forces": forces, "stress": stress}
        return out if self.padding is None else EdgePadding.unpad(out, graph.num_nodes, graph.num_structures)


def _dynamic_shapes():
    """Numbers of atoms and edges dynamic; the number of structures (cell's first dimension) fixed."""
    num_atoms = torch.export.Dim("num_atoms", min=1)
    num_edges = torch.export.Dim("num_edges", min=0)
    # positions, cell, atomic_numbers, edge_index, edge_shift, batch
    return ({0: num_atoms}, None, {0: num_atoms}, {1: num_edges}, {0: num_edges}, {0: num_atoms})


def _metadata(model: AllegroPotential) -> dict[str, str]:
    config = model.config
    return {  # keys: METADATA_KEYS
        "allegro_fast_config": json.dumps(config.to_dict()),
        "r_max": repr(float(config.r_max)),
        "type_names": json.dumps(list(config.type_names)),
        "dtype": str(model.dtype).removeprefix("torch."),
        "inputs": json.dumps(list(INPUT_NAMES)),
        "outputs": json.dumps(list(OUTPUT_KEYS)),
    }


def _views_to_reshapes(graph_module: torch.fx.GraphModule) -> None:
    """Replace aten.view by aten.reshape where nothing is mutated in place through either side.

    make_fx records reshape as view when the traced tensor happened to be contiguous; a later retrace (by
    AOTInductor, whose decompositions give e.g. cat other strides) then fails with "Cannot view a tensor
    ...". reshape is the same function without that assumption.
    """
    views = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
    mutated = set()
    for node in graph_module.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable and node.args:
            mutated.add(node.args[0])
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in views and node not in mutated and node.args[0] not in mutated:
            node.target = torch.ops.aten.reshape.default
    graph_module.recompile()


def export_program(model: AllegroPotential, example_graph: AtomicGraph) -> torch.export.ExportedProgram:
    """torch.export of ForceField(model), dynamic in the numbers of atoms and edges.

    Two steps, because torch.export (2.13, non-strict) cannot trace torch.autograd.grad through ops that
    save their output for the backward (sqrt, norm, ...): it lifts the saved tensors as constants holding
    fake values (pytorch/pytorch#146719). make_fx with symbolic shapes traces the forward and the backward
    into one aten graph with the weights as constants; torch.export of that graph then has nothing left
    to differentiate. The example must have at least 2 atoms and 2 edges (sizes 0 and 1 are specialized
    by tracing).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    if example_graph.num_nodes < 2 or example_graph.num_edges < 2:
        raise ValueError(
            f"export: the example graph needs at least 2 atoms and 2 edges (sizes 0 and 1 are specialized "
            f"while tracing), got {example_graph.num_nodes} atoms and {example_graph.num_edges} edges"
        )
    force_field = ForceField(model.eval())
    example = graph_inputs(example_graph, model.dtype)
    traced = make_fx(force_field, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    for node in traced.graph.find_nodes(op="get_attr"):  # weights: constants of an inference program
        value = getattr(traced, node.target)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            delattr(traced, node.target)
            setattr(traced, node.target, value.detach())
    _views_to_reshapes(traced)
    return torch.export.export(traced, example, dynamic_shapes=_dynamic_shapes(), strict=False)


def _atomic_target(path) -> tuple[str, str]:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}.pt2")
    return path, temporary


def export_model(model: AllegroPotential, example_graph: AtomicGraph, path: str | os.PathLike) -> str:
    """Export to a .pt2 file (torch.export.save, atomic write); the model's config and the input/output
    names go into its extra files. Returns the path."""
    program = export_program(model, example_graph)
    path, temporary = _atomic_target(path)
    try:
        torch.export.save(program, temporary, extra_files=_metadata(model))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


@dataclasses.dataclass
class LoadedProgram:
    """A loaded exported or AOTInductor-compiled ForceField: call with the six tensors or an AtomicGraph."""

    runner: object
    metadata: dict[str, str]

    @property
    def r_max(self) -> float:
        return float(self.metadata["r_max"])

    @property
    def type_names(self) -> list[str]:
        return json.loads(self.metadata["type_names"])

    def __call__(self, *inputs) -> dict[str, torch.Tensor]:
        if len(inputs) == 1 and isinstance(inputs[0], AtomicGraph):
            dtype = getattr(torch, self.metadata.get("dtype", "float64"))
            inputs = graph_inputs(inputs[0], dtype)
        return self.runner(*inputs)


def _register_ops() -> None:
    """Register this package's custom ops (allegro_fast::...), which the triton backend's programs call by name:
    torch resolves a loaded program's ops among those registered in the process (a fresh process that had not
    imported the kernels failed to load one)."""
    from .kernels import edge_geometry, segments, tensor_product  # noqa: F401


def _register_layer_forms(metadata: dict) -> None:
    """Register the fused layer forms of the program's model with the kernels: the triton backend's layer ops
    take a form's key, which the model registers when it is built (`Allegro._triton_forms`)."""
    from .config import AllegroConfig
    from .model import Allegro

    text = metadata.get("allegro_fast_config")
    if text:
        Allegro(AllegroConfig.from_dict(json.loads(text)), backend="triton")._triton_forms()


def load_exported(path: str | os.PathLike) -> LoadedProgram:
    """Load a file written by export_model; returns a callable."""
    _register_ops()
    extra_files = dict.fromkeys(METADATA_KEYS, "")
    program = torch.export.load(os.fspath(path), extra_files=extra_files)
    _register_layer_forms(extra_files)
    return LoadedProgram(runner=program.module(), metadata=extra_files)


def package_model(
    model: AllegroPotential,
    example_graph: AtomicGraph,
    path: str | os.PathLike,
    *,
    inductor_configs: dict | None = None,
) -> str:
    """AOTInductor package (.pt2) of the exported ForceField: a compiled shared library plus weights, loadable
    without Python (torch::inductor::AOTIModelPackageLoader) or with `load_package`. Atomic write.

    A model of the triton backend packages too, but its library calls this package's ops, which are Python
    (torch.library.custom_op): it loads with `load_package`, in Python, and not from C++ alone (torch: "Custom
    operators created via torch.library.custom_op cannot be run via AOTI without Python environment")."""
    from torch._inductor import aoti_compile_and_package

    program = export_program(model, example_graph)
    configs = {"aot_inductor.metadata": _metadata(model)}
    configs.update(inductor_configs or {})
    path, temporary = _atomic_target(path)
    try:
        with _CompileSettings():
            aoti_compile_and_package(program, package_path=temporary, inductor_configs=configs)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def load_package(path: str | os.PathLike) -> LoadedProgram:
    """Load an AOTInductor package written by package_model; returns a callable."""
    from torch._inductor import aoti_load_package

    _register_ops()
    runner = aoti_load_package(os.fspath(path))
    metadata = dict(runner.get_metadata())
    _register_layer_forms(metadata)
    return LoadedProgram(runner=runner, metadata=metadata)

"""What every Allegro model shares around its edge function: species lookup, the per-atom energy sum,
and forces and stress by automatic differentiation (DESIGN section 1, items 5 and 6).

A backend implements `edge_energies(edge_vectors, center_species, neighbor_species, graph)`; the base
class turns that into the output dict

    energy (B,), atomic_energy (N,), forces (N, 3) = -dE/dr, stress (B, 3, 3) = (1/V) dE/d(strain).

Stress is taken with respect to a symmetric strain applied to positions and cell together; it is zero
for structures without a cell volume (molecules, slabs with an empty vacuum vector).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .config import AllegroConfig
from .graph import AtomicGraph
from .radial import initial_bessel_frequencies


# Buffers computed exactly at construction (float64) and never trained: restored after a dtype round trip.
# Every non-persistent floating-point buffer is one too (a table derived from the configuration), except
# `energy_shift_float64`, which is kept in float64 on its own.
_EXACT_CONSTANT_MARKERS = ("w3j", "clebsch_gordan", "harmonic_coefficients", "bessel_frequencies", "per_species_energy_")
_NOT_EXACT_CONSTANTS = ("energy_shift_float64",)


def _is_backend_constant(name: str, value: torch.Tensor) -> bool:
    """Buffers that e3nn modules keep for themselves, not weights of the function."""
    return "w3j" in name or name.endswith("output_mask") or value.numel() == 0


@contextlib.contextmanager
def float64_construction() -> Iterator[torch.dtype]:
    """Build modules with float64 defaults, yielding the caller's default dtype.

    e3nn computes Clebsch-Gordan and spherical-harmonic constants in the default dtype when a module is
    built; built in float32 and cast to float64 later, they keep float32 round-off (equivariance errors of
    1e-10 instead of 1e-15). Models are therefore built in float64 and cast to the caller's dtype after.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield previous
    finally:
        torch.set_default_dtype(previous)


class AllegroPotential(nn.Module):
    """Base class: per-species energy scale/shift, species lookup, Bessel frequencies, forces and stress.

    Subclasses implement `build(config)` (their modules) and `edge_energies`. Everything is built with
    float64 defaults (see `float64_construction`) and then cast to the caller's default dtype.
    """

    def __init__(self, config: AllegroConfig) -> None:
        with float64_construction() as default_dtype:
            super().__init__()
            self._build_common(config)
            self.build(config)
            self.remember_exact_constants()
        self.to(default_dtype)

    def build(self, config: AllegroConfig) -> None:
        raise NotImplementedError

    def _build_common(self, config: AllegroConfig) -> None:
        self.config = config
        num_types = config.num_types
        type_of_atomic_number = torch.full((119,), -1, dtype=torch.long)
        for type_index, z in enumerate(config.atomic_numbers):
            type_of_atomic_number[z] = type_index
        self.register_buffer("type_of_atomic_number", type_of_atomic_number, persistent=False)
        shift = config.per_species_energy_shift or (0.0,) * num_types
        scale = config.per_species_energy_scale or (1.0,) * num_types
        self.register_buffer("per_species_energy_shift", torch.tensor(shift, dtype=torch.get_default_dtype()))
        self.register_buffer("per_species_energy_scale", torch.tensor(scale, dtype=torch.get_default_dtype()))
        # The shift again, kept in float64 whatever the model's dtype (see `atomic_energies`).
        self.register_buffer("energy_shift_float64", torch.tensor(shift, dtype=torch.float64), persistent=False)
        if config.per_edge_species_scale:
            self.edge_species_scale = nn.Parameter(torch.ones(num_types, num_types))
        else:
            self.edge_species_scale = None
        frequencies = initial_bessel_frequencies(config.num_bessels)
        if config.bessel_trainable:
            self.bessel_frequencies = nn.Parameter(frequencies)
        else:
            self.register_buffer("bessel_frequencies", frequencies)

    def remember_exact_constants(self) -> None:
        """Keep float64 copies of constant buffers (Clebsch-Gordan tables, Bessel frequencies, per-species
        shift and scale, every non-persistent table), so that a model cast to float32 and back to float64 gets
        them back without float32 round-off. load_state_dict refreshes the copies of the buffers it loads."""
        non_persistent = {f"{prefix}.{name}" if prefix else name
                          for prefix, module in self.named_modules() for name in module._non_persistent_buffers_set}
        self._exact_constants = {
            name: buffer.detach().to(torch.float64).clone()
            for name, buffer in self.named_buffers()
            if buffer.is_floating_point() and name not in _NOT_EXACT_CONSTANTS
            and (name in non_persistent or any(marker in name for marker in _EXACT_CONSTANT_MARKERS))
        }

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights from any backend or the reference: constants that only one side keeps (e3nn's
        Clebsch-Gordan buffers and empty bias/weight placeholders) are taken from this model."""
        own = self.state_dict()
        state = {key: value for key, value in state_dict.items() if key in own or not _is_backend_constant(key, value)}
        for key, value in own.items():
            if key not in state and _is_backend_constant(key, value):
                state[key] = value
        result = super().load_state_dict(state, strict=strict, assign=assign)
        exact = getattr(self, "_exact_constants", {})
        for key in exact:
            if key in state_dict:
                # A value that is only our exact constant rounded (a float32 model's state dict) keeps the exact one.
                loaded = state_dict[key].detach().to(exact[key].device)
                if not torch.equal(exact[key].to(loaded.dtype), loaded):
                    exact[key] = loaded.to(torch.float64).clone()
        self._keep_float64_shift()
        return result

    def _keep_float64_shift(self) -> None:
        exact = getattr(self, "_exact_constants", {}).get("per_species_energy_shift")
        if exact is not None:
            self.energy_shift_float64 = exact.to(self.per_species_energy_shift.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, exact in getattr(self, "_exact_constants", {}).items():
            buffer = self.get_buffer(name)
            with torch.no_grad():
                buffer.copy_(exact.to(device=buffer.device, dtype=buffer.dtype))
        self._keep_float64_shift()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.per_species_energy_shift.dtype

    def species_of(self, graph: AtomicGraph) -> torch.Tensor:
        """Type index of every atom; an atomic number outside type_names is an error naming the atom."""
        numbers = graph.atomic_numbers
        valid_range = (numbers >= 0) & (numbers < self.type_of_atomic_number.numel())
        species = torch.where(valid_range, self.type_of_atomic_number[numbers.clamp(0, 118)], -1)
        unknown = torch.nonzero(species < 0)
        if len(unknown) > 0:
            atom = int(unknown[0, 0])
            structure = int(graph.batch[atom])
            first_atom = int(torch.nonzero(graph.batch == structure)[0, 0])
            raise ValueError(
                f"atom {atom - first_atom} of structure {structure} has atomic number {int(numbers[atom])}, "
                f"which is not one of the model's type_names {list(self.config.type_names)}"
            )
        return species

    def edge_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """(E, 3) edge vectors -> (E,) edge energies E_ij before the per-species-pair scale."""
        raise NotImplementedError

    # The sums to atoms and structures and the gathers whose gradients are such sums. Here index_add and
    # indexing (on CUDA their backward and index_add use float atomics: the last bits vary between identical
    # calls); the triton backend overrides them with segment sums in a fixed order (kernels.segments).
    def edge_vectors(self, graph: AtomicGraph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """(E, 3) r_ij from (N, 3) positions and (B, 3, 3) cells (see AtomicGraph.edge_vectors)."""
        return graph.edge_vectors(positions, cell)

    def sum_to_centers(self, per_edge: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """(E,) -> (N,): the sum over each atom's edges (as center)."""
        summed = torch.zeros(graph.num_nodes, dtype=per_edge.dtype, device=per_edge.device)
        return summed.index_add(0, graph.edge_index[0], per_edge)

    def sum_to_structures(self, per_atom: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """(N,) -> (B,): the sum over each structure's atoms."""
        summed = torch.zeros(graph.num_structures, dtype=per_atom.dtype, device=per_atom.device)
        return summed.index_add(0, graph.batch, per_atom)

    def per_atom(self, per_structure: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """(B, ...) -> (N, ...): each atom's structure's entry."""
        return per_structure[graph.batch]

    def edge_pair_types(self, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """(E,) species pair of every edge, T species[i] + species[j]."""
        center, neighbor = graph.edge_index
        return species.index_select(0, center) * self.config.num_types + species.index_select(0, neighbor)

    def per_edge_pair(self, table: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """Rows of a per-species-pair table, (T, T, ...) or (T T, ...), picked for every edge: (E, ...) (its
        gradient, a sum over the edges of each pair, is a parameter's)."""
        return self.pair_table(table).index_select(0, self.edge_pair_types(species, graph))

    def pair_table(self, table: torch.Tensor) -> torch.Tensor:
        """A per-species-pair table as (T T, ...)."""
        num_types = self.config.num_types
        return table if table.shape[0] == num_types**2 else table.reshape(num_types**2, *table.shape[2:])

    def atomic_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """(N,) atomic energies E_i = sigma_Z summed_i + mu_Z, in float64 whatever the model's dtype: the
        network's part is computed in the model's dtype, the per-species shift mu_Z (hundreds to thousands of eV
        per atom for DFT totals) is added in float64, so a float32 model's total energy of aspirin (-17,600 eV)
        is not rounded to float32's 2 meV spacing there. Gradients reach the inputs in the model's dtype."""
        edge_energy = self.edge_energies(edge_vectors, species, graph)
        if self.edge_species_scale is not None:
            # With one species the table has one entry: broadcast it. A gather's backward would scatter into
            # one element, which inductor's CPU code generation fails on (compiled training).
            if self.config.num_types == 1:
                edge_energy = edge_energy * self.edge_species_scale.view(1)
            else:
                edge_energy = edge_energy * self.per_edge_pair(self.edge_species_scale, species, graph)
        summed = self.sum_to_centers(edge_energy, graph) / self.config.avg_num_neighbors**0.5
        scaled = (self.per_species_energy_scale[species] * summed).to(torch.float64)
        return scaled + self.energy_shift_float64.index_select(0, species)

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool | None = None,
        create_graph: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Energy, per-atom energy, forces and (for periodic structures, by default) stress.

        Energies are float64 for every model dtype (see `atomic_energies`); forces and stress have the model's
        dtype. create_graph defaults to self.training, so a force loss can be differentiated again.
        """
        if compute_stress is None:
            compute_stress = bool(graph.pbc.any())
        if create_graph is None:
            create_graph = self.training
        dtype = self.dtype
        species = self.species_of(graph)
        positions = graph.positions.to(dtype)
        cell = graph.cell.to(dtype)
        inputs = []
        if compute_forces:
            positions = positions.detach().requires_grad_(True)
            inputs.append(positions)
        if compute_stress:
            strain = torch.zeros_like(cell).requires_grad_(True)
            inputs.append(strain)
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            positions = positions + torch.bmm(positions.unsqueeze(1), self.per_atom(symmetric, graph)).squeeze(1)
            cell = cell + torch.bmm(cell, symmetric)
        edge_vectors = self.edge_vectors(graph, positions, cell)

        # Without create_graph the force gradient frees the graph: no parameter gradient can follow it, and
        # custom ops (the Triton layers) may skip their weights' (autograd does not tell them what is wanted).
        self.parameter_gradients = create_graph or not inputs
        try:
            atomic_energy = self.atomic_energies(edge_vectors, species, graph)
        finally:
            self.parameter_gradients = True
        energy = self.sum_to_structures(atomic_energy, graph)
        out = {"energy": energy, "atomic_energy": atomic_energy}
        if inputs:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
            if compute_forces:
                out["forces"] = -grads[0]
            if compute_stress:
                volume = torch.linalg.det(graph.cell.to(dtype)).abs()
                safe_volume = torch.where(volume > 0, volume, torch.ones_like(volume))
                stress = grads[-1] / safe_volume.view(-1, 1, 1)
                out["stress"] = torch.where((volume > 0).view(-1, 1, 1), stress, torch.zeros_like(stress))
        return out

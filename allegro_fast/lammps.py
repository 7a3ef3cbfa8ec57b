"""Allegro in LAMMPS through ML-IAP's Python "unified" interface (`pair_style mliap unified FILE 0`).

LAMMPS spreads the atoms over MPI ranks; on each rank and each step it hands the model the pairs of
its *local* atoms i with every atom j (local or ghost) closer than the cutoff:

    rij     (P, 3)  r_j - r_i in Å, with the periodic image already applied
    pair_i  (P,)    index of i among the rank's local + ghost atoms, grouped by i
    pair_j  (P,)    index of j among the rank's local + ghost atoms
    elems   (N_all,) element of every local and ghost atom, as an index into `element_types`

Allegro is strictly local: E = sum_i E_i, and E_i depends only on the vectors r_ij to the neighbours j
of i within r_max and on the species. All of them are among the pairs handed over for a local i, so every
local E_i is computed from those pairs alone, on a graph whose edges are the pairs (no positions or cell
needed) and whose nodes are the rank's local atoms, plus one node per species that every ghost of that species
shares (a neighbour j enters through its species only). The model returns

    eatoms[ii] = E_i for the ii-th atom of LAMMPS's list,     energy = sum of them on this rank,
    fij[p]     = dE_rank / d rij[p]   (autograd; E_rank = sum of the rank's local E_i),

and LAMMPS adds f_i += fij, f_j -= fij for every pair (F = -dE/dr, as rij = r_j - r_i), sends the
forces on ghost atoms back to their owners (`newton on`, which ML-IAP requires) and tallies the virial
W = -sum_p rij[p] (x) fij[p] itself, so the pressure needs nothing more from the model.

The trailing 0 of `pair_style mliap unified FILE 0` asks for no ghost neighbours: a strictly local
model never needs the neighbours of ghost atoms, so the communication stays one cutoff deep.
LAMMPS builds its list with a cutoff of 2 * rcutfac, hence rcutfac = r_max / 2 here.

The file LAMMPS loads is a pickle of `AllegroMLIAPUnified` holding the model's config and weights; it is
rebuilt on unpickling, so the process that runs LAMMPS must be able to import torch and allegro_fast.
LAMMPS reads files ending in .pt or .pth with a bare torch.load, which since torch 2.6 refuses pickled
classes (weights_only=True); `write_lammps_model` therefore refuses those suffixes and writes a plain
pickle (".mliap.pkl" by convention), which LAMMPS reads with pickle.load.

    python -m allegro_fast.lammps model.pt model.mliap.pkl      # then, in the LAMMPS input:
    pair_style mliap unified model.mliap.pkl 0
    pair_coeff * * Ag Cu                                        # element of LAMMPS type 1, 2, ...

With --compile (`AllegroMLIAPUnified(compile=True)`) every rank runs the evaluation as one torch.compile'd program
with dynamic shapes (`PairForceField`), compiled at its first step: the pair and atom counts change from step to
step and from rank to rank without compiling again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic_files import atomic_write
from .config import AllegroConfig
from .potential import AllegroPotential

__all__ = ["AllegroMLIAPUnified", "PairForceField", "PairGraph", "evaluate_pairs", "lammps_python_path", "local_rank",
           "main", "rank_device", "write_lammps_model"]

FORMAT = "allegro-fast-lammps-mliap"
FORMAT_VERSION = 1
_TORCH_LOAD_SUFFIXES = (".pt", ".pth")

# Where scripts/build_lammps.sh installs LAMMPS (bin/lmp, lib/, python/lammps with its own liblammps.so).
LAMMPS_PREFIX_VARIABLE = "ALLEGRO_FAST_LAMMPS"
DEFAULT_LAMMPS_PREFIX = Path("~/.cache/allegro-fast/lammps")


def lammps_python_path(prefix: str | os.PathLike | None = None) -> Path | None:
    """The folder to put on PYTHONPATH for the LAMMPS built by scripts/build_lammps.sh, or None if absent.

    prefix defaults to $ALLEGRO_FAST_LAMMPS, else ~/.cache/allegro-fast/lammps.
    """
    prefix = Path(prefix or os.environ.get(LAMMPS_PREFIX_VARIABLE) or DEFAULT_LAMMPS_PREFIX).expanduser()
    package = prefix / "python" / "lammps"
    if (package / "__init__.py").is_file() and any(package.glob("liblammps*.so*")):
        return prefix / "python"
    return None


@dataclasses.dataclass
class PairGraph:
    """The part of an AtomicGraph the edge function reads, for edges given as vectors.

    edge_index (2, P) int64 (center, neighbour), sorted by center; num_nodes atoms; center_ptr (num_nodes + 1,)
    CSR row pointers over the edges (the Triton backend walks edges per center with them).
    """

    edge_index: torch.Tensor
    num_nodes: int
    center_ptr: torch.Tensor
    fixed_slots = None  # as AtomicGraph's: the torch backend chooses its neighbour-slot count K itself

    @classmethod
    def from_sorted_pairs(cls, centers: torch.Tensor, neighbours: torch.Tensor, num_nodes: int) -> PairGraph:
        counts = torch.bincount(centers, minlength=num_nodes)
        center_ptr = torch.zeros(num_nodes + 1, dtype=torch.int64, device=centers.device)
        center_ptr[1:] = torch.cumsum(counts, 0)
        return cls(torch.stack([centers, neighbours]), num_nodes, center_ptr)


class PairForceField(nn.Module):
    """`evaluate_pairs`' tensor part: (energies (L,) float64, dE/d rij (P, 3)) of the listed atoms, from edge vectors
    that require grad (made by the caller: Dynamo cannot trace requires_grad_), edges sorted by center.

    ``traceable``: share the model through `export`'s one-chunk copy, for torch.compile (`AllegroMLIAPUnified`'s
    compile). ``slots``: None, or an empty (K,) tensor fixing the torch backend's neighbour-slot count
    (`export.slot_template`); without it an eager call chooses K itself and a traced one takes the edge list.
    """

    def __init__(self, model: AllegroPotential, traceable: bool = False) -> None:
        super().__init__()
        from .export import _traceable_copy

        self.model = _traceable_copy(model, parameter_gradients=False) if traceable else model

    def forward(self, edge_vectors: torch.Tensor, species: torch.Tensor, centers: torch.Tensor,
                neighbours: torch.Tensor, list_atoms: torch.Tensor,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            atom_range = torch.arange(species.shape[0] + 1, device=centers.device, dtype=centers.dtype)
            graph = PairGraph(torch.stack([centers, neighbours]), species.shape[0],
                              torch.searchsorted(centers, atom_range))
            if slots is not None:
                graph.fixed_slots = slots.shape[0]
            energies = self.model.atomic_energies(edge_vectors, species, graph).index_select(0, list_atoms)
            gradients = None
            if energies.requires_grad:  # not where there are no pairs
                (gradients,) = torch.autograd.grad(energies.sum(), edge_vectors, allow_unused=True)
        if gradients is None:
            gradients = torch.zeros_like(edge_vectors)
        return energies.detach(), gradients.detach()


def evaluate_pairs(
    model: AllegroPotential,
    rij: np.ndarray,
    pair_i: np.ndarray,
    pair_j: np.ndarray,
    elems: np.ndarray,
    list_atoms: np.ndarray,
    compiled: _CompiledPairs | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom energies of the listed atoms and dE/d rij for every pair, from pairs alone.

    rij (P, 3) Å; pair_i, pair_j (P,) atom indices; elems (N_all,) type index of every atom (local and
    ghost; atoms that appear in no pair and no list may carry -1, LAMMPS's NULL); list_atoms (L,) the atoms
    whose energies are wanted, each of which must have all its neighbours among the pairs.
    Returns (energies (L,) eV, gradients (P, 3) eV/Å) as float64 numpy arrays, with E = sum of energies.
    ``compiled``: a torch.compile'd `PairForceField` (traceable) of this model, used where P, N_all and L are all
    at least 2 (tracing specializes the sizes 0 and 1; those calls run eagerly instead of compiling again).
    """
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    num_types = model.config.num_types
    rij = np.asarray(rij, dtype=np.float64).reshape(-1, 3)
    centers = torch.as_tensor(np.asarray(pair_i, dtype=np.int64))
    neighbours = torch.as_tensor(np.asarray(pair_j, dtype=np.int64))
    list_atoms = torch.as_tensor(np.asarray(list_atoms, dtype=np.int64))
    species = torch.as_tensor(np.asarray(elems, dtype=np.int64))
    num_nodes = int(species.shape[0])

    used = torch.cat([centers, neighbours, list_atoms])
    bad = used[(species[used] < 0) | (species[used] >= num_types)]
    if bad.numel() > 0:
        atom = int(bad[0])
        raise ValueError(
            f"LAMMPS atom {atom} (local/ghost index on this rank) has element index {int(species[atom])}, but the "
            f"model knows {num_types} elements {list(model.config.type_names)}: check pair_coeff * * <elements>"
        )
    species = species.clamp(min=0)

    # The nodes: an atom that is a center or listed keeps its own (in index order, so sorted centers stay sorted);
    # an atom that is only some pair's neighbour j enters the model through its species alone, so all of those
    # share one node per species. LAMMPS's ghosts, several times the local atoms, then cost no node, and the
    # torch backend's neighbour-slot layout (N K slots) sees the local atoms only, as the ASE path does.
    own = torch.zeros(num_nodes, dtype=torch.bool)
    own[centers] = True
    own[list_atoms] = True
    node = torch.where(own, torch.cumsum(own, 0) - 1, int(own.sum()) + species)
    centers, neighbours, list_atoms = node[centers], node[neighbours], node[list_atoms]
    species = torch.cat([species[own], torch.arange(num_types)])
    num_nodes = int(species.shape[0])

    # Edges sorted by center (CSR order). LAMMPS hands the pairs grouped by center in its list order, which is
    # ascending for its standard lists; sort (stably) only when they are not.
    order = None
    if centers.numel() > 1 and bool((centers[1:] < centers[:-1]).any()):
        order = torch.argsort(centers, stable=True)
        centers, neighbours, rij = centers[order], neighbours[order], rij[order.numpy()]

    inputs = (centers.to(device), neighbours.to(device), list_atoms.to(device))
    edge_vectors = torch.as_tensor(rij, dtype=dtype, device=device).requires_grad_(True)
    if compiled is not None and min(rij.shape[0], num_nodes, int(list_atoms.shape[0])) >= 2:
        from .export import slot_template

        slots = slot_template(model, inputs[0].unsqueeze(0), num_nodes)  # it reads the edges' centers only
        energies, gradients = compiled(edge_vectors, species.to(device), *inputs, slots=slots)
    else:
        energies, gradients = PairForceField(model)(edge_vectors, species.to(device), *inputs)
    gradients = gradients.to("cpu", torch.float64).numpy()
    if order is not None:
        unsorted = np.empty_like(gradients)
        unsorted[order.numpy()] = gradients
        gradients = unsorted
    return energies.to("cpu", torch.float64).numpy(), np.ascontiguousarray(gradients)


# Where MPI launchers put a process's rank among the ranks on its node: MPICH's Hydra and Intel MPI, Open MPI,
# MVAPICH2, Cray PALS, Slurm's srun, a generic PMI, torchrun.
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                        "PALS_LOCAL_RANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK", "LOCAL_RANK")


def local_rank() -> int:
    """This process's rank among the MPI ranks on its node, from the launcher's environment (`LOCAL_RANK_VARIABLES`,
    the first that is set); 0 where none is. Not from MPI itself: a node-local communicator is a collective call,
    which would hang a rank that loads a model file on its own."""
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def rank_device(device: str | torch.device) -> torch.device:
    """The device this process runs the model on: ``device`` itself, except "cuda" without an index, which becomes
    cuda:<`local_rank()` modulo the visible GPUs>, so that the ranks on a node spread over its GPUs (with as many
    ranks per node as GPUs, one rank per GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    return torch.device("cuda", local_rank() % count) if count > 0 else device


class _CompiledPairs:
    """torch.compile of a traceable `PairForceField` (dynamic shapes, one graph), called with the settings that
    compiling it needs (Dynamo traces its autograd.grad; the package's cache tag, `export._CompileSettings`)."""

    def __init__(self, model: AllegroPotential, backend: str) -> None:
        from .export import _CompileSettings

        self.function = torch.compile(PairForceField(model, traceable=True).forward, dynamic=True, fullgraph=True,
                                      backend=backend)
        self.settings = _CompileSettings((torch._dynamo.config, "trace_autograd_ops", True))

    def __call__(self, *inputs: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with self.settings:
            return self.function(*inputs, slots=slots)


class AllegroMLIAPUnified:
    """An Allegro model as an ML-IAP unified model (the interface of LAMMPS's `lammps.mliap.MLIAPUnified`).

    LAMMPS reads `element_types` (matched against `pair_coeff * * <elements>`), `rcutfac` (half the cutoff),
    `ndescriptors` and `nparams` (unused by a unified model, but must be set), sets `interface`, and calls
    compute_descriptors, compute_gradients and compute_forces each step; all the work is in compute_forces.
    Pickles as config + weights (and the options below) and rebuilds the model when unpickled (see the module
    docstring).

    ``device``: where the model runs, as `rank_device` reads it: "cuda" without an index puts each MPI rank of a
    node on its own GPU (the node-local rank modulo the GPUs it sees), "cuda:1" puts every rank on that one.
    The request is what the pickle keeps, so a file written for "cuda" spreads over the GPUs of the nodes it runs on.
    ``compile`` (default False): evaluate through torch.compile (`PairForceField`, dynamic shapes: one program for
    every pair and atom count; a string names the torch.compile backend, True is inductor). Each LAMMPS process
    compiles at its first step (the default model, float64: 38 s on a CPU core with an empty cache, 13 s with
    inductor's disk cache).
    """

    def __init__(self, model: AllegroPotential, device: str | torch.device | None = None,
                 compile: bool | str = False) -> None:
        if not isinstance(compile, (bool, str)) or compile == "":
            raise ValueError(f"AllegroMLIAPUnified: compile must be True, False or a torch.compile backend name, "
                             f"got {compile!r}")
        self.device = str(torch.device(device) if device is not None else next(model.parameters()).device)
        self.model = model.eval()
        if device is not None:
            self.model.to(rank_device(device))
        self.interface = None
        self.element_types = list(model.config.type_names)
        self.ndescriptors = 1
        self.nparams = 1
        self.rcutfac = 0.5 * float(model.config.r_max)
        self.compile = compile
        self._compiled = _CompiledPairs(self.model, "inductor" if compile is True else compile) if compile else None

    def compute_descriptors(self, data) -> None:
        """Nothing to do: Allegro has no separate descriptor stage."""

    def compute_gradients(self, data) -> None:
        """Nothing to do: energies and pair forces are both set in compute_forces."""

    def compute_forces(self, data) -> None:
        """Set data.eatoms, data.energy and the pair forces dE/d rij for the rank's local atoms."""
        num_list = data.nlistatoms
        if data.npairs > 0:
            rij, pair_i, pair_j = data.rij, data.pair_i, data.pair_j
        else:
            rij, pair_i, pair_j = np.zeros((0, 3)), np.zeros(0, np.int32), np.zeros(0, np.int32)
        list_atoms = data.iatoms[:num_list] if num_list > 0 else np.zeros(0, np.int32)
        energies, gradients = evaluate_pairs(self.model, rij, pair_i, pair_j, data.elems, list_atoms, self._compiled)
        if num_list > 0:
            data.eatoms = energies
        data.energy = float(energies.sum())
        if data.npairs > 0:
            data.update_pair_forces(gradients)

    # --- pickling: config + weights, not the module object -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        model = self.model
        parameter = next(model.parameters())
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "model": type(model).__name__,
            "backend": getattr(model, "backend", None),
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "device": self.device,
            "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
            "metadata": dict(getattr(model, "metadata", {}) or {}),
            "compile": self.compile,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .model import Allegro
        from .reference import ReferenceAllegro

        if state.get("format") != FORMAT:
            raise ValueError(f"not an allegro-fast LAMMPS model (format {state.get('format')!r}, expected {FORMAT!r})")
        if state.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"this LAMMPS model file was written by a newer allegro-fast (format {state['format_version']}); "
                f"this one reads format {FORMAT_VERSION}"
            )
        device = torch.device(state["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"this LAMMPS model file was written for device {state['device']}, but torch sees no CUDA device here; "
                "write it again with `python -m allegro_fast.lammps MODEL OUT --device cpu`"
            )
        config = AllegroConfig.from_dict(state["config"])
        if state["model"] == "ReferenceAllegro":
            model = ReferenceAllegro(config)
        else:
            model = Allegro(config, backend=state["backend"] or "torch")
        model = model.to(getattr(torch, state["dtype"]))
        model.load_state_dict(state["state_dict"])
        model.metadata = state.get("metadata", {})
        self.__init__(model, device=state["device"], compile=state.get("compile", False))


def write_lammps_model(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str = "float64",
    device: str = "cpu",
    backend: str | None = None,
    compile: bool | str = False,
) -> AllegroMLIAPUnified:
    """Write the file that `pair_style mliap unified OUT 0` loads, from a model saved with allegro_fast.save.

    dtype: "float64" (default; LAMMPS integrates in double precision) or "float32". device: where the model
    runs inside LAMMPS ("cpu"; "cuda": each rank of a node on its own GPU, `rank_device`; "cuda:1": that GPU).
    The file is written from the CPU, so a machine without the GPU can write it. backend: override the saved
    backend ("torch", "triton", "reference"). compile: the model runs through torch.compile inside LAMMPS
    (`AllegroMLIAPUnified`). The file is a pickle written atomically; a .pt/.pth suffix is refused (LAMMPS would
    read it with torch.load, which refuses pickled classes). Returns the unified model that was written (its model
    on the CPU, its `device` the one LAMMPS's ranks will use).
    """
    from .serialization import load

    out_path = Path(out_path)
    if out_path.name.endswith(_TORCH_LOAD_SUFFIXES):
        raise ValueError(
            f"{out_path}: LAMMPS reads files ending in .pt/.pth with torch.load(weights_only=True), which cannot "
            "load this model; use another suffix, e.g. .mliap.pkl"
        )
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    device = str(torch.device(device))  # a malformed name fails here, not in LAMMPS
    model = load(model_path, backend=backend).to(getattr(torch, dtype))
    unified = AllegroMLIAPUnified(model, compile=compile)
    unified.device = device
    atomic_write(out_path, lambda stream: pickle.dump(unified, stream, protocol=pickle.HIGHEST_PROTOCOL))
    return unified


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `python -m allegro_fast.lammps` (also usable as a subcommand's parser)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m allegro_fast.lammps",
        description="Write the file that LAMMPS's `pair_style mliap unified FILE 0` loads, from a saved model.",
    )
    parser.add_argument("model", help="model file written by allegro_fast.save or `allegro-fast train`")
    parser.add_argument("out", help="output file for LAMMPS, e.g. model.mliap.pkl (not .pt/.pth)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="precision inside LAMMPS (default float64)")
    parser.add_argument("--device", default="cpu",
                        help="torch device the model runs on in LAMMPS (default cpu; cuda: each MPI rank of a node on "
                             "its own GPU, by node-local rank; cuda:N: every rank on GPU N)")
    parser.add_argument("--backend", default=None, help="override the saved backend (torch, triton, reference)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile in LAMMPS (each rank compiles at its first step)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the LAMMPS model file and print the pair_style / pair_coeff lines that use it."""
    try:
        unified = write_lammps_model(args.model, args.out, dtype=args.dtype, device=args.device, backend=args.backend,
                                     compile=args.compile)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elements = " ".join(unified.element_types)
    how = ", torch.compile" if args.compile else ""
    print(f"wrote {args.out} (r_max {2 * unified.rcutfac:g} Å, elements {elements}, {args.dtype}, {args.device}{how})")
    print("in the LAMMPS input (units metal, newton on):")
    print(f"    pair_style mliap unified {args.out} 0")
    print(f"    pair_coeff * * {elements}    # one element per LAMMPS atom type, in type order")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    # Run the package's copy of this module, not __main__: pickle names classes by module, and LAMMPS must
    # find allegro_fast.lammps.AllegroMLIAPUnified, not __main__.AllegroMLIAPUnified.
    from allegro_fast.lammps import main as package_main

    sys.exit(package_main())

"""Prototype measurement: a compiled force-training step on the CPU (not yet what `allegro_fast.train` runs).

A force loss needs the derivative of the forces, so eager training runs a double backward through every op.
Here the energy and the forces are traced together by make_fx, with the parameters as inputs: the force
computation (the first backward) becomes ordinary ops of one graph, torch.compile (inductor) fuses them, and
the loss backward is a first-order backward of that graph. The step is the benchmark's: energy + force loss
on a batch of rMD17 aspirin frames, backward, Adam.

    python bench/compiled_training.py [--layout slots|edge-list] [--batch-size 5] [--steps 20] [--out FILE]

`slots`: the eager model's neighbour-slot layout traced for this batch (static shapes, one compilation per
batch shape). `edge-list`: the layout of traced programs, compiled with dynamic shapes. Prints and writes JSON:
compile seconds, eager and compiled step times (interleaved), and the largest relative difference of the
parameter gradients between the two (float32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.stateless import _reparametrize_module

import allegro_fast as af
from allegro_fast.bench_cli import build_frames, git_commit, training_targets, write_json_atomic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["slots", "edge-list"], default="slots")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    af.retain_freed_memory()
    torch.set_num_threads(args.threads)

    type_names, frames = build_frames("aspirin", args.batch_size)
    probe = af.AtomicGraph.from_ase(frames[:1], r_max=5.0)
    config = af.AllegroConfig.preset("default", type_names, avg_num_neighbors=probe.num_edges / probe.num_nodes)
    graph = af.AtomicGraph.from_ase(frames, r_max=config.r_max, dtype=torch.float32)
    torch.manual_seed(0)
    model = af.Allegro(config).train()
    energies, forces = training_targets(frames)
    energy_target, force_target = torch.as_tensor(energies), torch.as_tensor(forces, dtype=torch.float32)
    atoms_per_structure = graph.num_atoms.double()
    species = model.species_of(graph)
    slots = model.neighbor_slots(graph) if args.layout == "slots" else None
    model.neighbor_slots = lambda _graph: slots  # concrete before tracing (make_fx cannot read tensor values)
    names = [name for name, _ in model.named_parameters()]
    parameters = list(model.parameters())

    def energy_and_forces(parameter_values, positions):
        with _reparametrize_module(model, dict(zip(names, parameter_values))):
            positions = positions.detach().requires_grad_(True)
            atomic_energy = model.atomic_energies(graph.edge_vectors(positions, graph.cell), species, graph)
            energy = torch.zeros(graph.num_structures, dtype=atomic_energy.dtype).index_add(0, graph.batch,
                                                                                            atomic_energy)
            (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=True)
        return energy, -gradient

    def loss_of(energy, forces):
        return (((energy - energy_target) / atoms_per_structure).pow(2).mean()
                + (forces - force_target).pow(2).mean())

    start = time.perf_counter()
    traced = make_fx(energy_and_forces, _allow_non_fake_inputs=True)([p.detach() for p in parameters],
                                                                     graph.positions)
    compiled = torch.compile(traced, dynamic=args.layout == "edge-list")
    optimizer = torch.optim.Adam(parameters, lr=1e-3)

    def compiled_gradients():
        loss = loss_of(*compiled(parameters, graph.positions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def eager_gradients():
        out = model(graph, compute_stress=False)
        loss = loss_of(out["energy"], out["forces"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    compiled_gradients()
    compile_seconds = time.perf_counter() - start
    with torch.no_grad():
        first = [p.grad.clone() for p in parameters]
    eager_gradients()
    difference = max(float((a - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
                     for a, p in zip(first, parameters))

    steps = {"eager": [], "compiled": []}
    for _ in range(3):
        compiled_gradients(); optimizer.step(); eager_gradients(); optimizer.step()
    for _ in range(args.steps):
        for name, gradients in (("compiled", compiled_gradients), ("eager", eager_gradients)):
            begin = time.perf_counter()
            gradients()
            optimizer.step()
            steps[name].append(1000 * (time.perf_counter() - begin))
    summary = {name: {"median_ms": sorted(v)[len(v) // 2], "p25_ms": sorted(v)[len(v) // 4], "times_ms": v}
               for name, v in steps.items()}
    result = {
        "kind": "compiled force-training step (prototype)", "commit": git_commit(), "layout": args.layout,
        "threads": args.threads, "batch_size": args.batch_size, "num_edges": graph.num_edges,
        "torch": torch.__version__, "loadavg": os.getloadavg(), "compile_s": compile_seconds,
        "max_rel_parameter_gradient_difference": difference, **summary,
        "speedup_median": summary["eager"]["median_ms"] / summary["compiled"]["median_ms"],
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("eager", "compiled")}))
    print(f"eager {summary['eager']['median_ms']:.1f} ms, compiled {summary['compiled']['median_ms']:.1f} ms "
          f"(medians of {args.steps}), compile {compile_seconds:.0f} s")
    if args.out:
        write_json_atomic(Path(args.out).resolve(), result)


if __name__ == "__main__":
    sys.exit(main())

"""The compiled force-training step (`training.compile: true`, `allegro_fast.export.TrainingForceField`)
against the eager one, on the CPU.

A force loss needs the derivative of the forces, so eager training runs a double backward through every op.
TrainingForceField traces the energy and the forces (the first backward) with make_fx, with the parameters as
inputs, into one graph that torch.compile (inductor, dynamic shapes) fuses; the loss backward is then a
first-order backward of it. The step is the benchmark's: energy + force loss on a batch of rMD17 aspirin
frames, backward, Adam.

    python bench/compiled_training.py [--batch-size 5] [--steps 20] [--out FILE]

Prints and writes JSON: compile seconds (the first call; inductor's cache shortens later runs), eager and
compiled step times (interleaved), and the largest relative difference of the parameter gradients between
the two (float32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import allegro_fast as af
from allegro_fast.bench_cli import build_frames, git_commit, training_targets, write_json_atomic
from allegro_fast.export import TrainingForceField


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parameters = list(model.parameters())

    def loss_of(energy, forces):
        return (((energy - energy_target) / atoms_per_structure).pow(2).mean()
                + (forces - force_target).pow(2).mean())

    start = time.perf_counter()
    training_step = TrainingForceField(model)
    optimizer = torch.optim.Adam(parameters, lr=1e-3)

    def compiled_gradients():
        out = training_step(graph)
        loss = loss_of(out["energy"], out["forces"])
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
        "kind": "compiled force-training step (TrainingForceField)", "commit": git_commit(),
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

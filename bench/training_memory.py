"""Peak memory of one force-training step, per edge, measured on the CPU: where a GPU is not lent, this is the
number that moves when the training step's memory changes (it agreed with the H200's max_memory_allocated within
3-6 % in session 16, scaled by the edge count).

The step: fcc Ag, 3x3x3 cubic cells (108 atoms) rattled by 0.05 A (seed 0), the default model (avg_num_neighbors
from the structure, as `allegro-fast bench` sets it), float32; energy and forces (create_graph), the benchmark's
loss (per-atom energy MSE + force MSE), loss.backward(). The triton backend runs under the Triton interpreter on
the CPU tensors. The peak is that of the CPU allocator's live bytes above the step's start (torch.profiler memory
events), after one unmeasured step (kernel generation; with --compiled, tracing and compiling).

    python bench/training_memory.py                        # eager, triton backend (~2 min)
    python bench/training_memory.py --compiled             # export.TrainingForceField with inductor (~5 min)
    python bench/training_memory.py --compiled --activation-memory-budget 0.5
    python bench/training_memory.py --backend torch --repeat 4

Prints one JSON line: the peak in bytes per edge (and in MiB for --scale-edges edges, 116,988 = Ag 2048 x 2).
--compiled turns inductor's caches off, so that every run compiles what it measures (a program of other source
would not be read back anyway: export.compile_cache_tag).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def peak_live_bytes(step) -> int:
    """Run step() under torch.profiler(profile_memory=True): the highest sum of the CPU allocator's live bytes
    above their level at the start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(profiler.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["triton", "torch"], default="triton")
    parser.add_argument("--compiled", action="store_true", help="export.TrainingForceField (inductor)")
    parser.add_argument("--activation-memory-budget", type=float, default=None,
                        help="torch._functorch.config.activation_memory_budget for --compiled")
    parser.add_argument("--repeat", type=int, default=3, help="cubic cells per side (3: 108 atoms, 3112 edges)")
    parser.add_argument("--scale-edges", type=int, default=116_988)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here (with versions, commit)")
    args = parser.parse_args(argv)
    if args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.compiled:
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

    import ase.build
    import torch

    import allegro_fast as af

    if args.activation_memory_budget is not None:
        torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    torch.manual_seed(0)
    atoms = ase.build.bulk("Ag", "fcc", a=4.09, cubic=True).repeat(args.repeat)
    atoms.rattle(0.05, seed=0)
    r_max = af.AllegroConfig.preset("default", ["Ag"]).r_max
    probe = af.AtomicGraph.from_ase([atoms], r_max=r_max)
    config = af.AllegroConfig.preset("default", ["Ag"], avg_num_neighbors=probe.num_edges / probe.num_nodes)
    graph = af.AtomicGraph.from_ase([atoms], r_max=config.r_max, dtype=torch.float32)
    model = af.Allegro(config, backend=args.backend).to(torch.float32).train()
    forward = af.export.TrainingForceField(model) if args.compiled else model
    generator = torch.Generator().manual_seed(0)
    energy_target = torch.randn(1, generator=generator) * graph.num_nodes
    force_target = torch.randn(graph.num_nodes, 3, generator=generator)

    def step():
        out = forward(graph) if args.compiled else model(graph, compute_stress=False)
        loss = ((out["energy"] - energy_target) / graph.num_nodes).pow(2).mean()
        (loss + (out["forces"] - force_target).pow(2).mean()).backward()
        model.zero_grad(set_to_none=True)

    step()
    peak = peak_live_bytes(step)
    per_edge = peak / graph.num_edges
    result = {"backend": args.backend, "compiled": args.compiled,
              "activation_memory_budget": args.activation_memory_budget, "atoms": graph.num_nodes,
              "edges": graph.num_edges, "peak_bytes_per_edge": round(per_edge),
              f"peak_mib_at_{args.scale_edges}_edges": round(per_edge * args.scale_edges / 2**20)}
    print(json.dumps(result))
    if args.output is not None:
        from allegro_fast.bench_cli import git_commit, versions, write_json_atomic

        write_json_atomic(args.output, {**result, "device": "cpu", "versions": versions(), "commit": git_commit(),
                                        "date": time.strftime("%Y-%m-%d")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

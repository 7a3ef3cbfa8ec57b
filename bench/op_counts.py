"""Ops per eager call, counted on the CPU: where a GPU is not lent, the count that stands for an eager step's kernel
launches (each op that is not a view is about one launch on CUDA, and an eager GPU step of small systems is
host-bound: session 16 timed 1,091 launches in a 38 ms training step of Ag 2048 on an H200, 9.2 ms of it GPU work).

The call: fcc Ag, 2x2x2 cubic cells (32 atoms) rattled by 0.05 A, the default model, float32. "inference" is energy
and forces (eval); "training" is the step of `allegro-fast bench`'s training case without the optimizer: energy and
forces with create_graph, an energy + force loss, loss.backward(). The triton backend's kernels are not launched
(precompile's `kernel_selection(())` and a stand-in for the segment sums' kernel): the count is of the ops, which do
not depend on what a kernel computes. A TorchDispatchMode counts every aten op and our custom ops (as one each; the
ops inside them are their own business); views (view, reshape, expand, slicing, ...) are counted apart.

    python bench/op_counts.py                          # triton backend, inference and training
    python bench/op_counts.py --backend torch --top 20

Prints one JSON line per call: ops, not views, views, the custom ops, and the most frequent ops; with
--by-node, the training step's loss backward by the autograd node that issued each op. With --compiled-graphs, also
the nodes (call_function, and of those our custom ops) of the two graphs AOTAutograd hands inductor for the
compiled training step (`export.TrainingForceField`: the traced energy + forces, and the loss backward), which set
inductor's compile time; the kernels do run here (the interpreter), ~20 s.

    python bench/op_counts.py --calls training --compiled-graphs
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the triton backend on CPU tensors

VIEWS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "select", "slice", "alias", "as_strided", "detach", "split", "split_with_sizes", "unbind", "narrow",
    "lift_fresh", "view_as", "diagonal", "unflatten", "flatten", "chunk", "movedim",
})


def count_ops(call, by_node: bool = False) -> dict:
    """Run call() under a dispatch mode: {"ops", "not_views", "views", "custom", "top", ["by_node"]}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()
            self.nodes: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__ if func.namespace == "aten" else str(func.overloadpacket)
            self.ops[name] += 1
            if by_node and name not in VIEWS:
                node = torch._C._current_autograd_node()
                self.nodes[type(node).__name__ if node is not None else "(none)"] += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        call()
    ops = counter.ops
    views = sum(n for name, n in ops.items() if name in VIEWS)
    result = {"ops": sum(ops.values()), "not_views": sum(ops.values()) - views, "views": views,
              "custom": {name: n for name, n in sorted(ops.items()) if "::" in name or "." in name},
              "top": [[name, n] for name, n in ops.most_common() if name not in VIEWS]}
    if by_node:
        result["by_node"] = [[name, n] for name, n in counter.nodes.most_common()]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton", choices=("triton", "torch", "reference"))
    parser.add_argument("--calls", nargs="+", default=["inference", "training"], choices=("inference", "training"))
    parser.add_argument("--top", type=int, default=12, help="the most frequent ops listed (not views)")
    parser.add_argument("--by-node", action="store_true", help="the training step's loss backward by autograd node")
    parser.add_argument("--compiled-graphs", action="store_true",
                        help="the nodes of the compiled training step's forward and backward graphs")
    parser.add_argument("--output", help="also write the results as one JSON file (with versions and commit)")
    args = parser.parse_args(argv)

    import torch
    from ase.build import bulk

    import allegro_fast as af

    stand_ins, restore = [], lambda: None
    if args.backend == "triton":
        from allegro_fast.kernels import _common, segments

        stand_ins.append(_common.kernel_selection(()))  # the generated kernels: not launched
        segment_kernel, segments._kernel = segments._kernel, lambda: _common._NotLaunched()  # nor the segment sums'

        def restore() -> None:
            segments._kernel = segment_kernel
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    graph = af.AtomicGraph.from_ase(atoms, r_max=5.0, dtype=torch.float32)
    config = af.AllegroConfig.preset("default", ("Ag",), r_max=5.0, avg_num_neighbors=graph.num_edges / graph.num_nodes)
    torch.manual_seed(0)
    if args.backend == "reference":
        model = af.reference.ReferenceAllegro(config).float()
    else:
        model = af.Allegro(config, backend=args.backend).float()

    def inference() -> None:
        model.eval()
        model(graph)

    def training(count=None):
        model.train()
        out = model(graph)
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        if count is None:
            loss.backward()
            return None
        return count(loss.backward)

    for context in stand_ins:
        context.__enter__()
    results = []
    for name in args.calls:
        call = inference if name == "inference" else training
        call()  # the first call generates the kernels' sources
        model.zero_grad(set_to_none=True)
        result = {"backend": args.backend, "call": name, "atoms": graph.num_nodes, "edges": graph.num_edges,
                  **count_ops(call)}
        if name == "training":
            model.zero_grad(set_to_none=True)
            result["loss_backward"] = training(lambda step: count_ops(step, by_node=args.by_node))
            result["loss_backward"]["top"] = result["loss_backward"]["top"][:args.top]
        result["top"] = result["top"][:args.top]
        print(json.dumps(result))
        results.append(result)
    for context in stand_ins:
        context.__exit__(None, None, None)
    restore()
    if args.compiled_graphs:
        results.append({"backend": args.backend, "call": "compiled training graphs",
                        **compiled_graph_nodes(model, graph)})
        print(json.dumps(results[-1]))
    if args.output is not None:
        import time

        from allegro_fast.bench_cli import git_commit, versions, write_json_atomic

        write_json_atomic(Path(args.output), {"results": results, "device": "cpu", "versions": versions(),
                                        "commit": git_commit(), "date": time.strftime("%Y-%m-%d")})
    return 0


def compiled_graph_nodes(model, graph) -> dict:
    """{"forward": [nodes, custom op nodes], "backward": [...]}: the graphs AOTAutograd gives the compiler for
    `TrainingForceField(model)`'s step and its loss backward (a counting backend that runs them as they are)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from allegro_fast.export import TrainingForceField

    nodes = {}

    def counting(name):
        def compiler(graph_module, _):
            calls = [node for node in graph_module.graph.nodes if node.op == "call_function"]
            nodes[name] = [len(calls), sum("allegro_fast" in str(node.target) for node in calls)]
            return make_boxed_func(graph_module)

        return compiler

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    out = TrainingForceField(model.train(), backend=backend)(graph)
    (out["energy"].square().sum() + out["forces"].square().sum()).backward()
    return nodes


if __name__ == "__main__":
    sys.exit(main())

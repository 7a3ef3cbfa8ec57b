"""Time to the first result of the triton backend's compiled inference (`export.compile_model`) on the CPU.

The case: fcc Ag, 2x2x2 cubic cells (32 atoms) rattled by 0.05 A, the default model, float32, the kernels under
Triton's interpreter (generated and run once eagerly before, so that their sources are cached). The first compiled
call traces (Dynamo, AOTAutograd), compiles (``--backend``) and runs; the second only runs, so first - second is
the compile time. ``--parameter-gradients`` traces as before 2026-12-05: the traced model did not say that no
parameter gradient is wanted (`export._traceable_copy`), so the layers' backward traced the mixing weights'
gradient, which AOTAutograd then dropped. Caches off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1). One JSON line.

    python bench/traced_inference_compile.py --backend inductor [--parameter-gradients]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the triton backend on CPU tensors
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager)")
    parser.add_argument("--parameter-gradients", action="store_true",
                        help="trace with the parameter gradients wanted (the behaviour before 2026-12-05)")
    args = parser.parse_args(argv)

    import torch
    from ase.build import bulk

    import allegro_fast as af
    from allegro_fast.export import compile_model

    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    graph = af.AtomicGraph.from_ase(atoms, r_max=5.0, dtype=torch.float32)
    config = af.AllegroConfig.preset("default", ("Ag",), r_max=5.0,
                                     avg_num_neighbors=graph.num_edges / graph.num_nodes)
    torch.manual_seed(0)
    model = af.Allegro(config, backend="triton").float()
    expected = model(graph)["forces"]  # the kernels' sources generated, their interpreter runs warmed
    compiled = compile_model(model, backend=args.backend)
    if args.parameter_gradients:
        object.__setattr__(compiled.force_field.model, "parameter_gradients", True)
    start = time.perf_counter()
    forces = compiled(graph)["forces"]
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiled(graph)
    second = time.perf_counter() - start
    error = float((forces - expected).abs().max() / expected.abs().max())
    print(json.dumps({"backend": args.backend, "parameter_gradients": args.parameter_gradients,
                      "edges": graph.num_edges, "first_call_s": round(first, 2), "second_call_s": round(second, 2),
                      "compile_s": round(first - second, 2), "max_rel_force_error": error,
                      "torch": torch.__version__, "load": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()

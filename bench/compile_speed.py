"""Compile/export speed on CPU: Ag 256 (fcc a=4.09, rattled 0.05 seed 0), default model, float32, energy+forces.
python bench/compile_speed.py VARIANT [threads] [ag256|demo]   VARIANT: eager | forcefield | compile-dyn | compile-static | compile-static-maxat | exported | aoti
Prints one JSON line: compile seconds, median ms of the variant, and median ms of eager model(graph) interleaved."""
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from ase.build import bulk

import allegro_fast as af
from allegro_fast import export as ex

variant = sys.argv[1]; threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
case = sys.argv[3] if len(sys.argv) > 3 else "ag256"
torch.set_num_threads(threads); torch.manual_seed(0)
if case == "ag256":
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((4, 4, 4)); atoms.rattle(0.05, seed=0)
    graph = af.AtomicGraph.from_ase(atoms, r_max=5.0, dtype=torch.float32)
    config = af.AllegroConfig(type_names=["Ag"], avg_num_neighbors=graph.num_edges / graph.num_nodes)
else:  # the demo: 2x2x2 fcc Ag with a vacancy (31 atoms), the quickstart's small model
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2)); del atoms[0]; atoms.rattle(0.05, seed=0)
    graph = af.AtomicGraph.from_ase(atoms, r_max=4.5, dtype=torch.float32)
    config = af.AllegroConfig(type_names=["Ag"], r_max=4.5, num_scalar_features=32, num_tensor_features=8,
                              two_body_mlp_hidden=(32,), latent_mlp_hidden=(32,), readout_mlp_hidden=(16,),
                              avg_num_neighbors=graph.num_edges / graph.num_nodes)
model = af.Allegro(config).eval()

def eager():
    return model(graph, compute_stress=False, create_graph=False)["forces"]

start = time.perf_counter()
if variant == "eager":
    run = eager
elif variant == "forcefield":
    ff = ex.ForceField(model); inputs = ex.graph_inputs(graph)
    run = lambda: ff(*inputs)["forces"]
elif variant.startswith("compile"):
    kwargs = {"dynamic": variant == "compile-dyn"}
    if variant.endswith("maxat"):
        kwargs["mode"] = "max-autotune-no-cudagraphs"
    compiled = ex.compile_model(model, **kwargs); inputs = ex.graph_inputs(graph)
    run = lambda: compiled(*inputs)["forces"]
    run()
elif variant == "exported":
    path = ex.export_model(model, graph, os.path.join(tempfile.mkdtemp(), "m.pt2"))
    loaded = ex.load_exported(path); inputs = ex.graph_inputs(graph)
    run = lambda: loaded(*inputs)["forces"]
    run()
elif variant == "aoti":
    path = ex.package_model(model, graph, os.path.join(tempfile.mkdtemp(), "m.pt2"))
    loaded = ex.load_package(path); inputs = ex.graph_inputs(graph)
    run = lambda: loaded(*inputs)["forces"]
    run()
compile_seconds = time.perf_counter() - start
reference = eager().detach()
error = float((run().detach() - reference).abs().max() / reference.abs().max())
for f in (run, eager):
    f(); f()
times, eager_times = [], []
for _ in range(10):  # interleaved, so that load changes hit both
    t = time.perf_counter(); run(); times.append(1000 * (time.perf_counter() - t))
    t = time.perf_counter(); eager(); eager_times.append(1000 * (time.perf_counter() - t))
print(json.dumps({"case": case, "variant": variant, "threads": threads, "atoms": graph.num_nodes, "edges": graph.num_edges,
                  "compile_s": round(compile_seconds, 1), "median_ms": round(statistics.median(times), 1),
                  "eager_median_ms": round(statistics.median(eager_times), 1),
                  "speedup": round(statistics.median(eager_times) / statistics.median(times), 3),
                  "max_rel_force_error": error, "load": os.getloadavg()[0]}))

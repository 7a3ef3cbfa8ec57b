"""`allegro-fast bench`: end-to-end benchmark of our backends, the e3nn reference and nequip-allegro.

    allegro-fast bench                                   # the default plan for this device
    allegro-fast bench --quick                           # a dry run in seconds (tiny case, 2 repeats)
    allegro-fast bench --cases ag256 aspirin --providers torch nequip --rounds 3
    python bench/run.py ...                              # the same, from a source checkout

Cases (DESIGN section 6; the same structures go to every provider through one extxyz file):
    ag32 / ag256 / ag2048 / ag32k  fcc Ag, a = 4.09 Å, cubic cell x2 / x4 / x8 / x20, rattled 0.05 Å (seed 0)
    ag2048x2                       two ag2048 frames (seeds 0 and 1): a batch of 2 (nequip's compiled training
                                   compiles only for batches of >= 2 frames)
    water192 / water1536           liquid water frame 0 of ../shared/data/water/data_0, as is / x (2, 2, 2)
    aspirin                        --batch-size rMD17 aspirin frames (labelled), one batch
Models: the presets "default" (2 layers, l_max 2, 64 scalar / 16 tensor features), "speed" (the paper's
one-layer l_max 1 model) and "rmd17" (the paper's 3-layer l_max 3 model), avg_num_neighbors = E / N.
Tasks: "inference" = energy + forces (no stress), model.eval(); "train" = one optimisation step: energy +
forces with create_graph, loss = per-atom energy MSE + force MSE, backward (double backward through the
forces), Adam step. Targets are the labels where the case has them, else fixed random numbers.

Providers: "torch" and "triton" (allegro_fast.Allegro backends; on CUDA the triton backend's kernels are first
compiled in parallel processes by `kernels.precompile`, reported as precompile_s), "torch-compiled" (the torch backend
compiled: `export.compile_model` for inference, `export.TrainingForceField`, i.e. `training.compile: true`,
for training; compilation happens in the untimed first call, reported as first_call_ms), "triton-compiled" (the same
for the triton backend: inductor fuses the MLPs, the Triton ops stay as they are), "triton-graphs" (CUDA only:
`compile_model` / `TrainingForceField` with `export.CUDA_GRAPHS`: mode="reduce-overhead", dynamic=False,
edge_headroom="auto" (2-20 %): the edges padded to a capacity as in an MD run, static shapes, CUDA graphs
replayed per call: energy + forces, or the training step's forward and loss backward), "reference" (ReferenceAllegro),
"nequip" (nequip-allegro 0.8.3 eager), "nequip-compiled" (training with its compile_mode="compile":
make_fx + torch.compile, compiled in the untimed first call), "nequip-aoti" (inference through its deployment
path, `nequip-compile --mode aotinductor`, exported in the job: compile_s), and on CUDA "nequip-triton" (its Triton
tensor-product kernel, inference only), "nequip-triton-aoti" (both: its fastest inference path; not in the default
provider list, it compiles for minutes per job) and "nequip-cueq" (its cuEquivariance path, where
cuequivariance_torch is installed). Inference rows of the triton providers carry force_error_vs_torch, the largest
force difference from the torch backend with the same weights on the same structures, over the largest force.
Inference rows of every provider carry repeat_force_difference, the largest force difference between two calls
on the same input (0.0: bitwise repeatable), training rows repeat_gradient_difference, the same for the parameter
gradients of the loss.
nequip runs through bench/nequip_runner.py with its own interpreter (--nequip-python, default
$NEQUIP_PYTHON, /work/venv-nequip/bin/python, or this interpreter if it can import nequip): it changes
process-wide torch defaults, so it never shares a process with us. Unavailable providers are rows with
"skipped": reason.

Timing: per job, warm-up calls, then --repeats timed calls; on CUDA each call is bracketed by CUDA events
after a synchronize, on the CPU by perf_counter. Rows give the median, min, max and quartiles of all
timed calls (pooled over --rounds), the per-round medians, and µs/atom/step = median / atoms. Rounds
interleave providers (their order rotates every round), so a change in machine load hits all alike.
Memory: on CUDA the peak allocated by torch during the timed calls (torch.cuda.max_memory_allocated);
on the CPU the peak resident set during the timed calls (VmHWM, reset before them) and ru_maxrss.
Each provider runs in its own subprocess per round, on the CPU one per job (--isolate / --no-isolate).

nvtx ranges (visible in an Nsight Systems trace; no-ops without CUDA): "bench/<provider>/<case>/<task>"
around each job, and inside a step "forward+forces" (inference), "forward+forces (create_graph)",
"loss.backward" and "optimizer.step" (train); --emit-nvtx adds one range per autograd op, backward included.

Output: one JSON (date, device, CPU/GPU model, versions, commit, load average, arguments, rows, speedups)
written atomically to --output, or <--out>/e2e.json, or bench/results/<device>-<date>-<time>.json in a
source checkout (else ./bench-results/). On CUDA the roofline of the fused layer (bench/roofline.py) is
added under "roofline" where the checkout has it; `--plot` draws the figures (bench/plot.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEQUIP_RUNNER = REPO / "bench" / "nequip_runner.py"
KCAL_MOL_TO_EV = 0.0433641

CASES = {
    "ag32": "fcc Ag 2x2x2 cubic cells, 32 atoms (quick runs)",
    "ag256": "fcc Ag 4x4x4 cubic cells, 256 atoms",
    "ag2048": "fcc Ag 8x8x8 cubic cells, 2048 atoms",
    "ag32k": "fcc Ag 20x20x20 cubic cells, 32000 atoms",
    "ag2048x2": "two ag2048 frames (rattle seeds 0 and 1), a batch of 2 structures: nequip's compiled training "
                "(compile_mode: compile) runs eagerly on single-frame batches",
    "water192": "liquid water, 192 atoms (frame 0 of water/data_0)",
    "water1536": "liquid water frame 0 replicated 2x2x2, 1536 atoms",
    "aspirin": "rMD17 aspirin, a batch of --batch-size frames of 21 atoms",
}
MODELS = ("default", "speed", "rmd17")
OUR_PROVIDERS = ("torch", "torch-compiled", "triton", "triton-compiled", "triton-graphs", "reference")
# ours, against which speedups are computed
TIMED_OURS = ("torch", "torch-compiled", "triton", "triton-compiled", "triton-graphs")
# under torch.compile: provider -> compile_model's options (inference)
COMPILED = ("torch-compiled", "triton-compiled", "triton-graphs")  # the last with export.CUDA_GRAPHS
NEQUIP_PROVIDERS = ("nequip", "nequip-compiled", "nequip-triton", "nequip-cueq", "nequip-aoti", "nequip-triton-aoti")
PROVIDERS = OUR_PROVIDERS + NEQUIP_PROVIDERS

# (case, model, task) per device; --cases/--models/--tasks filter these, --jobs replaces them.
DEFAULT_PLANS = {
    "cpu": [("ag256", "default", "inference"), ("ag2048", "default", "inference"), ("aspirin", "default", "train")],
    "cuda": [
        ("ag256", "default", "inference"), ("ag2048", "default", "inference"), ("ag32k", "default", "inference"),
        ("water1536", "default", "inference"), ("aspirin", "default", "train"), ("ag2048", "default", "train"),
        ("ag2048", "speed", "inference"), ("ag32k", "speed", "inference"),
        ("aspirin", "rmd17", "inference"), ("aspirin", "rmd17", "train"),
    ],
    "quick": [("ag32", "default", "inference"), ("aspirin", "default", "train")],
}


def data_dir() -> Path:
    return Path(os.environ.get("ALLEGRO_FAST_DATA", REPO.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def build_frames(case: str, batch_size: int = 5):
    """(type_names, list of ase.Atoms) of a case; raises FileNotFoundError naming the missing dataset."""
    import numpy as np
    from ase import Atoms
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    if case.startswith("ag"):
        size, _, copies = case.partition("x")
        repeat = {"ag32": 2, "ag256": 4, "ag2048": 8, "ag32k": 20}[size]
        frames = []
        for seed in range(int(copies or 1)):
            atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((repeat,) * 3)
            atoms.rattle(0.05, seed=seed)
            frames.append(atoms)
        return ["Ag"], frames
    if case.startswith("water"):
        folder = data_dir() / "water" / "data_0"
        if not folder.exists():
            raise FileNotFoundError(f"water data not found at {folder} (set ALLEGRO_FAST_DATA)")
        type_map = (folder / "type_map.raw").read_text().split()
        types = np.loadtxt(folder / "type.raw", dtype=int)
        coords = np.load(folder / "set.000" / "coord.npy")[0].reshape(-1, 3)
        box = np.load(folder / "set.000" / "box.npy")[0].reshape(3, 3)
        atoms = Atoms(symbols=[type_map[t] for t in types], positions=coords, cell=box, pbc=True)
        if case == "water1536":
            atoms = atoms.repeat((2, 2, 2))
        else:
            energy = float(np.load(folder / "set.000" / "energy.npy")[0])
            forces = np.load(folder / "set.000" / "force.npy")[0].reshape(-1, 3)
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        return ["H", "O"], [atoms]
    if case == "aspirin":
        path = data_dir() / "rmd17" / "rmd17_aspirin_train_01.npz"
        if not path.exists():
            raise FileNotFoundError(f"rMD17 aspirin not found at {path} (set ALLEGRO_FAST_DATA)")
        data = np.load(path)
        frames = []
        for k in range(batch_size):
            atoms = Atoms(numbers=data["nuclear_charges"], positions=data["coords"][k])
            atoms.calc = SinglePointCalculator(atoms, energy=float(data["energies"][k]) * KCAL_MOL_TO_EV,
                                               forces=data["forces"][k] * KCAL_MOL_TO_EV)
            frames.append(atoms)
        return ["H", "C", "O"], frames
    raise ValueError(f"unknown case '{case}'; choose one of {sorted(CASES)}")


def training_targets(frames, seed: int = 0):
    """Per-frame energies (B,) and forces (N, 3) in eV, eV/Å: the labels, or fixed random numbers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    energies, forces = [], []
    for atoms in frames:
        calc = atoms.calc
        labelled = calc is not None and "energy" in calc.results and "forces" in calc.results
        energies.append(float(calc.results["energy"]) if labelled else float(rng.normal()) * len(atoms))
        forces.append(np.asarray(calc.results["forces"]) if labelled else rng.normal(size=(len(atoms), 3)))
    return np.asarray(energies), np.concatenate(forces)


# ------------------------------------------------------------------------------------------------
# measurement helpers (also used by bench/nequip_runner.py's conventions)
# ------------------------------------------------------------------------------------------------
def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that the next peak belongs to what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def nvtx_range(name: str):
    """torch.cuda.nvtx.range where CUDA is available, else nothing."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def summarize(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median_ms": statistics.median(ordered), "min_ms": ordered[0], "max_ms": ordered[-1],
            "p25_ms": quartiles[0], "p75_ms": quartiles[2], "num_timed": len(ordered)}


def timed_calls(step, warmup: int, repeats: int, device) -> tuple[list[float], dict]:
    """Warm-up then timed calls of step(); per-call ms and the memory of the timed phase."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    memory = {}
    if cuda:
        torch.cuda.synchronize()
        # reserved by the caching allocator since the job began (its first call included): where CUDA graphs keep
        # their memory, in a private pool that max_memory_allocated of the timed calls does not see
        reserved_before = torch.cuda.max_memory_reserved()
        # allocated since the job began: like the timed calls' peak, but with the first call and, for CUDA graphs,
        # the capture (whose pool the replays reuse), so that it compares with other providers' timed peak
        allocated_before = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        memory["allocated_before_timed_mib"] = torch.cuda.memory_allocated() / 2**20
    else:
        memory["rss_before_timed_mib"] = _proc_status_mib("VmRSS")
        hwm_reset = _reset_peak_rss()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - begin))
    if cuda:
        memory["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        memory["peak_memory_method"] = "torch.cuda.max_memory_allocated during the timed calls"
        memory["peak_reserved_mib"] = max(reserved_before, torch.cuda.max_memory_reserved()) / 2**20
        memory["peak_allocated_job_mib"] = max(allocated_before, torch.cuda.max_memory_allocated()) / 2**20
    else:
        memory["peak_memory_mib"] = _proc_status_mib("VmHWM") if hwm_reset else None
        memory["peak_memory_method"] = "peak resident set (VmHWM) during the timed calls, whole process"
    return times, memory


def host_profile(step, calls: int, device, top: int = 15) -> dict:
    """Where a call's time goes on the host, after the timed calls: `calls` more calls under torch.profiler (CPU, and
    CUDA where there), per call: wall time (profiled, so above the timed median), time inside profiled ops (their
    self CPU time; the rest is Python and the autograd engine between them), kernel launches (runtime and driver
    API, Triton's included), the GPU's kernel time, the ops with the most self CPU time and the kernels with the most
    GPU time. Up to ~80k edges every provider on an H200 sat on a floor of ~6-9 ms per call that did not grow with
    the system: this says why."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - begin) / calls
    events = profiler.key_averages()

    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    host = [e for e in events if e.device_type == DeviceType.CPU]
    launches = sum(e.count for e in host if re.match(r"^(cuda|cu)LaunchKernel", e.key))
    ops = sorted((e for e in host if not e.key.startswith(("cuda", "cu"))), key=lambda e: -e.self_cpu_time_total)
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: -device_us(e))
    return {"calls": calls, "wall_ms_per_call": round(wall_ms, 3),
            "ops_self_cpu_ms_per_call": round(sum(e.self_cpu_time_total for e in ops) / 1000 / calls, 3),
            "runtime_api_ms_per_call": round(sum(e.self_cpu_time_total for e in host if e.key.startswith(("cuda", "cu")))
                                             / 1000 / calls, 3),
            "kernel_launches_per_call": launches / calls,
            "gpu_kernel_ms_per_call": round(sum(device_us(e) for e in events if e.device_type == DeviceType.CUDA)
                                            / 1000 / calls, 3) if cuda else None,
            "top_ops": [{"op": e.key, "calls_per_call": e.count / calls,
                         "self_cpu_us_per_call": round(e.self_cpu_time_total / calls, 1)} for e in ops[:top]],
            "top_kernels": [{"kernel": e.key[:200], "calls_per_call": e.count / calls,
                             "gpu_us_per_call": round(device_us(e) / calls, 1)} for e in kernels[:top]]}


# ------------------------------------------------------------------------------------------------
# worker: our providers, in a subprocess
# ------------------------------------------------------------------------------------------------
def force_error_vs_torch(model, config, graph, forces) -> float:
    """max |F - F_torch| / max |F_torch|: the timed Triton model's forces against the torch backend's with the same
    weights, on the benchmark's own structures (a check that the numbers timed are the right ones)."""
    import torch

    import allegro_fast as af

    check = af.Allegro(config, backend="torch").to(device=forces.device, dtype=forces.dtype)
    check.load_state_dict(model.state_dict())
    check.eval()
    expected = check(graph, compute_stress=False)["forces"].detach()
    error = (forces.detach() - expected).abs().max() / expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    del check, expected
    if forces.device.type == "cuda":
        torch.cuda.empty_cache()
    return error.item()


def run_our_job(provider: str, job: dict, settings: dict) -> dict:
    import ase.io
    import torch

    import allegro_fast as af

    device = torch.device(settings["device"])
    dtype = getattr(torch, job["dtype"])
    torch.manual_seed(settings["seed"])
    if device.type == "cuda":  # the job's own peak (timed_calls' peak_reserved_mib): nothing of an earlier job
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    frames = ase.io.read(job["frames_path"], index=":", format="extxyz")
    type_names = job["type_names"]
    probe = af.AtomicGraph.from_ase(frames[:1], r_max=af.AllegroConfig.preset(job["model"], type_names).r_max)
    config = af.AllegroConfig.preset(job["model"], type_names, avg_num_neighbors=probe.num_edges / probe.num_nodes)
    graph = af.AtomicGraph.from_ase(frames, r_max=config.r_max, dtype=dtype).to(device=device)
    compiled = provider in COMPILED  # the backend under torch.compile
    if compiled:
        from allegro_fast.export import CUDA_GRAPHS

        compile_options = CUDA_GRAPHS if provider == "triton-graphs" else {}
    backend = provider.split("-")[0]
    if provider == "reference":
        model = af.reference.ReferenceAllegro(config)
    else:
        model = af.Allegro(config, backend=backend)
    model = model.to(device=device, dtype=dtype)
    row = {"num_atoms": graph.num_nodes, "num_edges": graph.num_edges, "num_structures": graph.num_structures,
           "r_max": config.r_max, "num_parameters": sum(p.numel() for p in model.parameters())}

    if job["task"] == "inference":
        model.eval()
        evaluate = model
        if compiled:
            from allegro_fast.export import compile_model

            evaluate = compile_model(model, **compile_options)

        def step():
            with nvtx_range("forward+forces"):
                if compiled:
                    return evaluate(graph)["forces"]
                return evaluate(graph, compute_stress=False)["forces"]
    else:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")  # as training.py's
        energies, forces = training_targets(frames, settings["seed"])
        energy_target = torch.as_tensor(energies, dtype=dtype, device=device)
        force_target = torch.as_tensor(forces, dtype=dtype, device=device)
        atoms_per_structure = graph.num_atoms.to(dtype)
        forward = model
        if compiled:
            from allegro_fast.export import TrainingForceField

            budget = settings.get("activation_memory_budget")
            training_step = TrainingForceField(model, **compile_options, **(
                {} if budget is None else {"activation_memory_budget": budget}))
            row["activation_memory_budget"] = budget

            def forward(graph, compute_stress):
                return training_step(graph)

        def training_loss():
            out = forward(graph, compute_stress=False)
            return (((out["energy"] - energy_target) / atoms_per_structure).pow(2).mean()
                    + (out["forces"] - force_target).pow(2).mean())

        def step():
            with nvtx_range("forward+forces (create_graph)"):
                loss = training_loss()
            optimizer.zero_grad(set_to_none=True)
            with nvtx_range("loss.backward"):
                loss.backward()
            with nvtx_range("optimizer.step"):
                optimizer.step()
            return loss

    if backend == "triton" and device.type == "cuda":  # compile in parallel processes, not serially in step()
        from allegro_fast.kernels.precompile import precompile

        report = precompile(model, training=job["task"] == "train")
        row.update(precompile_s=report["seconds"], precompiled_kernels=len(report["kernels"]),
                   slowest_kernel_s=max(report["kernels"].values(), default=None))
        if report["errors"]:
            row["precompile_errors"] = report["errors"]
    begin = time.perf_counter()
    with nvtx_range(f"bench/{provider}/{job['case']}/{job['task']}/first call"):
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    row["first_call_ms"] = 1000 * (time.perf_counter() - begin)
    if backend == "triton" and job["task"] == "inference":
        row["force_error_vs_torch"] = force_error_vs_torch(model, config, graph, step())
    # emit_nvtx names every autograd op (backward too, which runs outside the forward's ranges) in the trace
    emit = settings.get("emit_nvtx") and device.type == "cuda"
    with nvtx_range(f"bench/{provider}/{job['case']}/{job['model']}/{job['task']}"), (
            torch.autograd.profiler.emit_nvtx(record_shapes=True) if emit else contextlib.nullcontext()):
        times, memory = timed_calls(step, settings["warmup"], settings["repeats"], device)
    row.update(memory)
    if provider == "triton-graphs" and "peak_reserved_mib" in memory:
        # the graphs' intermediates live in their private pool, allocated at capture: count all that is reserved
        row["peak_memory_mib"] = memory["peak_reserved_mib"]
        row["peak_memory_method"] = ("torch.cuda.max_memory_reserved over the whole job (first call, capture and "
                                     "the CUDA graphs' pool included)")
    row["times_ms"] = times
    if settings.get("profile_calls"):
        try:  # the profile explains the timing; it must never cost the timed row
            row["host_profile"] = host_profile(step, settings["profile_calls"], device)
        except Exception as error:  # noqa: BLE001
            row["host_profile"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    if job["task"] == "inference":
        row["repeat_force_difference"] = repeat_force_difference(step)
    else:
        row["repeat_gradient_difference"] = repeat_gradient_difference(training_loss, list(model.parameters()))
    return row


def repeat_gradient_difference(loss, parameters) -> float:
    """max |g_1 - g_2| over all parameter gradients of the training loss, computed twice with the same parameters
    (no optimizer step between): 0.0 where training is bitwise repeatable. bench/nequip_runner.py does the same."""
    import torch

    gradients = []
    for _ in range(2):
        grads = torch.autograd.grad(loss(), parameters, allow_unused=True)
        gradients.append(torch.cat([g.detach().flatten() for g in grads if g is not None]))
    return (gradients[0] - gradients[1]).abs().max().item()


def repeat_force_difference(step) -> float:
    """max |F_1 - F_2| of two calls on the same input: 0.0 where the forces are bitwise repeatable (float atomics,
    e.g. index_add on CUDA, sum in a varying order). The same check runs in bench/nequip_runner.py."""
    first = step().detach().clone()
    return (step().detach() - first).abs().max().item()


def worker_main(spec_path: str) -> None:
    """Run every job of one of our providers; print each job's row as it finishes, one JSON line
    {"job_row": row} (a worker stopped by the timeout keeps the rows of the jobs it finished)."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    settings = spec["settings"]
    torch.set_num_threads(settings["threads"])
    for job in spec["jobs"]:
        row = {"provider": spec["provider"], **{k: job[k] for k in ("case", "model", "task", "dtype")}}
        load_start = os.getloadavg()[0]
        try:
            row.update(run_our_job(spec["provider"], job, settings))
        except Exception as error:  # one failing job must not hide the others
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["loadavg_1min"] = [load_start, os.getloadavg()[0]]
        row["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"job_row": row}), flush=True)


# ------------------------------------------------------------------------------------------------
# parent: plan, interleave, pool, report
# ------------------------------------------------------------------------------------------------
def unavailable_reason(provider: str, device: str, task: str, nequip_python: str | None) -> str | None:
    if provider == "triton-graphs" and device != "cuda":
        return "triton-graphs replays CUDA graphs: CUDA only"
    if provider in ("triton", "triton-compiled", "triton-graphs"):
        if device != "cuda":
            return "the triton backend is timed on CUDA only (interpreter runs are not timings)"
        import allegro_fast as af

        try:
            af.Allegro(af.AllegroConfig(type_names=["Ag"]), backend="triton")
        except (NotImplementedError, ValueError, RuntimeError, ImportError) as error:
            return f"triton backend unavailable: {str(error).splitlines()[0]}"
    if provider in NEQUIP_PROVIDERS:
        if nequip_python is None:
            return "nequip-allegro not installed (no --nequip-python, $NEQUIP_PYTHON, /work/venv-nequip, or nequip here)"
        if not NEQUIP_RUNNER.exists():
            return f"{NEQUIP_RUNNER} not found (run from a source checkout)"
        if provider == "nequip-compiled" and task != "train":
            return "nequip-compiled is its train-time compile_mode='compile'; its compiled inference is nequip-aoti"
        if provider in ("nequip-aoti", "nequip-triton-aoti") and task != "inference":
            return f"{provider} is nequip's deployment path (AOTInductor, inference only)"
        if provider not in ("nequip", "nequip-compiled", "nequip-aoti") and device != "cuda":
            return f"{provider} needs CUDA"
        if provider == "nequip-triton" and task == "train":
            return "nequip's Triton kernel is inference-only (TritonContracter runs only when not training)"
    return None


def find_nequip_python(explicit: str | None) -> str | None:
    candidates = [explicit, os.environ.get("NEQUIP_PYTHON"), "/work/venv-nequip/bin/python", sys.executable]
    for candidate in candidates:
        if not candidate or not Path(candidate).exists():
            continue
        check = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('nequip') and u.find_spec('allegro') else 1)"
        probe = subprocess.run([candidate, "-c", check], check=False, capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def run_subprocess(command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[list[dict], str | None]:
    """Run a worker: (the rows it printed, one JSON line {"job_row": row} per finished job, in job order; None, or
    why it stopped: the timeout, or the last line of its stderr)."""
    error = None
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                                env=None if env is None else {**os.environ, **env})
        stdout = result.stdout
        if result.returncode != 0:
            error = f"exit {result.returncode}: {failure_line(result.stderr)}"[:500]
    except subprocess.TimeoutExpired as expired:  # what it printed before it was killed still counts
        stdout = expired.stdout or ""
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
        error = f"timed out after {timeout:.0f} s"
    rows = [json.loads(line)["job_row"] for line in stdout.splitlines() if line.startswith('{"job_row": ')]
    return rows, error


def failure_line(stderr: str) -> str:
    """The line of a failed worker's stderr that says why: the last exception line (`SomeError: ...`), else the
    last line that is not a warning (compilers log warnings after the traceback)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    exception = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    if exception:
        return exception[-1]
    plain = [line for line in lines if not re.match(r"^[WI]\d{4} |.*Warning:", line)]
    return (plain or lines or ["no output on stderr"])[-1]


def pool_rows(provider: str, job: dict, round_rows: list[dict]) -> dict:
    """One row per (provider, job): all timed calls of all rounds pooled, per-round medians kept."""
    row = {"provider": provider, **{k: job[k] for k in ("case", "model", "task", "dtype")}}
    good = [r for r in round_rows if "times_ms" in r]
    if not good:
        failed = next((r for r in round_rows if "error" in r or "skipped" in r), {"error": "no result"})
        row.update({k: failed[k] for k in ("error", "skipped") if k in failed})
        for key in ("num_atoms", "num_edges"):
            if key in failed:
                row[key] = failed[key]
        return row
    pooled = [t for r in good for t in r["times_ms"]]
    row.update({k: v for k, v in good[-1].items() if k not in ("times_ms", "provider", "loadavg_1min")})
    row.update(summarize(pooled))
    row["round_medians_ms"] = [statistics.median(r["times_ms"]) for r in good]
    row["times_ms"] = pooled
    row["us_per_atom_step"] = 1000 * row["median_ms"] / row["num_atoms"]
    row["peak_memory_mib"] = max((r.get("peak_memory_mib") or 0) for r in good) or None
    row["loadavg_1min"] = [r.get("loadavg_1min") for r in good]
    errors = [r["error"] for r in round_rows if "error" in r]
    if errors:
        row["round_errors"] = errors
    return row


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"device": device, "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2**30,
                    gpu_multiprocessors=properties.multi_processor_count, cuda=torch.version.cuda)
    return info


def versions() -> dict:
    import e3nn
    import numpy
    import torch

    import allegro_fast

    out = {"allegro_fast": allegro_fast.__version__, "torch": torch.__version__, "e3nn": e3nn.__version__,
           "numpy": numpy.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def git_commit() -> str:
    """HEAD (with -dirty); ALLEGRO_FAST_COMMIT where the checkout has no .git (the device tool copies only the tree)."""
    if os.environ.get("ALLEGRO_FAST_COMMIT"):
        return os.environ["ALLEGRO_FAST_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except OSError:
        return "unknown"


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def speedups(rows: list[dict]) -> dict:
    """median(other) / median(ours) for every job where both ran (ours: TIMED_OURS)."""
    medians = {(r["provider"], r["case"], r["model"], r["task"]): r["median_ms"] for r in rows if "median_ms" in r}
    out = {}
    for (provider, case, model, task), ours in medians.items():
        if provider not in TIMED_OURS:
            continue
        for other in ("reference", *NEQUIP_PROVIDERS, "torch"):
            theirs = medians.get((other, case, model, task))
            if theirs and other != provider:
                out[f"{case}/{model}/{task}: {other} / {provider}"] = theirs / ours
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'case':10s} {'model':8s} {'task':9s} {'provider':14s} {'median ms':>10s} {'p25-p75 ms':>19s} "
          f"{'us/atom':>9s} {'peak MiB':>9s}  note")
    for r in rows:
        if "median_ms" in r:
            print(f"{r['case']:10s} {r['model']:8s} {r['task']:9s} {r['provider']:14s} {r['median_ms']:10.2f} "
                  f"{r['p25_ms']:9.2f}-{r['p75_ms']:<9.2f} {r['us_per_atom_step']:9.2f} "
                  f"{r.get('peak_memory_mib') or float('nan'):9.0f}  {'; '.join(r.get('round_errors', []))[:60]}")
        else:
            print(f"{r['case']:10s} {r['model']:8s} {r['task']:9s} {r['provider']:14s} {'-':>10s} {'':19s} {'':9s} "
                  f"{'':9s}  {(r.get('skipped') or r.get('error', ''))[:100]}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="allegro-fast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda where available")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="filter the default plan's cases")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="filter the default plan's models")
    parser.add_argument("--tasks", nargs="+", choices=["inference", "train"], help="filter the default plan's tasks")
    parser.add_argument("--jobs", nargs="+", metavar="CASE:MODEL:TASK", help="replace the plan, e.g. ag256:speed:train")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per job and round (default 7; CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; CUDA 5)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the providers")
    parser.add_argument("--batch-size", type=int, default=5, help="aspirin frames per batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activation-memory-budget", type=float, default=None, metavar="FRACTION",
                        help="compiled training providers: TrainingForceField(activation_memory_budget=...), what the "
                             "step keeps for the loss backward (0 to 1), the rest recomputed (training."
                             "activation_memory_budget)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one subprocess per job, for a clean peak resident set (default on the CPU; on CUDA "
                             "one subprocess per provider, peaks reset per job)")
    parser.add_argument("--quick", action="store_true", help="dry run: ag32 + aspirin x2, 2 repeats, 1 warm-up")
    parser.add_argument("--nequip-python", default=None)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc at its defaults; by default every provider's subprocess (nequip "
                             "and the reference included) keeps freed memory, see allegro_fast/allocator.py")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--out", type=Path, default=None, help="folder: writes <out>/e2e.json")
    parser.add_argument("--no-roofline", action="store_true", help="skip bench/roofline.py on CUDA")
    parser.add_argument("--plot", action="store_true", help="draw figures with bench/plot.py next to the JSON")
    parser.add_argument("--profile-calls", type=int, default=0, metavar="N",
                        help="our providers: N more calls under torch.profiler after the timed ones; the row gets "
                             "host_profile (launches, host and GPU time per call, the costliest ops)")
    parser.add_argument("--emit-nvtx", action="store_true",
                        help="CUDA: wrap the timed calls in torch.autograd.profiler.emit_nvtx (for nsys; slows them)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan_jobs(args, device: str) -> list[tuple[str, str, str]]:
    if args.jobs:
        plan = []
        for text in args.jobs:
            parts = text.split(":")
            if len(parts) != 3 or parts[0] not in CASES or parts[1] not in MODELS or parts[2] not in ("inference", "train"):
                raise SystemExit(f"--jobs: '{text}' is not CASE:MODEL:TASK with CASE in {sorted(CASES)}, "
                                 f"MODEL in {list(MODELS)}, TASK inference or train")
            plan.append(tuple(parts))
        return plan
    plan = DEFAULT_PLANS["quick" if args.quick else device]
    return [job for job in plan if (not args.cases or job[0] in args.cases) and (not args.models or job[1] in args.models)
            and (not args.tasks or job[2] in args.tasks)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args._worker:
        worker_main(args._worker)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    cuda = device == "cuda"
    isolate = (not cuda) if args.isolate is None else args.isolate
    repeats = args.repeats or (2 if args.quick else 20 if cuda else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if cuda else 2)
    batch_size = 2 if args.quick and args.batch_size == 5 else args.batch_size
    # most informative first: a run cut short by a time limit still has the main comparison
    providers = args.providers or (["torch", "triton", "nequip", "nequip-triton", "reference", "nequip-cueq"] if cuda
                                   else ["torch", "reference", "nequip"])
    settings = {"device": device, "repeats": repeats, "warmup": warmup, "seed": args.seed, "emit_nvtx": args.emit_nvtx,
                "profile_calls": args.profile_calls, "activation_memory_budget": args.activation_memory_budget,
                "threads": args.threads or os.cpu_count() or 1, "batch_size": batch_size}
    nequip_python = find_nequip_python(args.nequip_python) if any(p in NEQUIP_PROVIDERS for p in providers) else None
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = list(os.getloadavg())

    workdir = Path(tempfile.mkdtemp(prefix="allegro_bench_"))
    jobs, skipped_rows = [], []
    for case, model, task in plan_jobs(args, device):
        try:
            type_names, frames = build_frames(case, batch_size)
        except FileNotFoundError as error:
            skipped_rows += [{"provider": p, "case": case, "model": model, "task": task, "dtype": args.dtype,
                              "skipped": str(error)} for p in providers]
            continue
        frames_path = workdir / f"{case}.extxyz"
        if not frames_path.exists():
            import ase.io

            ase.io.write(frames_path, frames, format="extxyz")
        jobs.append({"case": case, "model": model, "task": task, "dtype": args.dtype, "type_names": type_names,
                     "frames_path": str(frames_path), "num_atoms": sum(len(a) for a in frames)})

    # Which provider runs which job; the rest are skipped rows with a reason.
    runnable: dict[str, list[dict]] = {p: [] for p in providers}
    for job in jobs:
        for provider in providers:
            reason = unavailable_reason(provider, device, job["task"], nequip_python)
            if reason:
                skipped_rows.append({"provider": provider, **{k: job[k] for k in ("case", "model", "task", "dtype")},
                                     "num_atoms": job["num_atoms"], "skipped": reason})
            else:
                runnable[provider].append(job)

    stamp = started.astimezone().strftime("%Y-%m-%d-%H%M%S")
    if args.output:
        output = args.output
    elif args.out:
        output = args.out / "e2e.json"
    elif (REPO / "bench" / "results").is_dir():
        output = REPO / "bench" / "results" / f"{device}-{stamp}{'-quick' if args.quick else ''}.json"
    else:
        output = Path("bench-results") / f"{device}-{stamp}.json"
    results: dict[tuple[str, int], list[dict]] = {}
    from .allocator import ALLOCATOR_ENV

    provider_env = {} if args.system_malloc else dict(ALLOCATOR_ENV)  # the same for every provider
    static = {
        "kind": "allegro-fast end-to-end benchmark",
        "date": started.isoformat(timespec="seconds"),
        **machine_info(device),
        "commit": git_commit(), "versions": versions(),
        "loadavg_at_start": load_at_start,
        "settings": {**settings, "rounds": args.rounds, "dtype": args.dtype, "providers": providers,
                     "quick": args.quick, "isolate": isolate, "nequip_python": nequip_python,
                     "malloc_env": provider_env},
        "cases": {job["case"]: CASES[job["case"]] for job in jobs},
    }

    def assemble(complete: bool) -> dict:
        rows = [pool_rows(provider, job, results[(provider, id(job))])
                for job in jobs for provider in providers if (provider, id(job)) in results]
        rows += skipped_rows
        return {**static, "complete": complete, "loadavg_at_end": list(os.getloadavg()),
                "rows": rows, "speedups": speedups(rows)}

    active = [p for p in providers if runnable[p]]
    for round_index in range(args.rounds):
        order = active[round_index % len(active):] + active[:round_index % len(active)] if active else []
        for provider in order:
            batches = [[job] for job in runnable[provider]] if isolate else [runnable[provider]]
            for batch in batches:
                spec = {"provider": provider, "jobs": batch, "settings": settings}
                spec_path = workdir / f"spec-{provider}-{round_index}-{batch[0]['case']}.json"
                spec_path.write_text(json.dumps(spec))
                if provider in NEQUIP_PROVIDERS:
                    command = [nequip_python, str(NEQUIP_RUNNER), "--jobs", str(spec_path)]
                else:
                    command = [sys.executable, "-m", "allegro_fast.bench_cli", "--_worker", str(spec_path)]
                print(f"[round {round_index + 1}/{args.rounds}] {provider}: "
                      f"{', '.join(j['case'] + '/' + j['model'] + '/' + j['task'] for j in batch)}", flush=True)
                rows, error = run_subprocess(command, args.timeout, provider_env)
                for index, job in enumerate(batch):
                    row = rows[index] if index < len(rows) else {"error": error or "its worker printed no row"}
                    results.setdefault((provider, id(job)), []).append(row)
                write_json_atomic(output, assemble(complete=False))  # a killed run still leaves its rows

    result = assemble(complete=True)
    print_table(result["rows"])
    for key, value in result["speedups"].items():
        print(f"speedup {key}: {value:.2f}x")
    if cuda and not args.no_roofline and (REPO / "bench" / "roofline.py").exists():
        roofline_path = workdir / "roofline.json"
        _, error = run_subprocess([sys.executable, str(REPO / "bench" / "roofline.py"), "--device", "cuda",
                                   "--output", str(roofline_path)], args.timeout)
        result["roofline"] = json.loads(roofline_path.read_text()) if roofline_path.exists() else {"error": error}
    write_json_atomic(output, result)
    print(f"wrote {output}")
    if args.plot and (REPO / "bench" / "plot.py").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "plot.py"), str(output), "--out", str(output.parent)],
                       check=False, cwd=REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())

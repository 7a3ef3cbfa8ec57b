"""Compile a model's Triton kernels before its first call, several at a time, in parallel processes.

The first launch of a generated kernel compiles it (Triton to LLVM to PTX, then ptxas) and stores the binary
in Triton's disk cache (TRITON_CACHE_DIR, default ~/.triton/cache), where every later process finds it.
Within one process the kernels compile one after the other, each on one CPU core: a model with many channels
waits minutes on its first call (the rMD17 preset, l_max 3 and 128 channels, has about two dozen kernels,
the largest taking 1.5-2 minutes of ptxas each for sm_90). `precompile` compiles them in worker processes
instead, one per layer kernel and the small ones shared, at most `processes` at a time:

    import allegro_fast as af
    from allegro_fast.kernels.precompile import precompile

    model = af.Allegro(config, backend="triton").to("cuda")
    report = precompile(model, training=True)     # {"kernels": {name: seconds}, "seconds": ..., ...}

    python -m allegro_fast.kernels.precompile --preset rmd17 --type-names C H O --training   # the same, from a shell

How: each worker builds the model from its config (same dtype and device) and runs it on a small molecule
under `kernel_selection`, which launches only the worker's kernel and replaces the others by stand-ins that
launch nothing (their outputs stay as allocated: the values are meaningless, the shapes are right). What a
compiled kernel is specialised to (the arguments' dtypes, the model's strides and channel count, the launch's
constants; never the number of atoms or edges, which the kernels read from center_ptr) is the same on that
molecule as on any other structure, so the binaries it leaves are the ones a real run looks up. The edge
geometry kernels take the number of edges and may be specialised to its divisibility by 16 again: they compile
in about a second. A kernel that fails to compile fails its worker, and the report says which and why.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from ._common import interpreter_enabled, kernel_selection

WORKER_ATOMS = 7  # atoms of the example molecule: every pair within r_max, so every atom has 6 neighbours


def example_graph(config, dtype: torch.dtype, device: torch.device):
    """A molecule of WORKER_ATOMS atoms of the model's species (cycled), all within r_max of each other."""
    from allegro_fast.graph import AtomicGraph

    rng = np.random.default_rng(0)
    positions = rng.uniform(0.0, 0.5 * config.r_max / np.sqrt(3.0), size=(WORKER_ATOMS, 3))
    numbers = [config.atomic_numbers[i % config.num_types] for i in range(WORKER_ATOMS)]
    return AtomicGraph.from_arrays(positions, np.asarray(numbers), config.r_max, dtype=dtype, device=device,
                                   type_names=config.type_names)


def run_example(config, dtype: torch.dtype, device: torch.device, training: bool) -> None:
    """One call of a fresh triton-backend model on the example molecule: energy and forces, and for `training`
    the backward of an energy + force loss through them (the double backward's kernels)."""
    from allegro_fast.model import Allegro

    # the caller's random stream stays as it was (its values do not matter here); its model gave the warnings
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Allegro(config, backend="triton")
    model = model.to(device=device, dtype=dtype)
    model.train(training)
    graph = example_graph(config, dtype, device)
    out = model(graph, compute_stress=False)
    if training:
        (out["energy"].square().sum() + out["forces"].square().sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_names(config, dtype: torch.dtype, device: torch.device, training: bool) -> list[str]:
    """The generated kernels a model launches (in order of first use), found by a run that launches none."""
    with kernel_selection(()) as selection:
        run_example(config, dtype, device, training)
    return list(selection.requested)


def _check_model(model) -> tuple[torch.dtype, torch.device]:
    if getattr(model, "backend", None) != "triton":
        raise ValueError(f"precompile takes a model with backend 'triton', got backend "
                         f"'{getattr(model, 'backend', type(model).__name__)}'")
    device = next(model.parameters()).device
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_enabled()):
        raise ValueError(f"precompile compiles for CUDA devices; the model is on '{device}' (move it first: "
                         "model.to('cuda'))")
    return model.dtype, device


_PRECOMPILED: set[tuple[str, str]] = set()  # (device, kernel) compiled by precompile's workers in this process


def worker_groups(names: list[str], processes: int) -> list[list[str]]:
    """The kernels of each worker: a layer kernel alone (the channel-tiled ones take minutes), the backward
    before the forward (the larger); the small slot and edge-geometry kernels shared by the remaining
    processes (a worker costs a few seconds of start-up: importing torch, building the model)."""
    layers = sorted((name for name in names if name.startswith("layer ")), key=lambda name: "backward" not in name)
    others = [name for name in names if not name.startswith("layer ")]
    shared = max(1, min(len(others), processes - len(layers)))
    return [[name] for name in layers] + [others[start::shared] for start in range(shared) if others]


def precompile(model, training: bool = False, processes: int | None = None, timeout: float = 1800.0) -> dict:
    """Compile every generated kernel `model` launches (inference; with `training` also the force-training
    step's) into Triton's disk cache, in worker processes (`worker_groups`), at most `processes` (default: the
    CPU cores, at most 16) at once. Returns {"kernels": {name: seconds of its first launch}, "errors":
    {name: message}, "seconds": wall time, ...}; a kernel already in the cache takes well under a second, and
    one that an earlier call in this process compiled is left out.
    Under the Triton interpreter (CPU tensors) nothing is compiled: the workers run, which is what the tests
    check."""
    dtype, device = _check_model(model)
    begin = time.perf_counter()
    names = [name for name in kernel_names(model.config, dtype, device, training)
             if (str(device), name) not in _PRECOMPILED]  # a second model of the same sizes costs no workers
    processes = max(1, processes or min(os.cpu_count() or 1, 16))
    groups = worker_groups(names, processes)
    spec = {"config": model.config.to_dict(), "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "training": training}
    report: dict = {"kernels": {}, "errors": {}, "workers": len(groups), "processes": min(processes, len(groups)),
                    "training": training}
    with tempfile.TemporaryDirectory(prefix="allegro_precompile_") as folder:
        def compile_group(index: int) -> tuple[dict, str | None]:
            path = os.path.join(folder, f"worker-{index}.json")
            with open(path, "w") as stream:
                json.dump({**spec, "launch": groups[index]}, stream)
            return _run_worker(path, timeout)

        with concurrent.futures.ThreadPoolExecutor(max(1, report["processes"])) as pool:
            for group, (timings, error) in zip(groups, pool.map(compile_group, range(len(groups)))):
                report["kernels"].update(timings)
                _PRECOMPILED.update((str(device), name) for name in timings)
                report["errors"].update({name: error for name in group if name not in timings and error})
    report["seconds"] = time.perf_counter() - begin
    return report


def _run_worker(spec_path: str, timeout: float) -> tuple[dict[str, float], str | None]:
    """Run one worker: ({kernel: seconds} of what it launched, None) or ({}, why it failed)."""
    command = [sys.executable, "-m", "allegro_fast.kernels.precompile", "--worker", spec_path]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {}, f"its worker did not finish within {timeout:.0f} s"
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = [line for line in result.stderr.strip().splitlines() if line.strip()][-3:]
        return {}, f"its worker exited with {result.returncode}: {' | '.join(tail)[-600:]}"
    return json.loads(lines[-1])["first_launch_s"], None


def worker_main(spec_path: str) -> int:
    from allegro_fast.config import AllegroConfig

    with open(spec_path) as stream:
        spec = json.load(stream)
    config = AllegroConfig.from_dict(spec["config"])
    with kernel_selection(spec["launch"]) as selection:
        run_example(config, getattr(torch, spec["dtype"]), torch.device(spec["device"]), spec["training"])
    missing = set(spec["launch"]) - set(selection.first_launch_s)
    if missing:
        raise SystemExit(f"the example run did not launch {sorted(missing)}")
    print(json.dumps({"first_launch_s": selection.first_launch_s}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a model preset (AllegroConfig.preset): default, speed, rmd17")
    source.add_argument("--model", help="a saved model (allegro_fast.serialization.save)")
    parser.add_argument("--type-names", nargs="+", default=["H"], help="species of --preset (symbols)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--training", action="store_true", help="also the kernels of a force-training step")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per kernel")
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    from allegro_fast.config import AllegroConfig
    from allegro_fast.model import Allegro

    if args.preset:
        config = AllegroConfig.preset(args.preset, args.type_names)
    else:
        from allegro_fast.serialization import load

        config = load(args.model, backend="torch").config
    model = Allegro(config, backend="triton").to(device=args.device, dtype=getattr(torch, args.dtype))
    report = precompile(model, training=args.training, processes=args.processes, timeout=args.timeout)
    for name, seconds in report["kernels"].items():
        print(f"{seconds:8.1f} s  {name}")
    for name, error in report["errors"].items():
        print(f"  failed  {name}: {error}")
    print(f"{len(report['kernels'])} kernels in {report['seconds']:.1f} s ({report['workers']} workers, "
          f"{report['processes']} at a time)"
          + (f", {len(report['errors'])} failed" if report["errors"] else ""))
    if args.output:
        with open(args.output, "w") as stream:
            json.dump(report, stream, indent=1)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed–accuracy trade-off of Allegro model sizes (issue 6): test force MAE against inference cost.

    python bench/tradeoff/run.py                              # default CPU grid: 8 sizes x 5 min, 2 at a time
    python bench/tradeoff/run.py --minutes 3 --only tiny,default
    python bench/tradeoff/run.py --grid large --device cuda --minutes 30 --jobs 1   # on a GPU
    python bench/tradeoff/plot.py bench/results/tradeoff-<date>.json                # the Pareto plot

For every model size of the grid (layers, l_max, tensor channels n, scalar width F, cutoff r_max; MLP widths
follow F: two-body [F], latent [F], readout [F/2]):
1. train allegro-fast on rMD17 aspirin (950 train / 50 validation frames of the split-01 train file, seed 0;
   the settings of bench/accuracy/rmd17_aspirin.py: per-atom energy + force MSE 1 : 1, Adam 2e-3, batch 5,
   EMA 0.99, ReduceLROnPlateau) for a fixed wall-clock budget (`--minutes`) in a subprocess with one thread
   (`--jobs` trainings at once; all points share the machine alike);
2. test the best-validation model on the 1000-frame test file: energy and force MAE (meV, meV/Å);
3. after all trainings, one at a time: inference cost of energy + forces (eval mode, float32, `--threads`
   threads): one aspirin structure (21 atoms) and a batch of `--batch` structures, warm-up calls first, then
   repeated calls for at least 2 s; the cost is the median CPU time of the calling thread per call for
   one-thread CPU runs (on this shared 2-core machine wall times mostly measure other people's load; both
   are in the JSON), the median wall time otherwise; reported as ms per call and µs per atom.

A fixed budget favours small models (more epochs); that is the trade-off in practice. The budget, thread
counts and the load average are in the JSON (bench/results/tradeoff-<date>.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "accuracy"))
from common import (
    RESULTS_DIR,
    SHARED_DATA,
    LoadSampler,
    load_rmd17,
    machine_info,
    normalise_our_curve,
    single_thread_env,
    today,
    write_json,
)

ACCURACY_DIR = Path(__file__).resolve().parents[1] / "accuracy"
TRAINING = {"energy_weight": 1.0, "force_weight": 1.0, "learning_rate": 2e-3, "batch_size": 5, "ema_decay": 0.99,
            "lr_factor": 0.5, "lr_patience": 25}


def size(num_layers: int, l_max: int, num_tensor_features: int, num_scalar_features: int, r_max: float) -> dict:
    width = num_scalar_features
    return {"num_layers": num_layers, "l_max": l_max, "num_tensor_features": num_tensor_features,
            "num_scalar_features": width, "r_max": r_max, "two_body_mlp_hidden": [width],
            "latent_mlp_hidden": [width], "readout_mlp_hidden": [max(width // 2, 8)]}


# name -> model size. The default grid spans one axis at a time around the default model ("default").
GRIDS = {
    "default": {
        "tiny": size(1, 1, 8, 32, 4.0),
        "speed": size(1, 1, 16, 32, 5.0),
        "1layer-l2": size(1, 2, 16, 64, 5.0),
        "default-r4": size(2, 2, 16, 64, 4.0),
        "default": size(2, 2, 16, 64, 5.0),
        "l1-n32": size(2, 1, 32, 64, 5.0),
        "wide": size(2, 2, 32, 128, 5.0),
        "3layer-l3": size(3, 3, 16, 64, 5.0),
    },
}
GRIDS["large"] = {
    **GRIDS["default"],
    "n64": size(2, 2, 64, 128, 5.0),
    "3layer-l2-n32": size(3, 2, 32, 128, 5.0),
    "l3-n64": size(2, 3, 64, 256, 5.0),
    "r6": size(2, 2, 32, 128, 6.0),
    "paper-rmd17": {"preset": "rmd17"},  # 3 layers, l_max 3, n 128, latent [1024, 1024]
}


def run_config(model: dict, args) -> dict:
    return {
        "seed": args.seed,
        "data": {"train_file": str(args.train_file), "energy_unit": "kcal/mol", "n_train": args.n_train,
                 "n_val": args.n_val, "split_seed": args.seed, "test_file": str(args.test_file), "n_test": 1},
        "model": {"type_names": ["H", "C", "O"], **model},
        "training": {**TRAINING, "max_time_minutes": args.minutes, "max_epochs": 1_000_000,
                     "early_stopping_patience": None, "min_lr": 0.0, "num_threads": 1, "device": args.device,
                     "dtype": "float32", "progress_bar": False, "plots": False, "validation_batch_size": 50},
    }


def train_points(points: dict, args, workdir: Path) -> dict:
    """Trains every point in a subprocess, `args.jobs` at a time; returns name -> worker result (or error)."""
    pending = list(points.items())
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name, model = pending.pop(0)
            folder = workdir / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "run.yaml").write_text(yaml.safe_dump(run_config(model, args), sort_keys=False))
            (folder / "result.json").unlink(missing_ok=True)
            command = [sys.executable, str(ACCURACY_DIR / "ours_worker.py"), "--config", str(folder / "run.yaml"),
                       "--workdir", str(folder / "run"), "--output", str(folder / "result.json"), "--threads", "1",
                       "--test", f"test={args.test_file}:kcal/mol"]
            if args.n_test is not None:
                command += ["--n-test", str(args.n_test)]
            with open(folder / "worker.log", "w") as log:  # the child keeps its own descriptor
                process = subprocess.Popen(command, env=single_thread_env(), stdout=log, stderr=subprocess.STDOUT)
            running[name] = (process, time.perf_counter())
            print(f"  started {name}", flush=True)
        time.sleep(2.0)
        for name in list(running):
            process, started = running[name]
            if process.poll() is None:
                continue
            del running[name]
            folder = workdir / name
            if process.returncode == 0:
                results[name] = json.loads((folder / "result.json").read_text())
                test = results[name]["test"]["test"]
                print(f"  done {name}: {results[name]['epochs']} epochs, test F MAE "
                      f"{test['force_mae_meV_per_A']:.1f} meV/Å ({time.perf_counter() - started:.0f} s)", flush=True)
            else:
                tail = (folder / "worker.log").read_text()[-1500:]
                results[name] = {"error": f"exit {process.returncode}", "log_tail": tail}
                print(f"  FAILED {name} (exit {process.returncode}); see {folder / 'worker.log'}", flush=True)
    return results


def _timed(call, min_seconds: float, min_calls: int, warmup: int) -> dict:
    """Median wall time and median CPU time of this thread per call (ms). With one torch thread on the CPU all
    the work runs on the calling thread, so the CPU time is the cost without the waits a loaded machine adds."""
    for _ in range(warmup):
        call()
    wall, cpu = [], []
    start = time.perf_counter()
    while len(wall) < min_calls or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), time.thread_time()
        call()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return {"median_ms": 1e3 * statistics.median(wall), "min_ms": 1e3 * min(wall),
            "median_thread_cpu_ms": 1e3 * statistics.median(cpu), "calls": len(wall)}


def inference_cost(model_path: Path, frames, batch: int, device: str, threads: int) -> dict:
    """Energy + forces latency of the saved model: one structure, and a batch of structures (float32, eval)."""
    import torch

    import allegro_fast as af

    torch.set_num_threads(threads)
    model = af.load(model_path).to(device=device, dtype=torch.float32).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cpu_single_thread = device == "cpu" and threads == 1
    result = {"num_parameters": sum(p.numel() for p in model.parameters()),
              "cost_basis": "median CPU time of the calling thread" if cpu_single_thread else "median wall time"}
    for label, structures in (("single", frames[:1]), ("batch", frames[:batch])):
        graph = af.AtomicGraph.from_ase(list(structures), r_max=model.config.r_max, dtype=torch.float32).to(device=device)

        def call(graph=graph):
            out = model(graph, compute_forces=True, compute_stress=False)
            out["forces"].sum().item()  # waits for the device as well
            sync()

        timing = _timed(call, min_seconds=2.0, min_calls=5, warmup=3)
        # The cost: CPU time of the thread for one-thread CPU runs (robust to other load), else wall time.
        cost_ms = timing["median_thread_cpu_ms"] if cpu_single_thread else timing["median_ms"]
        timing.update(num_atoms=graph.num_nodes, num_edges=graph.num_edges, num_structures=len(structures),
                      cost_ms=cost_ms, us_per_atom=1e3 * cost_ms / graph.num_nodes)
        result[label] = timing
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--only", default=None, help="comma-separated point names of the grid to run")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per point")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (each one thread)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: training and inference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the inference timings")
    parser.add_argument("--batch", type=int, default=50, help="structures in the batched inference timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=950)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--n-test", type=int, default=None, help="first N test frames (default all 1000)")
    parser.add_argument("--train-file", type=Path, default=SHARED_DATA / "rmd17" / "rmd17_aspirin_train_01.npz")
    parser.add_argument("--test-file", type=Path, default=SHARED_DATA / "rmd17" / "rmd17_aspirin_test_01.npz")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/allegro-fast-bench/tradeoff"))
    parser.add_argument("--output", type=Path, default=None, help="default bench/results/tradeoff-<date>.json")
    args = parser.parse_args(argv)
    output = args.output or RESULTS_DIR / f"tradeoff-{today()}.json"
    points = GRIDS[args.grid]
    if args.only:
        names = [name.strip() for name in args.only.split(",")]
        unknown = [name for name in names if name not in points]
        if unknown:
            raise SystemExit(f"unknown point(s) {unknown}; grid '{args.grid}' has {list(points)}")
        points = {name: points[name] for name in names}
    test_frames = load_rmd17(args.test_file)

    print(f"training {len(points)} sizes for {args.minutes} min each, {args.jobs} at a time", flush=True)
    start = time.perf_counter()
    with LoadSampler(30.0) as training_load:
        trained = train_points(points, args, args.workdir)
    training_wall = time.perf_counter() - start
    print("inference timings, one model at a time", flush=True)
    with LoadSampler(10.0) as timing_load:
        rows = []
        for name, model in points.items():
            row = {"name": name, "model": model}
            worker = trained[name]
            if "error" in worker:
                row["error"] = worker
            else:
                row.update(test=worker["test"]["test"], epochs=worker["epochs"],
                           train_call_wall_s=worker["train_call_wall_s"],
                           train_call_cpu_s=worker.get("train_call_cpu_s"),
                           learning_curve=normalise_our_curve(worker["learning_curve"]),
                           **inference_cost(Path(worker["model_path"]), test_frames, args.batch, args.device,
                                            args.threads))
                print(f"  {name}: {row['single']['cost_ms']:.2f} ms per structure, "
                      f"{row['batch']['us_per_atom']:.1f} µs/atom in batches of {args.batch}", flush=True)
            rows.append(row)
    result = {
        "benchmark": "bench/tradeoff/run.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "grid": args.grid,
        "budget_minutes_per_point": args.minutes,
        "concurrent_trainings": args.jobs,
        "training_threads_per_process": 1,
        "inference_threads": args.threads,
        "device": args.device,
        "dataset": {"train_file": str(args.train_file), "test_file": str(args.test_file), "n_train": args.n_train,
                    "n_val": args.n_val, "n_test": args.n_test or len(test_frames), "split_seed": args.seed},
        "training": TRAINING,
        "machine": machine_info(),
        "load_during_training": training_load.summary(),
        "load_during_timing": timing_load.summary(),
        "training_wall_s": training_wall,
        "points": rows,
    }
    write_json(result, output)
    print(f"wrote {output}; plot with: python bench/tradeoff/plot.py {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

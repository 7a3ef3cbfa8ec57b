"""Acetylacetone temperature transferability: train at 300 K, test at 300 K and 600 K (allegro-fast only).

    python bench/accuracy/acac.py                      # 10 min, 1 thread
    python bench/accuracy/acac.py --minutes 20 --threads 2
    python bench/accuracy/acac.py --minutes 0.3 --n-train 20 --n-val 5 --n-test 10   # smoke run

Protocol (issue 5; the 3BPA-style transferability test of Kovács et al., data from davkovacs/BOTNet-datasets):
- train on ../shared/data/acac/train_300K.xyz (500 frames, PBE+D3 energies and forces in eV, eV/Å):
  `--n-train` (450) for training and `--n-val` (50) for validation, drawn with the run's seed;
- test on all 650 frames of test_MD_300K.xyz (same temperature) and test_MD_600K.xyz (twice the temperature,
  geometries the training never saw); the 600 K errors measure extrapolation;
- model: the default size (2 layers, l_max 2, 64 scalar / 16 tensor features, r_max 5 Å), float32, trained
  with the same settings as the aspirin benchmark (per-atom energy + force MSE 1 : 1, Adam 2e-3, batch 5,
  EMA 0.99, ReduceLROnPlateau 0.5 / 25) for a fixed wall-clock budget; the best-validation model is tested.

Writes bench/results/accuracy-acac-<date>.json and its learning-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    SHARED_DATA,
    LoadSampler,
    machine_info,
    normalise_our_curve,
    single_thread_env,
    today,
    wait_all,
    write_json,
)
from plot import plot_learning_curves

HERE = Path(__file__).resolve().parent
TRAINING = {"energy_weight": 1.0, "force_weight": 1.0, "learning_rate": 2e-3, "batch_size": 5, "ema_decay": 0.99,
            "lr_factor": 0.5, "lr_patience": 25}
MODEL = {"r_max": 5.0, "l_max": 2, "num_layers": 2, "num_scalar_features": 64, "num_tensor_features": 16,
         "two_body_mlp_hidden": [64], "latent_mlp_hidden": [64], "readout_mlp_hidden": [32]}


def run_config(args) -> dict:
    return {
        "seed": args.seed,
        # The trainer's own test set is left tiny: the worker scores the 300 K and 600 K files itself.
        "data": {"train_file": str(args.data / "train_300K.xyz"), "n_train": args.n_train, "n_val": args.n_val,
                 "test_file": str(args.data / "test_MD_300K.xyz"), "n_test": 1},
        "model": {"type_names": ["H", "C", "O"], **MODEL},
        "training": {**TRAINING, "max_time_minutes": args.minutes, "max_epochs": 1_000_000,
                     "early_stopping_patience": None, "min_lr": 0.0, "num_threads": args.threads, "device": "cpu",
                     "dtype": "float32", "progress_bar": False, "plots": False, "validation_batch_size": 50},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=450)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--n-test", type=int, default=None, help="first N frames of each test file (default all)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "acac")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/allegro-fast-bench/accuracy-acac"))
    parser.add_argument("--output", type=Path, default=None, help="default bench/results/accuracy-acac-<date>.json")
    args = parser.parse_args(argv)
    output = args.output or RESULTS_DIR / f"accuracy-acac-{today()}.json"
    for name in ("train_300K.xyz", "test_MD_300K.xyz", "test_MD_600K.xyz"):
        if not (args.data / name).exists():
            raise FileNotFoundError(f"{args.data / name} not found (set ALLEGRO_FAST_DATA to the shared data folder)")

    args.workdir.mkdir(parents=True, exist_ok=True)
    config_path = args.workdir / "run.yaml"
    config_path.write_text(yaml.safe_dump(run_config(args), sort_keys=False))
    worker_json = args.workdir / "result.json"
    worker_json.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / "ours_worker.py"), "--config", str(config_path),
               "--workdir", str(args.workdir / "run"), "--output", str(worker_json), "--threads", str(args.threads),
               "--test", f"300K={args.data / 'test_MD_300K.xyz'}", "--test", f"600K={args.data / 'test_MD_600K.xyz'}"]
    if args.n_test is not None:
        command += ["--n-test", str(args.n_test)]
    environment = single_thread_env()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environment[name] = str(args.threads)

    print(f"training for {args.minutes} min with {args.threads} thread(s); work folder {args.workdir}", flush=True)
    start = time.perf_counter()
    with LoadSampler(15.0) as load:
        with open(args.workdir / "worker.log", "w") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
        finished = wait_all({"allegro_fast": process}, timeout=60 * args.minutes + 1800, start=start)
    if process.returncode != 0:
        raise RuntimeError(f"allegro-fast worker failed (exit {process.returncode}); see {args.workdir / 'worker.log'}")
    ours = json.loads(worker_json.read_text())
    result = {
        "benchmark": "bench/accuracy/acac.py",
        "title": "acetylacetone: train 300 K, test 300 K and 600 K",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "dataset": {"train_file": str(args.data / "train_300K.xyz"), "n_train": args.n_train, "n_val": args.n_val,
                    "split_seed": args.seed, "test_files": {"300K": str(args.data / "test_MD_300K.xyz"),
                                                            "600K": str(args.data / "test_MD_600K.xyz")},
                    "units": "eV, eV/Å"},
        "budget_minutes": args.minutes,
        "threads_per_process": args.threads,
        "model": {"type_names": ["H", "C", "O"], **MODEL},
        "training": TRAINING,
        "machine": machine_info(),
        "load": load.summary(),
        "allegro_fast": {
            "test": ours["test"]["300K"], "test_by_temperature": ours["test"], "epochs": ours["epochs"],
            "train_call_wall_s": ours["train_call_wall_s"], "process_wall_s": finished["allegro_fast"]["wall_s"],
            "process_cpu_s": finished["allegro_fast"]["cpu_s"], "train_call_cpu_s": ours.get("train_call_cpu_s"),
            "torch_threads": ours["torch_threads"], "learning_curve": normalise_our_curve(ours["learning_curve"]),
            "run_config": run_config(args),
        },
    }
    write_json(result, output)
    plot_learning_curves(result, output.with_suffix(".png"))
    print(json.dumps(ours["test"], indent=1))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""rMD17 aspirin accuracy at a fixed wall-clock budget: allegro-fast against nequip-allegro 0.8.3, side by side.

    python bench/accuracy/rmd17_aspirin.py                    # 15 min each, both at once, 1 thread each
    python bench/accuracy/rmd17_aspirin.py --minutes 20 --seed 1
    python bench/accuracy/rmd17_aspirin.py --minutes 0.5 --n-train 20 --n-val 5 --n-test 10   # smoke run

Protocol (issue 5):
- data: ../shared/data/rmd17, split 01. From the 1000-frame train file, `--n-train` (950) training and
  `--n-val` (50) validation frames, drawn with numpy default_rng(seed).permutation (the same draw as
  allegro_fast.data.split_frames, checked); test on the 1000 frames of the test file. kcal/mol -> eV with
  0.0433641. Both packages get exactly these frames (nequip through extended-XYZ files).
- model: the same sizes for both (default: 2 layers, l_max 2, 64 scalar / 16 tensor features, r_max 5 Å,
  8 Bessels, p = 6, two-body MLP [64], latent MLP [64], readout [32], SiLU, float32). The two packages compute
  different functions (see the notes in the JSON and bench/README.md).
- training: per-atom energy MSE + force MSE with equal weights (1 : 1), Adam lr 2e-3, batch 5, EMA of the
  weights (decay 0.99) used for validation and testing, ReduceLROnPlateau (factor 0.5, patience 25 epochs),
  the best-validation model is tested. Statistics (avg. neighbours, energy shift, force-RMS scale) are fitted
  by each package on the training frames.
- budget: both trainings run AT THE SAME TIME, each in its own process with one thread (OMP_NUM_THREADS=1,
  torch.set_num_threads(1)) and the same wall-clock budget for the training loop (`--minutes`); the
  1-minute load average is sampled every 15 s. Setup (data, statistics) and testing are outside the budget.
- errors: energy MAE per structure (meV) and per atom, force-component MAE (meV/Å), RMSEs; computed from
  both packages' test predictions with the same function (bench/accuracy/common.error_metrics).

Writes bench/results/accuracy-aspirin-<date>.json and a learning-curve PNG beside it (bench/accuracy/plot.py).
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
import nequip_side
from common import (
    RESULTS_DIR,
    SHARED_DATA,
    LoadSampler,
    load_rmd17,
    machine_info,
    normalise_our_curve,
    single_thread_env,
    split_indices,
    today,
    wait_all,
    write_json,
)
from plot import plot_learning_curves

HERE = Path(__file__).resolve().parent
TYPE_NAMES = ("H", "C", "O")

# Hyperparameters shared by both packages (names of allegro_fast's RunConfig training section).
TRAINING = {"energy_weight": 1.0, "force_weight": 1.0, "learning_rate": 2e-3, "batch_size": 5, "ema_decay": 0.99,
            "lr_factor": 0.5, "lr_patience": 25}
MODEL = {"r_max": 5.0, "l_max": 2, "num_layers": 2, "num_scalar_features": 64, "num_tensor_features": 16,
         "two_body_mlp_hidden": [64], "latent_mlp_hidden": [64], "readout_mlp_hidden": [32]}

KNOWN_DIFFERENCES = [
    ("scalar track: nequip-allegro 0.8.3 feeds each latent MLP (and the readout) the concatenation of the scalar "
     "features of all earlier layers (dense connections); allegro-fast uses the paper's residual update "
     "x = (x_old + MLP(...)) / sqrt(2) and reads out the last layer's latents"),
    ("tensor track: nequip's tensor product (Contracter, tp_path_channel_coupling=True) carries learned weights per "
     "path and channel and sums the paths into one output per irrep, pruning irreps the last layer cannot use; "
     "allegro-fast keeps one output block per path and mixes channels and paths with an e3nn-style linear layer "
     "(not in the last layer)"),
    ("two-body embedding: nequip first maps one-hot species x Bessel basis with a linear layer to "
     "radial_chemical_embed_dim (= num_scalar_features here), then the two-body MLP; allegro-fast feeds one-hot "
     "species and Bessels straight into its two-body MLP"),
    ("energy shift: nequip one scalar (mean per-atom energy); allegro-fast per species least squares on "
     "composition (minimum-norm for one molecule); both fixed. Scale: force RMS of the training set in both"),
    ("ReduceLROnPlateau and the best-model choice monitor the validation force MAE in nequip (its validation metric) "
     "and the validation loss (energy + force MSE) in allegro-fast"),
    "nequip also differentiates with respect to a strain (virial) on every step; allegro-fast computes forces only",
    "neighbour lists: nequip matscipy, allegro-fast vesin; both built once before training",
    ("float32 energies: allegro-fast adds the per-species shift and sums atomic energies in the model dtype "
     "(float32: spacing 2 meV at the -17,600 eV of aspirin, so up to ~1 meV rounding per structure); nequip keeps "
     "per-atom and total energies in float64"),
    ("time budget: both count from the start of the training loop, validation included; allegro-fast also writes "
     "a checkpoint every epoch, nequip only when the validation metric improves"),
]


def run_config(args, workdir: Path) -> dict:
    """allegro-fast's run configuration (a dict, written as YAML for the worker)."""
    return {
        "seed": args.seed,
        "data": {
            "train_file": str(args.train_file), "energy_unit": "kcal/mol", "n_train": args.n_train,
            "n_val": args.n_val, "split_seed": args.seed, "test_file": str(args.test_file), "n_test": 1,
        },
        "model": {"type_names": list(TYPE_NAMES), **MODEL},
        "training": {
            **{key: TRAINING[key] for key in ("energy_weight", "force_weight", "learning_rate", "batch_size",
                                              "ema_decay", "lr_factor", "lr_patience")},
            "max_time_minutes": args.minutes, "max_epochs": 1_000_000, "early_stopping_patience": None,
            "min_lr": 0.0, "num_threads": 1, "device": "cpu", "dtype": "float32", "progress_bar": False,
            "plots": False, "validation_batch_size": 50,
        },
    }


def check_same_split(count: int, sizes, seed: int, ours) -> None:
    """The indices we give nequip must be the ones allegro_fast.data.split_frames picks."""
    from allegro_fast.data import split_frames

    split = split_frames(list(range(count)), sizes[0], sizes[1], 0, seed=seed)
    if sorted(split.train) != list(ours[0]) or sorted(split.validation) != list(ours[1]):
        raise RuntimeError("bench split differs from allegro_fast.data.split_frames; the comparison would be unfair")


def normalise_nequip_curve(rows: list[dict]) -> list[dict]:
    return [{
        "epoch": row["epoch"], "wall_s": row["wall_s"],
        "val_force_mae_meV_per_A": None if row["val_force_mae"] is None else 1e3 * row["val_force_mae"],
        "val_energy_mae_meV": None if row["val_energy_mae"] is None else 1e3 * row["val_energy_mae"],
        "train_loss": row["train_loss"], "lr": row["lr"], "cpu_s": row.get("cpu_s"),
    } for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget of each package")
    parser.add_argument("--seed", type=int, default=0, help="data split, weight initialisation, batch order")
    parser.add_argument("--n-train", type=int, default=950)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--n-test", type=int, default=None, help="first N test frames (default: all 1000)")
    parser.add_argument("--train-file", type=Path, default=SHARED_DATA / "rmd17" / "rmd17_aspirin_train_01.npz")
    parser.add_argument("--test-file", type=Path, default=SHARED_DATA / "rmd17" / "rmd17_aspirin_test_01.npz")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/allegro-fast-bench/accuracy-aspirin"))
    parser.add_argument("--output", type=Path, default=None, help="default bench/results/accuracy-aspirin-<date>.json")
    parser.add_argument("--skip-nequip", action="store_true", help="train allegro-fast only")
    args = parser.parse_args(argv)
    output = args.output or RESULTS_DIR / f"accuracy-aspirin-{today()}.json"
    args.workdir.mkdir(parents=True, exist_ok=True)

    frames = load_rmd17(args.train_file)
    test_frames = load_rmd17(args.test_file)
    if args.n_test is not None:
        test_frames = test_frames[:args.n_test]
    train_idx, val_idx = split_indices(len(frames), [args.n_train, args.n_val], args.seed)
    check_same_split(len(frames), [args.n_train, args.n_val], args.seed, (train_idx, val_idx))

    # ours
    ours_dir = args.workdir / "allegro-fast"
    ours_dir.mkdir(parents=True, exist_ok=True)
    ours_config = ours_dir / "run.yaml"
    ours_config.write_text(yaml.safe_dump(run_config(args, ours_dir), sort_keys=False))
    ours_json = ours_dir / "result.json"
    ours_json.unlink(missing_ok=True)
    ours_command = [sys.executable, str(HERE / "ours_worker.py"), "--config", str(ours_config),
                    "--workdir", str(ours_dir / "run"), "--output", str(ours_json), "--threads", "1",
                    "--test", f"test={args.test_file}:kcal/mol"]
    if args.n_test is not None:
        ours_command += ["--n-test", str(args.n_test)]

    # theirs
    notes: list[str] = []
    nequip_dir = args.workdir / "nequip"
    if not args.skip_nequip:
        import allegro_fast as af

        model_kwargs = nequip_side.nequip_model_kwargs(af.AllegroConfig(type_names=TYPE_NAMES, **MODEL),
                                                       args.seed, notes)
        config = nequip_side.nequip_config(
            model_kwargs, nequip_dir, budget_s=60 * args.minutes, batch_size=TRAINING["batch_size"],
            learning_rate=TRAINING["learning_rate"], energy_weight=TRAINING["energy_weight"],
            force_weight=TRAINING["force_weight"], ema_decay=TRAINING["ema_decay"],
            lr_plateau={"factor": TRAINING["lr_factor"], "patience": TRAINING["lr_patience"]}, seed=args.seed)
        nequip_config_path = nequip_side.prepare(nequip_dir, [frames[i] for i in train_idx],
                                                 [frames[i] for i in val_idx], test_frames, config)

    print(f"training both for {args.minutes} min on {args.n_train}/{args.n_val} frames; work folder {args.workdir}",
          flush=True)
    start = time.perf_counter()
    with LoadSampler(15.0) as load:
        with open(ours_dir / "worker.log", "w") as ours_log:  # the child keeps its own descriptor
            ours_process = subprocess.Popen(ours_command, env=single_thread_env(), stdout=ours_log,
                                            stderr=subprocess.STDOUT)
        nequip_process = None if args.skip_nequip else nequip_side.launch(nequip_config_path, nequip_dir / "nequip.log")
        finished = wait_all({"allegro_fast": ours_process, "nequip": nequip_process},
                            timeout=60 * args.minutes + 1800, start=start)
        total_wall = time.perf_counter() - start

    result = {
        "benchmark": "bench/accuracy/rmd17_aspirin.py",
        "title": "rMD17 aspirin: allegro-fast vs nequip-allegro 0.8.3, same size, split and budget",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "dataset": {"train_file": str(args.train_file), "test_file": str(args.test_file), "n_train": args.n_train,
                    "n_val": args.n_val, "n_test": len(test_frames), "split_seed": args.seed,
                    "train_indices": [int(i) for i in train_idx], "val_indices": [int(i) for i in val_idx],
                    "units": "kcal/mol converted to eV with 0.0433641"},
        "budget_minutes": args.minutes,
        "threads_per_process": 1,
        "run_concurrently": not args.skip_nequip,
        "model": {"type_names": list(TYPE_NAMES), **MODEL},
        "training": TRAINING,
        "machine": machine_info(),
        "load": load.summary(),
        "wall_s_both": total_wall,
        "known_differences": KNOWN_DIFFERENCES + notes,
    }
    if ours_process.returncode != 0:
        raise RuntimeError(f"allegro-fast worker failed (exit {ours_process.returncode}); see {ours_dir / 'worker.log'}")
    ours = json.loads(ours_json.read_text())
    result["allegro_fast"] = {
        "test": ours["test"]["test"], "epochs": ours["epochs"], "train_call_wall_s": ours["train_call_wall_s"],
        "train_wall_seconds_reported": ours["train_wall_seconds_reported"], "process_wall_s": ours["process_wall_s"],
        "train_call_cpu_s": ours.get("train_call_cpu_s"), "process_cpu_s": finished["allegro_fast"]["cpu_s"],
        "torch_threads": ours["torch_threads"], "learning_curve": normalise_our_curve(ours["learning_curve"]),
        "run_config": run_config(args, ours_dir),
    }
    if nequip_process is not None:
        if nequip_process.returncode != 0:
            tail = (nequip_dir / "nequip.log").read_text()[-3000:]
            raise RuntimeError(f"nequip-train failed (exit {nequip_process.returncode}):\n{tail}")
        theirs = nequip_side.collect(nequip_dir)
        result["nequip_allegro"] = {
            "test": theirs["test"], "epochs": theirs["epochs"], "process_wall_s": finished["nequip"]["wall_s"],
            "process_cpu_s": finished["nequip"]["cpu_s"],
            "training_loop_cpu_s": theirs["learning_curve"][-1].get("cpu_s") if theirs["learning_curve"] else None,
            "learning_curve": normalise_nequip_curve(theirs["learning_curve"]),
            "versions": {"nequip": "0.19.1", "nequip-allegro": "0.8.3"},
            "config": config,
        }
        ratio = result["allegro_fast"]["test"]["force_mae_meV_per_A"] / theirs["test"]["force_mae_meV_per_A"]
        result["force_mae_ratio_ours_over_nequip"] = ratio
        result["goal_force_mae_ratio_at_most"] = 0.8
    write_json(result, output)
    plot_learning_curves(result, output.with_suffix(".png"))
    summary = {"ours": result["allegro_fast"]["test"]}
    if "nequip_allegro" in result:
        summary["nequip"] = result["nequip_allegro"]["test"]
        summary["ratio"] = result["force_mae_ratio_ours_over_nequip"]
    print(json.dumps(summary, indent=1))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

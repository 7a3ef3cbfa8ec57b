"""Quickstart with the Python API: data, training, evaluation and MD in a few calls. Needs no dataset.

The same flow as `allegro-fast demo`, written out so that each step can be changed:
1. label frames of fcc Ag with a vacancy near its melting point with ASE's EMT potential;
2. train with a run configuration given as a dict (the same sections as a YAML file);
3. evaluate the saved model on held-out frames; 4. run NVE MD with it.

Run: python examples/quickstart.py [--minutes 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io
import torch

import allegro_fast as af
from allegro_fast.demo import generate_silver_frames
from allegro_fast.evaluation import evaluate, format_metrics
from allegro_fast.md import run_md
from allegro_fast.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0, help="training budget in minutes")
    parser.add_argument("--workdir", default="quickstart-run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    workdir = Path(args.workdir)
    workdir.mkdir(exist_ok=True)

    frames = generate_silver_frames(180, seed=0)
    ase.io.write(workdir / "train.extxyz", frames[:150])
    test_frames = frames[150:]

    config = {
        "data": {"train_file": str(workdir / "train.extxyz"), "n_train": 135, "n_val": 15},
        "model": {"r_max": 4.5, "num_scalar_features": 32, "num_tensor_features": 8, "two_body_mlp_hidden": [32],
                  "latent_mlp_hidden": [32], "readout_mlp_hidden": [16]},
        "training": {"learning_rate": 0.005, "batch_size": 5, "lr_patience": 10, "max_time_minutes": args.minutes,
                     "grad_clip_norm": 10.0},
    }
    result = train(config, workdir / "run", resume=False)
    print(f"trained {result.epochs} epochs in {result.wall_seconds:.0f} s; model in {result.model_path}")

    model = af.load(result.model_path)
    print(format_metrics(evaluate(model, test_frames), f"errors on {len(test_frames)} held-out frames:"))

    md = run_md(model, test_frames[-1], ensemble="nve", temperature_K=1200, timestep_fs=2.0, steps=200,
                trajectory=str(workdir / "md.traj"))
    print(md.summary())


if __name__ == "__main__":
    main()

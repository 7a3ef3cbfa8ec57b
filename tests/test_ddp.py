"""Two processes (torch.distributed, gloo, CPU) train exactly like one process with the same global batch."""

from __future__ import annotations

import ase.io
import pytest
import torch
import torch.multiprocessing as mp

from allegro_fast.demo import generate_silver_frames
from allegro_fast.training import train


def config_for(path) -> dict:
    return {
        "seed": 2,
        # 13 training frames with batch 4: the last global batch has one structure, so one process gets none
        "data": {"train_file": str(path), "n_train": 13, "n_val": 3, "n_test": 0},
        "model": {"r_max": 3.5, "l_max": 2, "num_layers": 2, "num_scalar_features": 8, "num_tensor_features": 3,
                  "num_bessels": 4, "two_body_mlp_hidden": [8], "latent_mlp_hidden": [8], "readout_mlp_hidden": [5]},
        "training": {"batch_size": 4, "max_epochs": 2, "dtype": "float64", "learning_rate": 0.01, "ema_decay": 0.9,
                     "grad_clip_norm": 0.5, "stress_weight": 10.0, "progress_bar": False, "plots": False,
                     "num_threads": 1},
    }


def _worker(rank: int, world_size: int, init_file: str, path: str, workdir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        train(config_for(path), workdir, progress=False)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    frames = generate_silver_frames(16, seed=3, equilibration_steps=5, steps_between=2)
    path = tmp_path / "silver.extxyz"
    ase.io.write(path, frames, format="extxyz")

    # fork, not spawn: a spawned child imports torch and the package again (10-20 s on a busy 2-core machine)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(path), str(tmp_path / "two")), nprocs=2,
                       join=True, start_method="fork")
    single = train(config_for(path), tmp_path / "one", progress=False)

    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert one["epoch"] == two["epoch"] == 2 and single.epochs == 2
    largest = 0.0
    for section in ("model", "ema"):
        a = one[section] if section == "model" else one[section]["model"]
        b = two[section] if section == "model" else two[section]["model"]
        for key, value in a.items():
            if value.is_floating_point():
                error = float((value - b[key]).abs().max() / value.abs().max().clamp_min(1e-300))
                largest = max(largest, error)
                assert error < 1e-10, f"{section} {key}: relative difference {error:.2e}"
    # the weights did move (the average lags behind them), so the comparison means something
    assert any(not torch.equal(one["model"][key], one["ema"]["model"][key]) for key in one["model"])
    print(f"largest relative difference between 1 and 2 processes: {largest:.1e}")
    assert abs(one["best_validation_loss"] - two["best_validation_loss"]) <= 1e-10 * abs(one["best_validation_loss"])

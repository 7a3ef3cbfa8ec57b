"""Train and test the authors' nequip-allegro 0.8.3 with `nequip-train` on the same split and budget as ours.

Runs in our environment; nequip itself only ever runs in a subprocess with its own interpreter
(/work/venv-nequip, see bench/README_nequip.md), because it changes torch's global defaults.

What it does:
1. writes the train / validation / test frames as extended-XYZ (eV, eV/Å) into a work folder;
2. writes a Hydra config for `nequip-train` (`nequip_config`): ASEDataModule on those files, nequip's
   matscipy neighbour list, `CommonDataStatisticsManager` statistics (avg. neighbours, per-atom energy mean
   as the shift, force RMS as the scale, both fixed), `allegro.model.AllegroModel` with sizes mapped from
   an `AllegroConfig` (`nequip_model_kwargs`), `EnergyForceLoss` (per-atom energy MSE + force MSE),
   Adam, optional ReduceLROnPlateau and EMA, `lightning.Trainer(max_time=...)` for the wall-clock budget,
   the best-validation checkpoint (validation force MAE) used for the test;
3. runs `nequip-train` with OMP_NUM_THREADS=1 (`launch`), which trains, then tests the best checkpoint on the
   test file and writes its predictions (TestTimeXYZFileWriter);
4. reads the predictions back and computes the errors with the same function as for our model (`collect`),
   plus the learning curve written by `nequip_callbacks.WallClockLog`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from ase import Atoms
from common import NEQUIP_PYTHON, error_metrics, single_thread_env, write_extxyz

HERE = Path(__file__).resolve().parent


def _depth_and_width(hidden: Sequence[int], name: str, notes: list[str]) -> tuple[int, int]:
    """nequip's MLPs have `depth` hidden layers of one `width`; ours take a list of widths."""
    if len(hidden) == 0:
        return 0, 1
    if len(set(hidden)) > 1:
        notes.append(f"{name} {list(hidden)}: nequip takes one hidden width, used {max(hidden)}")
    return len(hidden), max(hidden)


def nequip_model_kwargs(config, seed: int, notes: list[str]) -> dict:
    """`allegro.model.AllegroModel` arguments with the sizes of an `allegro_fast.AllegroConfig`.

    Statistics come from nequip's own data statistics (Hydra interpolations), computed on the same training
    frames. Differences that cannot be matched are appended to `notes`.
    """
    two_body_depth, two_body_width = _depth_and_width(config.two_body_mlp_hidden, "two_body_mlp_hidden", notes)
    latent_depth, latent_width = _depth_and_width(config.latent_mlp_hidden, "latent_mlp_hidden", notes)
    readout_depth, readout_width = _depth_and_width(config.readout_mlp_hidden, "readout_mlp_hidden", notes)
    return {
        "_target_": "allegro.model.AllegroModel",
        "seed": seed,
        "model_dtype": "float32",
        "type_names": list(config.type_names),
        "r_max": float(config.r_max),
        "l_max": int(config.l_max),
        "parity": bool(config.parity),
        "radial_chemical_embed": {
            "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
            "num_bessels": int(config.num_bessels),
            "bessel_trainable": bool(config.bessel_trainable),
            "polynomial_cutoff_p": int(config.polynomial_p),
        },
        "radial_chemical_embed_dim": int(config.num_scalar_features),
        "scalar_embed_mlp_hidden_layers_depth": two_body_depth,
        "scalar_embed_mlp_hidden_layers_width": two_body_width,
        "scalar_embed_mlp_nonlinearity": "silu",
        "num_layers": int(config.num_layers),
        "num_scalar_features": int(config.num_scalar_features),
        "num_tensor_features": int(config.num_tensor_features),
        "allegro_mlp_hidden_layers_depth": latent_depth,
        "allegro_mlp_hidden_layers_width": latent_width,
        "allegro_mlp_nonlinearity": "silu",
        "tp_path_channel_coupling": True,
        "readout_mlp_hidden_layers_depth": readout_depth,
        "readout_mlp_hidden_layers_width": readout_width,
        "readout_mlp_nonlinearity": "silu",
        "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
        "per_type_energy_shifts": "${training_data_stats:per_atom_energy_mean}",
        "per_type_energy_scales": "${training_data_stats:forces_rms}",
        "per_type_energy_scales_trainable": False,
        "per_type_energy_shifts_trainable": False,
    }


def _lightning_duration(seconds: float) -> str:
    """Lightning's "DD:HH:MM:SS" (whole seconds; Hydra would pass a dict as a DictConfig, which Lightning rejects)."""
    total = max(round(seconds), 1)
    return f"{total // 86400:02d}:{total % 86400 // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def nequip_config(model_kwargs: dict, workdir: Path, *, budget_s: float, batch_size: int, learning_rate: float,
                  energy_weight: float, force_weight: float, ema_decay: float | None,
                  lr_plateau: dict | None, seed: int, max_epochs: int = 1_000_000) -> dict:
    """The `nequip-train` Hydra config (a plain dict, dumped as YAML).

    budget_s: Lightning's max_time for the training loop (checked after every batch). lr_plateau: None or
    {"factor": f, "patience": p} for ReduceLROnPlateau on the validation force MAE. ema_decay: None for plain
    NequIPLightningModule, else EMALightningModule with that decay.
    """
    type_names = model_kwargs["type_names"]
    loader = {"_target_": "torch.utils.data.DataLoader", "batch_size": batch_size}
    training_module = {
        "_target_": "nequip.train.NequIPLightningModule" if ema_decay is None else "nequip.train.EMALightningModule",
        "loss": {
            "_target_": "nequip.train.EnergyForceLoss",
            "per_atom_energy": True,
            "coeffs": {"total_energy": float(energy_weight), "forces": float(force_weight)},
        },
        "val_metrics": {
            "_target_": "nequip.train.EnergyForceMetrics",
            "coeffs": {"forces_mae": 1.0, "total_energy_mae": None},
        },
        "test_metrics": "${training_module.val_metrics}",
        "optimizer": {"_target_": "torch.optim.Adam", "lr": float(learning_rate)},
        "model": model_kwargs,
    }
    if ema_decay is not None:
        training_module["ema_decay"] = float(ema_decay)
    if lr_plateau is not None:
        training_module["lr_scheduler"] = {
            "scheduler": {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                          "factor": float(lr_plateau["factor"]), "patience": int(lr_plateau["patience"])},
            "monitor": "val0_epoch/weighted_sum",
            "interval": "epoch",
            "frequency": 1,
        }
    return {
        "run": ["train", "test"],
        "seed": seed,
        "data": {
            "_target_": "nequip.data.datamodule.ASEDataModule",
            "seed": seed,
            "train_file_path": str(workdir / "train.xyz"),
            "val_file_path": str(workdir / "val.xyz"),
            "test_file_path": str(workdir / "test.xyz"),
            "transforms": [
                {"_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper", "model_type_names": type_names},
                {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": model_kwargs["r_max"]},
            ],
            "train_dataloader": {**loader, "shuffle": True},
            "val_dataloader": {**loader, "batch_size": 50},
            "test_dataloader": {**loader, "batch_size": 50},
            "stats_manager": {"_target_": "nequip.data.CommonDataStatisticsManager", "type_names": type_names,
                              "dataloader_kwargs": {"batch_size": 50}},
        },
        "trainer": {
            "_target_": "lightning.Trainer",
            "accelerator": "cpu",
            "max_epochs": max_epochs,
            "max_time": _lightning_duration(budget_s),
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 50,
            "enable_progress_bar": False,
            "logger": False,
            "callbacks": [
                {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "monitor": "val0_epoch/weighted_sum",
                 "dirpath": str(workdir / "checkpoints"), "filename": "best", "save_top_k": 1},
                {"_target_": "nequip.train.callbacks.TestTimeXYZFileWriter", "out_file": str(workdir / "test_pred"),
                 "output_fields_from_original_dataset": ["total_energy", "forces"], "chemical_symbols": type_names},
                {"_target_": "nequip_callbacks.WallClockLog", "path": str(workdir / "learning_curve.jsonl")},
            ],
        },
        "training_module": training_module,
        "global_options": {"allow_tf32": False},
    }


def prepare(workdir: Path, train: Sequence[Atoms], val: Sequence[Atoms], test: Sequence[Atoms], config: dict) -> Path:
    """Writes the three data files and `nequip.yaml` into `workdir`; returns the config path."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("test_pred_dataset0.xyz", "learning_curve.jsonl"):
        (workdir / stale).unlink(missing_ok=True)
    for name, frames in (("train", train), ("val", val), ("test", test)):
        write_extxyz(frames, workdir / f"{name}.xyz")
    path = workdir / "nequip.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(config_path: Path, log_path: Path) -> subprocess.Popen:
    """Starts `nequip-train` on the config with one thread; stdout+stderr go to `log_path`."""
    nequip_train = NEQUIP_PYTHON.parent / "nequip-train"
    if not nequip_train.exists():
        raise FileNotFoundError(f"{nequip_train} not found; create nequip's venv as in bench/README_nequip.md")
    env = single_thread_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    workdir = config_path.parent
    command = [str(nequip_train), "-cp", str(workdir), "-cn", config_path.stem,
               f"hydra.run.dir={workdir / 'hydra'}"]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def read_learning_curve(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(workdir: Path) -> dict:
    """Test errors of the best checkpoint (from nequip's test predictions) and the learning curve."""
    import ase.io

    prediction_file = workdir / "test_pred_dataset0.xyz"
    if not prediction_file.exists():
        raise FileNotFoundError(f"nequip wrote no test predictions ({prediction_file}); see {workdir / 'nequip.log'}")
    frames = ase.io.read(prediction_file, index=":", format="extxyz")
    pred_energy = np.array([atoms.get_potential_energy() for atoms in frames])
    pred_forces = np.concatenate([atoms.get_forces() for atoms in frames])
    ref_energy = np.array([float(np.squeeze(atoms.info["original_dataset_energy"])) for atoms in frames])
    ref_forces = np.concatenate([atoms.arrays["original_dataset_forces"] for atoms in frames])
    curve = read_learning_curve(workdir / "learning_curve.jsonl")
    return {
        "test": error_metrics(pred_energy, pred_forces, ref_energy, ref_forces, [len(atoms) for atoms in frames]),
        "learning_curve": curve,
        "epochs": curve[-1]["epoch"] if curve else 0,
        "best_val_force_mae_meV_per_A": 1e3 * min((row["val_force_mae"] for row in curve
                                                   if row["val_force_mae"] is not None), default=float("nan")),
    }


def run(workdir: Path, train, val, test, config: dict, timeout_s: float) -> dict:
    """prepare + launch + wait + collect, for callers that run nequip alone."""
    config_path = prepare(workdir, train, val, test, config)
    start = time.perf_counter()
    process = launch(config_path, workdir / "nequip.log")
    process.wait(timeout=timeout_s)
    result = {"returncode": process.returncode, "process_wall_s": time.perf_counter() - start}
    if process.returncode != 0:
        tail = (workdir / "nequip.log").read_text()[-3000:]
        raise RuntimeError(f"nequip-train failed (exit {process.returncode}); log tail:\n{tail}")
    return {**result, **collect(workdir)}

"""The pure parts of the accuracy and trade-off benchmarks (bench/accuracy, bench/tradeoff): no training here.

The benchmarks themselves train for minutes; these checks keep their bookkeeping honest: the split given to
nequip is the one allegro-fast draws, errors are computed as documented, the nequip config has the sizes and
budget asked for, and the Pareto front is right.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import allegro_fast as af
from allegro_fast.data import split_frames

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_module(path: Path, name: str):
    """Import a bench script under a unique name (bench/accuracy/plot.py and bench/tradeoff/plot.py share one)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


common = load_module(BENCH / "accuracy" / "common.py", "bench_accuracy_common")
nequip_side = load_module(BENCH / "accuracy" / "nequip_side.py", "bench_accuracy_nequip_side")
tradeoff_plot = load_module(BENCH / "tradeoff" / "plot.py", "bench_tradeoff_plot")


@pytest.mark.parametrize("seed", [0, 7])
def test_split_matches_allegro_fast(seed):
    train, val = common.split_indices(1000, [950, 50], seed)
    split = split_frames(list(range(1000)), 950, 50, 0, seed=seed)
    assert list(train) == sorted(split.train) and list(val) == sorted(split.validation)
    assert not set(train) & set(val)


def test_error_metrics_units():
    atoms_per_frame = np.array([2, 3])
    ref_energy, ref_forces = np.array([-1.0, -2.0]), np.zeros((5, 3))
    pred_energy = ref_energy + np.array([0.003, -0.006])  # eV
    pred_forces = ref_forces + 0.01  # eV/Å on every component
    metrics = common.error_metrics(pred_energy, pred_forces, ref_energy, ref_forces, atoms_per_frame)
    assert metrics["energy_mae_meV"] == pytest.approx(4.5)
    assert metrics["energy_per_atom_mae_meV"] == pytest.approx((1.5 + 2.0) / 2)
    assert metrics["force_mae_meV_per_A"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="does not match"):
        common.error_metrics(pred_energy, pred_forces[:4], ref_energy, ref_forces, atoms_per_frame)


def test_nequip_config_matches_sizes_and_budget(tmp_path):
    import yaml

    config = af.AllegroConfig(type_names=("H", "C", "O"), num_layers=3, l_max=1, num_tensor_features=8,
                              num_scalar_features=32, two_body_mlp_hidden=(32, 16), latent_mlp_hidden=(32,),
                              readout_mlp_hidden=(16,), r_max=4.5)
    notes = []
    model = nequip_side.nequip_model_kwargs(config, seed=3, notes=notes)
    assert (model["num_layers"], model["l_max"], model["num_tensor_features"], model["num_scalar_features"],
            model["r_max"]) == (3, 1, 8, 32, 4.5)
    assert (model["scalar_embed_mlp_hidden_layers_depth"], model["scalar_embed_mlp_hidden_layers_width"]) == (2, 32)
    assert any("two_body_mlp_hidden" in note for note in notes)  # nequip has one width per MLP
    full = nequip_side.nequip_config(model, tmp_path, budget_s=905, batch_size=5, learning_rate=2e-3,
                                     energy_weight=1.0, force_weight=1.0, ema_decay=0.99,
                                     lr_plateau={"factor": 0.5, "patience": 25}, seed=0)
    assert full["trainer"]["max_time"] == "00:00:15:05"
    assert full["training_module"]["_target_"] == "nequip.train.EMALightningModule"
    assert yaml.safe_load(yaml.safe_dump(full)) == full


def test_pareto_front():
    points = [(1.0, 50.0, "a"), (2.0, 60.0, "b"), (3.0, 20.0, "c"), (0.5, 80.0, "d"), (4.0, 20.0, "e")]
    assert [name for _, _, name in tradeoff_plot.pareto_front(points)] == ["d", "a", "c"]


def test_learning_curve_from_metrics_records():
    record = {"epoch": 3, "wall_seconds": 12.5, "learning_rate": 0.002, "train_loss": 0.4,
              "validation_forces_mae_meV_per_A": 80.0, "validation_energy_mae_meV": 30.0}
    assert common.normalise_our_curve([record]) == [{
        "epoch": 3, "wall_s": 12.5, "val_force_mae_meV_per_A": 80.0, "val_energy_mae_meV": 30.0,
        "train_loss": 0.4, "lr": 0.002}]

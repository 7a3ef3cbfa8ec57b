"""A Lightning callback for nequip-train that writes a wall-clock learning curve (runs in nequip's own venv).

nequip's loggers record metrics per epoch and step but not the wall-clock time, which a fixed-budget
comparison needs. This callback appends one JSON line per training epoch to `path`:
{"epoch", "wall_s" (seconds since the start of training), "cpu_s" (CPU seconds of the process since then), "train_loss", "val_force_mae", "val_energy_mae",
"lr"}; errors in eV and eV/Å as nequip logs them (the validation metrics are of the EMA weights when the
training module keeps an EMA). The benchmark puts bench/accuracy on PYTHONPATH so Hydra can import it as
`nequip_callbacks.WallClockLog`.
"""

from __future__ import annotations

import json
import time

import lightning


def _metric(metrics: dict, name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)


class WallClockLog(lightning.Callback):
    def __init__(self, path: str):
        self.path = path
        self.start = None
        self.pending = None  # this epoch's row, waiting for its training loss

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        open(self.path, "w").close()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Callbacks run before the module's own hook, which is where nequip logs the epoch's training loss:
        # the row is completed at the next epoch start (or at the end of training).
        metrics = trainer.callback_metrics
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.pending = {
            "epoch": int(trainer.current_epoch) + 1,
            "wall_s": time.perf_counter() - self.start,
            "cpu_s": time.process_time() - self.cpu_start,
            "train_loss": None,
            "val_force_mae": _metric(metrics, "val0_epoch/forces_mae"),
            "val_energy_mae": _metric(metrics, "val0_epoch/total_energy_mae"),
            "val_weighted_sum": _metric(metrics, "val0_epoch/weighted_sum"),
            "lr": float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
        }

    def _flush(self, trainer) -> None:
        if self.pending is None:
            return
        self.pending["train_loss"] = _metric(trainer.callback_metrics, "train_loss_epoch/weighted_sum")
        with open(self.path, "a") as handle:
            handle.write(json.dumps(self.pending) + "\n")
        self.pending = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

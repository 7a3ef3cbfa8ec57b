"""Train allegro-fast on a run configuration and test the saved model: one subprocess of a benchmark.

    python bench/accuracy/ours_worker.py --config RUN.yaml --workdir DIR --output RESULT.json \
        [--test-file PATH --test-energy-unit kcal/mol [--n-test N]] [--extra-test NAME=PATH ...]

Runs `allegro_fast.training.train` (one torch thread unless the config says otherwise), then
`allegro_fast.evaluation.predict` of the saved (best-validation) model on each test file, and writes one
JSON: the TrainResult fields, the per-epoch learning curve with wall-clock seconds, and the test errors
computed with bench/accuracy/common.error_metrics (the same function that scores nequip's predictions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import error_metrics, write_json


def test_errors(model_path: Path, test_file: Path, energy_unit: str, n_test: int | None, batch_size: int) -> dict:
    from allegro_fast.data import read_frames
    from allegro_fast.evaluation import predict

    frames = read_frames(test_file, energy_unit=energy_unit)
    if n_test is not None:
        frames = frames[:n_test]
    start = time.perf_counter()
    predictions = predict(str(model_path), frames, batch_size=batch_size, device="cpu", source=str(test_file))
    metrics = error_metrics(predictions.energy_pred, predictions.forces_pred, predictions.energy_ref,
                            predictions.forces_ref, predictions.num_atoms)
    metrics["evaluation_s"] = time.perf_counter() - start
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--test", action="append", default=[], metavar="NAME=PATH[:UNIT]",
                        help="a test set to score the trained model on (repeatable); UNIT defaults to eV")
    parser.add_argument("--n-test", type=int, default=None, help="only the first N frames of each test set")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from allegro_fast.training import read_metrics, train

    start = time.perf_counter()
    cpu_start = time.process_time()
    trained = train(str(args.config), str(args.workdir), resume=False, progress=False)
    train_wall = time.perf_counter() - start
    train_cpu = time.process_time() - cpu_start
    result = {
        "model_path": str(trained.model_path),
        "metrics_path": str(trained.metrics_path),
        "epochs": int(trained.epochs),
        "best_validation_loss": float(trained.best_validation_loss),
        "train_wall_seconds_reported": float(trained.wall_seconds),
        "train_call_wall_s": train_wall,
        "train_call_cpu_s": train_cpu,  # CPU seconds of the whole train() call (data setup and final test included)
        "learning_curve": read_metrics(trained.metrics_path),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "test": {},
    }
    for spec in args.test:
        name, _, rest = spec.partition("=")
        path, _, unit = rest.rpartition(":") if ":" in rest else (rest, "", "eV")
        result["test"][name] = test_errors(trained.model_path, Path(path), unit, args.n_test, batch_size=50)
    result["process_wall_s"] = time.perf_counter() - start
    write_json(result, args.output)
    print(json.dumps({key: result[key] for key in ("epochs", "train_call_wall_s", "test")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

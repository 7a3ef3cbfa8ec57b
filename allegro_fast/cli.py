"""The `allegro-fast` command line.

    allegro-fast train CONFIG [--workdir DIR] [--restart]      train from a YAML run configuration
    allegro-fast evaluate MODEL DATA [--energy-unit kcal/mol]   MAE / RMSE of E, F, stress, per species
    allegro-fast md MODEL STRUCTURE [--ensemble nve --steps N]  molecular dynamics with ASE's integrators
        [--device cuda --backend triton --cuda-graphs]         ... on a GPU, on the Triton kernels, as CUDA graphs
    allegro-fast demo [--minutes 2]                             generate data, train, evaluate, run MD
    allegro-fast lammps MODEL OUT [--dtype float64]             the model file for LAMMPS (pair_style mliap unified)
        [--compile]                                             ... run through torch.compile in every rank
    allegro-fast bench [--quick] [--device cuda] ...            end-to-end benchmarks (see bench/README.md)

Errors in the input (a misspelt config key, a malformed data file, a species the model does not know)
are printed as one line naming the file, frame and field, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]

# --backend: the model's (torch and triton: the same function and weights) or the e3nn reference
BACKENDS = ("torch", "triton", "reference")


def _train(args) -> int:
    from .run_config import load_run_config
    from .training import train

    config = load_run_config(args.config)
    workdir = Path(args.workdir) if args.workdir else Path("runs") / Path(args.config).stem
    result = train(config, workdir, resume=not args.restart, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, one summary is enough
    print(f"model: {result.model_path}  (epoch {result.best_epoch} of {result.epochs}, stopped by {result.stop_reason}, "
          f"{result.wall_seconds:.0f} s of training)")
    print(f"metrics per epoch: {result.metrics_path}; plots: {', '.join(str(p) for p in result.plot_paths) or 'none'}")
    return 0


def _load_for(args):
    """The model of `args.model` with `args.backend` (None: the saved one), checked against `args.device` (None:
    the CPU) before anything runs: a CUDA device must exist, and the triton backend needs one (or, on the CPU,
    Triton's interpreter)."""
    import torch

    from .serialization import load

    device = torch.device(args.device) if args.device else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda or 'none'})")
    model = load(args.model, backend=args.backend)
    if getattr(model, "backend", None) == "triton" and device.type == "cpu":
        from .kernels._common import interpreter_enabled

        if not interpreter_enabled():
            raise ValueError("the triton backend runs on CUDA devices (add --device cuda), or on the CPU only under "
                             "Triton's interpreter (TRITON_INTERPRET=1, ~100x slower, for tests): on the CPU use "
                             "--backend torch, the same function with the same weights")
    return model


def _evaluate(args) -> int:
    from .data import read_frames
    from .evaluation import evaluate, format_metrics

    model = _load_for(args)
    frames = read_frames(args.data, format=args.format, energy_unit=args.energy_unit, length_unit=args.length_unit,
                         energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key,
                         index=args.index)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    metrics = evaluate(model, frames, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                       source=str(args.data))
    print(format_metrics(metrics, f"{args.model} on {len(frames)} frames of {args.data}:"))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    return 0


def _md(args) -> int:
    import ase.io

    from .md import run_md

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model = _load_for(args)
    if Path(args.structure).suffix == ".npz":  # a frame of an rMD17-style dataset (positions in Å)
        from .data import read_frames

        atoms = read_frames(args.structure, index=args.index)
    else:
        try:
            atoms = ase.io.read(args.structure, index=args.index)
        except Exception as error:  # noqa: BLE001  (ASE raises many kinds for a malformed file)
            raise ValueError(f"{args.structure}: cannot read a structure ({type(error).__name__}: {error})") from None
    if isinstance(atoms, list):
        if len(atoms) != 1:
            raise ValueError(f"{args.structure}: --index {args.index} selects {len(atoms)} frames; MD starts from one")
        atoms = atoms[0]
    atoms.calc = None
    result = run_md(model, atoms, ensemble=args.ensemble, temperature_K=args.temperature, timestep_fs=args.timestep,
                    steps=args.steps, friction_per_fs=args.friction, thermostat_time_fs=args.thermostat_time,
                    trajectory=args.trajectory, log_interval=args.log_interval, seed=args.seed,
                    progress=not args.quiet, compile=args.compile, device=args.device, cuda_graphs=args.cuda_graphs)
    print(result.summary())
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(workdir=args.workdir, minutes=args.minutes, threads=args.threads, num_frames=args.frames,
             md_steps=args.md_steps, seed=args.seed, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import ENERGY_UNIT_IN_EV, LENGTH_UNIT_IN_ANGSTROM

    parser = argparse.ArgumentParser(prog="allegro-fast", description="Train, evaluate and run Allegro potentials.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train from a YAML run configuration (resumes when interrupted)")
    train.add_argument("config", help="the run configuration (YAML): data, model and training sections")
    train.add_argument("--workdir", help="folder for checkpoints, model, metrics and plots (default runs/CONFIG_NAME)")
    train.add_argument("--restart", action="store_true", help="start over instead of resuming from the checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="errors of a model on labelled data (MAE, RMSE, per species)")
    evaluate.add_argument("model", help="a model file written by train (model.pt)")
    evaluate.add_argument("data", help="labelled frames: an ASE-readable file (extxyz, ...) or an rMD17-style .npz")
    evaluate.add_argument("--format", help="ASE format name or 'npz' (default: from the suffix)")
    evaluate.add_argument("--energy-unit", default="eV", choices=list(ENERGY_UNIT_IN_EV))
    evaluate.add_argument("--length-unit", default="Å", choices=list(LENGTH_UNIT_IN_ANGSTROM))
    evaluate.add_argument("--energy-key", default="energy")
    evaluate.add_argument("--forces-key", default="forces")
    evaluate.add_argument("--stress-key", default="stress")
    evaluate.add_argument("--index", default=":", help="frames to use, an ASE index such as ':100' (default all)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    evaluate.add_argument("--backend", choices=BACKENDS, help="run the model on this backend (default: the saved one)")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(run=_evaluate)

    md = commands.add_parser("md", help="molecular dynamics of a structure with a model (ASE integrators)")
    md.add_argument("model", help="a model file written by train (model.pt)")
    md.add_argument("structure", help="the starting structure: any ASE-readable file, or an rMD17-style .npz")
    md.add_argument("--index", default="-1", help="which frame of STRUCTURE (ASE index, default the last)")
    md.add_argument("--ensemble", default="nve", choices=["nve", "langevin", "nose-hoover"])
    md.add_argument("--temperature", type=float, default=300.0, help="K: initial velocities and thermostat target")
    md.add_argument("--timestep", type=float, default=1.0, help="fs")
    md.add_argument("--steps", type=int, default=1000)
    md.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    md.add_argument("--thermostat-time", type=float, default=100.0, help="Nosé–Hoover relaxation time, fs")
    md.add_argument("--trajectory", help="write frames here (.traj or .xyz/.extxyz)")
    md.add_argument("--log-interval", type=int, default=10, help="steps between recorded frames")
    md.add_argument("--seed", type=int, default=0, help="seed of the initial velocities (and Langevin noise)")
    md.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    md.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    md.add_argument("--backend", choices=BACKENDS, help="run the model on this backend (default: the saved one)")
    md.add_argument("--compile", action="store_true",
                    help="run the model with torch.compile (about a minute to compile, then faster steps)")
    md.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA only: compile for static shapes and replay one CUDA graph per step (the fastest on a "
                         "GPU; the first step compiles)")
    md.add_argument("--quiet", action="store_true")
    md.set_defaults(run=_md)

    demo = commands.add_parser("demo", help="no data needed: EMT-labelled Ag with a vacancy, train, evaluate, MD")
    demo.add_argument("--minutes", type=float, default=2.0, help="training time budget (default 2)")
    demo.add_argument("--workdir", default="allegro-fast-demo", help="output folder (default ./allegro-fast-demo)")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default 2, or 1 when the load average shows the cores are busy)")
    demo.add_argument("--frames", type=int, default=300, help="EMT frames to generate (default 300)")
    demo.add_argument("--md-steps", type=int, default=500, help="NVE MD steps with the trained model (default 500)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)

    from .lammps import build_parser as build_lammps_parser
    from .lammps import run as run_lammps

    lammps = commands.add_parser("lammps", help="write the file LAMMPS's `pair_style mliap unified FILE 0` loads")
    build_lammps_parser(lammps)
    lammps.set_defaults(run=run_lammps)
    # `bench` hands its arguments to allegro_fast.bench_cli (see main); listed here for --help.
    commands.add_parser("bench", help="end-to-end benchmarks: allegro-fast bench --help", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .allocator import retain_freed_memory
    from .data import DataError
    from .run_config import ConfigError
    from .training import TrainingDiverged

    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["bench"]:
        from .bench_cli import main as bench_main

        return bench_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    retain_freed_memory()  # large CPU tensors reuse pages instead of faulting them in at every call
    try:
        return args.run(args)
    except (ConfigError, DataError, FileNotFoundError, TrainingDiverged, ValueError) as error:
        print(f"allegro-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print("\ninterrupted; run the same command again to resume from the last finished epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

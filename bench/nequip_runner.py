"""Baseline runner for the authors' package nequip-allegro (allegro 0.8.x on nequip 0.19.x).

Run it with the interpreter of its OWN virtual environment, never import it into our process:
nequip sets the process-wide default dtype to float64 (and other global torch state) when it is
initialised, so it must live in a separate subprocess.

    /work/venv-nequip/bin/python bench/nequip_runner.py --case ag256 --task inference --dtype float32

Prints exactly ONE JSON object on stdout; all logging goes to stderr.

    /work/venv-nequip/bin/python bench/nequip_runner.py --jobs spec.json

runs the jobs of allegro_fast's bench runner (`allegro-fast bench`, allegro_fast/bench_cli.py) in one
process: the spec names the provider (nequip, nequip-triton = its Triton tensor-product kernel via the
enable_TritonContracter modifier, nequip-cueq = enable_CuEquivarianceContracter), the jobs (structures
as an extxyz file, model preset default / speed / rmd17, task, dtype) and the settings (device, warm-up,
repeats, threads, seed); it prints each job's row as one JSON line {"job_row": row} when the job finishes, with
the same timing and memory conventions as bench_cli (CUDA events on CUDA).

Model: the authors' default sizes, matching allegro_fast's "default" preset: r_max 5.0, l_max 2,
parity on, 2 layers, 64 scalar / 16 tensor features, 8 Bessels (not trainable), polynomial p = 6,
SiLU MLPs: two-body (scalar embed) MLP [64], allegro latent MLPs [64], readout [32];
avg_num_neighbors = the actual mean neighbour count of the input (edges / atoms).

Cases (identical to bench/neighborlist.py and DESIGN section 6):
  ag256 / ag2048  bulk('Ag', 'fcc', a=4.09, cubic=True) * (4,4,4) / (8,8,8), rattle(0.05, seed=0), periodic
  aspirin         rMD17 aspirin frames [0, batch_size) of ../shared/data/rmd17/rmd17_aspirin_train_01.npz
                  (kcal/mol -> eV with 0.0433641), pbc off (ASE's zero cell is carried, as nequip's
                  from_ase does), frames batched with AtomicDataDict.batched_from_list
Only the model call is timed; the neighbour list (matscipy, nequip's default) is built once (data_prep_ms).

Tasks:
  inference  energy + forces (nequip always also computes the virial; stress where a cell exists),
             model.eval(); `--warmup` (default 3) calls then `--repeats` (default 10) timed calls.
  train      one step = forward with forces (create_graph, model.train()), loss = per-atom energy MSE
             + force MSE, backward (double backward through the forces), Adam step;
             `--warmup` (default 2) steps then `--repeats` timed steps.
             Ag cases have no labels: targets are zeros (timing only).

Memory (MiB, from /proc/self/status; VmHWM is reset with /proc/self/clear_refs): rss_after_setup
(data + model ready, before the first call), peak_rss_before_timed (first calls incl. any
torch.compile + warm-up), rss_before_timed / peak_rss_timed_phase / rss_increase_timed_phase (the
transient working set of the timed calls), peak_increase_over_setup, ru_maxrss (whole process).

Compiled paths (`--compile`, optional):
  aotinductor    (inference) nequip's deployment path, the same as `nequip-compile --mode aotinductor
                 --target ase` (single frame) or `--target batch` (several frames): torch.export +
                 AOTInductor, run through nequip's own loader (which runs the model in inference_mode).
  torch_compile  (train, or inference on batches) nequip's train-time `compile_mode: compile`
                 (CompileGraphModel: make_fx + torch.compile(dynamic=True)); nequip itself falls back
                 to eager for single-frame inputs, so for ag256/ag2048 this is eager (reported in notes).
  `--compile` without a value picks aotinductor for inference and torch_compile for train.
The Triton tensor-product path (`Contracter.enable_TritonContracter` modifier, used with
`nequip-compile --mode aotinductor --modifiers enable_TritonContracter`) needs CUDA: out of scope on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RMD17 = REPO_ROOT.parent / "shared" / "data" / "rmd17" / "rmd17_aspirin_train_01.npz"
KCAL_MOL_TO_EV = 0.0433641
R_MAX = 5.0

CASE_TYPE_NAMES = {
    "ag256": ["Ag"],
    "ag2048": ["Ag"],
    "aspirin": ["H", "C", "O"],  # atomic-number order, as allegro_fast orders species
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# memory helpers (Linux /proc; all values in MiB)
# --------------------------------------------------------------------------------------
def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) of this process to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mark_setup_memory() -> dict:
    """RSS once data and model are ready (AOTInductor: after export + load), before the first model call."""
    rss = _proc_status_mib("VmRSS")
    _reset_peak_rss()
    return {"rss_after_setup_mib": rss}


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def ru_maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------
# structures
# --------------------------------------------------------------------------------------
def fcc_ag(repeat: int):
    import ase.build

    atoms = ase.build.bulk("Ag", "fcc", a=4.09, cubic=True) * (repeat, repeat, repeat)
    atoms.rattle(0.05, seed=0)
    return atoms


def aspirin_frames(path: Path, batch_size: int, start: int = 0):
    """rMD17 aspirin frames as ase.Atoms plus (energies eV, forces eV/Å) labels."""
    import ase

    d = np.load(path)
    z = d["nuclear_charges"].astype(int)
    frames, energies, forces = [], [], []
    for i in range(start, start + batch_size):
        frames.append(ase.Atoms(numbers=z, positions=d["coords"][i], pbc=False))
        energies.append(float(d["energies"][i]) * KCAL_MOL_TO_EV)
        forces.append(d["forces"][i] * KCAL_MOL_TO_EV)
    return frames, np.asarray(energies), np.concatenate(forces, axis=0)


def build_case(case: str, batch_size: int, rmd17_path: Path):
    if case == "ag256":
        return [fcc_ag(4)], None, None
    if case == "ag2048":
        return [fcc_ag(8)], None, None
    if case == "aspirin":
        return aspirin_frames(rmd17_path, batch_size)
    raise ValueError(f"unknown case {case}")


def atoms_to_nequip_data(frames, type_names, r_max):
    """The path nequip's own ASE calculator and datasets take: from_ase -> type mapper -> neighbour list.

    Positions/cell stay float64 (nequip's global dtype); the model casts to model_dtype internally.
    Several frames are batched with AtomicDataDict.batched_from_list (as nequip's data loader does).
    """
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=list(type_names))
    datas = []
    for atoms in frames:
        d = from_ase(atoms)
        d = mapper(d)
        d = compute_neighborlist_(d, r_max)  # default backend: matscipy
        datas.append(d)
    if len(datas) == 1:
        return datas[0]
    return AtomicDataDict.batched_from_list(datas)


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
# The presets of allegro_fast.AllegroConfig in nequip-allegro's vocabulary. nequip's MLPs have one hidden
# width, so the rMD17 model's two-body MLP [128, 256, 512] becomes 2 x 512 after a 128-wide embedding.
MODEL_PRESETS = {
    "default": {},
    "speed": dict(r_max=4.0, l_max=1, num_layers=1, num_scalar_features=32, num_tensor_features=32,
                  radial_chemical_embed_dim=32, scalar_embed_mlp_hidden_layers_width=32,
                  allegro_mlp_hidden_layers_width=32, readout_mlp_hidden_layers_width=32),
    "rmd17": dict(r_max=5.0, l_max=3, num_layers=3, num_scalar_features=1024, num_tensor_features=128,
                  radial_chemical_embed_dim=128, scalar_embed_mlp_hidden_layers_depth=2,
                  scalar_embed_mlp_hidden_layers_width=512, allegro_mlp_hidden_layers_depth=2,
                  allegro_mlp_hidden_layers_width=1024, readout_mlp_hidden_layers_width=128),
}

# Providers of allegro_fast's bench runner -> nequip model modifiers (nequip-compile's --modifiers).
PROVIDER_MODIFIERS = {
    "nequip": [],
    "nequip-triton": ["enable_TritonContracter"],  # inference on CUDA only
    "nequip-cueq": ["enable_CuEquivarianceContracter"],  # needs cuequivariance_torch
    "nequip-compiled": [],  # training with nequip's compile_mode="compile" (make_fx + torch.compile)
    "nequip-aoti": [],  # inference through AOTInductor (nequip-compile --mode aotinductor)
    "nequip-triton-aoti": ["enable_TritonContracter"],  # its fastest inference path on CUDA: both
}
AOTI_PROVIDERS = ("nequip-aoti", "nequip-triton-aoti")


def model_kwargs(type_names, dtype, avg_num_neighbors, seed, shift=None, scale=None, preset="default"):
    kwargs = dict(
        seed=seed,
        model_dtype=dtype,
        type_names=list(type_names),
        r_max=R_MAX,
        l_max=2,
        parity=True,
        radial_chemical_embed=dict(
            _target_="allegro.nn.TwoBodyBesselScalarEmbed",
            num_bessels=8,
            bessel_trainable=False,
            polynomial_cutoff_p=6,
        ),
        radial_chemical_embed_dim=64,
        scalar_embed_mlp_hidden_layers_depth=1,
        scalar_embed_mlp_hidden_layers_width=64,
        scalar_embed_mlp_nonlinearity="silu",
        num_layers=2,
        num_scalar_features=64,
        num_tensor_features=16,
        allegro_mlp_hidden_layers_depth=1,
        allegro_mlp_hidden_layers_width=64,
        allegro_mlp_nonlinearity="silu",
        tp_path_channel_coupling=True,
        readout_mlp_hidden_layers_depth=1,
        readout_mlp_hidden_layers_width=32,
        readout_mlp_nonlinearity="silu",
        avg_num_neighbors=float(avg_num_neighbors),
        per_type_energy_scales=scale,
        per_type_energy_shifts=shift,
        per_type_energy_scales_trainable=False,
        per_type_energy_shifts_trainable=False,
    )
    kwargs.update(MODEL_PRESETS[preset])
    return kwargs


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def summarize(times_s):
    ms = [t * 1e3 for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "all_ms": ms,
    }


def timed_loop(fn, warmup, repeats, mem):
    """Warm-up then timed calls. `mem` already holds rss_after_setup_mib (VmHWM was reset there)."""
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        log(f"  warm-up {i}: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    mem["peak_rss_before_timed_mib"] = _proc_status_mib("VmHWM")  # since setup: first calls (+ compile) + warm-up
    rss_before = _proc_status_mib("VmRSS")
    hwm_reset = _reset_peak_rss()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        log(f"  call {i}: {times[-1] * 1e3:.1f} ms")
    hwm_after = _proc_status_mib("VmHWM")
    ok = hwm_reset and hwm_after is not None and rss_before is not None
    mem.update({
        "rss_before_timed_mib": rss_before,
        "peak_rss_timed_phase_mib": hwm_after if hwm_reset else None,
        "rss_increase_timed_phase_mib": (hwm_after - rss_before) if ok else None,
        "peak_rss_method": "VmRSS/VmHWM from /proc/self/status, VmHWM reset via /proc/self/clear_refs=5"
        if hwm_reset else "unavailable",
    })
    if ok and mem.get("rss_after_setup_mib") is not None and mem.get("peak_rss_before_timed_mib") is not None:
        mem["peak_increase_over_setup_mib"] = max(mem["peak_rss_before_timed_mib"], hwm_after) - mem["rss_after_setup_mib"]
    return times, mem


# --------------------------------------------------------------------------------------
# AOTInductor: nequip's deployment path, in process
# --------------------------------------------------------------------------------------
def aotinductor_model(model, data, device):
    """What `nequip-compile --mode aotinductor --target ase` (one frame; `batch` for several) builds from an
    eval-mode model (modifiers already applied), exported for `device` and loaded back through nequip's own
    loader: (callable on a data dict, its input dict, {"compile_s", "target", "note"})."""
    import torch
    from nequip.data import AtomicDataDict
    from nequip.model.inference_models.aotinductor import load_aotinductor_model
    from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
    from nequip.utils.aot import aot_export_model
    from nequip.utils.aoti_metadata import NEQUIP_AOTI_INPUTS_KEY, NEQUIP_AOTI_OUTPUTS_KEY, serialize_aoti_keys

    target = "ase" if AtomicDataDict.num_frames(data) == 1 else "batch"
    settings = COMPILE_TARGET_DICT[target]
    batch_map = settings["batch_map_settings"]({
        "graph": torch.export.Dim("num_frames", min=2),
        "node": torch.export.Dim("num_nodes", min=2),
        "edge": torch.export.Dim("num_edges", min=2),
    })
    export_data = settings["data_settings"]({k: v.clone() for k, v in data.items()})
    metadata = {k: str(v) for k, v in model.metadata.items()}
    metadata[NEQUIP_AOTI_INPUTS_KEY] = serialize_aoti_keys(settings["input"])
    metadata[NEQUIP_AOTI_OUTPUTS_KEY] = serialize_aoti_keys(settings["output"])
    folder = tempfile.mkdtemp(prefix="nequip_aoti_")
    path = os.path.join(folder, "model.nequip.pt2")
    begin = time.perf_counter()
    aot_export_model(model=model, device=device, input_fields=settings["input"], output_fields=settings["output"],
                     data=export_data, batch_map=batch_map, output_path=path,
                     inductor_configs={"aot_inductor.metadata": metadata}, seed=1)
    compile_s = time.perf_counter() - begin
    run_model, _ = load_aotinductor_model(path, str(device))
    shutil.rmtree(folder, ignore_errors=True)  # loaded: the package file is no longer read
    note = (f"AOTInductor export of the freshly built model, nequip-compile target '{target}' (inputs "
            f"{settings['input']}, outputs {settings['output']}), called through nequip's loader (inference_mode)")
    return run_model, {k: data[k] for k in settings["input"]}, {"compile_s": compile_s, "target": target, "note": note}


# --------------------------------------------------------------------------------------
# --jobs: several jobs of allegro_fast's bench runner (allegro_fast/bench_cli.py) in one process
# --------------------------------------------------------------------------------------
def _labels(frames, seed):
    """Energies (B,) and forces (N, 3): the frames' labels, else fixed random numbers (as bench_cli does)."""
    rng = np.random.default_rng(seed)
    energies, forces = [], []
    for atoms in frames:
        calc = atoms.calc
        labelled = calc is not None and "energy" in calc.results and "forces" in calc.results
        energies.append(float(calc.results["energy"]) if labelled else float(rng.normal()) * len(atoms))
        forces.append(np.asarray(calc.results["forces"]) if labelled else rng.normal(size=(len(atoms), 3)))
    return np.asarray(energies), np.concatenate(forces)


def _timed(step, warmup, repeats, device):
    """Warm-up, then timed calls: CUDA events on CUDA, perf_counter on the CPU; memory of the timed phase."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    memory = {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        memory["rss_before_timed_mib"] = _proc_status_mib("VmRSS")
        hwm_reset = _reset_peak_rss()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        memory["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        memory["peak_memory_method"] = "torch.cuda.max_memory_allocated during the timed calls"
    else:
        memory["peak_memory_mib"] = _proc_status_mib("VmHWM") if hwm_reset else None
        memory["peak_memory_method"] = "peak resident set (VmHWM) during the timed calls, whole process"
    return times, memory


def run_one_job(provider, job, settings):
    import allegro.model
    import ase.io
    import torch
    from nequip.data import AtomicDataDict
    from nequip.model.modify_utils import modify

    device = torch.device(settings["device"])
    if provider == "nequip-cueq":
        import cuequivariance_torch  # noqa: F401  (ImportError -> the row says why)
    frames = ase.io.read(job["frames_path"], index=":", format="extxyz")
    preset = job.get("model", "default")
    r_max = MODEL_PRESETS[preset].get("r_max", R_MAX)
    data = atoms_to_nequip_data(frames, job["type_names"], r_max)
    data = AtomicDataDict.to_(data, device)
    num_atoms, num_edges = AtomicDataDict.num_nodes(data), AtomicDataDict.num_edges(data)
    kwargs = model_kwargs(job["type_names"], job["dtype"], num_edges / num_atoms, settings["seed"], preset=preset)
    if provider == "nequip-compiled":
        kwargs["compile_mode"] = "compile"  # nequip's train-time CompileGraphModel
    model = allegro.model.AllegroModel(**kwargs)
    modifiers = PROVIDER_MODIFIERS[provider]
    if modifiers:
        model = modify(model, [{"modifier": name} for name in modifiers])
    model = model.to(device)
    row = {"num_atoms": num_atoms, "num_edges": num_edges, "num_structures": len(frames), "r_max": r_max,
           "num_parameters": sum(p.numel() for p in model.parameters()), "modifiers": modifiers,
           "notes": ["nequip always computes the virial as well"]}
    if provider == "nequip-compiled" and len(frames) < 2:
        row["notes"].append("compile_mode=compile: nequip's CompileGraphModel runs the eager model for single-frame "
                            "inputs (0/1 specialisation guard in CompileGraphModel.forward), so this timing is eager")
    if preset != "default":
        row["notes"].append("nequip has one hidden width per MLP: sizes approximate allegro_fast's preset "
                            f"'{preset}' (see MODEL_PRESETS in bench/nequip_runner.py)")
    if job["task"] == "inference" and provider in AOTI_PROVIDERS:
        model.eval()
        run_model, run_data, compiled = aotinductor_model(model, data, device)
        row["compile_s"] = compiled["compile_s"]
        row["notes"].append(compiled["note"])

        def step():
            return run_model(dict(run_data))[AtomicDataDict.FORCE_KEY]
    elif job["task"] == "inference":
        model.eval()

        def step():
            return model(dict(data))[AtomicDataDict.FORCE_KEY]
    else:
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        energies, forces = _labels(frames, settings["seed"])
        e_ref = torch.as_tensor(energies, dtype=torch.float64, device=device)
        f_ref = torch.as_tensor(forces, dtype=torch.float64, device=device)
        natoms = torch.as_tensor([len(a) for a in frames], dtype=torch.float64, device=device)

        def training_loss():
            out = model(dict(data))
            energy = out[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1)
            return torch.mean(((energy - e_ref) / natoms) ** 2) + torch.mean((out[AtomicDataDict.FORCE_KEY] - f_ref) ** 2)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = training_loss()
            loss.backward()
            optimizer.step()
            return loss

    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    times, memory = _timed(step, settings["warmup"], settings["repeats"], device)
    row.update(memory)
    row["times_ms"] = times
    if job["task"] == "inference":  # as allegro_fast.bench_cli.repeat_force_difference: 0.0 = bitwise repeatable
        first = step().detach().clone()
        row["repeat_force_difference"] = (step().detach() - first).abs().max().item()
    else:  # as allegro_fast.bench_cli.repeat_gradient_difference
        parameters = [p for p in model.parameters() if p.requires_grad]
        gradients = []
        for _ in range(2):
            grads = torch.autograd.grad(training_loss(), parameters, allow_unused=True)
            gradients.append(torch.cat([g.detach().flatten() for g in grads if g is not None]))
        row["repeat_gradient_difference"] = (gradients[0] - gradients[1]).abs().max().item()
    return row


def run_jobs(spec_path) -> int:
    """Run the jobs of one spec file ({"provider", "jobs": [...], "settings": {...}}); print each job's row as it
    finishes, one JSON line {"job_row": row}."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    settings = spec["settings"]
    torch.set_num_threads(settings["threads"])
    import allegro
    import nequip
    from nequip.utils.global_state import set_global_state

    set_global_state()  # float64 default dtype etc. (process-wide: why this runs in its own process)
    torch.set_num_threads(settings["threads"])
    for job in spec["jobs"]:
        row = {"provider": spec["provider"], **{k: job[k] for k in ("case", "model", "task", "dtype")}}
        load_start = os.getloadavg()[0]
        try:
            row.update(run_one_job(spec["provider"], job, settings))
        except ModuleNotFoundError as exc:
            if spec["provider"] == "nequip":
                row["error"] = f"ModuleNotFoundError: {exc}"
            else:  # an optional accelerator (triton, cuequivariance) that this machine lacks
                row["skipped"] = f"{spec['provider']} needs the module '{exc.name}', which is not installed"
        except Exception as exc:  # one failing job must not hide the others
            traceback.print_exc(file=sys.stderr)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row["error"] = f"{type(exc).__name__}: {message}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["loadavg_1min"] = [load_start, os.getloadavg()[0]]
        row["ru_maxrss_mib"] = ru_maxrss_mib()
        row["versions"] = {"nequip": nequip.__version__, "allegro": allegro.__version__, "torch": torch.__version__}
        print(json.dumps({"job_row": row}), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--jobs"] and len(argv) == 2:
        return run_jobs(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=sorted(CASE_TYPE_NAMES))
    p.add_argument("--task", required=True, choices=["inference", "train"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=None, help="default 3 (inference) / 2 (train)")
    p.add_argument("--batch-size", type=int, default=5, help="aspirin frames per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rmd17", type=Path, default=DEFAULT_RMD17)
    p.add_argument("--compile", nargs="?", const="auto", default="none",
                   choices=["none", "auto", "aotinductor", "torch_compile"],
                   help="compiled path (see module docstring); bare --compile = auto")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (3 if args.task == "inference" else 2)
    compile_path = args.compile
    if compile_path == "auto":
        compile_path = "aotinductor" if args.task == "inference" else "torch_compile"
    if compile_path == "aotinductor" and args.task == "train":
        p.error("--compile aotinductor is an inference-only path (nequip exports the model in eval mode)")

    t_start = time.perf_counter()
    load_at_start = list(os.getloadavg())
    import torch

    torch.set_num_threads(args.threads)
    import allegro
    import e3nn
    import nequip
    from nequip.data import AtomicDataDict
    from nequip.utils.global_state import set_global_state

    set_global_state()  # float64 default dtype, e3nn optimisation flags, seeds (process-wide!)
    torch.set_num_threads(args.threads)
    import allegro.model

    notes = []
    result = {
        "runner": "bench/nequip_runner.py",
        "case": args.case,
        "task": args.task,
        "dtype": args.dtype,
        "threads": args.threads,
        "compile": compile_path,
        "repeats": args.repeats,
        "warmup": warmup,
    }

    # ---- data ----
    type_names = CASE_TYPE_NAMES[args.case]
    frames, e_ref, f_ref = build_case(args.case, args.batch_size, args.rmd17)
    t0 = time.perf_counter()
    data = atoms_to_nequip_data(frames, type_names, R_MAX)
    data_prep_ms = (time.perf_counter() - t0) * 1e3
    num_atoms = AtomicDataDict.num_nodes(data)
    num_edges = AtomicDataDict.num_edges(data)
    num_frames = len(frames)
    avg_nn = num_edges / num_atoms
    result.update(num_frames=num_frames, num_atoms=num_atoms, num_edges=num_edges,
                  avg_num_neighbors=avg_nn, data_prep_ms=data_prep_ms,
                  neighborlist_backend="matscipy (nequip default)")

    # ---- labels / per-type scale & shift ----
    shift = scale = None
    if e_ref is not None:
        atoms_per_frame = np.array([len(a) for a in frames], dtype=float)
        shift = float(np.mean(e_ref / atoms_per_frame))  # mean per-atom energy (eV), one scalar
        scale = float(np.sqrt(np.mean(f_ref ** 2)))  # force RMS (eV/Å), one scalar
        notes.append("per_type_energy_shifts = mean per-atom energy of the batch, per_type_energy_scales = "
                     "force RMS of the batch (single scalars -> nequip's shortcut path, not trainable)")
        e_ref_t = torch.as_tensor(e_ref, dtype=torch.float64)
        f_ref_t = torch.as_tensor(f_ref, dtype=torch.float64)
        natoms_t = torch.as_tensor(atoms_per_frame, dtype=torch.float64)
    else:
        e_ref_t = torch.zeros(num_frames, dtype=torch.float64)
        f_ref_t = torch.zeros(num_atoms, 3, dtype=torch.float64)
        natoms_t = torch.full((num_frames,), float(num_atoms), dtype=torch.float64)
        if args.task == "train":
            notes.append("no labels for this case: energy and force targets are zeros (timing only)")
    result["per_type_energy_shift"] = shift
    result["per_type_energy_scale"] = scale

    # ---- model ----
    kwargs = model_kwargs(type_names, args.dtype, avg_nn, args.seed, shift=shift, scale=scale)
    if compile_path == "torch_compile":
        kwargs["compile_mode"] = "compile"
    t0 = time.perf_counter()
    model = allegro.model.AllegroModel(**kwargs)
    result["model_build_ms"] = (time.perf_counter() - t0) * 1e3
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["num_parameters"] = n_params
    result["num_trainable_parameters"] = n_trainable
    result["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    result["model_builder"] = "allegro.model.AllegroModel"
    result["model_config"] = {k: v for k, v in kwargs.items() if k not in ("seed",)}
    result["model_config"]["seed"] = args.seed
    log(f"[nequip_runner] case={args.case} task={args.task} dtype={args.dtype} atoms={num_atoms} "
        f"edges={num_edges} avg_nn={avg_nn:.3f} params={n_params} compile={compile_path}")

    if compile_path == "torch_compile" and (num_frames < 2):
        notes.append("compile_mode=compile: nequip's CompileGraphModel runs the eager model for single-frame "
                     "inputs (0/1 specialisation guard in CompileGraphModel.forward), so this timing is eager")

    # ---- task ----
    sanity = {}
    if args.task == "inference":
        model.eval()
        if compile_path == "aotinductor":
            eager_forces = model(dict(data))[AtomicDataDict.FORCE_KEY].detach()  # parity check, before memory marks
            run_model, run_data, compiled = aotinductor_model(model, data, torch.device("cpu"))
            result["compile_s"] = compiled["compile_s"]
            notes.append(compiled["note"])
        else:
            run_model = model
            run_data = data

        def step():
            out = run_model(dict(run_data))
            return out[AtomicDataDict.TOTAL_ENERGY_KEY], out[AtomicDataDict.FORCE_KEY]

        mem = mark_setup_memory()
        t0 = time.perf_counter()
        e, f = step()  # torch_compile on batches: traces + compiles here
        result["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        sanity = {"energy_eV": e.detach().double().view(-1).tolist()[:8],
                  "forces_abs_max": float(f.detach().abs().max()),
                  "forces_dtype": str(f.dtype), "energy_dtype": str(e.dtype)}
        if compile_path == "aotinductor":
            sanity["aoti_vs_eager_max_abs_force_diff"] = float((f.detach() - eager_forces).abs().max())
        times, mem = timed_loop(step, warmup, args.repeats, mem)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=args.lr)

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(dict(data))
            e = out[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1)
            f = out[AtomicDataDict.FORCE_KEY]
            loss_e = torch.mean(((e - e_ref_t) / natoms_t) ** 2)
            loss_f = torch.mean((f - f_ref_t) ** 2)
            loss = loss_e + loss_f
            loss.backward()
            opt.step()
            return loss.detach()

        mem = mark_setup_memory()
        t0 = time.perf_counter()
        first_loss = float(step())  # torch_compile on batches: traces + compiles here (not a warm-up step)
        result["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        sanity = {"first_loss": first_loss}
        times, mem = timed_loop(step, warmup, args.repeats, mem)
        sanity["last_loss"] = float(step())

    result["timings"] = summarize(times)
    result["timings"]["us_per_atom"] = result["timings"]["median_ms"] * 1e3 / num_atoms
    mem["ru_maxrss_mib"] = ru_maxrss_mib()
    result["memory"] = mem
    result["sanity"] = sanity
    result["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nequip": nequip.__version__,
        "allegro": allegro.__version__,
        "e3nn": e3nn.__version__,
        "numpy": np.__version__,
        "ase": __import__("ase").__version__,
        "matscipy": __import__("matscipy").__version__,
    }
    result["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": list(os.getloadavg()),
        "torch_num_threads": torch.get_num_threads(),
        "torch_default_dtype_after_nequip_init": str(torch.get_default_dtype()),
    }
    result["commit"] = git_commit()
    result["notes"] = notes
    result["wall_total_s"] = time.perf_counter() - t_start
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # still emit one JSON object so callers can parse the failure
        traceback.print_exc(file=sys.stderr)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)

"""The whole GPU suite in one invocation: CUDA tests, kernel profiles, end to end, roofline, plots.

Run it through bench/gpu/run_suite.sh on a bare GPU machine (that script installs the carried wheels and the
package first); directly:

    python bench/gpu/suite.py --out results/                 # CUDA
    python bench/gpu/suite.py --device cpu --quick --out /tmp/suite   # dry run of the same stages here
    bash bench/gpu/run_suite.sh --only cuda_tests roofline    # a second call: the stages the first had no time for
    bash bench/gpu/run_suite.sh --only heavy_cuda_tests       # the CUDA tests whose kernels take minutes to compile

Every stage runs in its own subprocess (and process group, killed whole on timeout) with a timeout taken from
the remaining budget (--budget seconds, default 560, counted from run_suite.sh's start so that one device call
of 10 minutes holds the install, the suite and the archive); a stage that fails or runs out of time is recorded
with its error and the next one runs. The summary, the merged results and the archive of every log are written into
the out folder after every stage, so a run killed from outside still brings back what finished. Stages, in order
of priority (on an H200, 2026-12-04: cuda_tests 121 s, e2e_headline 114 s with triton, triton-graphs and
nequip-triton, e2e_training 189 s with triton, triton-graphs, triton-compiled and nequip, roofline 28 s; `--only`
picks the stages of a call that cannot hold them all, `--skip-providers` leaves rows already measured out):

    environment        nvidia-smi, CPU/GPU model, versions of torch / triton / e3nn / allegro_fast, commit
    cuda_tests         python -m pytest -m "cuda and not compile_heavy" tests, in parallel processes (CPU dry
                       run: -m cuda, all skipped); meanwhile, in the background, precompile_default: the default
                       model's kernels for the timed stages (CUDA)
    e2e_headline       the issue's first target: Ag 32000 atoms, energy + forces, triton eager and triton-graphs
                       (CUDA graphs, padded edges) against nequip-triton (eager with nequip-allegro's Triton kernel)
                       and nequip-triton-aoti (AOTInductor + that kernel, its fastest inference path; minutes of
                       compiling; --skip-providers leaves providers out)
    e2e_training       the issue's second and third: a training step on Ag 2048 atoms, and on a batch of two such
                       frames (time, peak memory), triton eager, triton-graphs and triton-compiled against nequip
                       eager and nequip-compiled (which compiles only for batches of >= 2 frames)
    e2e_training_budget the compiled steps (triton-graphs, triton-compiled) on the batch of two again with
                       --activation-memory-budget 0.5 (training.activation_memory_budget): the recomputation's time
                       and the memory it saves (--only e2e_training selects it too)
    overhead           Ag 256 energy + forces and an aspirin training step under torch.profiler (bench_cli
                       --profile-calls): launches, host and GPU time per call, triton / triton-graphs (CUDA
                       graphs) / torch / triton-compiled (overhead.json, in suite.tar.gz); from here on
                       precompile_rmd17 (CUDA) compiles the rMD17 model's kernels in the background
    roofline           bench/roofline.py, float32: the fused layer's FLOPs, bytes and fraction of the roofline;
                       the fused kernel also at 262,144 and 1,048,576 edges, and each row's time on the device
                       alone as well (calls replayed from a CUDA graph: no host time)
    tune_layer         bench/gpu/tune_layer.py: the fused kernels' forward and backward under other launch
                       parameters (BLOCK_E x warps, Triton's num_stages, ptxas's register cap, tf32x3 mixing), checked
                       against the default launch, with the forward's fraction of its roofline; then each layer's
                       double backward (time, peak memory), the first layer's both ways: its own kernels, its twin
                       (tune-layer.json; each variant's line in tune_layer.log as it finishes)
    e2e_default        end to end, default model, every case (allegro_fast.bench_cli)
    kernels_<op>       pytest-benchmark profiles of each op, float32 then float64 (bench/kernels)
    kernels_layer_tiled_float32  the n = 32 middle layer again with the channel-tiled kernels (the threshold's data)
    e2e_models         end to end, the speed and rMD17 models (after waiting for precompile_rmd17)
    plots              bench/plot.py
    heavy_cuda_tests   the CUDA tests marked compile_heavy (minutes of ptxas; CUDA only)

Out folder (at most 8 files, as the device tool brings back): summary.txt (the final table and every
stage's last lines), summary.json (stages, timings, errors), e2e.json (all end-to-end rows merged),
kernels.json (all kernel-profile rows, compact), roofline.json, latency.png, speedup.png, and suite.tar.gz
with every log, raw JSON and figure so far. --keep-work also leaves the working folder in <out>/work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# The files of the out folder (at most 8 come back from the device tool): name in the work folder -> name there
PUBLISHED = (("summary.txt", "summary.txt"), ("summary.json", "summary.json"), ("e2e.json", "e2e.json"),
             ("kernels.json", "kernels.json"), ("roofline.json", "roofline.json"),
             ("e2e-latency.png", "latency.png"), ("e2e-speedup.png", "speedup.png"))


def _stop(process: subprocess.Popen) -> None:
    """Kill a stage and everything it started (its own process group: pytest-xdist workers, bench_cli's isolated
    providers), so that nothing of a timed-out stage runs on beside the next one."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()


class Suite:
    def __init__(self, work: Path, out: Path, budget: float, only: list[str] | None = None,
                 started: float | None = None, header: dict | None = None) -> None:
        """`budget` seconds from `started` (a time.time(); run_suite.sh passes its own start, so that the install
        counts too) or from now."""
        self.work = work
        self.out = out
        self.only = only
        spent = max(0.0, time.time() - started) if started else 0.0
        self.deadline = time.monotonic() + budget - spent
        self.header = header or {}
        self.stages: list[dict] = []

    def add(self, stage: dict) -> None:
        """Record a stage and publish what is known so far (a failure to publish is printed, never fatal)."""
        self.stages.append(stage)
        try:
            self.publish()
        except Exception as error:
            print(f"   could not publish the results so far: {type(error).__name__}: {error}", flush=True)

    def publish(self) -> None:
        """Write the summary and the merged results so far into the out folder after every stage: a run killed
        from outside (the device tool's limit) still brings back everything that finished."""
        merged = merge_e2e(self.work)
        if merged:
            (self.work / "e2e.json").write_text(json.dumps(merged, indent=1))
        kernels = merge_kernel_profiles(self.work)
        if kernels:
            (self.work / "kernels.json").write_text(json.dumps(kernels, indent=0))
        summary = {**self.header, "stages": self.stages}
        (self.work / "summary.json").write_text(json.dumps(summary, indent=1))
        details = "\n\n".join(f"--- {s['stage']} ({s['status']})\n" + "\n".join(s.get("log_tail", []))
                               for s in self.stages if s.get("log_tail"))
        (self.work / "summary.txt").write_text(table(self.stages) + "\n\n" + details + "\n")
        for name, target in PUBLISHED:
            if (self.work / name).exists():
                shutil.copyfile(self.work / name, self.out / target)
        archive_path = self.work.with_name(self.work.name + ".tar.gz")  # every log and raw JSON so far
        with tarfile.open(archive_path, "w:gz") as archive:
            archive.add(self.work, arcname="suite")
        shutil.copyfile(archive_path, self.out / "suite.tar.gz")  # built outside: the out folder holds 8 files

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], max_seconds: float, env: dict | None = None,
            outputs: tuple[str, ...] = ()) -> dict:
        """Run one stage with timeout min(max_seconds, remaining budget); log to work/<name>.log."""
        timeout = min(max_seconds, self.remaining() - 5)
        stage = {"stage": name, "command": " ".join(command), "timeout_s": round(max(timeout, 0), 1)}
        if self.only and not any(name.startswith(prefix) for prefix in self.only):
            stage.update(status="skipped", error="not selected (--only)")
            self.stages.append(stage)  # not published: nothing changed
            return stage
        if timeout < 10:
            stage.update(status="skipped", error="no time left in the budget")
            self.add(stage)
            print(f"== {name}: skipped (no time left)", flush=True)
            return stage
        log_path = self.work / f"{name}.log"
        print(f"== {name} (timeout {timeout:.0f} s): {stage['command']}", flush=True)
        begin = time.monotonic()
        try:
            with open(log_path, "w") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                           env={**os.environ, **(env or {})}, process_group=0)
                try:
                    returncode = process.wait(timeout=timeout)
                except BaseException:
                    _stop(process)
                    raise
            stage["returncode"] = returncode
            no_tests = returncode == 5 and "pytest" in command  # pytest: nothing collected or selected
            stage["status"] = "ok" if returncode == 0 or no_tests else "failed"
        except subprocess.TimeoutExpired:
            stage.update(status="timeout", error=f"killed after {timeout:.0f} s")
        except OSError as error:
            stage.update(status="failed", error=f"{type(error).__name__}: {error}")
        stage["seconds"] = round(time.monotonic() - begin, 1)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.exists() else []
        stage["log_tail"] = tail
        if stage["status"] == "failed" and "error" not in stage:
            stage["error"] = next((line for line in reversed(tail) if line.strip()), f"exit {stage.get('returncode')}")[:300]
        stage["outputs"] = [o for o in outputs if (self.work / o).exists()]
        self.add(stage)
        print(f"   {stage['status']} in {stage['seconds']} s" + (f": {stage.get('error', '')}" if stage["status"] != "ok" else ""),
              flush=True)
        return stage

    def start(self, name: str, command: list[str], needed_by: str) -> subprocess.Popen | None:
        """Start a stage in the background (logged to work/<name>.log) when the stage `needed_by` is selected;
        `finish` waits for it and records it."""
        if self.only and not any(name.startswith(prefix) or needed_by.startswith(prefix) for prefix in self.only):
            return None
        print(f"== {name} (in the background): {' '.join(command)}", flush=True)
        log = open(self.work / f"{name}.log", "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, process_group=0)
        process.began, process.log, process.command = time.monotonic(), log, command
        return process

    def finish(self, name: str, process: subprocess.Popen | None, outputs: tuple[str, ...] = ()) -> None:
        """Wait for a background stage (at most the remaining budget less 5 s; then it is killed) and record it."""
        if process is None:
            return
        stage = {"stage": name, "command": " ".join(process.command)}
        try:
            process.wait(timeout=max(1.0, self.remaining() - 5))
            stage["returncode"] = process.returncode
            stage["status"] = "ok" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(process)
            stage.update(status="timeout", error="killed: no time left in the budget")
        process.log.close()
        stage["seconds"] = round(time.monotonic() - process.began, 1)
        stage["log_tail"] = (self.work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-15:]
        if stage["status"] == "failed":
            stage["error"] = next((line for line in reversed(stage["log_tail"]) if line.strip()), "failed")[:300]
        stage["outputs"] = [o for o in outputs if (self.work / o).exists()]
        self.add(stage)
        print(f"   {name}: {stage['status']} in {stage['seconds']} s", flush=True)

    def record(self, name: str, function) -> None:
        """An in-process stage (cheap bookkeeping), with its error recorded."""
        begin = time.monotonic()
        stage = {"stage": name}
        try:
            stage["result"] = function()
            stage["status"] = "ok"
        except Exception as error:  # recorded in the table, never fatal
            stage.update(status="failed", error=f"{type(error).__name__}: {error}")
        stage["seconds"] = round(time.monotonic() - begin, 1)
        self.add(stage)


def environment(device: str) -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    probe = ("import json, torch, e3nn\n"
             "out = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'e3nn': e3nn.__version__,\n"
             "       'cuda_available': torch.cuda.is_available()}\n"
             "if torch.cuda.is_available(): out['gpu'] = torch.cuda.get_device_name(0)\n"
             "try:\n import triton; out['triton'] = triton.__version__\nexcept ImportError: out['triton'] = None\n"
             "try:\n import allegro_fast, allegro_fast.kernels; out['allegro_fast'] = allegro_fast.__version__\n"
             "except Exception as e: out['allegro_fast'] = 'import failed: ' + repr(e)\n"
             "print(json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    info.update(json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else {"probe_error": result.stderr[-500:]})
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
        info["nvidia_smi"] = smi.stdout.strip()
    try:  # the device tool copies the working tree without .git: run_suite.sh's caller names the commit
        info["commit"] = os.environ.get("ALLEGRO_FAST_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip() or None
    except OSError:
        info["commit"] = None
    info["device"] = device
    info["data_dir"] = os.environ.get("ALLEGRO_FAST_DATA") or str(REPO.parent / "shared" / "data")
    info["data_found"] = Path(info["data_dir"]).is_dir()
    return info


def read_json(path: Path) -> dict:
    """A stage's JSON, or {} where the stage was killed while writing it (pytest-benchmark writes in place)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def merge_kernel_profiles(work: Path) -> list[dict]:
    rows = []
    for path in sorted(work.glob("kernels-*.json")):
        data = read_json(path)
        for bench in data.get("benchmarks", []):
            stats = bench["stats"]
            rows.append({"group": bench.get("group"), "name": bench["name"], **bench.get("extra_info", {}),
                         "median_s": stats["median"], "iqr_s": stats["iqr"], "min_s": stats["min"],
                         "max_s": stats["max"], "rounds": stats["rounds"]})
    return rows


def merge_e2e(work: Path) -> dict:
    merged = None
    for path in sorted(work.glob("e2e-*.json")):
        data = read_json(path)
        if not data:
            continue
        if merged is None:
            merged = data
        else:
            merged["rows"] += data["rows"]
            merged["speedups"].update(data.get("speedups", {}))
            merged.setdefault("parts", []).append(path.name)
    return merged or {}


def table(stages: list[dict]) -> str:
    lines = [f"{'stage':22s} {'status':8s} {'seconds':>8s}  note"]
    for stage in stages:
        note = stage.get("error") or ", ".join(stage.get("outputs", [])) or ""
        lines.append(f"{stage['stage']:22s} {stage['status']:8s} {stage.get('seconds', 0):8.1f}  {note[:120]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "suite-out")))
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (dry run)")
    parser.add_argument("--budget", type=float, default=560.0,
                        help="seconds for all stages together, counted from --started")
    parser.add_argument("--started", type=float, default=float(os.environ.get("ALLEGRO_SUITE_STARTED", 0)) or None,
                        help="when the run began (seconds since the epoch; run_suite.sh passes its own start, so its "
                             "install counts against the budget); default: now")
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                        help="run only the stages whose names start with these, e.g. --only kernels e2e_models")
    parser.add_argument("--install-log", type=Path, default=None, help="log of run_suite.sh's install step")
    parser.add_argument("--skip-providers", nargs="+", default=[], metavar="PROVIDER",
                        help="leave these bench_cli providers out of the end-to-end stages, e.g. nequip-triton-aoti "
                             "(minutes of compiling) where its row is already measured")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="allegro_suite_"))
    suite = Suite(work, args.out, args.budget, args.only, args.started,
                  header={"device": device, "quick": args.quick, "budget_s": args.budget})
    python = sys.executable
    quick = ["--quick"] if args.quick else []

    if args.install_log and args.install_log.exists():
        text = args.install_log.read_text(errors="replace")
        shutil.copyfile(args.install_log, work / "install.log")
        failed = [line for line in text.splitlines() if line.startswith("!")]
        suite.stages.append({"stage": "install", "status": "partial" if failed else "ok", "seconds": 0.0,
                             "error": "; ".join(failed)[:300] if failed else None,
                             "log_tail": text.strip().splitlines()[-15:]})
    suite.record("environment", lambda: environment(device))
    e2e = [python, "-m", "allegro_fast.bench_cli", "--device", device, "--no-roofline"]
    full = cuda and not args.quick
    # Compiling the generated kernels (one CPU core each, minutes in all) dominates the CUDA tests: with pytest-xdist
    # (carried by fetch_wheels.sh) they run in parallel processes sharing Triton's disk cache.
    parallel = ["-n", str(min(12, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []

    # 1. Correctness on this device first. Meanwhile the default model's kernels (energy + forces and a force-training
    # step, float32) compile into Triton's disk cache on the cores the tests leave, for the timed stages after them.
    precompiling = None
    if full:
        precompiling = suite.start("precompile_default", [
            python, "-m", "allegro_fast.kernels.precompile", "--preset", "default", "--type-names", "Ag", "--training",
            "--processes", "4", "--output", str(work / "precompile-default.json")], needed_by="e2e_headline")
    if cuda:  # the tests marked compile_heavy (minutes of ptxas each) run in the last stage, heavy_cuda_tests
        # -v: a line per test as it ends, so that a stage stopped by its timeout still says which passed (130 s of 150
        # in session 16, with fewer tests than now)
        suite.run("cuda_tests", [python, "-m", "pytest", "-v", "-m", "cuda and not compile_heavy", "tests", "-p",
                                 "no:cacheprovider", *parallel], 210)
    else:
        suite.run("cuda_tests", [python, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider",
                                 *parallel], 60, env={"OMP_NUM_THREADS": "1"})
    suite.finish("precompile_default", precompiling, outputs=("precompile-default.json",))

    # 2. The targets, with nothing else running: energy + forces of 32000 atoms of Ag against nequip-allegro's
    # Triton kernel, eager and in its fastest inference path (AOTInductor, minutes of compiling, hence last), and a
    # training step against its training path (eager). The triton rows of inference jobs carry
    # force_error_vs_torch, a check of the numbers timed should the CUDA tests not have passed.
    targets = ["--repeats", "10", "--warmup", "3"] if full else ["--quick", "--no-isolate", "--threads", "1"]
    targets += ["--profile-calls", "3"]  # our rows get host_profile: where the call's host and GPU time go

    def providers(*names: str) -> list[str]:
        return ["--providers", *[name for name in names if name not in args.skip_providers]]

    # triton-compiled: inductor around our ops (fuses the MLPs' elementwise work, ~5.6 of 24 GPU ms eager at 32k
    # atoms); triton-graphs: CUDA graphs of the compiled program (static shapes, padded edges); both compile in
    # their first call
    suite.run("e2e_headline", [*e2e, *targets, "--timeout", "200", "--jobs", "ag32k:default:inference" if full
                               else "ag32:default:inference",
                               *providers("triton", "triton-compiled", "triton-graphs", "nequip-triton",
                                          "nequip-triton-aoti"),
                               "--output", str(work / "e2e-headline.json")], 300, outputs=("e2e-headline.json",))
    # the training step eager, compiled (inductor around our ops) and as CUDA graphs, against nequip eager and
    # nequip compiled (its compile_mode="compile")
    # ag2048x2 (a batch of two frames), first: nequip's compile_mode: compile runs eagerly on single-frame batches, so
    # the targets (time and memory against its compiled training) are measured on this case
    suite.run("e2e_training", [*e2e, *targets, "--timeout", "240", "--jobs",
                               *(("ag2048x2:default:train", "ag2048:default:train") if full
                                 else ("ag32:default:train",)),
                               *providers("triton", "triton-graphs", "triton-compiled", "nequip", "nequip-compiled"),
                               "--output", str(work / "e2e-training.json")], 400, outputs=("e2e-training.json",))
    # the compiled steps again with half the activation memory (training.activation_memory_budget: 0.5; CPU: -14 % at
    # the peak): what the recomputation costs in time, and the memory on a GPU
    suite.run("e2e_training_budget", [*e2e, *targets, "--timeout", "240", "--jobs",
                                      "ag2048x2:default:train" if full else "ag32:default:train",
                                      *providers("triton-graphs", "triton-compiled"),
                                      "--activation-memory-budget", "0.5",
                                      "--output", str(work / "e2e-training-budget.json")], 240,
              outputs=("e2e-training-budget.json",))

    # Why small systems sit on a floor of ~6-9 ms per call (H200, 2026-12-04): the host's side of a call, profiled
    # (kernel launches, time in ops, GPU time), for the backends eager and under torch.compile; not merged into e2e.json
    suite.run("overhead", [*e2e, *targets, "--timeout", "90", "--jobs",
                           *(("ag256:default:inference", "aspirin:default:train") if full
                             else ("ag32:default:inference", "aspirin:default:train")),
                           "--providers", "triton", "triton-graphs", "torch", "triton-compiled",
                           "--output", str(work / "overhead.json")], 160, outputs=("overhead.json",))

    # The rMD17 model's kernels (l_max 3, 128 channels: minutes of ptxas each) compile in the background from here on,
    # in parallel processes, into Triton's disk cache, where e2e_models finds them.
    precompiling = None
    if full:
        precompiling = suite.start("precompile_rmd17", [
            python, "-m", "allegro_fast.kernels.precompile", "--preset", "rmd17", "--type-names", "C", "H", "O",
            "--training", "--processes", str(max(2, (os.cpu_count() or 2) - 4)),
            "--output", str(work / "precompile-rmd17.json")], needed_by="e2e_models")

    # 3. The fused layer's fraction of its roofline (float32 first; float64 in the kernel profiles)
    roofline = [python, "bench/roofline.py", "--device", device, "--output", str(work / "roofline.json"),
                "--dtypes", "float32", "--providers", "triton-kernel", "triton", "torch"]
    if args.quick or not cuda:
        roofline += ["--edges", "1024", "--kernel-edges", "--repeats", "3"]
    suite.run("roofline", roofline, 150, outputs=("roofline.json",))

    # The fused layer's launch parameters (edges per step, warps) around layer_launch's choice, outputs checked
    tune = [python, "bench/gpu/tune_layer.py", "--output", str(work / "tune-layer.json")]
    if not full:
        tune += ["--device", "cpu", "--edges", "96", "--variants", "16x4", "--repeats", "1"]
    suite.run("tune_layer", tune, 180, env=None if cuda else {"TRITON_INTERPRET": "1"}, outputs=("tune-layer.json",))

    # 4. Everything else, as far as the budget goes (a second call: --only with the stages named)

    # The default model on every case, against nequip's eager, Triton and cuEquivariance paths and the reference
    if args.quick:
        suite.run("e2e_default", [*e2e, "--timeout", "150", *quick, "--no-isolate", "--threads", "1",
                                  "--output", str(work / "e2e-default.json")], 240, outputs=("e2e-default.json",))
    else:
        repeats = ["--repeats", "10", "--warmup", "3"] if cuda else []
        suite.run("e2e_default", [*e2e, "--timeout", "150", *repeats, "--models", "default",
                                  "--output", str(work / "e2e-default.json")], 220, outputs=("e2e-default.json",))

    sizes = "quick" if args.quick else ("gpu" if cuda else "cpu")

    def kernel_profile(name: str, op: str, dtype: str, timeout: float, options: tuple[str, ...] = ()) -> None:
        """One pytest-benchmark run of bench/kernels, its JSON as work/<name>.json (stage name: dashes as _)."""
        suite.run(name.replace("-", "_"), [
            python, "-m", "pytest", "bench/kernels", "-q", "-p", "no:cacheprovider", "--bench-device", device,
            "--bench-sizes", sizes, "--bench-ops", op, "--bench-dtypes", dtype, *options,
            "--benchmark-max-time", "0.05", "--benchmark-min-rounds", "5", "--benchmark-columns", "median,iqr,rounds",
            "--benchmark-json", str(work / f"{name}.json")], timeout, env={"OMP_NUM_THREADS": "1"} if not cuda else None,
            outputs=(f"{name}.json",))

    for dtype in ("float32", "float64"):
        for op in ("layer", "edge_geometry", "readout"):
            kernel_profile(f"kernels-{op}-{dtype}", op, dtype, 150 if op == "layer" else 90)

    # The threshold between the one-block and the channel-tiled layer kernels (TILE_CHANNELS_ABOVE = 32): at n = 32
    # ptxas spills 1-2 KB per thread in the one-block backward and at most 136 B in the tiled one (bench/README);
    # the same middle-layer point timed with the tiled kernels, beside the default's row in kernels.json ("tiled").
    point = "middle and n8" if args.quick else "middle and E65536 and n32 and l2"
    kernel_profile("kernels-layer-tiled-float32", "layer", "float32", 90,
                   ("--bench-providers", "triton", "--bench-tile-channels-above", "0", "-k", point))

    suite.finish("precompile_rmd17", precompiling, outputs=("precompile-rmd17.json",))
    if full:
        suite.run("e2e_models", [*e2e, "--timeout", "240", "--models", "speed", "rmd17", "--repeats", "10",
                                 "--warmup", "3", "--output", str(work / "e2e-models.json")], 300,
                  outputs=("e2e-models.json",))

    if (work / "e2e.json").exists():  # merged by every stage's publish
        suite.run("plots", [python, "bench/plot.py", str(work / "e2e.json"), str(work / "roofline.json")
                            if (work / "roofline.json").exists() else str(work / "e2e.json"), "--out", str(work)], 60)
    if cuda:  # last: minutes of compiling (the l_max 3 channel-tiled backward); alone: --only heavy_cuda_tests
        suite.run("heavy_cuda_tests", [python, "-m", "pytest", "-q", "-m", "cuda and compile_heavy", "tests", "-p",
                                       "no:cacheprovider", *parallel], 420)
    suite.record("kernel_rows", lambda: len(merge_kernel_profiles(work)))  # publishes the final summary
    text = table(suite.stages)
    if args.keep_work:
        shutil.copytree(work, args.out / "work", dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + text)
    print(f"\nwrote {args.out}/ (summary.txt, summary.json, e2e.json, kernels.json, roofline.json, figures, suite.tar.gz)")
    return 0 if all(s["status"] in ("ok", "skipped", "partial") for s in suite.stages) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time the fused layer kernels (forward and backward) under other launch parameters than `layer_launch` picks:
edges per step (BLOCK_E) and warps per program, on one GPU, for the default model's first (mixing) and last layers.

Why: on an H200 (2026-12-04, `results/gpu-h200-2026-12-04/`) the fused forward reached 7-9 % of its roofline, and
ptxas's register counts (`kernel_resources.py`) did not say which launch is fastest: the first sweep
(`results/gpu-h200-2026-12-04-graphs/`) found 16 x 4 1.3-1.9x faster than the 16 x 8 of then, although it spills,
and `layer_launch` used it since for the default model; a second sweep from there
(`results/gpu-h200-2026-12-04-warps/`) found 2 warps faster for the first layer's forward and the last layer's
backward, now the default for those. Only a GPU says; every variant's outputs are checked against the default
launch's.

    python bench/gpu/tune_layer.py                                  # default model, 262144 edges, float32
    python bench/gpu/tune_layer.py --edges 65536 --variants 16x4 16x8 32x8 --output tune.json

Variants are BLOCK_ExWARPS, then optionally sSTAGES, Triton's num_stages (software pipelining of the edge loops:
ptxas gives the first-layer forward at 8 warps 107 registers with 1 stage, 128 with Triton's default 3), and
rREGISTERS, ptxas's cap on registers per thread (Triton's maxnreg, `LayerLaunch.max_registers`), any of them with
"-tf32x3": the mixing's tl.dot as three TF32 tensor-core products instead of IEEE float32 on the FMA
units (`LayerLaunch.dot_precision`); the one-block kernels only (up to TILE_CHANNELS_ABOVE channels). BLOCK_E >= 16
(tl.dot's smallest side on a GPU). `--device cpu` (under TRITON_INTERPRET=1) checks the harness, not speed.
On CUDA each row has two times: `median_ms`, one call between CUDA events (the host's launch included where it is
the slower side), and `device_ms`, per call from CUDA-graph replays (`roofline.device_time_ms`): the kernel alone.

Then, at the default launches, each layer's double backward (`fused_layer_double_backward`'s body, force training's
loss backward through the layer, every input's cotangent wanted), pass "double_backward": in the first layer both
ways, "own kernels" (three directions on the first layer's kernels, one of them through its form of two feature
pairs: what the op runs since session 21) and "twin" (three on the plain twin, with V^0, dV and the V^0 cotangent in
memory: what it ran before, and what its derivative still differentiates), with `peak_mib`, the memory allocated
above the inputs at the peak of one call (CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from roofline import (copy_bandwidth, device_time_ms, fma_rate, fused_layer_inputs, layer_work,  # noqa: E402
                      roofline_bounds, time_ms)  # (bench/roofline.py)

# around the defaults since the H200 sweeps of 2026-12-04 (the default model: 16 x 2 or 16 x 4 per kernel,
# results/gpu-h200-2026-12-04-warps; 64 x 4 took 18x as long as the default in the first layer's backward, 8 warps
# 1.4-2x); "r128", "r168": ptxas's register cap (the first layer's kernels take 255 registers, so an SM holds 8 of
# their warps; 128 holds 16, 168 holds 12, at the cost of spills); "-tf32x3": the mixing on the tensor cores in three
# TF32 products (about float32's accuracy; the difference column says how close), untimed so far; ptxas (Triton 3.6,
# sm_90) spills the first layer's backward at 4 warps badly there
DEFAULT_VARIANTS = ("16x2", "16x4", "32x4", "16x2r128", "16x4r128", "16x4r168", "16x2-tf32x3", "16x4-tf32x3")


def parse_variant(variant: str, default_launch):
    """"16x8" (BLOCK_E x warps), "16x8s1" (and Triton's num_stages), "16x4r128" (and ptxas's register cap,
    `LayerLaunch.max_registers`), "16x8-tf32x3" (and the mixing's tl.dot precision, `LayerLaunch.dot_precision`)
    -> the default launch with those set."""
    launch, _, precision = variant.partition("-")
    match = re.fullmatch(r"(\d+)x(\d+)(?:s(\d+))?(?:r(\d+))?", launch)
    if match is None:
        raise ValueError(f"tune_layer: variant {variant!r} is not BLOCK_ExWARPS[sSTAGES][rREGISTERS][-PRECISION]")
    block_e, warps, stages, registers = (None if part is None else int(part) for part in match.groups())
    return dataclasses.replace(default_launch, block_e=block_e, num_warps=warps,
                               num_stages=stages if stages else default_launch.num_stages,
                               max_registers=registers if registers else default_launch.max_registers,
                               dot_precision=precision or default_launch.dot_precision)


def relative_difference(got: tuple, expected: tuple) -> float:
    worst = 0.0
    for g, e in zip(got, expected):
        if e.numel():
            worst = max(worst, float((g - e).abs().max() / e.abs().max().clamp_min(1e-30)))
    return worst


def double_backward_rows(model, args, dtype, device) -> list[dict]:
    """The double backward of the first and the last layer at the default launches (the module docstring)."""
    from allegro_fast.kernels import tensor_product as kernels

    rows = []
    for index, position in ((0, "first"), (args.layers - 1, "last")):
        key, inputs, (scalars, mixed), center_ptr = fused_layer_inputs(model, index, args.edges, dtype, device)
        tensors = (*inputs, scalars, mixed)
        generator = torch.Generator(device=device).manual_seed(1)
        cotangents = [torch.randn(x.shape, generator=generator, device=device, dtype=dtype) for x in inputs[:3]]
        ways = (("own kernels", False), ("twin", True)) if kernels._LAYERS[key].first_features else (("default", True),)
        expected = None
        for variant, differentiable in ways:
            def fn():
                with torch.no_grad():
                    return kernels.layer_backward_vjp(key, tensors, cotangents, [True] * 6, center_ptr,
                                                      differentiable=differentiable)

            row = {"position": position, "pass": "double_backward", "variant": variant}
            try:
                out = fn()
                expected = expected or [t.clone() for t in out]
                row["relative_difference"] = relative_difference(out, expected)
                del out
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    fn()
                    torch.cuda.synchronize(device)
                    row["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, 1)
                repeats = min(args.repeats, 5)  # calls of tens of milliseconds: the stage's budget
                times = time_ms(fn, device, warmup=1, repeats=repeats)
                row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times))
                if device.type == "cuda":
                    row["device_ms"] = statistics.median(device_time_ms(fn, device, repeats))
            except Exception as error:  # recorded, the other rows stand
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            rows.append(row)
            status = row.get("error") or (f"{row['median_ms']:8.3f} ms  diff {row['relative_difference']:.1e}"
                                          + "".join(f"  {label} {row[k]:.3f}" for k, label in (
                                              ("device_ms", "device ms"), ("peak_mib", "peak MiB")) if k in row))
            print(f"{position:6s} double_backward {variant:12s} {status}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, default=262144)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--l-max", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="layers of the model (first: mixing; last: scalars)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="BLOCK_ExWARPS")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune_layer: no CUDA device (--device cpu under TRITON_INTERPRET=1 checks the harness only)")
        return 2

    import allegro_fast as af
    from allegro_fast.kernels import tensor_product as kernels

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.channels > kernels.TILE_CHANNELS_ABOVE:
        raise SystemExit(f"--channels {args.channels}: the channel-tiled kernels (above "
                         f"{kernels.TILE_CHANNELS_ABOVE}) are not tuned here")
    config = af.AllegroConfig(type_names=("Ag",), l_max=args.l_max, num_tensor_features=args.channels,
                              num_layers=args.layers, avg_num_neighbors=28.0)
    model = af.Allegro(config, backend="triton").to(device=device, dtype=dtype)
    # the forward rows' fraction of the fused core's roofline (roofline.py's work model and peaks) for this model
    peaks = {"copy_bandwidth": copy_bandwidth(device), f"fma_{args.dtype}": fma_rate(device, dtype)}
    original = kernels.fused_layer_launch
    chosen = {}
    kernels.fused_layer_launch = lambda *arguments, **options: chosen["launch"]
    rows, default_launches, works = [], {}, {}
    try:
        for index, position in ((0, "first"), (args.layers - 1, "last")):
            key, inputs, (scalars, mixed), center_ptr = fused_layer_inputs(model, index, args.edges, dtype, device)
            layer = kernels._LAYERS[key]
            work = layer_work(model, index, args.edges, center_ptr.numel() - 1, dtype.itemsize)
            works[position] = work
            default_launch = {name: original(layer, args.channels, dtype, device.type, backward=name == "backward")
                              for name in ("forward", "backward")}
            default_launches[position] = {name: dataclasses.asdict(launch) for name, launch in default_launch.items()}

            def forward():
                return kernels._launch_layer(key, *inputs, center_ptr)

            def backward():
                return kernels._launch_layer_backward(key, *inputs, scalars, mixed, center_ptr)

            expected = {}
            for variant in ["default", *args.variants]:
                for name, fn in (("forward", forward), ("backward", backward)):
                    default = default_launch[name]
                    launch = default if variant == "default" else parse_variant(variant, default)
                    chosen["launch"] = launch
                    row = {"position": position, "pass": name, "variant": variant, "block_e": launch.block_e,
                           "num_warps": launch.num_warps, "num_stages": launch.num_stages,
                           "max_registers": launch.max_registers, "dot_precision": launch.dot_precision}
                    try:
                        begin = time.perf_counter()
                        out = fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        row["first_call_s"] = round(time.perf_counter() - begin, 2)  # compiling included
                        if variant == "default":
                            expected[name] = [t.clone() for t in out]
                        row["relative_difference"] = relative_difference(out, expected[name])
                        times = time_ms(fn, device, warmup=1, repeats=args.repeats)
                        row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times))
                    except Exception as error:  # a variant that does not compile or launch is a finding
                        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                    if device.type == "cuda" and "median_ms" in row:  # the kernel alone (CUDA-graph replays)
                        try:
                            row["device_ms"] = statistics.median(device_time_ms(fn, device, args.repeats))
                        except Exception as error:  # the single calls' time stands
                            row["device_error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
                    if name == "forward":  # t* / time: the forward's fraction of the fused core's roofline
                        for time_key, fraction_key in (("median_ms", "roofline_fraction"),
                                                       ("device_ms", "device_roofline_fraction")):
                            if time_key in row:
                                row[fraction_key] = roofline_bounds(
                                    work, peaks[f"fma_{args.dtype}"]["flops_per_s"],
                                    peaks["copy_bandwidth"]["bytes_per_s"], row[time_key] / 1000)["fused_core"][
                                    "achieved_fraction"]
                    rows.append(row)
                    base = next((r for r in rows if r["position"] == position and r["pass"] == name
                                 and r["variant"] == "default" and "median_ms" in r), None)
                    ratio = (f"{base['median_ms'] / row['median_ms']:.2f}x default" if base and "median_ms" in row
                             else "")
                    device_note = f"  device {row['device_ms']:8.3f} ms" if "device_ms" in row else ""
                    device_note += "".join(f"  {label} {row[key]:.1%}" for key, label in (
                        ("roofline_fraction", "roofline"), ("device_roofline_fraction", "device roofline"))
                        if key in row)
                    status = row.get("error") or (f"{row['median_ms']:8.3f} ms  {ratio:>13s}  "
                                                  f"diff {row['relative_difference']:.1e}{device_note}")
                    print(f"{position:6s} {name:8s} {variant:12s} (BLOCK_E {launch.block_e:3d}, "
                          f"{launch.num_warps:2d} warps)  {status}", flush=True)
    finally:
        kernels.fused_layer_launch = original
    rows += double_backward_rows(model, args, dtype, device)
    result = {"kind": "allegro-fast layer launch tuning", "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "device": device.type,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "commit": os.environ.get("ALLEGRO_FAST_COMMIT"),
              "settings": {k: v for k, v in vars(args).items() if k != "output"},
              "default_launch": default_launches, "peaks": peaks,
              "work": {position: {part: work[part] for part in ("flops", "fused_core", "needed_paths",
                                                                "clebsch_gordan_nonzeros", "output_columns")}
                       for position, work in works.items()}, "rows": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.output.with_name(args.output.name + ".tmp")
        temporary.write_text(json.dumps(result, indent=1))
        os.replace(temporary, args.output)
        print(f"wrote {args.output}")
    bad = [r for r in rows if r.get("relative_difference", 0.0) > (1e-5 if dtype == torch.float32 else 1e-12)]
    if bad:
        print(f"{len(bad)} variants disagree with the default launch beyond rounding: "
              + ", ".join(f"{r['position']} {r['pass']} {r['variant']}" for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Roofline of one Allegro layer: the FLOPs and bytes it must move, the device's measured peaks, and the
fraction of the roofline bound that each provider achieves.

    python bench/roofline.py                          # CUDA where available, else CPU
    python bench/roofline.py --device cpu --edges 4096 --output roofline.json

Work model, per layer L of a model (E edges, N atoms, n channels, F scalar features, D2 = (l_max+1)^2
spherical-harmonic columns; D_in / D_out: columns of the irreps of V^{L-1} this layer reads / of V^L the
next layer reads; "needed" paths: those that reach the energy, see tensor_product.LayerTensorProduct):

  FLOPs (a multiply-add counts 2):
    environment sum     2 E n D2                       w_{c,l(k)} Y_k, accumulated per center
    tensor product      2 E n nnz                      nnz = Clebsch-Gordan nonzeros of the needed paths
    channel mixing      2 E n n sum_out paths(l,p) (2l+1)  over the output irreps the next layer reads
    env linear          2 E F n (l_max+1)              x -> environment weights
    latent MLP          2 E sum_k w_k w_{k+1}          widths [F + S n, hidden..., F]
  Minimal bytes (each operand read or written once from/to memory; A and T stay on chip):
    fused core (environment sum + tensor product + mixing, the Triton kernel's job):
        read  V^{L-1} (E n D_in; in the first layer w^0, E n (l_max+1), from which the kernel forms V^0 =
              w^0 (x) Y on chip), environment weights (E n (l_max+1)), Y (E D2), CSR pointers (N+1, int64),
              mixing weights;
        write scalars (E S n) and V^L (E n D_out)
    whole layer (also env linear, latent MLP and the residual): read x (E F) instead of the environment
        weights, write x^L (E F) instead of the scalars, plus the MLP and env-linear weights.

Device peaks, measured here: copy bandwidth (bytes read + written per second by a large device-to-device
copy) and FMA rate (CUDA: a Triton kernel of independent fused multiply-adds in registers, float32 and
float64; also cuBLAS SGEMM without TF32 for comparison; CPU: a float32 / float64 matmul).
Roofline bound t* = max(FLOPs / FMA rate, bytes / bandwidth); achieved fraction = t* / measured median.
Measured: the forward of one layer (bench/ops.py, the whole layer: the torch backend, the reference,
and the Triton-backed layer where it exists), against the whole-layer counts; and, on CUDA, provider
`triton-kernel`: the fused kernel alone (`kernels.tensor_product.fused_layer`, environment sum + tensor
product + channel mixing) against the fused-core counts, the fraction the issue's target refers to, at
`--edges` and at each of `--kernel-edges` (default on CUDA: 262144 and 1048576; the headline's Ag 32,000 has
915,724).

Two times per row on CUDA. `median_ms`: one call between two CUDA events, what a caller waits for; where the
call's host side (custom-op dispatch, allocation, Triton's launcher: 0.1-0.3 ms) takes longer than the
kernel, the GPU idles between the events and this is host time. `device_ms`: the same call captured
`GRAPH_CALLS` times back to back in one CUDA graph, replayed, the time per call: the kernels' time on the
device without the host (`device_roofline`: the fractions t* / device_ms). The first H200 rows (65,536 edges) had only the
first: 0.420 ms for the first layer's fused kernel, where the same kernel took 0.617 ms at 4x the edges.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops  # bench/ops.py

from allegro_fast.tensor_product import irrep_offsets


def layer_work(model, index: int, num_edges: int, num_nodes: int, itemsize: int) -> dict:
    """FLOPs and minimal bytes of layer `index` of a torch-backend Allegro model; see the module docstring."""
    config = model.config
    layer = model.layers[index]
    description = layer.tensor_product.description
    n, F, E = config.num_tensor_features, config.num_scalar_features, num_edges
    d2 = (config.l_max + 1) ** 2
    needed = description.scalar_paths if description.is_last else description.needed_paths
    nnz = sum(len(description.nonzeros(i)[0]) for i in needed)
    input_irreps = description.irreps_in1 if index == 0 else model.input_irreps[index]
    d_in = irrep_offsets(tuple(input_irreps))[-1]
    features_read = config.l_max + 1 if index == 0 else d_in  # the first layer's kernels read w^0, not V^0
    next_irreps = model.input_irreps[index + 1] if index + 1 < len(model.layers) else ()
    d_out = irrep_offsets(tuple(next_irreps))[-1]
    mixing_terms = sum(len([p for p in needed if description.paths[p].irrep_out == irrep]) * (2 * irrep[0] + 1)
                       for irrep in next_irreps)
    num_scalar_paths = len(description.scalar_paths)
    mlp_widths = [F + num_scalar_paths * n, *config.latent_mlp_hidden, F]
    mlp_weights = sum(a * b for a, b in zip(mlp_widths, mlp_widths[1:]))

    flops = {
        "environment_sum": 2 * E * n * d2,
        "tensor_product": 2 * E * n * nnz,
        "channel_mixing": 2 * E * n * n * mixing_terms,
        "env_linear": 2 * E * F * n * (config.l_max + 1),
        "latent_mlp": 2 * E * mlp_weights,
    }
    core_flops = flops["environment_sum"] + flops["tensor_product"] + flops["channel_mixing"]
    mixing_weights = n * n * sum(len([p for p in needed if description.paths[p].irrep_out == irrep]) for irrep in next_irreps)
    core_bytes = itemsize * (E * n * features_read + E * n * (config.l_max + 1) + E * d2 + E * num_scalar_paths * n
                             + E * n * d_out + mixing_weights) + 8 * (num_nodes + 1)
    layer_bytes = itemsize * (E * n * features_read + E * F + E * d2 + E + E * F + E * n * d_out + mixing_weights
                              + F * n * (config.l_max + 1) + mlp_weights) + 8 * (num_nodes + 1)
    return {
        "layer": index, "position": "first" if index == 0 else "last" if description.is_last else "middle",
        "num_edges": E, "num_nodes": num_nodes, "channels": n, "scalar_features": F, "l_max": config.l_max,
        "input_columns": d_in, "output_columns": d_out, "needed_paths": len(needed),
        "clebsch_gordan_nonzeros": nnz, "scalar_paths": num_scalar_paths,
        "flops": flops, "all_paths_tensor_product_flops": description.flop(E),
        "fused_core": {"flops": core_flops, "bytes": core_bytes, "intensity": core_flops / core_bytes},
        "whole_layer": {"flops": sum(flops.values()), "bytes": layer_bytes,
                        "intensity": sum(flops.values()) / layer_bytes},
    }


def fused_layer_inputs(model, index: int, num_edges: int, dtype, device, seed: int = 0):
    """Random inputs of layer `index`'s fused kernel and cotangents of its outputs, edges sorted by center with
    ~NEIGHBOURS_PER_ATOM per center: (key, (w, Y, V, mixing weights), (scalars', mixed'), center_ptr)."""
    from allegro_fast.kernels.tensor_product import _LAYERS

    config = model.config
    key = model._triton_forms()[index]
    layer = _LAYERS[key]
    n, num_nodes = config.num_tensor_features, max(2, num_edges // ops.NEIGHBOURS_PER_ATOM)
    center = torch.arange(num_edges, device=device) * num_nodes // num_edges  # sorted, ~uniform counts
    center_ptr = torch.searchsorted(center, torch.arange(num_nodes + 1, device=device))
    generator = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    inputs = (rand(num_edges, config.l_max + 1, n), rand(num_edges, (config.l_max + 1) ** 2),
              rand(num_edges, layer.feature_columns, n), rand(layer.num_weights, n, n) / n ** 0.5)
    first, last = layer.scalar_columns
    cotangents = (rand(num_edges, last - first, n), rand(num_edges, layer.output_dim if layer.mixing else 0, n))
    return key, inputs, cotangents, center_ptr


def fused_kernel_case(model, index: int, num_edges: int, dtype, device):
    """The fused layer kernel of layer `index` alone, on random inputs of its shapes: (callable, num_nodes)."""
    from allegro_fast.kernels.tensor_product import fused_layer

    key, inputs, _, center_ptr = fused_layer_inputs(model, index, num_edges, dtype, device)
    return (lambda: fused_layer(key, *inputs, center_ptr)), center_ptr.numel() - 1


# ------------------------------------------------------------------------------------------------
# device peaks
# ------------------------------------------------------------------------------------------------
def time_ms(fn, device, warmup: int = 3, repeats: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return times


GRAPH_CALLS = 10  # calls per CUDA graph replay in `device_time_ms`


def device_time_ms(fn, device, repeats: int, calls: int = GRAPH_CALLS) -> list[float]:
    """Per-call times of `fn` on a CUDA device without its host side: `calls` calls captured back to back in
    one CUDA graph (after a warm-up on a side stream, so that nothing compiles or first allocates during the
    capture), each replay timed with CUDA events and divided by `calls`."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return [t / calls for t in time_ms(graph.replay, device, warmup=1, repeats=repeats)]


def copy_bandwidth(device) -> dict:
    numel = (1 << 28 if device.type == "cuda" else 1 << 25)  # 1 GiB / 128 MiB of float32
    source = torch.rand(numel, device=device)
    target = torch.empty_like(source)
    times = time_ms(lambda: target.copy_(source), device)
    moved = 2 * source.numel() * source.element_size()
    return {"bytes_per_s": moved / (statistics.median(times) / 1000), "bytes_moved": moved,
            "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _triton_fma_rate(device, dtype, numel: int | None = None, iterations: int = 1024) -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def fma_chain(x_ptr, out_ptr, ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offsets)
        b = a * 0.5 + 0.25
        c = a * 0.25 + 0.5
        d = a * 0.125 + 0.75
        for _ in range(ITERATIONS):  # four independent chains of dependent FMAs keep the pipes full
            a = a * 0.9999 + 0.0001
            b = b * 0.9999 + 0.0001
            c = c * 0.9999 + 0.0001
            d = d * 0.9999 + 0.0001
        tl.store(out_ptr + offsets, a + b + c + d)

    block = 256
    if numel is None:  # 64 blocks of 256 per multiprocessor: enough warps in flight to hide FMA latency
        numel = block * torch.cuda.get_device_properties(device).multi_processor_count * 64
    x = torch.rand(numel, device=device, dtype=dtype)
    out = torch.empty_like(x)
    grid = (numel // block,)
    times = time_ms(lambda: fma_chain[grid](x, out, ITERATIONS=iterations, BLOCK=block), device)
    flops = 2 * 4 * iterations * numel
    return {"flops_per_s": flops / (statistics.median(times) / 1000),
            "method": f"Triton kernel, 4 chains x {iterations} dependent FMAs per element, {numel} elements",
            "median_ms": statistics.median(times)}


def fma_rate(device, dtype) -> dict:
    if device.type == "cuda":
        result = {}
        try:
            result = _triton_fma_rate(device, dtype)
        except Exception as error:  # the matmul figure below still gives a peak
            result["triton_error"] = f"{type(error).__name__}: {error}"
        size = 8192 if dtype == torch.float32 else 4096
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        a, b = torch.rand(size, size, device=device, dtype=dtype), torch.rand(size, size, device=device, dtype=dtype)
        times = time_ms(lambda: a @ b, device)
        torch.backends.cuda.matmul.allow_tf32 = previous
        result["matmul_flops_per_s"] = 2 * size**3 / (statistics.median(times) / 1000)
        result.setdefault("flops_per_s", result["matmul_flops_per_s"])
        return result
    size = 1024
    a, b = torch.rand(size, size, dtype=dtype), torch.rand(size, size, dtype=dtype)
    times = time_ms(lambda: a @ b, device, warmup=2, repeats=7)
    return {"flops_per_s": 2 * size**3 / (statistics.median(times) / 1000), "method": f"{size}^3 matmul",
            "median_ms": statistics.median(times)}


# ------------------------------------------------------------------------------------------------
# measured layers
# ------------------------------------------------------------------------------------------------
def roofline_bounds(work: dict, flops_per_s: float, bytes_per_s: float, seconds: float) -> dict:
    """The bound t* of each part ("whole_layer", "fused_core") of a layer's `work` and what `seconds` achieves."""
    bounds = {}
    for part in ("whole_layer", "fused_core"):
        t_compute = work[part]["flops"] / flops_per_s
        t_memory = work[part]["bytes"] / bytes_per_s
        bounds[part] = {"bound_s": max(t_compute, t_memory),
                        "limited_by": "compute" if t_compute > t_memory else "memory",
                        "achieved_fraction": max(t_compute, t_memory) / seconds,
                        "achieved_flops_per_s": work[part]["flops"] / seconds,
                        "achieved_bytes_per_s": work[part]["bytes"] / seconds}
    return bounds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--edges", type=int, default=None, help="edges (default 65536 on CUDA, 4096 on CPU)")
    parser.add_argument("--kernel-edges", type=int, nargs="*", default=None,
                        help="more edge counts for the fused kernel alone (default on CUDA: 262144 1048576)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--l-max", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--providers", nargs="+", default=["torch", "triton", "triton-kernel", "reference"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    edges = args.edges or (65536 if cuda else 4096)
    kernel_edges = args.kernel_edges if args.kernel_edges is not None else ([262144, 1048576] if cuda else [])
    repeats = args.repeats or (20 if cuda else 5)

    result = {"kind": "allegro-fast layer roofline", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device.type, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if cuda else None,
              "commit": os.environ.get("ALLEGRO_FAST_COMMIT"), "loadavg": list(os.getloadavg()), "edges": edges,
              "kernel_edges": kernel_edges, "graph_calls": GRAPH_CALLS, "peaks": {}, "layers": [], "measured": []}
    result["peaks"]["copy_bandwidth"] = copy_bandwidth(device)
    bandwidth = result["peaks"]["copy_bandwidth"]["bytes_per_s"]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        peak = fma_rate(device, dtype)
        result["peaks"][f"fma_{dtype_name}"] = peak
        for position in ("first", "middle", "last"):
            work_model = ops.make_op("layer", "torch", num_edges=8, channels=args.channels, l_max=args.l_max).model
            index = ops.layer_index(position, work_model.config.num_layers)
            for provider in args.providers:
                sizes = [edges, *(e for e in kernel_edges if e != edges)] if provider == "triton-kernel" else [edges]
                for num_edges in sizes:
                    work = layer_work(work_model, index, num_edges, max(2, num_edges // ops.NEIGHBOURS_PER_ATOM),
                                      torch.finfo(dtype).bits // 8)
                    if num_edges == edges and provider == args.providers[0]:
                        result["layers"].append({**work, "dtype": dtype_name})
                    row = {"provider": provider, "position": position, "dtype": dtype_name, "num_edges": num_edges}
                    measure(row, provider, index, num_edges, dtype, device, args, repeats, work, peak, bandwidth)
                    result["measured"].append(row)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; " + "; ".join(
        f"{k} {v['flops_per_s'] / 1e9:.0f} GFLOP/s" for k, v in result["peaks"].items() if k.startswith("fma")))
    output = args.output or Path(__file__).resolve().parent / "results" / f"roofline-{device.type}-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, output)
    print(f"wrote {output}")
    return 0


def measure(row: dict, provider: str, index: int, num_edges: int, dtype, device, args, repeats: int, work: dict,
            peak: dict, bandwidth: float) -> None:
    """Time one provider's layer forward (or the fused kernel alone) into `row`: single calls, and on CUDA the
    device time per call from CUDA-graph replays (an error there is recorded, the single calls kept)."""
    reason = ops.provider_unavailable("triton" if provider == "triton-kernel" else provider, "layer", device)
    if reason or (provider.startswith("triton") and device.type != "cuda"):
        row["skipped"] = reason or "interpreter runs are not timings"
        return
    try:
        if provider == "triton-kernel":
            model = ops.make_op("layer", "torch", num_edges=8, channels=args.channels, l_max=args.l_max,
                                dtype=dtype, device=device).model
            fn, num_nodes = fused_kernel_case(model, index, num_edges, dtype, device)
        else:
            fn = ops.make_op("layer", provider, num_edges=num_edges, channels=args.channels, l_max=args.l_max,
                             dtype=dtype, device=device, position=row["position"])
            num_nodes = fn.num_nodes
        times = time_ms(fn, device, warmup=2, repeats=repeats)
    except Exception as error:  # out of memory, a kernel failing to compile: recorded, not fatal
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return
    part = "fused_core" if provider == "triton-kernel" else "whole_layer"
    median_s = statistics.median(times) / 1000
    row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), num_nodes=num_nodes,
               roofline=roofline_bounds(work, peak["flops_per_s"], bandwidth, median_s))
    device_note = ""
    if device.type == "cuda":
        try:
            device_times = device_time_ms(fn, device, repeats)
        except Exception as error:  # a host sync inside the call cannot be captured: the single calls stand
            row["device_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            device_s = statistics.median(device_times) / 1000
            row.update(device_ms=1000 * device_s, device_roofline=roofline_bounds(
                work, peak["flops_per_s"], bandwidth, device_s))
            device_note = (f"  device {row['device_ms']:8.3f} ms, fraction "
                           f"{row['device_roofline'][part]['achieved_fraction']:.3f}")
    bound = row["roofline"][part]
    print(f"{row['dtype']} layer[{row['position']}] {provider:13s} E={num_edges:8d} {row['median_ms']:9.3f} ms  "
          f"{part} roofline fraction {bound['achieved_fraction']:.3f} ({bound['limited_by']}-bound)"
          f"{device_note}", flush=True)
    fn = None  # free device memory before the next provider
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())

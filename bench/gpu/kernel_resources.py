"""Compile the generated Triton kernels of a model for a GPU architecture on a machine without a GPU, and
report what ptxas allocates: registers per thread, stack (spilled registers), shared memory, compile time.

Triton's wheel carries the NVIDIA toolchain (LLVM to PTX, ptxas, cuobjdump), so `triton.compile` with an
explicit target needs no driver. What this shows: that every kernel compiles for the target (errors the
interpreter cannot raise, such as tl.dot shape limits), and where a kernel spills; what it cannot show is
speed. The launch parameters are the launchers' own (`kernels.tensor_product`).

    python bench/gpu/kernel_resources.py                          # default model, float32, sm_90
    python bench/gpu/kernel_resources.py --l-max 1 --channels 32 --layers 1 --dtypes float32 float64
    python bench/gpu/kernel_resources.py --slots                  # the slot kernels (backward's pieces) too
    python bench/gpu/kernel_resources.py --only layer0 --variants 16x4r128 32x4   # the layers under other launches
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

TRITON_TYPES = {"float32": "fp32", "float64": "fp64"}
# edges per center of `warp_instructions_per_edge`: fcc Ag at the default r_max (915,724 edges of 32,000 atoms)
EDGES_PER_CENTER = 28


def compile_for_gpu(kernel, dtype: str, constexprs: dict, num_warps: int, arch: int = 90,
                    arguments: list | None = None, options: dict | None = None,
                    edges_per_center: int | None = None) -> dict:
    """Compile a generated @triton.jit kernel for CUDA `arch` without a device.

    With `arguments` (what the launcher passes, on CPU tensors: `layer_arguments`), the kernel is specialised as a
    launch specialises it: Triton's own binder marks the integers equal to 1 as constants (a contiguous channel
    stride) and the pointers and integers divisible by 16 as such, which lets it vectorise loads and drop index
    arithmetic. Without, every pointer `*_ptr` gets the element type `dtype` ("float32"/"float64"; CSR pointers
    int64) and every other argument is a plain int64: the same kernel, less specialised than any launch of it
    (the default model's first layer forward: 5880 SASS instructions and 440 B of spill unspecialised, 4600 and
    32 B as launched). `options`: further compile options (e.g. maxnreg). With `edges_per_center` (a one-block
    layer kernel, whose loops run over a center's blocks of BLOCK_E edges), the row has
    `warp_instructions_per_edge`: `loop_weighted_instructions` per center, times the warps, per edge."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    launch_options = {"num_warps": num_warps, **(options or {})}
    if arguments is not None:
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        keywords = {**constexprs, **launch_options}
        bound, specialization, _ = binder(*arguments, **keywords)
        _, signature, constants, attrs = kernel._pack_args(backend, keywords, bound, specialization, None)
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    else:
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {}
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):  # CSR pointers (center_ptr_ptr, ptr_ptr) are int64, the rest `dtype`
                signature[name] = "*i64" if name.endswith("ptr_ptr") else f"*{TRITON_TYPES[dtype]}"
            else:
                signature[name] = "i64"
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(name),): value for name, value in constexprs.items()})
    begin = time.perf_counter()
    compiled = triton.compile(source, target=target, options=launch_options)
    seconds = time.perf_counter() - begin
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as stream:
            stream.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split()
                  if ":" in item and item.split(":")[1].isdigit())
    registers = int(fields["REG"])
    return {"registers": registers, "stack_bytes": int(fields["STACK"]), "specialised": arguments is not None,
            "shared_bytes": int(fields["SHARED"]), "num_warps": num_warps, "compile_s": round(seconds, 2),
            "resident_warps_per_sm": resident_warps(registers, num_warps, int(fields["SHARED"])),
            **dot_precisions(compiled.asm["ttir"]), "instructions": instruction_mix(sass),
            **({} if edges_per_center is None else {"warp_instructions_per_edge": loop_weighted_instructions(
                sass, -(-edges_per_center // constexprs["BLOCK_E"])) * num_warps / edges_per_center})}


def resident_warps(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Warps of this kernel that one sm_90 multiprocessor holds at once, as limited by registers (65,536 per SM,
    allocated per warp in units of 256), shared memory (228 KB) and 64 warps: what there is to hide latency with."""
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(65536 // (per_warp * num_warps), 64 // num_warps,
                   (228 * 1024) // shared_bytes if shared_bytes else 64)
    return programs * num_warps


# SASS opcodes by what they do (the rest: integer, address and control instructions)
INSTRUCTION_CLASSES = {"fp32_fma": ("FFMA",), "fp32_other": ("FMUL", "FADD", "FMNMX", "FSETP", "FSEL"),
                       "fp64": ("DFMA", "DMUL", "DADD"), "tensor_core": ("HMMA", "DMMA", "IMMA"),
                       "global_memory": ("LDG", "STG", "LDGSTS", "RED", "ATOM"),
                       "shared_memory": ("LDS", "STS", "LDSM", "STSM"),
                       "spill": ("LDL", "STL"), "shuffle": ("SHFL",), "barrier": ("BAR",)}


def instruction_mix(sass: str) -> dict:
    """Static counts of the kernel's SASS instructions by class (each instruction once, loops not unrolled: a
    picture of the loop bodies, not a dynamic count) and in all."""
    opcodes = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass, re.MULTILINE)
    counts = {name: sum(op in members for op in opcodes) for name, members in INSTRUCTION_CLASSES.items()}
    return {"total": len(opcodes), **counts}


def loop_weighted_instructions(sass: str, trips: int) -> int:
    """The SASS instructions one thread executes when every loop runs `trips` times: an instruction inside k
    nested loops (ranges from a backward branch's target to the branch) counts trips^k. For the one-block layer
    kernels, whose loops are over a center's edge blocks, trips = ceil(edges per center / BLOCK_E) makes this
    the dynamic count per center (predicated-off instructions included); the static count weighs a loop body
    once, however often it runs."""
    rows = [(int(address, 16), opcode, rest) for address, opcode, rest in re.findall(
        r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)[.A-Z0-9_]*([^;]*)", sass, re.MULTILINE)]
    loops = []
    for address, opcode, rest in rows:
        target = re.search(r"0x([0-9a-f]+)", rest) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    return sum(trips ** sum(first <= address <= last for first, last in loops) for address, _, _ in rows)


def dot_precisions(ttir: str) -> dict:
    """The tt.dot ops of a kernel's Triton IR (after Triton's own rewrites) and how many take TF32 inputs (10-bit
    mantissas, ~1e-3 relative error). Triton's combine pass turns a float32 `tl.sum(x[:, :, None] * y[None, :, :],
    axis=1)` with both sides >= 16 into a TF32 tt.dot (Triton 3.6 and 3.9), which only a GPU shows: the
    interpreter never runs that pass."""
    dots = [line for line in ttir.splitlines() if re.search(r"\btt\.dot\b", line)]
    # tf32x3 (LayerLaunch.dot_precision, three TF32 products of high and low parts: about float32's accuracy)
    # is counted apart
    return {"dots": len(dots), "tf32_dots": sum("tf32" in line and "tf32x3" not in line for line in dots),
            "tf32x3_dots": sum("tf32x3" in line for line in dots)}


def model_kernels(l_max: int, channels: int, layers: int, parity: bool, slots: bool, dtype: str,
                  variants: tuple[str, ...] = ()):
    """(name, kernel, constexprs, options (num_warps, ...), arguments, edges per center) of every generated kernel
    an Allegro model launches on CUDA (segment sums, edge geometry, layers), with the launchers' own block sizes and
    options (`kernels.layer_launch`: the channel-tiled layer kernels above 32 channels). Arguments (for
    `compile_for_gpu`'s specialisation) for the layer kernels, None for the others (compiled unspecialised); edges
    per center (EDGES_PER_CENTER) for the one-block layer kernels, else None. With `variants` (tune_layer.py's
    syntax, e.g. "16x4r128"), the layer kernels again under each of those launches, named "<kernel>@<variant>"."""
    import torch

    import triton

    import allegro_fast as af
    from allegro_fast.kernels import edge_geometry, segments
    from allegro_fast.kernels import tensor_product as kernels

    # the sums to atoms (energies: 1 column; cell gradients: 9) and to structures (long segments)
    for columns, rows in ((1, segments.BLOCK_ROWS), (9, segments.BLOCK_ROWS), (1, segments.BLOCK_ROWS_LONG)):
        yield (f"segment_sum.c{columns}.r{rows}", segments._kernel(),
               {"BLOCK_R": rows, "BLOCK_C": 1 << (columns - 1).bit_length()}, {"num_warps": 4}, None, None)
    config = af.AllegroConfig(type_names=("H",), l_max=l_max, num_tensor_features=channels, num_layers=layers,
                              parity=parity)
    # the edge geometry (Bessel basis, envelope, harmonics), its backward and double backward, with and without the
    # frequencies' gradient (trainable Bessel frequencies in training)
    geometry = {"BLOCK_E": edge_geometry._block_size(torch.device("cuda")),
                "BLOCK_B": triton.next_power_of_2(config.num_bessels)}
    arguments = (l_max, config.polynomial_p, config.r_max)
    yield "edge_geometry.forward", edge_geometry._kernel(*arguments), geometry, {"num_warps": 4}, None, None
    for frequency_grad in (False, True):
        suffix = ".frequencies" if frequency_grad else ""
        yield (f"edge_geometry.backward{suffix}", edge_geometry._kernel(*arguments, "backward"),
               {**geometry, "FREQUENCY_GRAD": frequency_grad}, {"num_warps": 4}, None, None)
        yield (f"edge_geometry.double_backward{suffix}", edge_geometry._kernel(*arguments, "double_backward"),
               {**geometry, "FREQUENCY_GRAD": frequency_grad, "HAS_FREQUENCY_COTANGENT": frequency_grad},
               {"num_warps": 4}, None, None)
    if variants:
        from tune_layer import parse_variant  # bench/gpu/tune_layer.py, beside this script
    model = af.Allegro(config, backend="torch")
    for index, key in enumerate(model._triton_forms()):
        layer = kernels._LAYERS[key]
        # the first layer's twin that reads V^0 from memory (the double backward's derivative runs on it) and its form
        # of two feature pairs (the double backward, force training, runs on it and on the first layer's own)
        versions = [("", key)] + ([(".twin", kernels.plain_layer_key(key)), (".pairs", kernels.paired_layer_key(key))]
                                  if layer.first_features else [])
        for suffix, version in versions:
            for backward in (False, True):
                default, arguments = layer_arguments(version, getattr(torch, dtype), channels, backward)
                name = f"layer{index}{suffix}.{'backward' if backward else 'forward'}"
                for variant in (None, *variants):
                    launch = default if variant is None else parse_variant(variant, default)
                    yield (name if variant is None else f"{name}@{variant}",
                           kernels._layer_kernel(version, backward, launch),
                           launch.constants(getattr(torch, dtype), backward), launch.options, arguments,
                           None if launch.tiled else EDGES_PER_CENTER)
        if slots:
            slot_e, slot_c = kernels._block_sizes(channels, torch.device("cuda"))
            for form_name, form in (("environment", layer.environment), ("product", layer.product)):
                for slot in range(3):
                    yield (f"layer{index}.{form_name}.slot{slot}", kernels._slot_kernel(form.key, slot),
                           {"BLOCK_E": slot_e, "BLOCK_C": slot_c}, {"num_warps": kernels._num_warps(slot_e, slot_c)},
                           None, None)


def layer_arguments(key: str, dtype, channels: int, backward: bool, num_edges: int = 64):
    """(launch, arguments) of a registered layer's kernel as its launcher (`kernels.layer_call`,
    `layer_backward_call`) would launch it on a GPU, from CPU tensors of the model's shapes (the strides, hence the
    specialisation, do not depend on the edge count)."""
    import torch

    from allegro_fast.kernels import tensor_product as kernels

    layer = kernels._LAYERS[key]
    inputs = (torch.zeros(num_edges, layer.environment.operands[0].columns, channels, dtype=dtype),
              torch.zeros(num_edges, layer.environment.operands[1].columns, dtype=dtype),
              torch.zeros(num_edges, layer.feature_columns, channels, dtype=dtype),
              torch.zeros(layer.num_weights, channels, channels, dtype=dtype))
    center_ptr = torch.arange(0, num_edges + 1, 4)  # 4 edges per center
    second_pair = (inputs[2], inputs[1]) if layer.feature_pairs == 2 else None
    if not backward:
        launch, arguments, _ = kernels.layer_call(key, *inputs, center_ptr, device_type="cuda", second_pair=second_pair)
        return launch, arguments
    first, last = layer.scalar_columns
    cotangents = (torch.zeros(num_edges, last - first, channels, dtype=dtype),
                  torch.zeros(num_edges, layer.output_dim, channels, dtype=dtype))
    launch, arguments, _ = kernels.layer_backward_call(key, *inputs, *cotangents, center_ptr, device_type="cuda",
                                                       second_pair=second_pair)
    return launch, arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--l-max", type=int, default=2)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(TRITON_TYPES))
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--slots", action="store_true", help="also the slot kernels (backward's building blocks)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                        help="only the kernels whose names start with one of these (e.g. layer0 segment_sum)")
    parser.add_argument("--variants", nargs="+", default=(), metavar="VARIANT",
                        help="the layer kernels also under these launches (tune_layer.py's syntax: 16x4, 16x4r128, "
                             "16x2-tf32x3, ...), rows named <kernel>@<variant>")
    parser.add_argument("--output", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of the Triton versions we run on
    rows = []
    for dtype in args.dtypes:
        for name, kernel, constexprs, options, arguments, edges_per_center in model_kernels(
                args.l_max, args.channels, args.layers, not args.no_parity, args.slots, dtype, tuple(args.variants)):
            if args.only and not name.startswith(tuple(args.only)):
                continue
            row = {"kernel": name, "dtype": dtype, **constexprs, "arch": args.arch}
            try:
                options = dict(options)
                row.update(compile_for_gpu(kernel, dtype, constexprs, options.pop("num_warps"), args.arch, arguments,
                                           options, edges_per_center))
            except Exception as error:  # a kernel that does not compile is the finding: report it, go on
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            rows.append(row)
            mix = row.get("instructions", {})
            status = row.get("error") or (f"{row['registers']:3d} registers, {row['stack_bytes']:5d} B stack, "
                                          f"{row['shared_bytes']:6d} B shared, {row['num_warps']:2d} warps "
                                          f"({row['resident_warps_per_sm']} per SM), "
                                          f"{row['dots']} dots ({row['tf32_dots']} TF32), "
                                          f"SASS {mix['total']}: FFMA {mix['fp32_fma']}, shared "
                                          f"{mix['shared_memory']}, spill {mix['spill']}, "
                                          + (f"{row['warp_instructions_per_edge']:.0f} warp instructions per edge, "
                                             if "warp_instructions_per_edge" in row else "")
                                          + f"compiled in {row['compile_s']:.1f} s")
            print(f"{dtype:8s} {name:28s} {status}", flush=True)
    if args.output:
        with open(args.output, "w") as stream:
            json.dump(rows, stream, indent=1)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

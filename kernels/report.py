"""Compile every Triton kernel of nanotulu for an H100/H200 (sm_90a) at its default GPU configurations, without a
GPU, and print what the GPU would run: registers per thread, stack bytes (local memory: > 0 means spills), shared
memory, wgmma / mma / atomic instruction counts.

    python -m nanotulu.kernels.report            # a table
    python -m nanotulu.kernels.report --json     # one JSON object per line (what tests/test_sm90_compile.py reads)

It uses Triton's own compiler (triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))) and the cuobjdump
shipped inside the triton wheel. TRITON_INTERPRET must be unset: interpreted kernels cannot be compiled.
The configurations come from the launchers themselves (linear_logprobs.GPU_CONFIGS, rows.GPU_CONFIGS), and each
kernel is compiled with the specialisations a real launch at the reference shape (LAUNCH_SHAPE) gets from Triton's
JIT: every pointer 16-byte aligned (torch allocations are; chunk offsets are multiples of 256 tokens) and every
int argument whose value there is divisible by 16 marked so (tt.divisibility 16, what JITFunction's
specialisation key "D" becomes). Without them the compiler must assume unaligned rows: scalar loads, no cp.async
pipelining and far more registers (--unhinted shows that compile, for comparison), i.e. not the launched code.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# argument types of each kernel's pointers and scalars on GPU (bf16 model, int64 targets, fp32 statistics)
_TILE_TYPES = {"X": "*bf16", "W": "*bf16", "T": "*i64", "LSE": "*fp32", "TGT": "*fp32", "EZ": "*fp32",
               "GT": "*fp32", "CA": "*fp32", "CB": "*fp32", "DX": "*fp32", "DW": "*fp32"}
_ROW_TYPES = {"Z": "*fp32", "DZ": "*bf16", "T": "*i64", "LSE": "*fp32", "TGT": "*fp32", "EZ": "*fp32",
              "GT": "*fp32", "CA": "*fp32", "CB": "*fp32"}


# The reference launch (bench_losses' middle shape, Llama 3 8B head): the int arguments' values there. N tokens,
# H hidden, V vocab rows; the tile grads kernel runs per 16384-row vocab chunk (the last one 13568 rows).
N, H, V = 8192, 4096, 128256
LAUNCH_SHAPE = dict(N=N, H=H, V=V)
_TILE_INTS = {"N": N, "V": V, "H": H, "vocab_start": 0, "ignore_index": -100, "v_per_split": 16384,
              "stride_x": H, "stride_w": H, "stride_dx": H, "stride_dw": H}
_ROW_INTS = {"V": V, "stride_z": V, "stride_dz": V, "vocab_start": 0, "ignore_index": -100}


def _modules():
    # by import_module: the package's `linear_logprobs` attribute is the function of that name, not the module
    return [importlib.import_module(f"{__package__}.{m}") for m in ("rows", "linear_logprobs")]


def kernel_configs():
    """[(module, kernel name, JITFunction, pointer types, int values, constexprs, num_warps, num_stages)] for every
    kernel and launch configuration."""
    import triton.language as tl

    rows, linear_logprobs = _modules()
    out = []
    for name, constexprs, warps, stages in linear_logprobs.GPU_CONFIGS:
        c = dict(constexprs, DOT_DTYPE=tl.bfloat16, PRECISION="tf32")
        out.append(("linear_logprobs", name, getattr(linear_logprobs, name), _TILE_TYPES, _TILE_INTS, c, warps,
                    stages))
    for name, constexprs, warps, stages in rows.GPU_CONFIGS:
        out.append(("rows", name, getattr(rows, name), _ROW_TYPES, _ROW_INTS, dict(constexprs), warps, stages))
    return out


def launch_attrs(fn, pointer_types, int_values):
    """The attributes Triton's JIT gives a launch with these arguments: {(arg index,): [["tt.divisibility", 16]]}
    for each 16-byte aligned pointer (all of them) and each int divisible by 16. (An int equal to 1 would become a
    constant; none is 1 at the reference shape.)"""
    from triton.backends.compiler import BaseBackend

    attrs = {}
    for i, arg in enumerate(fn.arg_names):
        if arg in pointer_types:
            key = "D"
        elif arg in int_values:
            key = BaseBackend.get_int_specialization(int_values[arg], align=True)
            assert int_values[arg] != 1
        else:
            continue
        if BaseBackend.parse_attr(key):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return attrs


def all_kernels():
    """Every @triton.jit function defined in the kernel modules: the report must cover each one."""
    import triton

    return sorted(f"{m.__name__.rsplit('.', 1)[1]}.{n}" for m in _modules()
                  for n, v in vars(m).items()
                  if isinstance(v, triton.runtime.jit.JITFunction) and not n.startswith("_logit"))


def compile_one(fn, pointer_types, constexprs, warps, stages, arch=90, attrs=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = pointer_types.get(arg, "i32")  # sizes, strides, offsets
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    ptx = k.asm["ptx"]
    return {"registers": int(m[1]), "stack_bytes": int(m[2]), "static_shared": int(m[3]),
            "dynamic_shared": k.metadata.shared, "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync", ptx)), "atomics": len(re.findall(r"\b(?:atom|red)\.", ptx)),
            "cp_async": len(re.findall(r"\bcp\.async\b", ptx)),
            "vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v[248]\.", ptx))}


def _describe(constexprs):
    return " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items()
                    if k not in ("DOT_DTYPE", "PRECISION"))


def _compile_config(i, unhinted):
    """Compiles the i-th entry of kernel_configs() (by index: a worker process rebuilds the list itself)."""
    module, name, fn, types, ints, constexprs, warps, stages = kernel_configs()[i]
    r = compile_one(fn, types, constexprs, warps, stages, attrs=None if unhinted else launch_attrs(fn, types, ints))
    r.update(hinted=not unhinted, kernel=f"{module}.{name}",
             config=f"{_describe(constexprs)} warps={warps} stages={stages}")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel and config")
    ap.add_argument("--unhinted", action="store_true",
                    help="compile without the launch's alignment / divisibility specialisations (not what runs)")
    ap.add_argument("--only", default=None, help="kernels whose name contains this string")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="compile this many configurations at once (processes); 1: in this process")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for sm_90a")
    todo = [i for i, c in enumerate(kernel_configs()) if not args.only or args.only in c[1]]
    if args.jobs > 1 and len(todo) > 1:  # ptxas dominates: one process per configuration, results in order
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(todo)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_compile_config, todo, [args.unhinted] * len(todo))
            rows = []
            for r in results:
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
    else:
        rows = []
        for i in todo:
            rows.append(_compile_config(i, args.unhinted))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps({"all_kernels": all_kernels()}))
        return rows
    cols = ["kernel", "config", "registers", "stack_bytes", "static_shared", "dynamic_shared", "wgmma", "mma_sync",
            "atomics", "cp_async", "vector_loads"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("sm_90a (H100/H200), compiled by triton without a GPU; stack_bytes > 0 = local-memory spills; "
          + ("UNHINTED (not the launched code)" if args.unhinted else f"launch specialisations at {LAUNCH_SHAPE}"))
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return rows


if __name__ == "__main__":
    main()

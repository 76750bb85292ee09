"""Compile every Triton kernel of nanotulu for an H100/H200 (sm_90a) at its default GPU configurations, without a
GPU, and print what the GPU would run: registers per thread, stack bytes (local memory: > 0 means spills), shared
memory, wgmma / mma / atomic instruction counts.

    python -m nanotulu.kernels.report            # a table
    python -m nanotulu.kernels.report --json     # one JSON object per line (what tests/test_sm90_compile.py reads)

It uses Triton's own compiler (triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))) and the cuobjdump
shipped inside the triton wheel. TRITON_INTERPRET must be unset: interpreted kernels cannot be compiled.
The configurations come from the launchers themselves (linear_logprobs.GPU_CONFIGS, chunked_loss.GPU_CONFIGS), so
what is compiled here is what a GPU run launches.
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


def _modules():
    # by import_module: the package's `linear_logprobs` attribute is the function of that name, not the module
    return [importlib.import_module(f"{__package__}.{m}") for m in ("chunked_loss", "linear_logprobs")]


def kernel_configs():
    """[(module, kernel name, JITFunction, pointer types, constexprs, num_warps, num_stages)] for every kernel."""
    import triton.language as tl

    chunked_loss, linear_logprobs = _modules()
    out = []
    for name, constexprs, warps, stages in linear_logprobs.GPU_CONFIGS:
        c = dict(constexprs, DOT_DTYPE=tl.bfloat16, PRECISION="tf32")
        out.append(("linear_logprobs", name, getattr(linear_logprobs, name), _TILE_TYPES, c, warps, stages))
    for name, constexprs, warps, stages in chunked_loss.GPU_CONFIGS:
        out.append(("chunked_loss", name, getattr(chunked_loss, name), _ROW_TYPES, dict(constexprs), warps, stages))
    return out


def all_kernels():
    """Every @triton.jit function defined in the kernel modules: the report must cover each one."""
    import triton

    return sorted(f"{m.__name__.rsplit('.', 1)[1]}.{n}" for m in _modules()
                  for n, v in vars(m).items()
                  if isinstance(v, triton.runtime.jit.JITFunction) and not n.startswith("_logit"))


def compile_one(fn, pointer_types, constexprs, warps, stages, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = pointer_types.get(arg, "i32")  # sizes, strides, offsets
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
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
            "mma_sync": len(re.findall(r"\bmma\.sync", ptx)), "atomics": len(re.findall(r"\b(?:atom|red)\.", ptx))}


def _describe(constexprs):
    return " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items()
                    if k not in ("DOT_DTYPE", "PRECISION"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel and config")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for sm_90a")
    rows = []
    for module, name, fn, types, constexprs, warps, stages in kernel_configs():
        r = compile_one(fn, types, constexprs, warps, stages)
        r.update(kernel=f"{module}.{name}", config=f"{_describe(constexprs)} warps={warps} stages={stages}")
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    if args.json:
        print(json.dumps({"all_kernels": all_kernels()}))
        return rows
    cols = ["kernel", "config", "registers", "stack_bytes", "static_shared", "dynamic_shared", "wgmma", "mma_sync",
            "atomics"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("sm_90a (H100/H200), compiled by triton without a GPU; stack_bytes > 0 = local-memory spills")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return rows


if __name__ == "__main__":
    main()

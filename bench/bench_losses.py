"""Forward + backward time and peak extra memory of fused linear cross-entropy implementations.

    python bench/bench_losses.py                  # GPU: N in {4096, 8192, 16384}, H 4096, V 128256, bf16
    python bench/bench_losses.py --cpu-smoke      # CPU: tiny fp32 shapes, Triton under TRITON_INTERPRET=1

Each row is one loss = sum of token cross-entropies (or a GRPO-like per-token loss: "grpo"), forward then backward
into hidden and weight. "nanotulu ce fused" / "grpo fused" are the default chunked loss-fused path (6NHV);
"ce triton" / "logprobs triton" the memory-lean tile kernels (8NHV). Time is the
median of --reps rounds, each synchronised; "x liger" divides by Liger FLCE's time in the same run; "% 6NHV" is
the share of the cuBLAS bf16 matmul rate (torch.mm on the same (N,H) x (H,V) shapes, measured in this run) that
6NHV FLOPs per step would reach: 100% means as fast as three plain matmuls. "extra GiB" is the peak memory above
the inputs and their gradients. Baselines that cannot run here are listed with the reason.
"""
import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shapes on CPU (Triton interpreted)")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="token counts N")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--ignore-frac", type=float, default=0.0, help="share of targets set to ignore_index")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.ns = args.ns or [40, 72]
        args.hidden = args.hidden or 32
        args.vocab = args.vocab or 131
        args.reps = args.reps or 2
    else:
        args.ns = args.ns or [4096, 8192, 16384]
        args.hidden = args.hidden or 4096
        args.vocab = args.vocab or 128256
        args.reps = args.reps or 10
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.cpu_smoke:  # must be set before triton is imported anywhere
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from nanotulu.kernels.chunked_loss import fused_linear_loss  # noqa: E402
from nanotulu.kernels.linear_logprobs import linear_cross_entropy, linear_logprobs  # noqa: E402

IGNORE = -100


# ---- the methods: each returns a loss for (hidden, weight, targets); backward is called by the timer --------------
def eager_torch(x, w, t):
    # full bf16 logits, then an fp32 copy inside cross_entropy: the memory everyone tries to avoid
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=IGNORE, reduction="sum")


def _chunk_ce(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=IGNORE, reduction="sum")


_COMPILED = {}


def compiled_chunked_torch(x, w, t, chunk=1024):
    # torch.compile per chunk, checkpointed so only one chunk's logits live at a time (backward recomputes: 8NHV)
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_chunk_ce, dynamic=False)
    total = x.new_zeros((), dtype=torch.float32)
    for s in range(0, x.shape[0], chunk):
        total = total + checkpoint(_COMPILED["fn"], x[s:s + chunk], w, t[s:s + chunk], use_reentrant=False)
    return total


def liger_flce(x, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(x, w, t, ignore_index=IGNORE, reduction="sum")


def cut_cross_entropy(x, w, t):
    from cut_cross_entropy import linear_cross_entropy as cce
    return cce(x, w, t, ignore_index=IGNORE, reduction="sum")


def nanotulu_ce_fused(x, w, t):
    # the default: chunked, gradient formed in the forward pass (6NHV); Triton rows on CUDA
    return linear_cross_entropy(x, w, t, IGNORE, reduction="sum", impl="auto")


def nanotulu_grpo_fused(x, w, t):
    # a GRPO-like per-token loss (PPO ratio against fixed old log-probs, per-token advantages) on the same path:
    # what RLVR and DPO pay, 6NHV with a per-token upstream gradient
    adv = torch.linspace(-1.0, 1.0, x.shape[0], device=x.device)

    def loss_fn(lp, en, s, e):
        return -(torch.exp(lp - lp.detach()) * adv[s:e]).sum()

    return fused_linear_loss(x, w, t, loss_fn, ignore_index=IGNORE)[0]


def nanotulu_ce_triton(x, w, t):
    return linear_cross_entropy(x, w, t, IGNORE, reduction="sum", impl="triton")


def nanotulu_ce_torch(x, w, t):
    return linear_cross_entropy(x, w, t, IGNORE, reduction="sum", impl="torch")


def nanotulu_logprobs_triton(x, w, t):
    # the DPO/GRPO call: per-token log-probs with a different weight per token (8NHV: weights unknown in forward)
    g = torch.linspace(-1.0, 1.0, x.shape[0], device=x.device)
    return (linear_logprobs(x, w, t, IGNORE, impl="triton") * g).sum()


METHODS = {
    "eager torch": eager_torch,
    "compiled chunked torch": compiled_chunked_torch,
    "liger flce": liger_flce,
    "cut cross-entropy": cut_cross_entropy,
    "nanotulu ce fused": nanotulu_ce_fused,
    "nanotulu grpo fused": nanotulu_grpo_fused,
    "nanotulu ce triton": nanotulu_ce_triton,
    "nanotulu ce torch-chunked": nanotulu_ce_torch,
    "nanotulu logprobs triton": nanotulu_logprobs_triton,
}


def unavailable(name, device, args):
    """Why a method cannot run here, or None."""
    if name == "liger flce":
        try:
            import liger_kernel.transformers.functional  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    if name == "cut cross-entropy":
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return "cut-cross-entropy not installed"
        if device.type != "cuda":
            return "cut-cross-entropy needs CUDA"
    if name == "compiled chunked torch" and getattr(args, "no_compile", False):
        return "--no-compile"
    return None


# ---- measurement ---------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(N, H, V, dtype, device, ignore_frac, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: a 128256 x 4096 weight is fast
    x = torch.randn(N, H, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=device) * H ** -0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g, device=device)
    t[torch.rand(N, generator=g, device=device) < ignore_frac] = IGNORE
    return x, w, t


def step(fn, x, w, t):
    x.grad = w.grad = None
    fn(x, w, t).backward()


def time_step(fn, x, w, t, reps, device):
    """Median seconds of a synchronised forward + backward, after one warm-up round (compile, autotune)."""
    step(fn, x, w, t)
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step(fn, x, w, t)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn, x, w, t, device):
    """Peak memory of one step above the inputs and their gradients (CUDA only)."""
    if device.type != "cuda":
        return None
    x.grad = w.grad = None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(fn, x, w, t)
    sync(device)
    grads = x.numel() * x.element_size() + w.numel() * w.element_size()
    return torch.cuda.max_memory_allocated(device) - base - grads


def matmul_rate(x, w, reps, device):
    """FLOP/s of the plain (N,H) x (H,V) matmul in the inputs' dtype."""
    with torch.no_grad():
        w_t = w.t()
        torch.mm(x, w_t)
        sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(x, w_t)
            sync(device)
            times.append(time.perf_counter() - t0)
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / statistics.median(times)


def run(args):
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.cpu_smoke:
        sys.exit("no CUDA device: run with --cpu-smoke for the tiny CPU check")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    names = args.methods or list(METHODS)
    H, V = args.hidden, args.vocab
    rows = []
    for N in args.ns:
        x, w, t = make_inputs(N, H, V, dtype, device, args.ignore_frac)
        rate = matmul_rate(x, w, args.reps, device)
        results = {}
        for name in names:
            why = unavailable(name, device, args)
            if why is None:
                try:
                    secs = time_step(METHODS[name], x, w, t, args.reps, device)
                    extra = peak_extra_bytes(METHODS[name], x, w, t, device)
                    results[name] = (secs, extra, "")
                except torch.OutOfMemoryError:
                    results[name] = (None, None, "out of memory")
                    x.grad = w.grad = None
                    torch.cuda.empty_cache()
                except Exception as e:  # a baseline failing must not hide the others
                    results[name] = (None, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
            else:
                results[name] = (None, None, f"skipped: {why}")
        liger = results.get("liger flce", (None,))[0]
        for name in names:
            secs, extra, note = results[name]
            rows.append(dict(
                method=name, N=N,
                ms=f"{secs * 1e3:.2f}" if secs else "-",
                x_liger=f"{secs / liger:.2f}" if secs and liger else "-",
                pct=f"{100 * 6 * N * H * V / rate / secs:.0f}%" if secs else "-",
                gib=f"{extra / 2**30:.2f}" if extra is not None else "-",
                note=note))
        print(f"N={N}: {dtype} matmul rate {rate / 1e12:.3g} TFLOP/s on {device.type}", file=sys.stderr)
        del x, w, t
    header = dict(method="method", N="N", ms="fwd+bwd ms", x_liger="x liger", pct="% 6NHV@mm", gib="extra GiB",
                  note="note")
    widths = {k: max(len(str(r[k])) for r in rows + [header]) for k in header}
    line = lambda r: "  ".join(str(r[k]).ljust(widths[k]) for k in header)  # noqa: E731
    print(f"H={H} V={V} dtype={dtype} device={device} reps={args.reps} ignore_frac={args.ignore_frac}")
    print(line(header))
    print("  ".join("-" * widths[k] for k in header))
    for r in rows:
        print(line(r))
    return rows


if __name__ == "__main__":
    run(ARGS)

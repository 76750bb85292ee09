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

Beside each measured time: a byte and FLOP model of the method (`cost_model`) and the time it predicts from the
matmul rate and the copy bandwidth measured in the same run (FLOPs / rate + bytes outside the matmuls / bandwidth).
--check: before any timing, every method's loss, per-token log-probs, dX and dW at the first N against an fp32
chunked reference (max |d logp|, relative errors), and the default fused path run twice: bitwise equal (a race
would show as a difference). --pieces: the fused path's five pieces at one chunk, each beside its model.
Every line is printed (and appended to --jsonl) as soon as it is measured: a timeout keeps what was done.
"""
import argparse
import json
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
    p.add_argument("--check", action="store_true",
                   help="before timing, check every method's values at the first N against an fp32 reference")
    p.add_argument("--pieces", action="store_true", help="also time the fused path's pieces (matmuls, row kernels)")
    p.add_argument("--jsonl", default=None, help="append each result to this file as soon as it is measured")
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

from nanotulu.kernels.chunked_loss import default_chunk_size, fused_linear_loss  # noqa: E402
from nanotulu.kernels.linear_logprobs import linear_cross_entropy, linear_logprobs  # noqa: E402
from nanotulu.kernels.rows import addmm_path  # noqa: E402

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


def grpo_like(adv):
    # a GRPO-like per-token loss (PPO ratio against fixed old log-probs, per-token advantages)
    def loss_fn(lp, en, s, e):
        return -(torch.exp(lp - lp.detach()) * adv[s:e]).sum()
    return loss_fn


def nanotulu_grpo_fused(x, w, t):
    # the GRPO-like loss on the default path: what RLVR and DPO pay, 6NHV with a per-token upstream gradient
    adv = torch.linspace(-1.0, 1.0, x.shape[0], device=x.device)
    return fused_linear_loss(x, w, t, grpo_like(adv), ignore_index=IGNORE)[0]


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


def reference_loss_fn(name, N, device):
    """The loss of per-token log-probs each method computes, as a fused_linear_loss loss_fn (for --check's fp32
    reference): cross-entropy unless named otherwise."""
    if name == "nanotulu grpo fused":
        return grpo_like(torch.linspace(-1.0, 1.0, N, device=device))
    if name == "nanotulu logprobs triton":
        g = torch.linspace(-1.0, 1.0, N, device=device)
        return lambda lp, en, s, e: (lp * g[s:e]).sum()
    return lambda lp, en, s, e: -lp.sum()


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


def copy_bandwidth(device, nbytes):
    """Bytes per second of a large device-to-device copy (read + written), median of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def cost_model(name, N, H, V, elem):
    """(FLOPs, bytes moved outside the matmuls' own operand streams, what the bytes are) of one forward + backward.
    elem: bytes per element of x and w. k = chunks of the fused path (C = default_chunk_size)."""
    C = min(default_chunk_size(V, elem), N)
    k = -(-N // C)
    dz = elem if elem < 4 else 0  # fp32: dz written over the logits
    if name in ("nanotulu ce fused", "nanotulu grpo fused", "nanotulu ce torch-chunked"):
        # row stats read z (4NV), row grad reads z and writes dz (4NV + dz NV); the matmuls write z and read dz;
        # dW: first chunk writes 4VH, each later one re-reads and rewrites it (8VH); backward scales and casts
        # it once (4VH read + elem VH written); dX written once
        rows = (8 + dz) * N * V
        dw = 4 * V * H + 8 * V * H * (k - 1) + (4 + elem) * V * H
        return 6 * N * H * V, rows + dw + elem * N * H, f"rows {rows / 1e9:.1f} GB + dW {dw / 1e9:.1f} GB, C={C}"
    if name in ("nanotulu ce triton", "nanotulu logprobs triton"):
        # tile kernels: no logits in memory; fp32 atomics into dX (one per vocab tile) and dW (one per token tile)
        atomics = N * H * -(-V // 128) + V * H * -(-N // 64)
        return 8 * N * H * V, 8 * atomics, f"{atomics:.2g} fp32 atomics (8 B each)"
    if name == "eager torch":  # bf16 logits, fp32 copy, softmax grad in fp32, bf16 grad logits
        return 6 * N * H * V, (2 + 4 + 4 + 4 + 4 + 2 + 2) * N * V, "full (N, V) logits, several passes"
    if name == "compiled chunked torch":  # checkpointed chunks: forward twice
        return 8 * N * H * V, (2 + 4 + 2 + 2 + 4 + 2) * N * V, "chunked logits, recomputed"
    if name == "liger flce":  # gradient formed in the forward, bf16 logits chunks, in-place softmax grad
        return 6 * N * H * V, (2 + 2 + 2 + 2) * N * V + 4 * V * H, "bf16 logit chunks"
    if name == "cut cross-entropy":  # logits never in memory, recomputed in backward
        return 8 * N * H * V, 0, "no logits in memory"
    return None, None, ""


def emit(row, jsonl):
    """Print one result at once and append it to the JSONL file: a timeout loses nothing measured before it."""
    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check_values(names, N, H, V, dtype, device, args):
    """Every method against an fp32 chunked reference (the same bf16 values upcast), and the default fused path
    run twice (bitwise equal). Returns the failed checks."""
    x, w, t = make_inputs(N, H, V, dtype, device, args.ignore_frac, seed=1)
    refs = {}

    def reference(name):  # fp32 chunked reference (torch rows, fp32 matmuls) of this method's loss, cached
        fn = reference_loss_fn(name, N, device)
        key = fn.__code__
        if key not in refs:
            refs.clear()  # one at a time: an fp32 dW of V x H each
            x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
            loss, logp, _ = fused_linear_loss(x32, w32, t, fn, ignore_index=IGNORE, row_impl="torch")
            loss.backward()
            refs[key] = (loss.detach(), logp, x32.grad, w32.grad)
        return refs[key]

    bf16 = dtype != torch.float32
    tol = 2e-2 if bf16 else 1e-4  # bf16 operands (dz rounded to bf16) against fp32; fp32 against fp32
    failed = []
    for name in names:
        why = unavailable(name, device, args)
        if why is not None:
            emit(dict(check=name, N=N, result=f"skipped: {why}"), args.jsonl)
            continue
        try:
            loss_ref, _, dx_ref, dw_ref = reference(name)
            x.grad = w.grad = None
            loss = METHODS[name](x, w, t)
            loss.backward()
            errs = dict(loss=rel_err(loss, loss_ref), dX=rel_err(x.grad, dx_ref), dW=rel_err(w.grad, dw_ref))
        except Exception as e:  # a baseline failing must not hide the others
            emit(dict(check=name, N=N, result=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"),
                 args.jsonl)
            continue
        bad = [k for k, v in errs.items() if not v <= tol]
        failed += [f"{name} {k}" for k in bad]
        emit(dict(check=name, N=N, **{f"rel_err_{k}": f"{v:.2e}" for k, v in errs.items()}, tol=tol,
                  result="FAIL " + ",".join(bad) if bad else "ok"), args.jsonl)
    # per-token log-probs of the default paths (no grad: the DPO reference / GRPO old-policy pass) and the race
    # check: two runs of the fused path bitwise equal
    logp_ref = reference("nanotulu ce fused")[1]
    with torch.no_grad():
        d_logp = (linear_logprobs(x, w, t, IGNORE) - logp_ref).abs().max().item()
    runs = []
    for _ in range(2):
        x.grad = w.grad = None
        loss, logp, _ = fused_linear_loss(x, w, t, lambda lp, en, s, e: -lp.sum(), ignore_index=IGNORE)
        loss.backward()
        runs.append((loss.detach().clone(), logp.clone(), x.grad.clone(), w.grad.clone()))
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    d_logp_fused = (runs[0][1] - logp_ref).abs().max().item()
    logp_tol = 0.1 if bf16 else 1e-4  # bf16 logits products, fp32 log-sum-exp
    ok = same and d_logp <= logp_tol and d_logp_fused <= logp_tol
    failed += [] if ok else ["log-probs / bitwise"]
    emit(dict(check="fused path", N=N, max_abs_d_logp_nograd=f"{d_logp:.3g}",
              max_abs_d_logp_fused=f"{d_logp_fused:.3g}",
              two_runs_bitwise_equal=same, addmm_path=addmm_path(device.type), result="ok" if ok else "FAIL"),
         args.jsonl)
    del x, w, t, refs
    return failed


def time_pieces(N, H, V, dtype, device, args, rate, bw):
    """The fused path's pieces at one chunk of C tokens: logits matmul, row stats, row grad, dX and dW matmuls."""
    from nanotulu.kernels import rows

    C = min(default_chunk_size(V, torch.empty((), dtype=dtype).element_size()), N)
    x, w, t = make_inputs(C, H, V, dtype, device, args.ignore_frac, seed=2)
    x, w = x.detach(), w.detach()
    f32 = dict(dtype=torch.float32, device=device)
    z = torch.empty(C, V, **f32)
    dz = rows.dz_buffer(z, dtype)
    lse, tgt, ez = (torch.empty(C, **f32) for _ in range(3))
    g = torch.randn(C, **f32)
    dx = torch.empty(C, H, dtype=dtype, device=device)
    dw = torch.zeros(V, H, **f32)
    stats, grad = rows.row_fns(rows.resolve_row_impl("auto", device))
    el = x.element_size()
    pieces = [
        ("logits mm", lambda: rows._mm_into(x, w.t(), z), 2 * C * H * V, 0),
        ("row stats", lambda: stats(z, t, 0, IGNORE, False, lse, tgt, ez), 0, 4 * C * V),
        ("row grad", lambda: grad(z, dz, t, lse, g, -g, None, 0, IGNORE), 0, (4 + (el if el < 4 else 0)) * C * V),
        ("dX mm", lambda: rows._mm_into(dz, w, dx), 2 * C * H * V, 0),
        ("dW addmm", lambda: rows._addmm_acc(dw, dz.t(), x), 2 * C * H * V, 8 * V * H),
    ]
    for name, fn, flops, nbytes in pieces:
        fn()
        sync(device)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        model = (flops / rate + nbytes / bw) * 1e3
        emit(dict(piece=name, C=C, ms=f"{ms:.3f}", model_ms=f"{model:.3f}", flops=f"{flops:.3g}",
                  bytes=f"{nbytes:.3g}"), args.jsonl)
    del x, w, z, dz, dw


def run(args):
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.cpu_smoke:
        sys.exit("no CUDA device: run with --cpu-smoke for the tiny CPU check")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    names = args.methods or list(METHODS)
    H, V = args.hidden, args.vocab
    print(f"H={H} V={V} dtype={dtype} device={device} reps={args.reps} ignore_frac={args.ignore_frac}", flush=True)
    bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**22)
    failed = check_values(names, args.ns[0], H, V, dtype, device, args) if args.check else []
    rows = []
    for N in args.ns:
        x, w, t = make_inputs(N, H, V, dtype, device, args.ignore_frac)
        rate = matmul_rate(x, w, args.reps, device)
        C_model = int(min(32768, max(256, -(-(4 * rate / (3 * 0.05 * bw)) // 256) * 256)))
        emit(dict(N=N, matmul_TFLOPs=f"{rate / 1e12:.3g}", copy_GBs=f"{bw / 1e9:.4g}",
                  chunk_default=default_chunk_size(V, x.element_size()), chunk_for_5pct_dW_at_these_rates=C_model),
             args.jsonl)
        if args.pieces and N == args.ns[0]:
            time_pieces(N, H, V, dtype, device, args, rate, bw)
        liger = None
        for name in names:
            why = unavailable(name, device, args)
            secs, extra, note = None, None, ""
            if why is None:
                try:
                    secs = time_step(METHODS[name], x, w, t, args.reps, device)
                    extra = peak_extra_bytes(METHODS[name], x, w, t, device)
                except torch.OutOfMemoryError:
                    note = "out of memory"
                    x.grad = w.grad = None
                    torch.cuda.empty_cache()
                except Exception as e:  # a baseline failing must not hide the others
                    note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            else:
                note = f"skipped: {why}"
            if name == "liger flce":
                liger = secs
            flops, nbytes, what = cost_model(name, N, H, V, x.element_size())
            model_ms = (flops / rate + nbytes / bw) * 1e3 if flops is not None else None
            row = dict(method=name, N=N, ms=f"{secs * 1e3:.2f}" if secs else "-",
                       model_ms=f"{model_ms:.2f}" if model_ms is not None else "-",
                       x_liger=f"{secs / liger:.2f}" if secs and liger else "-",
                       pct=f"{100 * 6 * N * H * V / rate / secs:.0f}%" if secs else "-",
                       gib=f"{extra / 2**30:.2f}" if extra is not None else "-",
                       flops=f"{flops:.3g}" if flops else "-", bytes=f"{nbytes:.3g}" if nbytes is not None else "-",
                       model=what, note=note)
            emit(row, args.jsonl)
            rows.append(row)
        del x, w, t
    header = dict(method="method", N="N", ms="fwd+bwd ms", model_ms="model ms", x_liger="x liger", pct="% 6NHV@mm",
                  gib="extra GiB", note="note")
    widths = {k: max(len(str(r[k])) for r in rows + [header]) for k in header}
    line = lambda r: "  ".join(str(r[k]).ljust(widths[k]) for k in header)  # noqa: E731
    print(line(header))
    print("  ".join("-" * widths[k] for k in header))
    for r in rows:
        print(line(r))
    if failed:
        print("VALUE CHECKS FAILED: " + "; ".join(failed), flush=True)
        if __name__ == "__main__":
            sys.exit(1)
    return rows


if __name__ == "__main__":
    run(ARGS)

"""nanotulu.kernels against a float64 full-logits reference (and Liger's fused linear cross-entropy).

The Triton kernels run on CPU under TRITON_INTERPRET=1 (set in conftest.py): shapes are small and chosen so
that N and V are not multiples of any block size and whole token tiles are ignored.
"""

import pytest
import torch
import torch.nn.functional as F

from nanotulu import run
from nanotulu.kernels.linear_logprobs import (
    linear_cross_entropy,
    linear_logprobs,
    logprob_stats,
    vocab_parallel_linear_logprobs,
)

IGNORE = -100


def reference(hidden, weight, targets, ignore_index=IGNORE):
    """float64 (logp, lse, entropy) from full logits; 0 on ignored tokens."""
    z = hidden.double() @ weight.double().t()  # (N, V)
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    lse = torch.logsumexp(z, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return tuple(torch.where(valid, v, zero) for v in (logp, lse, entropy))


def make_inputs(N, H, V, dtype, seed, ignore_frac=0.3, ignore_block=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5 * 3).to(dtype)  # logits of std ~3: a peaked softmax
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    if ignore_block is not None:  # a run of ignored tokens covering at least one whole 16-token tile
        targets[ignore_block[0]:ignore_block[1]] = IGNORE
    upstream = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]
    return hidden, weight, targets, upstream


def reference_grads(hidden, weight, targets, upstream, which=(0, 1, 2)):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    outs = reference(h, w, targets)
    sum(((outs[i] * upstream[i]).sum() for i in which)).backward()
    return outs, h.grad, w.grad


def assert_close(actual, expected, rel):
    # relative to the largest reference entry: rows of ignored tokens are exactly 0 in both
    scale = expected.abs().max().clamp(min=1e-12).item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


SHAPES = [  # (N, H, V, ignored token range)
    (37, 40, 75, (0, 18)),
    (50, 24, 131, (16, 48)),
]


@pytest.mark.parametrize("impl", ["torch", "triton", "fused"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_logprobs_values_and_grads(impl, shape, dtype, rel):
    N, H, V, block = shape
    hidden, weight, targets, upstream = make_inputs(N, H, V, dtype, seed=N + V, ignore_block=block)
    ref, ref_dh, ref_dw = reference_grads(hidden, weight, targets, upstream)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    kw = dict(stats=dict(n_split=3), grads=dict(v_chunk=48)) if impl == "triton" else \
        dict(stats=dict(chunk_size=16), grads=dict(chunk_size=16))
    outs = linear_logprobs(h, w, targets, return_lse=True, return_entropy=True, impl=impl, **kw)
    assert all(o.dtype == torch.float32 and o.shape == (N,) for o in outs)
    for o, r in zip(outs, ref):
        assert_close(o, r, rel)
    sum((o * u.float()).sum() for o, u in zip(outs, upstream)).backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(h.grad, ref_dh, rel)
    assert_close(w.grad, ref_dw, rel)
    ignored = targets == IGNORE
    assert (h.grad[ignored] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logprobs_only_output(impl):
    # the common DPO/GRPO call: logps alone, a random weight per token
    hidden, weight, targets, upstream = make_inputs(29, 32, 53, torch.float32, seed=3)
    _, ref_dh, ref_dw = reference_grads(hidden, weight, targets, upstream, which=(0,))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, targets, impl=impl)
    (logp * upstream[0].float()).sum().backward()
    assert_close(h.grad, ref_dh, 1e-5)
    assert_close(w.grad, ref_dw, 1e-5)


def test_impls_agree():
    hidden, weight, targets, upstream = make_inputs(45, 48, 97, torch.float32, seed=7)
    results = []
    for impl in ("torch", "triton", "auto"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        outs = linear_logprobs(h, w, targets, return_lse=True, return_entropy=True, impl=impl)
        sum((o * u.float()).sum() for o, u in zip(outs, upstream)).backward()
        results.append((*outs, h.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# ---- P1: the defaults take the chunked matmul + row kernels, never the atomic tile kernels -------------------------
def _no_tiles(monkeypatch):
    from nanotulu.kernels import linear_logprobs as mod

    def refuse(*a, **k):
        raise AssertionError("a default path launched the tile kernels")

    monkeypatch.setattr(mod, "_triton_stats", refuse)
    monkeypatch.setattr(mod, "_triton_grads", refuse)


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_defaults_never_take_the_tile_kernels(monkeypatch, impl):
    _no_tiles(monkeypatch)
    hidden, weight, targets, upstream = make_inputs(37, 40, 75, torch.bfloat16, seed=31, ignore_block=(0, 18))
    ref, ref_dh, ref_dw = reference_grads(hidden, weight, targets, upstream)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    outs = linear_logprobs(h, w, targets, return_lse=True, return_entropy=True, impl=impl,
                           stats=dict(chunk_size=16), grads=dict(chunk_size=16))
    for o, r in zip(outs, ref):
        assert_close(o, r, 1e-2)
    sum((o * u.float()).sum() for o, u in zip(outs, upstream)).backward()
    assert_close(h.grad, ref_dh, 1e-2)
    assert_close(w.grad, ref_dw, 1e-2)
    with torch.no_grad():
        assert_close(linear_logprobs(hidden, weight, targets, impl=impl), ref[0], 1e-2)
    none = linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)
    assert_close(none, -ref[0], 1e-2)


def test_no_grad_logprobs_are_one_matmul_and_no_gradient_buffers(monkeypatch):
    """The DPO reference / GRPO old-policy pass: 2NHV FLOPs (the logits matmul, then the row-stats kernel), and no
    tensor of the inputs' shapes (a dX or dW buffer) is ever created."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    _no_tiles(monkeypatch)
    N, H, V = 48, 24, 70
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, seed=33)
    hidden.requires_grad_()
    weight.requires_grad_()
    shapes = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with torch.no_grad(), FlopCounterMode(display=False) as counter, Shapes():
        logp = linear_logprobs(hidden, weight, targets, stats=dict(chunk_size=16))
    assert counter.get_total_flops() == 2 * N * H * V
    assert (N, H) not in shapes and (V, H) not in shapes, shapes
    assert_close(logp, reference(hidden.detach(), weight.detach(), targets)[0], 1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_ignored(impl):
    hidden, weight, targets, _ = make_inputs(20, 16, 33, torch.float32, seed=1)
    targets[:] = IGNORE
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, lse, ent = linear_logprobs(h, w, targets, return_lse=True, return_entropy=True, impl=impl)
    (logp.sum() + lse.sum() + ent.sum()).backward()
    for t in (logp, lse, ent, h.grad, w.grad):
        assert (t == 0).all()
    mean = linear_cross_entropy(hidden, weight, targets, reduction="mean", impl=impl)
    assert mean.item() == 0.0  # defined as sum / max(count, 1), not nan


def test_triton_skips_ignored_tiles():
    # NaN in the hidden states of a fully ignored 16-token tile: if that tile did matmul work, the NaN would reach
    # dW (0 * NaN) and the lse of its neighbours; the in-kernel skip keeps everything finite.
    hidden, weight, targets, upstream = make_inputs(48, 32, 40, torch.float32, seed=5, ignore_frac=0.0)
    targets[16:32] = IGNORE
    hidden[16:32] = float("nan")
    ref, ref_dh, ref_dw = reference_grads(torch.cat([hidden[:16], hidden[32:]]), weight,
                                          torch.cat([targets[:16], targets[32:]]),
                                          [torch.cat([u[:16], u[32:]]) for u in upstream])
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    outs = linear_logprobs(h, w, targets, return_lse=True, return_entropy=True, impl="triton",
                           stats=dict(block_n=16), grads=dict(block_n=16))
    sum((o * u.float()).sum() for o, u in zip(outs, upstream)).backward()
    keep = targets != IGNORE
    for o, r in zip(outs, ref):
        assert (o[~keep] == 0).all()
        assert_close(o[keep], r, 1e-5)
    assert_close(w.grad, ref_dw, 1e-5)
    assert (h.grad[16:32] == 0).all()
    assert_close(h.grad[keep], ref_dh, 1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_cross_entropy(impl, reduction):
    hidden, weight, targets, upstream = make_inputs(41, 24, 67, torch.float32, seed=11)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=IGNORE, reduction=reduction)
    grad_out = upstream[0] if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    (ref * grad_out).sum().backward()

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, reduction=reduction, impl=impl, chunk_size=16)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close(loss, ref.detach(), 1e-5)
    (loss * grad_out.float()).sum().backward()
    assert_close(h.grad, h64.grad, 1e-5)
    assert_close(w.grad, w64.grad, 1e-5)


def test_cross_entropy_no_grad_and_partial_grad():
    hidden, weight, targets, _ = make_inputs(33, 16, 50, torch.float32, seed=13)
    ref = F.cross_entropy(hidden.double() @ weight.double().t(), targets, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, targets, impl="torch")
    assert not loss.requires_grad
    assert_close(loss, ref, 1e-5)
    # only the hidden states need a gradient (a frozen output layer)
    h = hidden.detach().clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, impl="torch").backward()
    h64 = hidden.detach().double().requires_grad_()
    F.cross_entropy(h64 @ weight.double().t(), targets, ignore_index=IGNORE, reduction="sum").backward()
    assert_close(h.grad, h64.grad, 1e-5)


def test_low_level_vocab_offset():
    # a shard's stats: lse over its rows only, target logit only when the target lies in the shard
    hidden, weight, targets, _ = make_inputs(21, 16, 60, torch.float32, seed=17)
    z = hidden.double() @ weight.double().t()
    valid = targets != IGNORE
    for impl in ("torch", "triton"):
        lse, tgt, _ = logprob_stats(hidden, weight[25:], targets, vocab_start=25, impl=impl)
        assert_close(lse, torch.where(valid, torch.logsumexp(z[:, 25:], -1), 0.0), 1e-5)
        inside = valid & (targets >= 25)
        expected = torch.where(inside, z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
        assert_close(tgt, expected, 1e-5)


def test_against_liger():
    liger = pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy",
                                reason="liger-kernel is not installed")
    # Liger's Triton kernels run under TRITON_INTERPRET on CPU (checked: liger-kernel 0.8.5)
    hidden, weight, targets, _ = make_inputs(45, 40, 75, torch.float32, seed=19)
    grads = []
    for fn in ("liger", "ours"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if fn == "liger":
            loss = liger.LigerFusedLinearCrossEntropyFunction.apply(h, w, targets, None, None, IGNORE, 0.0, 0.0,
                                                                    "sum")[0]
        else:
            loss = linear_cross_entropy(h, w, targets, reduction="sum", impl="triton")
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="hidden size"):
        linear_logprobs(h, torch.randn(10, 6), t)
    with pytest.raises(ValueError, match="targets must be"):
        linear_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match="integer"):
        linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match="dtypes differ"):
        linear_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(h, w, t, impl="cuda")


# ---- vocab parallel: 2 gloo processes against the unsharded reference ----------------------------------------
def _vocab_parallel_worker(rank, world, port, impl):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        N, H, V = 27, 24, 61
        hidden, weight, targets, upstream = make_inputs(N, H, V, torch.float32, seed=23, ignore_block=(0, 5))
        targets[5] = 0  # first row of shard 0
        targets[6] = V - 1  # last row of the last shard
        ref, ref_dh, ref_dw = reference_grads(hidden, weight, targets, upstream)
        bounds = [0, 29, V]  # uneven shards
        lo, hi = bounds[rank], bounds[rank + 1]
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        outs = vocab_parallel_linear_logprobs(h, w, targets, lo, group=None, return_lse=True,
                                              return_entropy=True, impl=impl)
        for o, r in zip(outs, ref):
            assert_close(o, r, 1e-5)
        sum((o * u.float()).sum() for o, u in zip(outs, upstream)).backward()
        assert_close(h.grad, ref_dh, 1e-5)
        assert_close(w.grad, ref_dw[lo:hi], 1e-5 * ref_dw.abs().max().item() / ref_dw[lo:hi].abs().max().item())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["torch", "triton", "fused"])
def test_vocab_parallel_gloo(impl):
    torch.multiprocessing.spawn(_vocab_parallel_worker, args=(2, run.free_port(), impl), nprocs=2, join=True)


def test_bench_script_cpu_smoke():
    # bench/bench_losses.py --cpu-smoke on the smallest shapes: every available method runs and gets a time
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(bench.parse_args(["--cpu-smoke", "--ns", "24", "--vocab", "40", "--hidden", "16",
                                       "--reps", "1", "--no-compile"]))
    for r in rows:
        assert r["ms"] != "-" or r["note"].startswith("skipped"), r


def test_kernel_modules_import_without_a_circle():
    """rows.py <- chunked_loss.py <- linear_logprobs.py, one way (issue 28): the shared helpers and the
    tensor-parallel combine live in rows.py, which imports neither loss module."""
    import ast
    import pathlib

    kdir = pathlib.Path(__file__).resolve().parents[1] / "kernels"

    def imports(name):
        tree = ast.parse((kdir / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}

    assert imports("rows") == set()
    assert imports("chunked_loss") == {"rows"}
    assert imports("linear_logprobs") == {"rows", "chunked_loss"}
    combines = [p.name for p in kdir.glob("*.py") if "ReduceOp.MAX" in p.read_text()]
    assert combines == ["rows.py"]

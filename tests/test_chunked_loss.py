"""kernels.fused_linear_loss (chunked, gradient formed in the forward pass) against plain torch on float64 full
logits: SFT sum/mean, the four DPO losses with label smoothing, GRPO with clip and k1/k2/k3 KL, an entropy term;
values and gradients of hidden and weight to 1e-5 in fp32, with the Triton row kernels interpreted and with the
torch rows; the FLOP count of each path (FlopCounterMode); vocab parallel over 2 gloo processes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nanotulu import run
from nanotulu.kernels.chunked_loss import fused_linear_loss, plan_chunks
from nanotulu.kernels.linear_logprobs import linear_cross_entropy, linear_logprobs
from nanotulu.algos.dpo import dpo_loss
from nanotulu.algos.grpo import grpo_token_loss

IGNORE = -100
ROW_IMPLS = ["torch", "triton"]


def make_inputs(N, H, V, seed, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * H ** -0.5 * 3  # logits of std ~3: a peaked softmax
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, targets


def reference_logps(hidden, weight, targets, want_entropy=False):
    """float64 per-token log-probs (0 where ignored) and entropies, from full logits: differentiable."""
    logp_all = torch.log_softmax(hidden @ weight.t(), dim=-1)  # (N, V)
    valid = targets != IGNORE
    logp = torch.where(valid, logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0) if want_entropy else None
    return logp, entropy


def assert_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp(min=1e-12).item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


def check(loss_fn, hidden, weight, targets, row_impl, want_entropy=False, chunk_size=16, cuts=None, grad_out=0.7):
    """fused_linear_loss == the same loss_fn applied once to the whole float64 reference log-probs."""
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    lp, en = reference_logps(h64, w64, targets, want_entropy)
    ref = loss_fn(lp, en, 0, targets.numel())
    (ref * grad_out).backward()

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, logp, entropy = fused_linear_loss(h, w, targets, loss_fn, return_entropy=want_entropy,
                                            chunk_size=chunk_size, cuts=cuts, row_impl=row_impl)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref.detach())
    assert_close(logp, lp.detach())
    if want_entropy:
        assert_close(entropy, en.detach())
    (loss * grad_out).backward()
    assert_close(h.grad, h64.grad)
    assert_close(w.grad, w64.grad)
    assert (h.grad[targets == IGNORE] == 0).all()


# ---- SFT ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_impl", ROW_IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy(row_impl, reduction):
    hidden, weight, targets = make_inputs(53, 24, 75, seed=1)
    targets[16:32] = IGNORE  # a whole chunk of ignored tokens
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=IGNORE, reduction=reduction)
    (ref * 0.7).backward()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=16,
                                impl={"torch": "torch", "triton": "fused"}[row_impl])
    assert_close(loss, ref.detach())
    (loss * 0.7).backward()
    assert_close(h.grad, h64.grad)
    assert_close(w.grad, w64.grad)


# ---- DPO: pairs of two documents, chunks cut on pair starts ------------------------------------------------------
def dpo_setup(seed, lengths):
    """Packed pairs: documents of the given lengths (chosen, rejected, chosen, ...), a prompt part of each
    ignored, then 5 padding tokens. -> inputs, per-token segment ids (padding: segment 2P), pair starts."""
    N = sum(lengths) + 5
    hidden, weight, targets = make_inputs(N, 24, 75, seed, ignore_frac=0.0)
    seg = torch.full((N,), len(lengths), dtype=torch.long)
    starts, pos = [], 0
    for d, n in enumerate(lengths):
        if d % 2 == 0:
            starts.append(pos)
        seg[pos:pos + n] = d
        targets[pos:pos + n // 3] = IGNORE  # the prompt
        pos += n
    targets[pos:] = IGNORE
    return hidden, weight, targets, seg, starts


def make_dpo_loss(seg, starts, targets, ref, loss_kw):
    P = len(starts)
    counts = torch.zeros(2 * P + 1, dtype=torch.float64).index_add_(0, seg, (targets != IGNORE).double())
    counts = counts[:2 * P].view(P, 2)
    pair_at = {s: i for i, s in enumerate(starts)}

    def loss_fn(lp, _en, s, e):
        # pairs wholly inside [s, e): the chunk starts on a pair start (or in the padding)
        p0 = pair_at.get(s, P)
        p1 = next((pair_at[c] for c in starts if c >= e), P)
        sums = torch.zeros(2 * P + 1, dtype=lp.dtype).index_add(0, seg[s:e], lp)[:2 * P].view(P, 2)[p0:p1]
        c, r = counts[p0:p1].to(lp.dtype), ref[p0:p1].to(lp.dtype)
        return dpo_loss(sums[:, 0], sums[:, 1], r[:, 0], r[:, 1], c[:, 0], c[:, 1], **loss_kw)[0].sum()

    return loss_fn


@pytest.mark.parametrize("row_impl", ROW_IMPLS)
@pytest.mark.parametrize("loss_type", ["dpo", "dpo_norm", "simpo", "ipo"])
def test_dpo_losses(row_impl, loss_type):
    lengths = [9, 12, 14, 7, 25, 21, 6, 10]  # the third pair (46 tokens) is longer than a chunk
    hidden, weight, targets, seg, starts = dpo_setup(5, lengths)
    ref = -torch.rand(len(starts), 2, dtype=torch.float64) * 20 - 5
    kw = dict(loss_type=loss_type, beta=0.5, gamma_beta_ratio=0.3, label_smoothing=0.1)
    loss_fn = make_dpo_loss(seg, starts, targets, ref, kw)
    check(loss_fn, hidden, weight, targets, row_impl, chunk_size=24, cuts=starts)


def test_plan_chunks():
    assert plan_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    # cut only at allowed positions; a run longer than the chunk is one chunk
    assert plan_chunks(30, 10, cuts=[0, 4, 9, 12, 25]) == [(0, 9), (9, 12), (12, 25), (25, 30)]
    assert plan_chunks(8, 100, cuts=[0, 3]) == [(0, 8)]


# ---- GRPO: token-level PPO-clip + KL, normaliser known beforehand; an entropy bonus for the entropy gradient -------
@pytest.mark.parametrize("row_impl", ROW_IMPLS)
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_grpo_loss(row_impl, kl):
    hidden, weight, targets = make_inputs(47, 24, 75, seed=7)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        lp_now, _ = reference_logps(hidden.double(), weight.double(), targets)
    old = lp_now + torch.randn(47, generator=g, dtype=torch.float64) * 0.3  # ratios across both clip edges
    ref = lp_now + torch.randn(47, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(47, generator=g, dtype=torch.float64)
    mask = (targets != IGNORE).double()
    n_tokens = mask.sum()

    def loss_fn(lp, en, s, e):
        tok, _, _ = grpo_token_loss(lp, old[s:e].to(lp.dtype), ref[s:e].to(lp.dtype), adv[s:e].to(lp.dtype),
                                    0.2, 0.05, kl)
        return (tok * mask[s:e].to(lp.dtype)).sum() / n_tokens.to(lp.dtype)

    check(loss_fn, hidden, weight, targets, row_impl, chunk_size=16)


@pytest.mark.parametrize("row_impl", ROW_IMPLS)
def test_entropy_term(row_impl):
    hidden, weight, targets = make_inputs(40, 24, 75, seed=9)

    def loss_fn(lp, en, s, e):
        w = torch.linspace(-1, 1, 40, dtype=lp.dtype)[s:e]
        return -(lp * w).sum() - 0.3 * (en * (1 - w * w)).sum()

    check(loss_fn, hidden, weight, targets, row_impl, want_entropy=True, chunk_size=16)


def test_no_grad_and_frozen_weight():
    hidden, weight, targets = make_inputs(30, 16, 40, seed=11)
    lp, _ = reference_logps(hidden.double(), weight.double(), targets)
    with torch.no_grad():
        loss, logp, _ = fused_linear_loss(hidden.requires_grad_(), weight, targets, lambda lp, en, s, e: -lp.sum(),
                                          chunk_size=8)
    assert not loss.requires_grad
    assert_close(loss, -lp.sum())
    h = hidden.detach().clone().requires_grad_()
    loss, _, _ = fused_linear_loss(h, weight, targets, lambda lp, en, s, e: -lp.sum(), chunk_size=8)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    (-reference_logps(h64, weight.double(), targets)[0].sum()).backward()
    assert_close(h.grad, h64.grad)


def test_bf16_close_to_float64():
    # bf16 inputs: fp32 logits block and fp32 dW accumulation; dz rounded to bf16 (the matmul operand)
    hidden, weight, targets = make_inputs(40, 32, 75, seed=13)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    h64 = hb.double().requires_grad_()
    w64 = wb.double().requires_grad_()
    ref = -reference_logps(h64, w64, targets)[0].sum()
    ref.backward()
    for row_impl in ROW_IMPLS:
        h = hb.clone().requires_grad_()
        w = wb.clone().requires_grad_()
        loss, _, _ = fused_linear_loss(h, w, targets, lambda lp, en, s, e: -lp.sum(), chunk_size=16,
                                       row_impl=row_impl)
        assert_close(loss, ref.detach(), 1e-5)  # the loss itself is computed in fp32
        loss.backward()
        assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
        assert_close(h.grad, h64.grad, 1e-2)
        assert_close(w.grad, w64.grad, 1e-2)


# ---- FLOPs: FlopCounterMode counts the matmuls torch runs ----------------------------------------------------------
def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("what", ["sft", "grpo_entropy"])
def test_fused_path_costs_6nhv(what):
    N, H, V = 96, 32, 200
    hidden, weight, targets = make_inputs(N, H, V, seed=15)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    if what == "sft":
        run = lambda: linear_cross_entropy(h, w, targets, impl="torch", chunk_size=32).backward()  # noqa: E731
    else:
        def run():
            loss, _, _ = fused_linear_loss(h, w, targets, lambda lp, en, s, e: (torch.exp(lp) * 0.3 - en).sum(),
                                           return_entropy=True, chunk_size=32, row_impl="torch")
            loss.backward()
    flops = flops_of(run)
    assert 6 * N * H * V <= flops <= 1.01 * 6 * N * H * V, flops / (N * H * V)


def test_memory_lean_path_costs_8nhv():
    N, H, V = 96, 32, 200
    hidden, weight, targets = make_inputs(N, H, V, seed=17)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    flops = flops_of(lambda: (linear_logprobs(h, w, targets, impl="torch") * 0.5).sum().backward())
    assert 8 * N * H * V <= flops <= 1.01 * 8 * N * H * V, flops / (N * H * V)


# ---- vocab parallel: 2 gloo processes against the unsharded float64 reference ------------------------------------
def _tp_worker(rank, world, port, row_impl):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        N, V = 37, 61
        hidden, weight, targets = make_inputs(N, 24, V, seed=19)
        targets[5], targets[6] = 0, V - 1  # first row of shard 0, last row of the last shard

        def loss_fn(lp, en, s, e):
            w = torch.linspace(-1, 1, N, dtype=lp.dtype)[s:e]
            return -(lp * w).sum() - 0.3 * (en * (1 - w * w)).sum()

        h64 = hidden.double().requires_grad_()
        w64 = weight.double().requires_grad_()
        lp, en = reference_logps(h64, w64, targets, True)
        ref = loss_fn(lp, en, 0, N)
        ref.backward()
        bounds = [0, 29, V]  # uneven shards
        lo, hi = bounds[rank], bounds[rank + 1]
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        loss, logp, entropy = fused_linear_loss(h, w, targets, loss_fn, return_entropy=True, chunk_size=16,
                                                row_impl=row_impl, vocab_start=lo, tp_group="default")
        assert_close(loss, ref.detach())
        assert_close(logp, lp.detach())
        assert_close(entropy, en.detach())
        loss.backward()
        assert_close(h.grad, h64.grad)
        assert_close(w.grad, w64.grad[lo:hi], 1e-5 * w64.grad.abs().max().item() / w64.grad[lo:hi].abs().max().item())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("row_impl", ROW_IMPLS)
def test_vocab_parallel_gloo(row_impl):
    torch.multiprocessing.spawn(_tp_worker, args=(2, run.free_port(), row_impl), nprocs=2, join=True)


# ---- issue 26: B5 (dz never over memory still read), B6 (dW accumulation paths), traffic counted ----------------
@pytest.mark.parametrize("block_v", [16, 32, 64])
def test_row_grad_writes_nothing_it_reads(block_v):
    """The Triton row-grad kernel (interpreted) with tile widths where a 16-bit dz written over the fp32 logits
    would put tile j's store on tile j/2's columns (V = 200: ragged last tile): dz lands in its own buffer, the
    logits stay bitwise unchanged, and dz equals the float64 formula rounded to bf16."""
    from nanotulu.kernels import rows

    C, V = 6, 200
    g = torch.Generator().manual_seed(21)
    z = torch.randn(C, V, generator=g) * 3
    t = torch.randint(0, V, (C,), generator=g)
    t[2] = IGNORE
    lse = torch.logsumexp(z, 1)
    gt, a, b = (torch.randn(C, generator=g) for _ in range(3))
    dz = rows.dz_buffer(z, torch.bfloat16)
    assert dz.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()
    z_before = z.clone()
    rows._triton_rows_grad(z, dz, t, lse, gt, a, b, 0, IGNORE, block_v=block_v)
    assert torch.equal(z, z_before)
    z64 = z.double()
    valid, inside, t_idx = rows._target_index(t, V, 0, IGNORE)
    want = rows._torch_dz(z64, lse.double(), gt.double(), a.double(), b.double(), valid, inside, t_idx)
    assert_close(dz.double(), want, 1e-2)


@pytest.mark.parametrize("block_v", [16, 64])
def test_fused_loss_never_gives_the_row_kernel_an_aliased_dz(monkeypatch, block_v):
    """Through fused_linear_loss with bf16 inputs: every row-grad launch gets a dz that shares no bytes with the
    logits it reads (before issue 26 it was a bf16 view into the fp32 block), and the gradients match float64."""
    from nanotulu.kernels import rows

    real = rows._triton_rows_grad
    launches = []

    def spy(z, dz, *args, **kw):
        z_lo, dz_lo = z.data_ptr(), dz.data_ptr()
        z_hi = z_lo + ((z.shape[0] - 1) * z.stride(0) + z.shape[1]) * z.element_size()
        dz_hi = dz_lo + ((dz.shape[0] - 1) * dz.stride(0) + dz.shape[1]) * dz.element_size()
        launches.append(dz_hi <= z_lo or z_hi <= dz_lo)
        z_before = z.clone()
        real(z, dz, *args, block_v=block_v)
        assert torch.equal(z, z_before)

    monkeypatch.setattr(rows, "_triton_rows_grad", spy)
    hidden, weight, targets = make_inputs(40, 32, 75, seed=23)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    h64, w64 = hb.double().requires_grad_(), wb.double().requires_grad_()
    (-reference_logps(h64, w64, targets)[0].sum()).backward()
    h, w = hb.clone().requires_grad_(), wb.clone().requires_grad_()
    loss, _, _ = fused_linear_loss(h, w, targets, lambda lp, en, s, e: -lp.sum(), chunk_size=16, row_impl="triton")
    loss.backward()
    assert launches == [True] * 3
    assert_close(h.grad, h64.grad, 1e-2)
    assert_close(w.grad, w64.grad, 1e-2)


def test_addmm_paths_agree_and_the_path_is_logged_once(caplog):
    """B6: acc += a @ b with 16-bit a, b by one addmm or by row blocks (ragged: 37 rows in blocks of 8) give the
    float64 result; the path taken is logged once per device type and readable through addmm_path."""
    import logging

    from nanotulu.kernels import rows

    g = torch.Generator().manual_seed(25)
    acc0 = torch.randn(37, 24, generator=g)
    a = torch.randn(37, 20, generator=g).bfloat16()
    b = torch.randn(20, 24, generator=g).bfloat16()
    want = acc0.double() + a.double() @ b.double()
    rows._ADDMM_PATH.pop("cpu", None)
    with caplog.at_level(logging.INFO, logger="nanotulu.kernels"):
        for path in ("addmm", "row blocks"):
            acc = acc0.clone()
            rows._addmm_acc(acc, a, b, block_rows=8, path=path)
            assert_close(acc, want, 1e-6)
        acc = acc0.clone()
        rows._addmm_acc(acc, a, b)  # the path this device took: addmm, not logged again
        assert_close(acc, want, 1e-6)
    assert rows.addmm_path("cpu") == "addmm"
    msgs = [r.getMessage() for r in caplog.records if "dW accumulation" in r.getMessage()]
    assert msgs == ["fused loss dW accumulation on cpu: addmm"]
    with pytest.raises(ValueError, match="path must be"):
        rows._addmm_acc(acc, a, b, path="fast")


def vh_ops(fn, V, H):
    """aten ops whose result is a (V, H) tensor (what writes the dW accumulator or gradient), in call order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (V, H):
                self.ops.append(func.__name__)
            return out

    with Record() as rec:
        fn()
    return rec.ops


def test_dw_traffic_counted():
    """Point 4: the fp32 dW accumulator is never zeroed (the first chunk's matmul writes it, later chunks addmm
    into it) and backward scales it in one op; 4 chunks. The gradient still equals float64 (tests above)."""
    N, H, V = 64, 24, 40
    hidden, weight, targets = make_inputs(N, H, V, seed=27)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = {}
    fwd = vh_ops(lambda: out.update(loss=fused_linear_loss(h, w, targets, lambda lp, en, s, e: -lp.sum(),
                                                           chunk_size=16, row_impl="torch")[0]), V, H)
    writes = [op for op in fwd if op.split(".")[0] in ("mm", "addmm")]
    assert writes == ["mm.out"] + ["addmm.out"] * 3, fwd
    assert not [op for op in fwd if op.split(".")[0] in ("zero_", "fill_", "zeros", "zeros_like", "copy_")], fwd
    bwd = vh_ops(lambda: (out["loss"] * 0.5).backward(), V, H)
    assert [op for op in bwd if not op.startswith(("detach", "empty", "new_empty", "add"))] == ["mul_.Tensor"], bwd


def test_scale_cast_is_one_op():
    """Backward's scale and cast of an fp32 gradient to bf16: one aten op (no fp32 temporary), value exact to
    bf16 rounding of the float64 product."""
    from nanotulu.kernels.rows import scale_cast

    g = torch.Generator().manual_seed(29)
    t = torch.randn(40, 24, generator=g)
    out = {}
    ops = vh_ops(lambda: out.update(r=scale_cast(t, torch.tensor(0.7), torch.bfloat16)), 40, 24)
    assert [op for op in ops if not op.startswith("empty")] == ["mul.out"], ops
    assert out["r"].dtype == torch.bfloat16
    assert torch.equal(out["r"], (t.double() * torch.tensor(0.7).double()).bfloat16()) or \
        (out["r"].double() - t.double() * 0.7).abs().max() <= 2 ** -8 * t.abs().max() * 0.7

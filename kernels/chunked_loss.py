"""Chunked, loss-fused linear + log-softmax: forward and backward of any per-token loss at 6NHV.

Notation as in linear_logprobs.py: hidden X (N, H), output weight W (V, H), targets t (N,), logits z = X W^T.
The caller gives the loss as a torch function of the per-token log-probs (and entropies) of one chunk of tokens:

    loss_fn(logp_c (C,), entropy_c (C,) or None, start, end) -> scalar, the loss of tokens [start, end)

and the total loss is the sum of the chunk losses. That covers every loss nanotulu trains with: cross-entropy
(-sum logp / normaliser), DPO (each pair's loss needs only its own two sequences, so chunks are cut on pair
boundaries: `plan_chunks` with the pair starts as allowed cuts) and GRPO (token-level PPO-clip + KL with a
normaliser known before the forward). Because the loss of a chunk is known as soon as its log-probs are, the
gradient is formed in the forward pass, per chunk:

    z   = X_c W^T                       (C, V) fp32, torch matmul (cuBLAS on GPU)          2 C H V FLOPs
    row kernel 1 reads z:  lse, target logit, E_p[z]   -> logp_c, entropy_c
    g   = d loss_fn / d (logp_c, entropy_c)             (C,) each, torch autograd over C numbers: negligible
    row kernel 2 reads z, writes dz = g_logp (onehot - p) - g_ent p (z - E_p[z]) in place over z
    dX_c = dz W                                                                              2 C H V
    dW  += dz^T X_c    fp32 accumulator, in place (addmm into it: no temporary of V x H)      2 C H V

Total 6NHV; autograd's backward only multiplies the stored dX and dW by the incoming scalar gradient.
The row kernels are Triton (one program per row, fp32 online log-sum-exp) on CUDA, and torch ops on CPU (the
Triton interpreter runs them in the tests).

Memory (beyond inputs, outputs and the fp32 V x H dW accumulator): one (C, V) fp32 logits block; on GPU dz is
written in bf16 into the first half of each fp32 row of that same block (row n's bf16 dz lies inside row n's
own fp32 bytes and tile j's store only covers columns already read, so the in-place write is race free), and
dz is handed to cuBLAS as a strided (C, V) view with leading dimension 2V. dX is written per chunk in the
hidden dtype (fp32 buffer under tensor parallel, all-reduced once). Chunk size: see `default_chunk_size`.

Tensor (vocab) parallel: each rank holds rows [vocab_start, vocab_start + V_r) of W. Row kernel 1 gives the
shard's lse, target logit and E_p[z]; ranks combine them into the global ones (max / sum-exp all-reduce, C
numbers each), every rank evaluates the same loss_fn, row kernel 2 uses the global lse, each rank keeps its dW
shard, and the (N, H) dX partials are summed once at the end.

No host sync: chunk bounds are host integers planned from shapes (and host-side pair starts for DPO); ignored
tokens (target == ignore_index) get dz = 0 inside the row kernel (their logits are still computed: skipping
them would need their count on the host).
"""
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .linear_logprobs import _check_inputs, _target_index, _torch_dz

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Triton row kernels: one program per token row of the (C, V) logits block
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(Z, T, LSE, TGT, EZ, V, stride_z, vocab_start, ignore_index,
                      BLOCK_V: tl.constexpr, WANT_EZ: tl.constexpr):
    # lse, target logit and E_p[z] of one row, fp32. Per-lane online max / sum: one cross-lane reduction per row.
    row = tl.program_id(0)
    t = tl.load(T + row)
    valid = t != ignore_index
    t_local = t - vocab_start
    z_row = Z + row.to(tl.int64) * stride_z
    m = tl.full([BLOCK_V], -3.0e38, dtype=tl.float32)  # finite start: exp(m - m_new) never sees -inf - -inf
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    sz = tl.zeros([BLOCK_V], dtype=tl.float32)
    if valid:  # ignored rows read nothing
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(z_row + cols, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m, z)
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)  # 0 on masked columns
            s = s * scale + e
            if WANT_EZ:
                sz = sz * scale + e * tl.where(ok, z, 0.0)
            m = m_new
    m_row = tl.max(m, axis=0)
    w = tl.exp(m - m_row)
    s_row = tl.sum(s * w, axis=0)
    s_safe = tl.where(s_row > 0, s_row, 1.0)
    lse = tl.where(valid, m_row + tl.log(s_safe), 0.0)
    inside = valid & (t_local >= 0) & (t_local < V)
    tgt = tl.load(z_row + tl.where(inside, t_local, 0), mask=inside, other=0.0)
    tl.store(LSE + row, lse)
    tl.store(TGT + row, tgt)
    if WANT_EZ:
        tl.store(EZ + row, tl.where(valid, tl.sum(sz * w, axis=0) / s_safe, 0.0))


@triton.jit
def _row_grad_kernel(Z, DZ, T, LSE, GT, CA, CB, V, stride_z, stride_dz, vocab_start, ignore_index,
                     BLOCK_V: tl.constexpr, HAS_CB: tl.constexpr):
    # dz = g [v == t] + p (a + b z), p = exp(z - lse), written over the row (DZ may alias Z, see the docstring);
    # 0 on ignored rows (their exp(z - 0) may overflow: selected away, never multiplied in)
    row = tl.program_id(0)
    t = tl.load(T + row)
    valid = t != ignore_index
    t_local = t - vocab_start
    lse = tl.load(LSE + row)
    g = tl.load(GT + row)
    a = tl.load(CA + row)
    z_row = Z + row.to(tl.int64) * stride_z
    dz_row = DZ + row.to(tl.int64) * stride_dz
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=0.0)
        p = tl.exp(z - lse)
        if HAS_CB:
            dz = p * (a + tl.load(CB + row) * z)
        else:
            dz = p * a
        dz = tl.where(cols == t_local, dz + g, dz)
        dz = tl.where(valid, dz, 0.0)
        tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=ok)


# Default GPU launch configurations, (kernel, constexprs, num_warps, num_stages): the launchers read them and
# `python -m nanotulu.kernels.report` compiles each for sm_90a (tests/test_sm90_compile.py fails on any spill).
# 2048 fp32 per tile over 8 warps: 8 per thread, 16-byte loads; the rows are memory bound.
GPU_CONFIGS = [
    ("_row_stats_kernel", dict(BLOCK_V=2048, WANT_EZ=False), 8, 3),
    ("_row_stats_kernel", dict(BLOCK_V=2048, WANT_EZ=True), 8, 3),
    ("_row_grad_kernel", dict(BLOCK_V=2048, HAS_CB=False), 8, 3),
    ("_row_grad_kernel", dict(BLOCK_V=2048, HAS_CB=True), 8, 3),
]


def _row_config(z, kernel):
    if INTERPRET or not z.is_cuda:
        return 64, 1, 1  # interpreter: small tiles so the tests cross tile edges
    c, warps, stages = next((c, w, st) for k, c, w, st in GPU_CONFIGS if k == kernel)
    return c["BLOCK_V"], warps, stages


def _triton_rows_stats(z, targets, vocab_start, ignore_index, want_ez, lse, tgt, ez, block_v=None):
    C, V = z.shape
    bv, warps, stages = _row_config(z, "_row_stats_kernel")
    _row_stats_kernel[(C,)](z, targets, lse, tgt, ez if want_ez else lse, V, z.stride(0), vocab_start,
                            ignore_index, BLOCK_V=block_v or bv, WANT_EZ=want_ez, num_warps=warps,
                            num_stages=stages)


def _triton_rows_grad(z, dz, targets, lse, g, a, b, vocab_start, ignore_index, block_v=None):
    C, V = z.shape
    bv, warps, stages = _row_config(z, "_row_grad_kernel")
    _row_grad_kernel[(C,)](z, dz, targets, lse, g, a, b if b is not None else a, V, z.stride(0), dz.stride(0),
                           vocab_start, ignore_index, BLOCK_V=block_v or bv, HAS_CB=b is not None,
                           num_warps=warps, num_stages=stages)


# ---------------------------------------------------------------------------------------------------------------
# The same two row operations in torch (CPU training; a second reference for the kernels)
# ---------------------------------------------------------------------------------------------------------------
def _torch_rows_stats(z, targets, vocab_start, ignore_index, want_ez, lse, tgt, ez, block_v=None):
    valid, inside, t_idx = _target_index(targets, z.shape[1], vocab_start, ignore_index)
    lse_c = torch.logsumexp(z, dim=1)
    lse.copy_(torch.where(valid, lse_c, 0.0))
    tgt.copy_(torch.where(inside, z.gather(1, t_idx[:, None]).squeeze(1), 0.0))
    if want_ez:
        ez.copy_(torch.where(valid, (torch.exp(z - lse_c[:, None]) * z).sum(1), 0.0))


def _torch_rows_grad(z, dz, targets, lse, g, a, b, vocab_start, ignore_index, block_v=None):
    valid, inside, t_idx = _target_index(targets, z.shape[1], vocab_start, ignore_index)
    dz.copy_(_torch_dz(z, lse, g, a, torch.zeros_like(a) if b is None else b, valid, inside, t_idx))


# ---------------------------------------------------------------------------------------------------------------
# Matmul helpers: fp32 results from 16-bit operands without upcast copies on GPU
# ---------------------------------------------------------------------------------------------------------------
def _mm_into(a, b, out):
    """out = a @ b (out may be fp32 with 16-bit a, b)."""
    if a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif out.is_cuda:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # CPU with 16-bit operands (tests): no mixed-dtype CPU kernel
        out.copy_(torch.mm(a.float(), b.float()))


_ADDMM_MIXED = {}  # device type -> whether addmm(fp32 acc, bf16, bf16, out_dtype=fp32) runs


def _addmm_acc(acc, a, b, block_rows=8192):
    """acc (fp32) += a @ b, in place. 16-bit a, b on GPU: cuBLAS with an fp32 C/D matrix (addmm.dtype_out);
    torch builds that refuse an fp32 `self` fall back to row blocks of acc with a bounded fp32 temporary."""
    # addmm with out=acc, not addmm_: the same in-place kernel, and FlopCounterMode counts it (it skips addmm_)
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
        return
    if not acc.is_cuda:
        torch.addmm(acc, a.float(), b.float(), out=acc)
        return
    if _ADDMM_MIXED.get("cuda", True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_MIXED["cuda"] = True
            return
        except RuntimeError:
            _ADDMM_MIXED["cuda"] = False
    for r in range(0, acc.shape[0], block_rows):  # at most block_rows x H fp32 extra (128 MiB at H 4096)
        acc[r:r + block_rows] += torch.mm(a[r:r + block_rows], b, out_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Chunk planning
# ---------------------------------------------------------------------------------------------------------------
def default_chunk_size(V, budget_bytes=1 << 30):
    """Tokens per chunk: the largest multiple of 256 whose (C, V) fp32 logits block fits in `budget_bytes`.

    Why as large as memory allows: every chunk re-reads and rewrites the fp32 V x H dW accumulator (8 V H bytes)
    while doing 6 C H V FLOPs; at a matmul rate R and bandwidth B that traffic adds 8 R / (6 C B) of the matmul
    time: H100 (R ~ 790 TFLOP/s bf16, B ~ 3.35 TB/s) gives 314 / C, i.e. 31% at C = 1024, 15% at 2048, 8% at
    4096. The 1 GiB budget gives C = 2048 at V = 128256 (see bench/README.md)."""
    return int(max(256, min(32768, budget_bytes // (4 * max(V, 1)) // 256 * 256)))


def plan_chunks(n_tokens, chunk_size, cuts=None):
    """Host list of (start, end) token ranges covering [0, n_tokens), each at most chunk_size long, cut only at
    positions in `cuts` (sorted host ints; None: anywhere). A run between two allowed cuts longer than chunk_size
    becomes one chunk of its own (e.g. a DPO pair longer than the chunk)."""
    if cuts is None:
        return [(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]
    points = sorted({int(c) for c in cuts if 0 < c < n_tokens} | {n_tokens})
    chunks, start, i = [], 0, 0
    while start < n_tokens:
        end = None
        while i < len(points) and points[i] - start <= chunk_size:
            end = points[i]
            i += 1
        if end is None:  # the next allowed cut is further than chunk_size: one oversize chunk
            end = points[i]
            i += 1
        chunks.append((start, end))
        start = end
    return chunks


# ---------------------------------------------------------------------------------------------------------------
# Autograd function
# ---------------------------------------------------------------------------------------------------------------
class _FusedLinearLossFn(torch.autograd.Function):
    """Returns (loss, logp (N,), entropy (N,) or empty); the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_fn, chunks, want_entropy, ignore_index, row_impl,
                vocab_start, tp_group, need_hidden, need_weight):
        N, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        group = None if tp_group == "default" else tp_group
        stats_fn, grad_fn = ((_triton_rows_stats, _triton_rows_grad) if row_impl == "triton"
                             else (_torch_rows_stats, _torch_rows_grad))
        need_grad = need_hidden or need_weight
        f32 = dict(dtype=torch.float32, device=dev)
        lse, tgt, ez = (torch.zeros(N, **f32) for _ in range(3))
        logp, entropy = torch.zeros(N, **f32), torch.zeros(N if want_entropy else 0, **f32)
        loss = torch.zeros((), **f32)
        z_buf = torch.empty(max(e - s for s, e in chunks), V, **f32)  # the one (C, V) block, reused
        dx = None
        if need_hidden:  # fp32 partial sums under tensor parallel (all-reduced once), else the output dtype
            dx = torch.empty(N, H, dtype=torch.float32 if tp_group is not None else hidden.dtype, device=dev)
        dw = torch.zeros(V, H, **f32) if need_weight else None
        w_t = weight.t()
        for s, e in chunks:
            x_c, t_c = hidden[s:e], targets[s:e]
            z = z_buf[:e - s]
            _mm_into(x_c, w_t, z)  # (C, V) fp32
            stats_fn(z, t_c, vocab_start, ignore_index, want_entropy, lse[s:e], tgt[s:e], ez[s:e])
            if tp_group is not None:  # global lse from the shards' max and sum-exp; one rank holds the target
                m = lse[s:e].clone()
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                sum_exp = torch.exp(lse[s:e] - m)
                dist.all_reduce(sum_exp, group=group)
                lse_g = m + torch.log(sum_exp)
                ez[s:e] = torch.exp(lse[s:e] - lse_g) * ez[s:e]
                dist.all_reduce(ez[s:e], group=group)
                dist.all_reduce(tgt[s:e], group=group)
                lse[s:e] = torch.where(t_c != ignore_index, lse_g, 0.0)
            logp[s:e] = tgt[s:e] - lse[s:e]
            ent_c = None
            if want_entropy:
                entropy[s:e] = lse[s:e] - ez[s:e]
                ent_c = entropy[s:e]
            # the chunk's loss and d loss / d (logp, entropy): autograd over C numbers
            with torch.enable_grad():
                lp = logp[s:e].detach().requires_grad_(need_grad)
                en = ent_c.detach().requires_grad_(need_grad) if want_entropy else None
                loss_c = loss_fn(lp, en, s, e)
                if need_grad and loss_c.requires_grad:
                    grads = torch.autograd.grad(loss_c, [lp] + ([en] if want_entropy else []), allow_unused=True)
                else:
                    grads = [None, None]
            loss += loss_c.detach().float()
            if not need_grad:
                continue
            g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
            g_en = grads[1] if want_entropy and grads[1] is not None else None
            # d logp/dz = onehot - p; d entropy/dz = -p (z - E_p[z]): dz = g_lp onehot + p (a + b z)
            a = -g_lp if g_en is None else -g_lp + g_en * ez[s:e]
            b = None if g_en is None else -g_en
            dz = z if weight.dtype == torch.float32 else z_buf.view(weight.dtype)[:e - s, :V]
            grad_fn(z, dz, t_c, lse[s:e], g_lp.float().contiguous(), a.float().contiguous(),
                    None if b is None else b.float().contiguous(), vocab_start, ignore_index)
            if need_hidden:
                _mm_into(dz, weight, dx[s:e])  # (C, H)
            if need_weight:
                _addmm_acc(dw, dz.t(), x_c)  # (V, H) += (V, C) @ (C, H)
        del z_buf
        if dx is not None and tp_group is not None:
            dist.all_reduce(dx, group=group)  # each shard gave its vocab's part of dX
        ctx.grads = (dx, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _g_logp, _g_entropy):
        dx, dw = ctx.grads
        ctx.grads = (None, None)  # the stored gradients are scaled in place: a second backward is an error
        if dx is None and dw is None:
            raise RuntimeError("fused_linear_loss: backward called twice, or no input needed a gradient")
        d_hidden = dx.mul_(grad_loss.to(dx.dtype)).to(ctx.dtypes[0]) if dx is not None else None
        d_weight = dw.mul_(grad_loss).to(ctx.dtypes[1]) if dw is not None else None
        return (d_hidden, d_weight) + (None,) * 10


def _resolve_row_impl(row_impl, hidden):
    if row_impl == "auto":
        return "triton" if hidden.is_cuda else "torch"
    if row_impl not in ("triton", "torch"):
        raise ValueError(f"row_impl must be 'auto', 'triton' or 'torch', got {row_impl!r}")
    return row_impl


def fused_linear_loss(hidden, weight, targets, loss_fn, *, ignore_index=-100, return_entropy=False,
                      chunk_size=None, cuts=None, row_impl="auto", vocab_start=0, tp_group=None):
    """A loss of the per-token log-probs of hidden @ weight.T, forward and backward at 6NHV, no (N, V) logits.

    hidden (N, H), weight (V, H) same dtype, targets (N,) int (ignore_index: not trained, logp 0).
    loss_fn(logp_c, entropy_c, start, end) -> scalar: the loss of tokens [start, end) from their fp32 log-probs
    (and entropies when return_entropy; else None); the total loss is the sum over chunks. It must depend only on
    those tokens: pass `cuts` (sorted host token offsets where a chunk may end, e.g. DPO pair starts) when a
    term spans several tokens. chunk_size: tokens per chunk (default: default_chunk_size(V)).
    row_impl: "auto" (Triton rows on CUDA, torch on CPU), "triton" (CPU: under TRITON_INTERPRET=1), "torch".
    tp_group: vocab (tensor) parallel - weight holds global rows [vocab_start, vocab_start + V); "default" for
    the default group. Every rank must pass the same hidden, targets and loss_fn.
    Returns (loss fp32 scalar, differentiable w.r.t. hidden and weight; logp (N,) fp32 detached; entropy (N,)
    fp32 detached or None).
    """
    _check_inputs(hidden, weight, targets)
    row_impl = _resolve_row_impl(row_impl, hidden)
    N, V = hidden.shape[0], weight.shape[0]
    chunks = plan_chunks(N, chunk_size or default_chunk_size(V), cuts)
    if N == 0:
        raise ValueError("fused_linear_loss: no tokens (hidden has 0 rows)")
    grad = torch.is_grad_enabled()
    need_hidden, need_weight = grad and hidden.requires_grad, grad and weight.requires_grad
    with torch.autocast(hidden.device.type, enabled=False):  # the kernel picks its own precisions
        loss, logp, entropy = _FusedLinearLossFn.apply(
            hidden, weight, targets.contiguous(), loss_fn, chunks, return_entropy, ignore_index, row_impl,
            int(vocab_start), tp_group, need_hidden, need_weight)
    return loss, logp, (entropy if return_entropy else None)

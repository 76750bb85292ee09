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
    row kernel 2 reads z, writes dz = g_logp (onehot - p) - g_ent p (z - E_p[z]) (weight dtype, own buffer)
    dX_c = dz W                                                                              2 C H V
    dW   = dz^T X_c  (first chunk: writes the fp32 accumulator, no separate zeroing)         2 C H V
    dW  += dz^T X_c  (later chunks: addmm into it, in place, no temporary of V x H)

Total 6NHV; autograd's backward only multiplies the stored dX and dW by the incoming scalar gradient, one pass
each that also casts to the parameter's dtype (rows.scale_cast).
The row kernels are Triton (one program per row, fp32 online log-sum-exp) on CUDA, and torch ops on CPU (the
Triton interpreter runs them in the tests); they live in rows.py, shared with linear_logprobs.py.

Memory (beyond inputs, outputs and the fp32 V x H dW accumulator): one (C, V) fp32 logits block and one (C, V)
dz block in the weight's 16-bit dtype (fp32 weights: dz over z, see rows._row_grad_kernel; a bf16 dz written
into the fp32 block raced: one warp's store of tile j lands on tile j/2's columns, still read by other warps).
dX is written per chunk in the hidden dtype (fp32 buffer under tensor parallel, all-reduced once). Chunk size:
see `default_chunk_size`.

Tensor (vocab) parallel: each rank holds rows [vocab_start, vocab_start + V_r) of W. Row kernel 1 gives the
shard's lse, target logit and E_p[z]; ranks combine them into the global ones (max / sum-exp all-reduce, C
numbers each), every rank evaluates the same loss_fn, row kernel 2 uses the global lse, each rank keeps its dW
shard, and the (N, H) dX partials are summed once at the end.

No host sync: chunk bounds are host integers planned from shapes (and host-side pair starts for DPO); ignored
tokens (target == ignore_index) get dz = 0 inside the row kernel (their logits are still computed: skipping
them would need their count on the host).
"""
import torch
import torch.distributed as dist

from .rows import (_addmm_acc, _check_inputs, _mm_into, combine_vocab_shards, dz_buffer, resolve_row_impl, row_fns,
                   scale_cast)


# ---------------------------------------------------------------------------------------------------------------
# Chunk planning
# ---------------------------------------------------------------------------------------------------------------
# The machine figures the chunk choice rests on (H100/H200 SXM): the bf16 matmul rate cuBLAS reaches at these
# shapes and a large device-to-device copy's bandwidth (bytes read + written). bench/bench_losses.py measures both
# on the machine it runs on and prints the chunk size they give beside this default.
MATMUL_RATE = 700e12  # FLOP/s
COPY_BANDWIDTH = 3.3e12  # B/s


def default_chunk_size(V, weight_bytes=2, budget_bytes=3 << 30, overhead=0.05, rate=MATMUL_RATE,
                       bandwidth=COPY_BANDWIDTH):
    """Tokens per chunk C (a multiple of 256, 256..32768) for a vocab of V rows.

    What depends on C: every chunk but the first re-reads and rewrites the fp32 V x H dW accumulator (8 V H
    bytes; the first chunk only writes it) while its three matmuls do 6 C H V FLOPs, so the re-read adds
    (8 V H / B) / (6 C H V / R) = 4 R / (3 C B) of the matmul time, whatever H. Everything else (the logits
    written and read, dz, dX) is proportional to the tokens, not to C. C is the smallest multiple of 256 that
    keeps that overhead at most `overhead` (5%: C >= 26.7 R / B, 5632 at R 700 TFLOP/s, B 3.3 TB/s), capped by
    memory: the (C, V) fp32 logits and the (C, V) dz in the weight's dtype (weight_bytes; fp32 weights write dz
    over the logits) within budget_bytes. 3 GiB gives C = 4096 at V = 128256 with bf16 weights (6.9%)."""
    need = 4 * rate / (3 * overhead * bandwidth)
    c_time = -(-need // 256) * 256
    per_token = V * (4 + (weight_bytes if weight_bytes < 4 else 0))
    c_mem = budget_bytes // max(per_token, 1) // 256 * 256
    return int(max(256, min(32768, c_time, c_mem)))


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
        stats_fn, grad_fn = row_fns(row_impl)
        need_grad = need_hidden or need_weight
        f32 = dict(dtype=torch.float32, device=dev)
        lse, tgt, ez = (torch.zeros(N, **f32) for _ in range(3))
        logp, entropy = torch.zeros(N, **f32), torch.zeros(N if want_entropy else 0, **f32)
        loss = torch.zeros((), **f32)
        z_buf = torch.empty(max(e - s for s, e in chunks), V, **f32)  # the one (C, V) block, reused
        dz_buf = dz_buffer(z_buf, weight.dtype) if need_grad else None
        dx = None
        if need_hidden:  # fp32 partial sums under tensor parallel (all-reduced once), else the output dtype
            dx = torch.empty(N, H, dtype=torch.float32 if tp_group is not None else hidden.dtype, device=dev)
        dw = torch.empty(V, H, **f32) if need_weight else None  # no zeroing: the first chunk writes it whole
        w_t = weight.t()
        for s, e in chunks:
            x_c, t_c = hidden[s:e], targets[s:e]
            z = z_buf[:e - s]
            _mm_into(x_c, w_t, z)  # (C, V) fp32
            stats_fn(z, t_c, vocab_start, ignore_index, want_entropy, lse[s:e], tgt[s:e], ez[s:e])
            if tp_group is not None:  # global statistics from the shards' (see rows.combine_vocab_shards)
                lse[s:e], tgt[s:e], ez[s:e] = combine_vocab_shards(lse[s:e], tgt[s:e], ez[s:e],
                                                                   t_c != ignore_index, group)
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
            dz = dz_buf[:e - s]
            grad_fn(z, dz, t_c, lse[s:e], g_lp.float().contiguous(), a.float().contiguous(),
                    None if b is None else b.float().contiguous(), vocab_start, ignore_index)
            if need_hidden:
                _mm_into(dz, weight, dx[s:e])  # (C, H)
            if need_weight:  # (V, H) = or += (V, C) @ (C, H)
                if s == chunks[0][0]:
                    _mm_into(dz.t(), x_c, dw)
                else:
                    _addmm_acc(dw, dz.t(), x_c)
        del z_buf, dz_buf
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
        # one pass over each: scale and cast together (in place when the dtype already matches)
        d_hidden = scale_cast(dx, grad_loss, ctx.dtypes[0]) if dx is not None else None
        d_weight = scale_cast(dw, grad_loss, ctx.dtypes[1]) if dw is not None else None
        return (d_hidden, d_weight) + (None,) * 10


def fused_linear_loss(hidden, weight, targets, loss_fn, *, ignore_index=-100, return_entropy=False,
                      chunk_size=None, cuts=None, row_impl="auto", vocab_start=0, tp_group=None):
    """A loss of the per-token log-probs of hidden @ weight.T, forward and backward at 6NHV, no (N, V) logits.

    hidden (N, H), weight (V, H) same dtype, targets (N,) int (ignore_index: not trained, logp 0).
    loss_fn(logp_c, entropy_c, start, end) -> scalar: the loss of tokens [start, end) from their fp32 log-probs
    (and entropies when return_entropy; else None); the total loss is the sum over chunks. It must depend only on
    those tokens: pass `cuts` (sorted host token offsets where a chunk may end, e.g. DPO pair starts) when a
    term spans several tokens. chunk_size: tokens per chunk (default: default_chunk_size).
    row_impl: "auto" (Triton rows on CUDA, torch on CPU), "triton" (CPU: under TRITON_INTERPRET=1), "torch".
    tp_group: vocab (tensor) parallel - weight holds global rows [vocab_start, vocab_start + V); "default" for
    the default group. Every rank must pass the same hidden, targets and loss_fn.
    Returns (loss fp32 scalar, differentiable w.r.t. hidden and weight; logp (N,) fp32 detached; entropy (N,)
    fp32 detached or None).
    """
    _check_inputs(hidden, weight, targets)
    row_impl = resolve_row_impl(row_impl, hidden.device)
    N, V = hidden.shape[0], weight.shape[0]
    chunks = plan_chunks(N, chunk_size or default_chunk_size(V, weight.element_size()), cuts)
    if N == 0:
        raise ValueError("fused_linear_loss: no tokens (hidden has 0 rows)")
    grad = torch.is_grad_enabled()
    need_hidden, need_weight = grad and hidden.requires_grad, grad and weight.requires_grad
    with torch.autocast(hidden.device.type, enabled=False):  # the kernel picks its own precisions
        loss, logp, entropy = _FusedLinearLossFn.apply(
            hidden, weight, targets.contiguous(), loss_fn, chunks, return_entropy, ignore_index, row_impl,
            int(vocab_start), tp_group, need_hidden, need_weight)
    return loss, logp, (entropy if return_entropy else None)

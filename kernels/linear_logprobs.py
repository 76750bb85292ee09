"""Fused linear + log-softmax: per-token log-probs and cross-entropy without the (N, V) logits.

Notation: hidden X (N, H), output weight W (V, H), targets t (N,), logits z = X W^T (N, V), never stored whole.
Per token n: lse_n = log sum_v exp(z_nv), logp_n = z_n,t - lse_n, entropy_n = lse_n - sum_v p_nv z_nv.

Gradient with respect to the logits, for per-token upstream gradients g_logp, g_lse, g_ent (any values: DPO and
GRPO weight tokens differently):
    dz_nv = g_logp_n * [v == t_n] + p_nv * (a_n + b_n * z_nv)
    a_n = g_lse_n - g_logp_n + g_ent_n * (lse_n - entropy_n),   b_n = -g_ent_n
(d logp/dz = onehot - p, d lse/dz = p, d entropy/dz = -p (z - E_p[z])). dX = dz W and dW = dz^T X.

Three implementations of the same two primitives, `logprob_stats` (lse, target logit, E_p[z]) and
`logprob_grads` (dX, dW from the coefficients above):
- "chunked" (the default, impl "auto"): chunks of C tokens, z = X_c W^T by one matmul into an fp32 (C, V) block
  (cuBLAS on GPU), then the row kernels of rows.py (Triton on CUDA, torch on CPU): stats read z once; grads
  write dz (own 16-bit buffer), then dX_c = dz W and dW (first chunk) = or += dz^T X_c. Without a gradient
  (DPO reference, GRPO/PPO old and reference passes) only the matmul and the row-stats kernel run: 2NHV, no
  gradient buffers.
- "triton": tiles of (BLOCK_N x BLOCK_V) logits live only in registers. The stats kernel streams W once per
  block of tokens with an online, fp32 log-sum-exp. The grads kernel recomputes each logit tile, forms dz in
  registers and adds dz W and dz^T X into fp32 buffers with atomics. Tiles whose tokens are all ignored return
  at once (no matmul work, no host sync: the check is inside the kernel). The memory-lean option (no logits
  block), never a default: it re-streams X per vocab tile and issues ~1e11 fp32 atomics at N 8192, V 128256.
- "torch": chunks of `chunk_size` tokens in plain torch ops; the reference the other two are tested against.

FLOP count (the softmax is negligible):
- linear_logprobs (per-token upstream gradient, every impl): forward 2NHV (logits for the lse), backward 6NHV
  (recompute logits 2, dX 2, dW 2) = 8NHV. The upstream gradient is unknown in the forward pass, and the
  softmax needs a row's whole lse before any dz, so without keeping (N, V) logits 8NHV is the floor.
- linear_cross_entropy, reduction sum/mean (impl auto, fused, torch): the chunked loss-fused path of
  chunked_loss.py, 6NHV (gradient formed in the forward pass), and what DPO and GRPO use through
  fused_linear_loss. The tile kernels here are the memory-lean option: no logits in memory, 8NHV.

Tile kernels' dW accumulation: fp32 atomics (order-dependent in the last bits, ~1e-7 relative), launched on a
diagonal grid so that CTAs running together add into different dW and dX tiles (see _grads_kernel): the atomics are
as many as before (N/BLOCK_N x V x H adds to dW) but no longer queue on the same addresses. The deterministic
alternative (a program owns V rows of dW and loops over all tokens) cannot hold its BLOCK_V x H fp32 accumulator on
chip at H = 4096 and would either read/write it in HBM once per token tile or recompute the logits once per H block;
both cost far more than the atomics. To bound the fp32 scratch, the grads kernel runs once per chunk of `v_chunk`
vocab rows and casts that chunk of dW to the weight's dtype; dX accumulates in an (N, H) fp32 buffer.

Vocab parallel: `vocab_start` shifts the targets onto a vocab shard (targets outside contribute 0), and
`logprob_grads` takes an external lse, so ranks can combine partial lse and share the global one
(see vocab_parallel_linear_logprobs).
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .chunked_loss import default_chunk_size, fused_linear_loss
from .rows import (INTERPRET, _addmm_acc, _check_inputs, _mm_f32, _mm_into, _target_index, _torch_dz,
                   combine_vocab_shards, dz_buffer, resolve_row_impl, row_fns)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _logit_tile(X, W, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # z = X[rows] @ W[cols]^T, (BLOCK_N, BLOCK_V) fp32; masked rows/cols read zeros.
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    x_row = rows.to(tl.int64)[:, None] * stride_x  # int64: V x H passes 2^31 elements at large vocab and width
    w_row = cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        # upcast after the load: the interpreter needs fp32 (its bf16 arithmetic is wrong), the GPU bf16
        x = tl.load(X + x_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + w_row + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), z, input_precision=PRECISION)
    return z


@triton.jit
def _stats_kernel(X, W, T, LSE, TGT, EZ,  # LSE, TGT, EZ: (n_split, N) fp32 partials
                  N, V, H, vocab_start, ignore_index, v_per_split, stride_x, stride_w,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # One program: BLOCK_N tokens x one split of the vocab, online log-sum-exp over its V tiles.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    t = tl.load(T + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (t != ignore_index)
    t_local = t - vocab_start

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum of exp(z - m)
    sz = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum of exp(z - m) * z
    tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:  # all-ignored tiles do no matmul work
        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_hi
            z = _logit_tile(X, W, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
            z0 = tl.where(col_ok[None, :], z, 0.0)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has one valid column
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V), 0 on masked columns
            s = s * scale + tl.sum(e, axis=1)
            sz = sz * scale + tl.sum(e * z0, axis=1)
            tgt += tl.sum(tl.where(cols[None, :] == t_local[:, None], z0, 0.0), axis=1)
            m = m_new
    s_safe = tl.where(s > 0, s, 1.0)
    lse = tl.where(s > 0, m + tl.log(s_safe), float("-inf"))  # -inf where skipped
    ez = sz / s_safe
    out = pid_s * N + rows
    tl.store(LSE + out, lse, mask=row_ok)
    tl.store(TGT + out, tgt, mask=row_ok)
    tl.store(EZ + out, ez, mask=row_ok)


@triton.jit
def _grads_kernel(X, W, T, LSE, GT, CA, CB, DX, DW,  # DX (N, H) fp32, DW (V, H) fp32 for this vocab chunk
                  N, V, H, vocab_start, ignore_index, stride_x, stride_w, stride_dx, stride_dw,
                  COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # One program: one (BLOCK_N, BLOCK_V) tile: recompute z, form dz, add dz W to dX and dz^T X to dW.
    # Diagonal order of the 1-D grid: program L takes token block n = L mod n_blocks and vocab tile
    # v = (L div n_blocks + n) mod v_tiles (a bijection onto all tiles). CTAs resident together (consecutive L)
    # then hold distinct token blocks AND distinct vocab tiles, so no dW row tile (nor dX row block) is the
    # target of more than ~2-3 concurrent atomic streams; the plain (n fastest) order sent every resident CTA's
    # dW atomics to the same one or two vocab tiles (128-way contention at N = 8192, BLOCK_N = 64).
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_blocks
    pid_v = (pid // n_blocks + pid_n) % tl.cdiv(V, BLOCK_V)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    t = tl.load(T + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (t != ignore_index)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(X, W, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
        lse = tl.load(LSE + rows, mask=valid, other=0.0)
        g_t = tl.load(GT + rows, mask=valid, other=0.0)
        a = tl.load(CA + rows, mask=valid, other=0.0)
        b = tl.load(CB + rows, mask=valid, other=0.0)
        keep = valid[:, None] & col_ok[None, :]
        p = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)  # exp may overflow on ignored rows: masked here
        dz = p * (a[:, None] + b[:, None] * z)
        dz += tl.where((cols[None, :] == (t - vocab_start)[:, None]) & keep, g_t[:, None], 0.0)
        dz = dz.to(DOT_DTYPE)  # bf16 on GPU, as the dots' inputs; accumulation stays fp32
        rows64 = rows.to(tl.int64)[:, None]
        cols64 = cols.to(tl.int64)[:, None]
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            if COMPUTE_DX:
                w = tl.load(W + cols64 * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                            other=0.0).to(DOT_DTYPE)
                dx = tl.dot(dz, w, input_precision=PRECISION)  # (BLOCK_N, BLOCK_H)
                tl.atomic_add(DX + rows64 * stride_dx + ks[None, :], dx,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if COMPUTE_DW:
                x = tl.load(X + rows64 * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0).to(DOT_DTYPE)
                dw = tl.dot(tl.trans(dz), x, input_precision=PRECISION)  # (BLOCK_V, BLOCK_H)
                tl.atomic_add(DW + cols64 * stride_dw + ks[None, :], dw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------------------------
# Default GPU launch configurations, (kernel, constexprs, num_warps, num_stages): the launchers read them and
# `python -m nanotulu.kernels.report` compiles each for sm_90a (tests/test_sm90_compile.py fails on any spill).
# Chosen from the sm_90a compile WITH the specialisations a real launch gets (16-byte aligned pointers, sizes and
# strides divisible by 16; kernels/report.py). An earlier choice read an unhinted compile (254 / 199 registers,
# scalar loads, no cp.async pipelining) and wrongly blamed spills; hinted, at 8 warps:
#   stats 128x64x64: 140 registers; 128x128x64: 255, no spill. Both exceed 128, so one CTA (8 warps) per SM
#     either way; BLOCK_V 128 halves the re-reads of the X block (one per vocab tile): chosen.
#   grads 64x128x32: 127 registers, 86 KB shared -> two CTAs per SM (their atomics overlap the other's dots);
#     64x128x64: 145 registers -> one CTA per SM; 128x128x32: 255. Kept 64x128x32.
# These are the memory-lean option (impl="triton"), never a default path.
GPU_CONFIGS = [
    ("_stats_kernel", dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64), 8, 3),
    ("_grads_kernel", dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, COMPUTE_DX=True, COMPUTE_DW=True), 8, 3),
    ("_grads_kernel", dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, COMPUTE_DX=True, COMPUTE_DW=False), 8, 3),
    ("_grads_kernel", dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, COMPUTE_DX=False, COMPUTE_DW=True), 8, 3),
]


def _triton_config(hidden, kernel, block_n, block_v, block_h):
    if INTERPRET or not hidden.is_cuda:
        # the interpreter runs each program in numpy: few, mid-sized tiles; fp32 dots (bf16 is garbage there)
        dot_dtype, precision = tl.float32, "ieee"
        bn, bv, bh, warps, stages = 16, 32, 32, 1, 1
    else:
        dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(hidden.dtype, tl.float32)
        precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
        c, warps, stages = next((c, w, st) for k, c, w, st in GPU_CONFIGS if k == "_" + kernel + "_kernel")
        bn, bv, bh = c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_H"]
    return dict(BLOCK_N=block_n or bn, BLOCK_V=block_v or bv, BLOCK_H=block_h or bh,
                DOT_DTYPE=dot_dtype, PRECISION=precision), warps, stages


def _triton_stats(hidden, weight, targets, vocab_start, ignore_index, n_split=None,
                  block_n=None, block_v=None, block_h=None):
    N, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    cfg, warps, stages = _triton_config(hidden, "stats", block_n, block_v, block_h)
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    v_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    if n_split is None:
        # split the vocab so small N still fills the GPU (about 2 programs per SM); a shape-only choice
        sms = 2 if not hidden.is_cuda else torch.cuda.get_device_properties(hidden.device).multi_processor_count
        n_split = min(v_tiles, max(1, triton.cdiv(2 * sms, n_blocks)))
    v_per_split = triton.cdiv(v_tiles, n_split) * cfg["BLOCK_V"]
    n_split = triton.cdiv(V, v_per_split)
    lse_p = torch.empty(n_split, N, dtype=torch.float32, device=hidden.device)
    tgt_p = torch.empty_like(lse_p)
    ez_p = torch.empty_like(lse_p)
    _stats_kernel[(n_blocks, n_split)](
        hidden, weight, targets, lse_p, tgt_p, ez_p, N, V, H, vocab_start, ignore_index, v_per_split,
        hidden.stride(0), weight.stride(0), num_warps=warps, num_stages=stages, **cfg)
    # combine the splits, (n_split, N) -> (N,): all on device, no sync
    valid = targets != ignore_index
    lse = torch.logsumexp(lse_p, dim=0)
    ez = (torch.exp(lse_p - lse) * ez_p).sum(0)
    zero = torch.zeros((), device=hidden.device)
    return torch.where(valid, lse, zero), torch.where(valid, tgt_p.sum(0), zero), torch.where(valid, ez, zero)


def _triton_grads(hidden, weight, targets, lse, g_target, coef_p, coef_pz, vocab_start, ignore_index,
                  need_hidden, need_weight, v_chunk=None, block_n=None, block_v=None, block_h=None):
    N, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    cfg, warps, stages = _triton_config(hidden, "grads", block_n, block_v, block_h)
    dx = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw = torch.empty_like(weight) if need_weight else None
    if v_chunk is None:
        v_chunk = V if weight.dtype == torch.float32 else 16384  # 16384 x 4096 fp32 scratch = 256 MiB
    v_chunk = triton.cdiv(v_chunk, cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    dw32 = None
    if need_weight and weight.dtype != torch.float32:
        dw32 = torch.empty(min(v_chunk, V), H, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, V, v_chunk):  # host loop over shapes only: no sync
        v1 = min(v0 + v_chunk, V)
        w_c = weight[v0:v1]
        if need_weight:
            dw_c = dw[v0:v1] if dw32 is None else dw32[: v1 - v0]
            dw_c.zero_()
        else:
            dw_c = lse  # unused pointer
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(v1 - v0, cfg["BLOCK_V"]),)  # diagonal order
        _grads_kernel[grid](
            hidden, w_c, targets, lse, g_target, coef_p, coef_pz, dx if need_hidden else lse, dw_c,
            N, v1 - v0, H, vocab_start + v0, ignore_index, hidden.stride(0), w_c.stride(0),
            H, H, COMPUTE_DX=need_hidden, COMPUTE_DW=need_weight, num_warps=warps, num_stages=stages, **cfg)
        if dw32 is not None:
            dw[v0:v1].copy_(dw_c)
    return dx, dw


# ---------------------------------------------------------------------------------------------------------------
# Chunked PyTorch implementation (CPU training, reference for the Triton path)
# ---------------------------------------------------------------------------------------------------------------
def _default_chunk(V):
    return max(16, min(4096, (1 << 27) // max(V, 1)))  # a (chunk, V) fp32 block of at most 512 MiB


def _torch_stats(hidden, weight, targets, vocab_start, ignore_index, chunk_size=None):
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or _default_chunk(V)
    valid, inside, t_idx = _target_index(targets, V, vocab_start, ignore_index)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    tgt = torch.empty_like(lse)
    ez = torch.empty_like(lse)
    w_t = weight.t()
    for s in range(0, N, chunk):
        z = _mm_f32(hidden[s:s + chunk], w_t)  # (C, V) fp32
        lse_c = torch.logsumexp(z, dim=1)
        lse[s:s + chunk] = lse_c
        ez[s:s + chunk] = (torch.softmax(z, dim=1) * z).sum(1)
        tgt[s:s + chunk] = z.gather(1, t_idx[s:s + chunk, None]).squeeze(1)
    zero = torch.zeros((), device=hidden.device)
    return torch.where(valid, lse, zero), torch.where(inside, tgt, zero), torch.where(valid, ez, zero)


def _torch_grads(hidden, weight, targets, lse, g_target, coef_p, coef_pz, vocab_start, ignore_index,
                 need_hidden, need_weight, chunk_size=None):
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or _default_chunk(V)
    valid, inside, t_idx = _target_index(targets, V, vocab_start, ignore_index)
    dx = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw32 = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if need_weight else None
    w_t = weight.t()
    for s in range(0, N, chunk):
        e = s + chunk
        z = _mm_f32(hidden[s:e], w_t)
        dz = _torch_dz(z, lse[s:e], g_target[s:e], coef_p[s:e], coef_pz[s:e], valid[s:e], inside[s:e], t_idx[s:e])
        if need_hidden:
            dx[s:e] = _mm_f32(dz, weight)
        if need_weight:
            dw32 += _mm_f32(dz.t(), hidden[s:e])
    return dx, (dw32.to(weight.dtype) if need_weight else None)


# ---------------------------------------------------------------------------------------------------------------
# Chunked matmul + row kernels: the default on every device (cuBLAS logits, then the memory-bound row kernels)
# ---------------------------------------------------------------------------------------------------------------
def _chunked_stats(hidden, weight, targets, vocab_start, ignore_index, want_ez=True, chunk_size=None,
                   row_impl="auto"):
    # per chunk: z = X_c W^T (C, V) fp32 by one matmul (2 C H V), then row kernel 1 reads z once. No gradient
    # buffers: what the no-grad passes (DPO reference, GRPO/PPO old and reference log-probs) run.
    N, V = hidden.shape[0], weight.shape[0]
    stats_fn, _ = row_fns(resolve_row_impl(row_impl, hidden.device))
    C = max(1, min(chunk_size or default_chunk_size(V, weight.element_size()), N))
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt, ez = torch.empty(N, **f32), torch.empty(N, **f32), torch.zeros(N if want_ez else 0, **f32)
    z_buf = torch.empty(C, V, **f32)
    w_t = weight.t()
    for s in range(0, N, C):
        e = min(s + C, N)
        z = z_buf[:e - s]
        _mm_into(hidden[s:e], w_t, z)
        stats_fn(z, targets[s:e], vocab_start, ignore_index, want_ez, lse[s:e], tgt[s:e], ez[s:e] if want_ez else ez)
    return lse, tgt, (ez if want_ez else torch.zeros_like(lse))


def _chunked_grads(hidden, weight, targets, lse, g_target, coef_p, coef_pz, vocab_start, ignore_index,
                   need_hidden, need_weight, chunk_size=None, row_impl="auto", addmm_path=None):
    # per chunk: z again (2 C H V), row kernel 2 -> dz (weight dtype, own buffer), dX_c = dz W (2 C H V) written,
    # dW = (first chunk) or += dz^T X_c (2 C H V) into one fp32 accumulator, cast once at the end
    N, H = hidden.shape
    V = weight.shape[0]
    _, grad_fn = row_fns(resolve_row_impl(row_impl, hidden.device))
    C = max(1, min(chunk_size or default_chunk_size(V, weight.element_size()), N))
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dx = torch.empty(N, H, **f32) if need_hidden else None  # every row written by its chunk
    dw = torch.empty(V, H, **f32) if need_weight else None  # written whole by the first chunk
    z_buf = torch.empty(C, V, **f32)
    dz_buf = dz_buffer(z_buf, weight.dtype)
    w_t = weight.t()
    for s in range(0, N, C):
        e = min(s + C, N)
        x_c, z, dz = hidden[s:e], z_buf[:e - s], dz_buf[:e - s]
        _mm_into(x_c, w_t, z)
        grad_fn(z, dz, targets[s:e], lse[s:e], g_target[s:e], coef_p[s:e], coef_pz[s:e], vocab_start, ignore_index)
        if need_hidden:
            _mm_into(dz, weight, dx[s:e])
        if need_weight:
            if s == 0:
                _mm_into(dz.t(), x_c, dw)
            else:
                _addmm_acc(dw, dz.t(), x_c, path=addmm_path)
    del z_buf, dz_buf
    return dx, (dw.to(weight.dtype) if need_weight else None)


# ---------------------------------------------------------------------------------------------------------------
# Low-level primitives (explicit vocab offset, external lse): what the vocab-parallel combine is built on
# ---------------------------------------------------------------------------------------------------------------
IMPLS = ("auto", "chunked", "fused", "triton", "torch")


def _resolve_impl(impl, hidden):
    """-> (path, row_impl). "auto" / "chunked": matmul + row kernels (Triton rows on CUDA, torch rows on CPU);
    "fused": the same with the Triton rows even on CPU (interpreted); "triton": the tile kernels (8NHV, no logits
    block in memory, fp32 atomics: the memory-lean option, never a default); "torch": the plain chunked torch
    reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl in ("auto", "chunked"):
        return "chunked", "auto"
    if impl == "fused":
        return "chunked", "triton"
    return impl, None


def logprob_stats(hidden, weight, targets, *, vocab_start=0, ignore_index=-100, impl="auto", **kw):
    """Per-token statistics of the softmax over this weight's vocab rows (no autograd).

    hidden (N, H), weight (V, H) holding global vocab ids [vocab_start, vocab_start + V), targets (N,) global ids.
    Returns fp32 (N,) tensors (lse, target_logit, mean_logit): lse of the local logits, the target's logit (0 when
    the target is outside the shard), and E_p[z] under the local softmax. All three are 0 on ignored tokens.
    """
    _check_inputs(hidden, weight, targets)
    path, row_impl = _resolve_impl(impl, hidden)
    if path == "chunked":
        return _chunked_stats(hidden, weight, targets, vocab_start, ignore_index, row_impl=row_impl, **kw)
    if path == "triton":
        return _triton_stats(hidden, weight, targets, vocab_start, ignore_index, **kw)
    return _torch_stats(hidden, weight, targets, vocab_start, ignore_index, **kw)


def logprob_grads(hidden, weight, targets, lse, g_target, coef_p, coef_pz, *, vocab_start=0, ignore_index=-100,
                  need_hidden=True, need_weight=True, impl="auto", **kw):
    """dX = dz W and dW = dz^T X for dz_nv = g_target_n [v == t_n] + p_nv (coef_p_n + coef_pz_n z_nv).

    p = exp(z - lse) with the lse given (the global one in vocab parallel); all per-token inputs fp32 (N,).
    Returns (d_hidden fp32 (N, H) or None, d_weight (V, H) in weight.dtype or None); ignored tokens give 0.
    """
    _check_inputs(hidden, weight, targets)
    path, row_impl = _resolve_impl(impl, hidden)
    f32 = [x.float().contiguous() for x in (lse, g_target, coef_p, coef_pz)]
    if path == "chunked":
        return _chunked_grads(hidden, weight, targets, *f32, vocab_start, ignore_index, need_hidden, need_weight,
                              row_impl=row_impl, **kw)
    fn = _triton_grads if path == "triton" else _torch_grads
    return fn(hidden, weight, targets, *f32, vocab_start, ignore_index, need_hidden, need_weight, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------------------------------
class _LinearLogprobsFn(torch.autograd.Function):
    """(logp, lse, entropy) per token; with tp_group set, weight is a vocab shard and ranks combine."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, ignore_index, impl, tp_group, want_ez, kw):
        stats_kw = dict(kw.get("stats", {}))
        if _resolve_impl(impl, hidden)[0] == "chunked":  # E_p[z] only when the entropy is asked for
            stats_kw["want_ez"] = want_ez
        lse, tgt, ez = logprob_stats(hidden, weight, targets, vocab_start=vocab_start, ignore_index=ignore_index,
                                     impl=impl, **stats_kw)
        if tp_group is not None:  # combine the shards (see rows.combine_vocab_shards)
            lse, tgt, ez = combine_vocab_shards(lse, tgt, ez, targets != ignore_index,
                                                None if tp_group == "default" else tp_group)
        logp = tgt - lse
        entropy = lse - ez
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.args = (vocab_start, ignore_index, impl, tp_group, kw.get("grads", {}))
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        vocab_start, ignore_index, impl, tp_group, kw = ctx.args
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return (None,) * 9
        coef_p = g_lse - g_logp + g_ent * (lse - entropy)  # see the module docstring
        d_hidden, d_weight = logprob_grads(
            hidden, weight, targets, lse, g_logp, coef_p, -g_ent, vocab_start=vocab_start,
            ignore_index=ignore_index, need_hidden=need_hidden, need_weight=need_weight, impl=impl, **kw)
        if d_hidden is not None:
            if tp_group is not None:  # each shard gave its vocab's part of dX
                dist.all_reduce(d_hidden, group=None if tp_group == "default" else tp_group)
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def _pick(outputs, return_lse, return_entropy):
    logp, lse, entropy = outputs
    if not (return_lse or return_entropy):
        return logp
    return (logp,) + ((lse,) if return_lse else ()) + ((entropy,) if return_entropy else ())


def linear_logprobs(hidden, weight, targets, ignore_index=-100, *, return_lse=False, return_entropy=False,
                    impl="auto", **kw):
    """log p(target) per token for logits = hidden @ weight.T, without materialising the logits.

    hidden (N, H), weight (V, H) same dtype, targets (N,) int. Returns logps (N,) fp32 (0 where ignored), or a
    tuple (logps, [lse], [entropy]) with the extras asked for, each fp32 (N,). Differentiable with respect to
    hidden and weight for any upstream gradient per token, through all returned outputs.
    impl: "auto" (chunked matmul + row kernels: Triton rows on CUDA, torch rows on CPU; without a gradient only
    the matmul and row-stats kernel run, no gradient buffers), "fused" (the same with Triton rows on CPU too),
    "triton" (the tile kernels: the memory-lean option; CPU under TRITON_INTERPRET=1), "torch" (reference).
    kw: expert knobs for tests and tuning: stats={...}, grads={...} passed to the chosen implementation.
    """
    _check_inputs(hidden, weight, targets)
    _resolve_impl(impl, hidden)
    out = _LinearLogprobsFn.apply(hidden, weight, targets, 0, ignore_index, impl, None, return_entropy, kw)
    return _pick(out, return_lse, return_entropy)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum", *, impl="auto",
                         chunk_size=None):
    """Cross-entropy of logits = hidden @ weight.T against targets, without materialising the logits.

    reduction: "sum" (sum over trained tokens), "mean" (sum / max(trained tokens, 1): 0 when all are ignored,
    where torch's cross_entropy gives nan), "none" ((N,) fp32, 0 where ignored). Returns fp32.
    impl for sum/mean: "auto" (the chunked loss-fused path of chunked_loss.py, 6NHV: Triton rows on CUDA, torch
    rows on CPU), "fused" (that path with the Triton row kernels, interpreted on CPU), "torch" (that path with
    torch rows), "chunked" (= "auto"), "triton" (the tile-only kernels, 8NHV, no logits in memory).
    reduction "none" goes through linear_logprobs with the same impl (8NHV: the per-token upstream gradient is
    unknown in the forward).
    """
    _check_inputs(hidden, weight, targets)
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    _resolve_impl(impl, hidden)
    if reduction != "none" and impl != "triton":
        valid = targets != ignore_index
        # mean: the normaliser is counted on device before the chunks (no host sync)
        scale = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else None

        def loss_fn(logp, _entropy, start, end):
            total = -logp.sum()
            return total if scale is None else total * scale

        row_impl = {"auto": "auto", "chunked": "auto", "fused": "triton", "torch": "torch"}[impl]
        return fused_linear_loss(hidden, weight, targets, loss_fn, ignore_index=ignore_index,
                                 chunk_size=chunk_size, row_impl=row_impl)[0]
    kw = {} if chunk_size is None or impl == "triton" else dict(stats=dict(chunk_size=chunk_size),
                                                                grads=dict(chunk_size=chunk_size))
    losses = -linear_logprobs(hidden, weight, targets, ignore_index, impl=impl, **kw)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "mean":
        total = total / (targets != ignore_index).sum().clamp(min=1)
    return total


def vocab_parallel_linear_logprobs(hidden, weight_shard, targets, vocab_start, group=None, ignore_index=-100, *,
                                   return_lse=False, return_entropy=False, impl="auto", **kw):
    """linear_logprobs with the output weight split over the vocab across the ranks of `group` (tensor parallel).

    Each rank holds rows [vocab_start, vocab_start + V_shard) of the full weight and the full hidden (N, H) and
    targets (global ids). Ranks all-reduce the max and sum-exp of their partial lse and the sum of target logits;
    backward uses the global lse for the local dz, returns the local dW shard and all-reduces (sums) dX.
    Every rank gets the same logps; the loss built on them must be the same on every rank.
    """
    _check_inputs(hidden, weight_shard, targets)
    _resolve_impl(impl, hidden)
    out = _LinearLogprobsFn.apply(hidden, weight_shard, targets, int(vocab_start), ignore_index, impl,
                                  "default" if group is None else group, return_entropy, kw)
    return _pick(out, return_lse, return_entropy)

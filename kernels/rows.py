"""What the two loss paths share: row kernels over an fp32 logits block, their torch twins, fp32-output matmuls
of 16-bit operands, input checks and the tensor-parallel combine of per-shard softmax statistics.

Used by chunked_loss.py (fused_linear_loss, 6NHV) and linear_logprobs.py (per-token log-probs: the chunked
matmul + row path by default, the tile kernels as the memory-lean option); neither imports the other's private
helpers, and linear_logprobs.py imports chunked_loss.py only for `fused_linear_loss` / `default_chunk_size`.

Notation: hidden X (N, H), output weight W (V, H), targets t (N,), logits z = X W^T, one (C, V) fp32 block of a
chunk of C tokens at a time. Row kernel 1 reads z: lse, target logit, E_p[z]. Row kernel 2 reads z and the
per-token coefficients and writes dz = g [v == t] + p (a + b z) into a separate 16-bit (C, V) buffer (or over z
in fp32, see _row_grad_kernel). The rows are memory bound: one read of z (and one write of dz) per row.
"""
import logging
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
log = logging.getLogger("nanotulu.kernels")


# ---------------------------------------------------------------------------------------------------------------
# Input checks and target indexing
# ---------------------------------------------------------------------------------------------------------------
def _target_index(targets, V, vocab_start, ignore_index):
    # (N,) column of the target in this shard (0 when outside) and whether it is inside
    valid = targets != ignore_index
    t_local = targets - vocab_start
    inside = valid & (t_local >= 0) & (t_local < V)
    return valid, inside, torch.where(inside, t_local, torch.zeros_like(t_local))


def _torch_dz(z, lse, g_target, coef_p, coef_pz, valid, inside, t_idx):
    # dz = g_target * onehot + p * (coef_p + coef_pz * z), zero on ignored rows; (C, V) fp32
    p = torch.exp(z - torch.where(valid, lse, 0.0)[:, None])
    dz = p * (coef_p[:, None] + coef_pz[:, None] * z)
    dz.scatter_add_(1, t_idx[:, None], torch.where(inside, g_target, 0.0)[:, None])
    return torch.where(valid[:, None], dz, 0.0)


def _check_inputs(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)} (flatten batch and time into N first)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size differs: hidden (N, {hidden.shape[1]}) vs weight (V, {weight.shape[1]})")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be ({hidden.shape[0]},) to match hidden, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets on different devices: "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")


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
    # dz = g [v == t] + p (a + b z), p = exp(z - lse); 0 on ignored rows (their exp(z - 0) may overflow: selected
    # away, never multiplied in). DZ is a separate buffer, or Z itself when both are fp32: each element is then
    # stored by the thread that loaded it, at the address it loaded, after the load (a data dependency). A 16-bit
    # DZ must not alias Z: a bf16 store of column c lands in fp32 column c/2, loaded by another warp (tile j's
    # stores land on tile j/2's columns), and nothing orders one warp's store after another warp's load.
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
# `python -m nanotulu.kernels.report` compiles each for sm_90a with a real launch's specialisations (tests/
# test_sm90_compile.py fails on any spill or scalar load). The rows are memory bound: what matters is 16-byte
# loads and enough bytes in flight. 2048 fp32 per tile over 8 warps = 8 per thread = two 16-byte loads (the hinted
# compile shows ld.global.v4; unhinted it is scalar). 26-44 registers: at least 5 CTAs (40 warps) per SM, 40 KB
# of loads in flight per SM, above the ~25 KB Little's law asks at 4.8 TB/s and ~0.7 us over 132 SMs. A wider
# tile would only add registers; num_stages has no effect on these loops (no dot: nothing to pipeline).
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
    """out = a @ b (out may be fp32 with 16-bit a, b): writes every element of out, reads nothing of it."""
    if a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif out.is_cuda:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # CPU with 16-bit operands (tests): no mixed-dtype CPU kernel
        out.copy_(torch.mm(a.float(), b.float()))


def _mm_f32(a, b):
    """a @ b as a new fp32 tensor. 16-bit CUDA operands: tensor-core matmul with fp32 output, no upcast copy."""
    if a.is_cuda and b.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


_ADDMM_PATH = {}  # device type -> "addmm" or "row blocks": how _addmm_acc accumulated 16-bit products (B6)


def addmm_path(device_type="cuda"):
    """Which path _addmm_acc took on this device type: "addmm" (one cuBLAS call with an fp32 C/D matrix:
    addmm.dtype_out), "row blocks" (this torch refuses an fp32 `self` there: row blocks of the accumulator plus a
    bounded fp32 temporary, correct but slower), or None (no 16-bit accumulation ran yet)."""
    return _ADDMM_PATH.get(device_type)


def _note_addmm_path(device_type, path):
    if _ADDMM_PATH.get(device_type) != path:  # logged once per device type (again only if it changes)
        log.info("fused loss dW accumulation on %s: %s", device_type, path)
        _ADDMM_PATH[device_type] = path


def _addmm_mixed(acc, a, b):
    # acc += a @ b in one call; addmm with out=acc, not addmm_: the same in-place kernel, and FlopCounterMode
    # counts it (it skips addmm_)
    if acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # CPU has no addmm.dtype_out: upcast operands (tests only)
        torch.addmm(acc, a.float(), b.float(), out=acc)


def _addmm_acc(acc, a, b, block_rows=8192, path=None):
    """acc (fp32) += a @ b, in place. 16-bit a, b: path "addmm" (tried first, see addmm_path) or "row blocks"
    (at most block_rows x H fp32 extra: 128 MiB at H 4096); path=None: the one this device took before."""
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
        return
    dev = acc.device.type
    path = path or _ADDMM_PATH.get(dev, "addmm")
    if path == "addmm":
        try:
            _addmm_mixed(acc, a, b)
            _note_addmm_path(dev, "addmm")
            return
        except RuntimeError:  # NotImplementedError included: no addmm.dtype_out kernel for this device
            _note_addmm_path(dev, "row blocks")
    elif path != "row blocks":
        raise ValueError(f"path must be 'addmm' or 'row blocks', got {path!r}")
    for r in range(0, acc.shape[0], block_rows):
        acc[r:r + block_rows] += _mm_f32(a[r:r + block_rows], b)


def scale_cast(t, g, dtype):
    """t * g (g a 0-d tensor) in `dtype`, one pass over t: in place when t has that dtype, else one kernel reading
    t and writing the cast product (torch.mul with a lower-precision out: the CUDA loop casts on store)."""
    if t.dtype == dtype:
        return t.mul_(g.to(dtype))
    out = torch.empty_like(t, dtype=dtype)
    return torch.mul(t, g.to(t.dtype), out=out)


# ---------------------------------------------------------------------------------------------------------------
# Tensor (vocab) parallel: per-shard softmax statistics -> global ones
# ---------------------------------------------------------------------------------------------------------------
def combine_vocab_shards(lse_r, tgt_r, ez_r, valid, group):
    """Each rank's (N,) lse, target logit and E_p[z] over its vocab rows -> the global (lse, target logit, E_p[z]),
    the same on every rank of `group` (None: the default group): lse from the max and the sum of exp(lse_r - max)
    (two all-reduces: no overflow), E_p[z] = sum_r exp(lse_r - lse) E_p_r[z], the target logit from the one rank
    holding the target (the others have 0). New tensors; 0 on ignored tokens (valid False)."""
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(lse_r - m)
    dist.all_reduce(sum_exp, group=group)
    lse = m + torch.log(sum_exp)
    ez = torch.exp(lse_r - lse) * ez_r  # rescale each shard's E_p[z] to the global softmax
    dist.all_reduce(ez, group=group)
    tgt = tgt_r.clone()
    dist.all_reduce(tgt, group=group)
    zero = torch.zeros((), device=lse.device)
    return torch.where(valid, lse, zero), torch.where(valid, tgt, zero), torch.where(valid, ez, zero)


def resolve_row_impl(row_impl, device):
    """"auto": the Triton rows on CUDA, the torch rows elsewhere; "triton" (CPU: under TRITON_INTERPRET=1); "torch"."""
    if row_impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if row_impl not in ("triton", "torch"):
        raise ValueError(f"row_impl must be 'auto', 'triton' or 'torch', got {row_impl!r}")
    return row_impl


def row_fns(row_impl):
    """(stats_fn, grad_fn) for a resolved row_impl; both take the same arguments in either implementation."""
    if row_impl == "triton":
        return _triton_rows_stats, _triton_rows_grad
    return _torch_rows_stats, _torch_rows_grad


def dz_buffer(z_buf, weight_dtype):
    """Where row kernel 2 writes dz for a (C, V) fp32 logits block: over z itself when the weight is fp32 (same
    element, same thread), else a separate (C, V) buffer in the weight's 16-bit dtype (see _row_grad_kernel)."""
    return z_buf if weight_dtype == torch.float32 else torch.empty(z_buf.shape, dtype=weight_dtype,
                                                                   device=z_buf.device)

"""Attention backends for packed rows, on CPU: the backend choice with availability mocked, the flex block mask built
per row against a dense mask written out by hand, the varlen glue (GQA handed to the kernel, max_seqlen a python int
from the loader) against per-document SDPA, and no host read of a device tensor in a varlen forward."""

import pytest
import torch
import torch.nn.functional as F

from nanotulu import data, model as model_mod
from nanotulu.model import LlamaConfig, attention_meta, build_model, pick_backend

CUDA = torch.device("cuda")  # a device object only: nothing runs on it
CPU = torch.device("cpu")


def test_backend_choice_with_availability_mocked(monkeypatch):
    for flash, torch_varlen, want in [(True, True, "varlen"), (True, False, "varlen"), (False, True, "varlen"),
                                      (False, False, "flex")]:
        monkeypatch.setattr(model_mod, "_has_flash_attn", lambda: flash)
        monkeypatch.setattr(model_mod, "_has_torch_varlen", lambda: torch_varlen)
        assert pick_backend("auto", CUDA) == want, (flash, torch_varlen)
        assert pick_backend("auto", CPU) == "sdpa"
        for name in ("sdpa", "flex", "varlen"):
            assert pick_backend(name, CUDA) == name
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        pick_backend("flash", CUDA)


def test_torch_varlen_is_found_without_a_prior_import(monkeypatch):
    """The bug this replaces: hasattr(torch.nn.attention, "varlen") is False until the submodule is imported. A fresh
    interpreter with flash-attn absent must still pick torch's varlen on CUDA where torch ships it."""
    import subprocess
    import sys

    code = ("import torch\nfrom nanotulu import model as m\nm._has_flash_attn = lambda: False\n"
            "print(m.pick_backend('auto', torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    try:
        import torch.nn.attention.varlen  # noqa: F401
        shipped = True
    except ImportError:
        shipped = False
    assert out == ("varlen" if shipped else "flex")


def segments_of(lengths_per_row, T):
    """Per-row document lengths -> (cu_seqlens over B*T, dense (B, T, T) bool mask written out position by position:
    query q sees key k iff same document and k <= q). Rows are padded to T with one extra segment, as make_row does."""
    B = len(lengths_per_row)
    cu, dense = [0], torch.zeros(B, T, T, dtype=torch.bool)
    for b, lengths in enumerate(lengths_per_row):
        segs = list(lengths) + ([T - sum(lengths)] if sum(lengths) < T else [])
        start = 0
        for n in segs:
            for q in range(start, start + n):
                for k in range(start, q + 1):
                    dense[b, q, k] = True
            start += n
            cu.append(b * T + start)
    return torch.tensor(cu, dtype=torch.int32), dense


ROWS = [[100, 60, 1, 95], [256], [3, 200, 40]]  # 3 rows of T = 256: 2 x 2 blocks of 128 per row


def test_flex_block_mask_is_per_row_and_matches_the_dense_mask():
    T = 256
    cu, dense = segments_of(ROWS, T)
    bm = attention_meta("flex", cu, len(ROWS), T, CPU)
    assert bm.shape == (len(ROWS), 1, T, T)  # (B, 1, T, T), not one (B*T)^2 mask
    assert bm.kv_num_blocks.shape == (len(ROWS), 1, T // 128)
    # block level: a (q block, kv block) tile is listed iff the dense mask has any True in it
    want_blocks = dense.view(len(ROWS), T // 128, 128, T // 128, 128).any(4).any(2)  # (B, 2, 2)
    assert torch.equal(bm.to_dense()[:, 0].bool(), want_blocks)
    # element level: the mask_mod at every (b, q, kv) equals the dense mask
    b, q, k = torch.meshgrid(torch.arange(len(ROWS)), torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(bm.mask_mod(b, torch.zeros_like(b), q, k), dense)
    # and the sdpa backend's mask is the same dense mask
    assert torch.equal(attention_meta("sdpa", cu, len(ROWS), T, CPU, per_document=False), dense)


TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def rows_for(lengths_per_row, T):
    """Packed rows from make_row (random tokens), and the stacked micro-batch."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for lengths in lengths_per_row:
        docs = [{"input_ids": torch.randint(0, 96, (n,), generator=g).tolist(), "labels": [1] * n} for n in lengths]
        rows.append(data.make_row(docs, T, pad_id=0))
    return rows, data.stack_rows(rows, "cpu")


def test_stack_rows_hands_max_seqlen_as_int():
    _, batch = rows_for([[5, 9], [3, 3, 3]], 16)  # segments 5, 9, (pad 2) | 3, 3, 3, (pad 7)
    assert batch["max_seqlen"] == 9 and type(batch["max_seqlen"]) is int
    _, batch = rows_for([[2], [4]], 16)  # the padding tail is a segment too
    assert batch["max_seqlen"] == 14


def test_flex_forward_on_cpu_equals_sdpa():
    """Eager flex (CPU has a forward, no backward) through the model, per-row block mask and GQA, vs sdpa."""
    T = 256
    _, batch = rows_for(ROWS, T)
    ref = build_model(TINY, seed=1, attn_backend="sdpa")
    flex = build_model(TINY, seed=1, attn_backend="flex")
    with torch.no_grad():
        want = ref(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])
        got = flex(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def fake_varlen_attn(calls):
    """A CPU stand-in for torch's varlen_attn with its signature: per-document causal SDPA, K/V repeated here in the
    reference only. Records what the model handed it."""
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, **kw):
        calls.append(dict(q_heads=q.shape[1], k_heads=k.shape[1], max_q=max_q, max_k=max_k, window=window_size,
                          gqa=enable_gqa))
        if q.device.type == "meta":
            return torch.empty_like(q)
        assert window_size == (-1, 0), "causal"
        assert enable_gqa == (k.shape[1] != q.shape[1])
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        assert max(b - a for a, b in zip(bounds, bounds[1:])) <= max_q
        g = q.shape[1] // k.shape[1]
        for a, b in zip(bounds, bounds[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, n, hd)
            ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        return out
    return varlen_attn


def test_varlen_glue_passes_gqa_and_loader_max_seqlen(monkeypatch):
    pytest.importorskip("torch.nn.attention.varlen")
    import torch.nn.attention.varlen as tv

    calls = []
    monkeypatch.setattr(model_mod, "_has_flash_attn", lambda: False)
    monkeypatch.setattr(tv, "varlen_attn", fake_varlen_attn(calls))
    T = 64
    _, batch = rows_for([[10, 30, 4], [64], [20]], T)
    ref = build_model(TINY, seed=2, attn_backend="sdpa")
    var = build_model(TINY, seed=2, attn_backend="varlen")
    args = (batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])
    want = ref(*args)
    got = var(*args, max_seqlen=batch["max_seqlen"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # GQA reached the kernel un-repeated; max_seqlen is the loader's int (64: the full second row), every layer
    assert len(calls) == TINY.num_hidden_layers
    for c in calls:
        assert (c["q_heads"], c["k_heads"], c["gqa"]) == (4, 2, True)
        assert c["max_q"] == c["max_k"] == 64 and type(c["max_q"]) is int
    # without the loader's number: T, an upper bound that needs no read of cu_seqlens
    calls.clear()
    var(*args[:2], batch["cu_seqlens"])
    assert {c["max_q"] for c in calls} == {T}
    # backward runs through the fake (its ops are differentiable) and equals sdpa's
    g = torch.randn_like(want)
    want.backward(g)
    var(*args, max_seqlen=batch["max_seqlen"]).backward(g)
    for (n, p), (_, q) in zip(ref.named_parameters(), var.named_parameters()):
        if p.grad is not None:
            # embedding rows sum over tokens in another order: 1e-4 of the gradient's scale
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(),
                                       msg=lambda m, n=n: f"{n}: {m}")


def test_varlen_forward_reads_nothing_back_from_the_device(monkeypatch):
    """The whole varlen forward on the meta device: any .item() / int() / .tolist() of a tensor would raise there,
    so this proves the forward has no host sync (and so no data-dependent recompile under compile)."""
    pytest.importorskip("torch.nn.attention.varlen")
    import torch.nn.attention.varlen as tv

    calls = []
    monkeypatch.setattr(model_mod, "_has_flash_attn", lambda: False)
    monkeypatch.setattr(tv, "varlen_attn", fake_varlen_attn(calls))
    with torch.device("meta"):
        m = model_mod.Llama(TINY, attn_backend="varlen")
        ids = torch.zeros(2, 32, dtype=torch.long)
        cu = torch.zeros(5, dtype=torch.int32)
    for max_seqlen in (20, None):
        h = m(ids, ids, cu, max_seqlen=max_seqlen)
        assert h.shape == (2, 32, TINY.hidden_size) and h.device.type == "meta"
    assert [c["max_q"] for c in calls] == [20, 20, 32, 32]

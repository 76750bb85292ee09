"""What only a GPU can show (every test skips on a CPU; bench/gpu_suite.py runs them with TRITON_INTERPRET=0):
the Triton kernels compiled for the GPU on bf16 inputs against a float64 reference, and one SFT step under FSDP2 with
bf16 mixed precision (full, LoRA and QLoRA) against the same step of a plain fp32 model. Packed flex / varlen
attention against SDPA and the compiled CUDA-graph decode against eager are in test_model.py, test_generate.py and
test_rlvr.py."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

N, H, V = 1000, 256, 5003  # not multiples of any tile: ragged edges in both directions


def inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100  # ignored tokens
    return h, w, t


def reference_logps(h, w, t):
    """float64 log p(target) of the same bf16 values, 0 where ignored."""
    lp = torch.log_softmax(h.double() @ w.double().T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    return torch.where(t == -100, torch.zeros_like(lp), lp)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("path", ["tiles", "fused", "chunked logprobs"])
def test_bf16_kernels_match_float64(path):
    from nanotulu.kernels.chunked_loss import fused_linear_loss
    from nanotulu.kernels.linear_logprobs import linear_logprobs

    h, w, t = inputs()
    g = torch.randn(N, device="cuda", dtype=torch.float64)  # an arbitrary per-token upstream gradient
    if path in ("tiles", "chunked logprobs"):
        lp = linear_logprobs(h, w, t, impl="triton" if path == "tiles" else "auto")
        (lp.double() * g).sum().backward()
    else:
        loss, lp, _ = fused_linear_loss(h, w, t, lambda lp, en, s, e: (lp.double() * g[s:e]).sum().float(),
                                                row_impl="triton")
        loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = reference_logps(h64, w64, t)
    (want * g).sum().backward()
    assert (lp.double() - want).abs().max().item() < 2e-2  # bf16 logits products, fp32 log-sum-exp
    assert rel(h.grad, h64.grad) < 2e-2 and rel(w.grad, w64.grad) < 2e-2


def test_fsdp2_bf16_mixed_precision_sft_step_matches_fp32():
    """One GPU, one process: FSDP2 with bf16 parameters in compute and fp32 gradient reduction (what the trainers
    place on a GPU) against the plain fp32 model: same loss and gradients within bf16 accuracy."""
    import torch.distributed as dist

    from nanotulu import data, parallel, run
    from nanotulu.model import LlamaConfig, build_model
    from nanotulu.algos.sft import sft_backward

    cfg = LlamaConfig(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
    docs = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * 5 + list(range(8, 3 + n))} for n in (60, 41, 90)]
    row = data.make_row(docs, 256, 0)
    batch = data.stack_rows([row], "cuda")

    plain = build_model(cfg, device="cuda", seed=1)
    loss32, _ = sft_backward(plain, [batch], impl="auto")
    grads32 = {n: p.grad.clone() for n, p in plain.named_parameters()}

    rank, world, device = run.init_distributed()  # NCCL, one rank
    try:
        mesh = parallel.build_mesh(world, -1, 1, device)
        model = parallel.parallelize(build_model(cfg, device="cuda", seed=1), mesh, bf16=True, seq_len=256)
        loss16, _ = sft_backward(model, [batch], impl="auto", mesh=mesh, use_bf16=True)
        assert abs(loss16.item() - loss32.item()) < 2e-2 * abs(loss32.item())
        for n, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            assert g.dtype == torch.float32  # fp32 master gradients
            assert F.cosine_similarity(g.flatten().double(), grads32[n].flatten().double(), dim=0) > 0.99, n
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_lora_step_on_gpu_matches_fp32(nf4):
    """LoRA / QLoRA as the trainers place it on one GPU (the frozen base in bf16, or NF4 made from it and dequantised
    to bf16 on each matmul; fp32 adapters; FSDP2 with bf16 compute and fp32 reduction; the fused loss) against the
    same adapters on the same base weights in fp32, one plain process: the loss and the adapter gradients (fp32)
    within bf16 accuracy, and no gradient on a frozen weight. QLoRA needs torchao (carry its wheel)."""
    import types

    import torch.distributed as dist

    from nanotulu import data, lora, parallel, run
    from nanotulu.model import LlamaConfig, build_model
    from nanotulu.algos.sft import sft_backward

    if nf4:
        pytest.importorskip("torchao")
    cfg = LlamaConfig(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
    flags = types.SimpleNamespace(lora=True, lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, seed=0, tp=1,
                                  lora_targets="q,k,v,o,gate,up,down", quantize="nf4" if nf4 else "",
                                  lora_adapter="", dp_shard=-1)
    docs = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * 5 + list(range(8, 3 + n))} for n in (60, 41, 90)]
    batch = data.stack_rows([data.make_row(docs, 256, 0)], "cuda")

    def adapted(base_dtype):
        m = lora.apply(build_model(cfg, device="cuda", seed=1), flags, base_dtype=base_dtype)
        gen = torch.Generator().manual_seed(0)  # B given values (it starts at zero) so the adapters matter
        with torch.no_grad():
            for _, mod in lora.lora_modules(model=m):
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=gen) * 0.05)
        return m

    rank, world, device = run.init_distributed()  # NCCL, one rank
    try:
        model = adapted(torch.bfloat16)
        ref = adapted(None)  # in fp32, every base weight as the GPU model holds it (bf16, NF4 dequantised); no FSDP
        with torch.no_grad():
            for (name, mod), (_, mod_ref) in zip(lora.lora_modules(model), lora.lora_modules(ref)):
                assert lora.is_nf4(mod.weight) == nf4, name
                mod_ref.weight.copy_(lora.dequantize(mod.weight, torch.float32))
            for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
                if not name.endswith(("lora_A", "lora_B")) and not lora.is_nf4(p) and "proj" not in name:
                    p_ref.copy_(p.float())  # embeddings and norms: their bf16 values
        loss32, _ = sft_backward(ref, [batch], impl="torch")
        want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        mesh = parallel.build_mesh(world, -1, 1, device)
        model = parallel.parallelize(model, mesh, bf16=True, seq_len=256)
        loss16, _ = sft_backward(model, [batch], impl="auto", mesh=mesh, use_bf16=True)
        assert abs(loss16.item() - loss32.item()) < 2e-2 * abs(loss32.item())
        got = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            assert g.dtype == torch.float32, n  # fp32 master gradients of the fp32 adapters
            got[lora.clean_name(n)] = g
        assert got.keys() == want.keys() and len(got) == 2 * 7 * cfg.num_hidden_layers
        for n in want:
            assert F.cosine_similarity(got[n].flatten().double(), want[n].flatten().double(), dim=0) > 0.99, n
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_fused_loss_is_bitwise_reproducible_and_dz_separate():
    """B5 on the GPU: two runs of the fused path give bitwise equal log-probs and gradients (a race between the
    row kernel's dz stores and the logits loads would show as a run-to-run difference)."""
    from nanotulu.kernels.chunked_loss import fused_linear_loss

    runs = []
    for _ in range(2):
        h, w, t = inputs(3)
        loss, lp, _ = fused_linear_loss(h, w, t, lambda lp, en, s, e: -lp.sum(), chunk_size=256)
        loss.backward()
        runs.append((lp, h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_addmm_paths_agree_on_gpu():
    """B6: cuBLAS addmm with an fp32 C matrix and the row-block fallback give the same fp32 accumulation."""
    from nanotulu.kernels import rows

    g = torch.Generator(device="cuda").manual_seed(5)
    acc0 = torch.randn(1000, 256, device="cuda", generator=g)
    a = torch.randn(1000, 300, device="cuda", generator=g).bfloat16()
    b = torch.randn(300, 256, device="cuda", generator=g).bfloat16()
    want = acc0.double() + a.double() @ b.double()
    for path in ("addmm", "row blocks"):
        acc = acc0.clone()
        rows._addmm_acc(acc, a, b, block_rows=384, path=path)
        assert rel(acc, want) < 1e-6, path
    assert rows.addmm_path("cuda") in ("addmm", "row blocks")


def test_fp32_packed_attention_runs_on_cuda():
    """B3: an fp32 model with packed rows on CUDA: "auto" must not pick varlen (fp16/bf16 only) and must run."""
    from nanotulu.model import LlamaConfig, build_model, pick_backend

    assert pick_backend("auto", torch.device("cuda"), torch.float32) != "varlen"
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    m = build_model(cfg, device="cuda", seed=2)
    ids = torch.randint(0, 96, (1, 30), device="cuda")
    cu = torch.tensor([0, 7, 20, 30], dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in (7, 13, 10)])[None]
    packed = m(ids, position_ids=pos, cu_seqlens=cu)
    sep = torch.cat([m(ids[:, a:b]) for a, b in ((0, 7), (7, 20), (20, 30))], dim=1)
    torch.testing.assert_close(packed, sep, rtol=1e-4, atol=1e-4)

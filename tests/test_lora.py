"""LoRA / QLoRA (nanotulu/lora.py) against independent references: the formula in float64, an NF4 decoder written
here from the QLoRA paper's format, the same step on the dequantised weights, peft + transformers (export, merge),
the base model for the DPO reference, and a single process for FSDP2 on 2 gloo ranks. Tiny shapes."""

import json
import os
import types

import pytest
import torch

from nanotulu import checkpoint, data, lora, parallel
from nanotulu.algos.dpo import DPOParams, compute_ref_logps, dpo_backward, pair_logps
from nanotulu.algos.sft import sft_backward
from nanotulu.data import stack_pair_rows, stack_rows
from nanotulu.model import Llama, LlamaConfig, build_model
from nanotulu.run import free_port

TINY = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)

# The 16 NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' table), written here
# rather than read from torchao, so the decoder below is independent of the library under test.
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def flags(**kw):
    base = dict(lora=True, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets="q,k,v,o,gate,up,down",
                quantize="", lora_adapter="", seed=0, tp=1, merge=False)
    return types.SimpleNamespace(**{**base, **kw})


def randomise_b(model, seed=0):
    """B starts at zero (the adapted model is then the base): tests give it values so the adapters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            if m.rank:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def sft_batch(tok, n=2):
    chats = [[{"role": "user", "content": f"What is {i} + {i + 1}?"},
              {"role": "assistant", "content": f"It is {2 * i + 1}."}] for i in range(n)]
    return [data.make_row([data.tokenize_sft(m, tok)], 64, tok.pad_token_id) for m in chats]


# ---- the layer ---------------------------------------------------------------------------------------------------


def test_lora_forward_is_base_plus_scaled_low_rank_update_float64():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False).double()
    layer = lora.LoRALinear(base, rank=4, alpha=12.0, dropout=0.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    W, A, B = base.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ W.T + (12.0 / 4) * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # B = 0 at init: the adapted layer is the base layer exactly; adapters off: the base whatever B holds
    fresh = lora.LoRALinear(base, rank=4, alpha=12.0, dropout=0.0).double()
    assert torch.equal(fresh(x), x @ W.T) or torch.allclose(fresh(x), x @ W.T, rtol=0, atol=1e-14)
    layer.adapters_on = False
    torch.testing.assert_close(layer(x), x @ W.T, rtol=1e-12, atol=1e-12)


def test_only_adapter_parameters_get_gradients():
    tok = data.load_tokenizer("byte")
    model = lora.apply(build_model(TINY, seed=1), flags(lora_targets="q,v,down"))
    randomise_b(model)
    sft_backward(model, [stack_rows(sft_batch(tok), "cpu")], impl="torch")
    for name, p in model.named_parameters():
        is_adapter = name.endswith((".lora_A", ".lora_B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
        if is_adapter:
            assert p.grad.abs().sum() > 0, name
    adapted = {n for n, m in lora.lora_modules(model)}
    assert adapted == {f"model.layers.{i}.{t}" for i in range(2) for t in ("self_attn.q_proj", "self_attn.v_proj",
                                                                           "mlp.down_proj")}


def test_fused_loss_and_bf16_base_give_the_reference_adapter_gradients():
    """The default (chunked, fused) loss gives the adapters the plain-torch loss's gradients; a frozen base stored
    in bf16 (what --precision bf16 keeps) under autocast stays within bf16 rounding of the fp32 run."""
    tok = data.load_tokenizer("byte")
    batch = stack_rows(sft_batch(tok), "cpu")
    grads = {}
    for impl, dtype, bf16 in (("torch", None, False), ("auto", None, False), ("torch", torch.bfloat16, True)):
        model = lora.apply(build_model(TINY, seed=1), flags(), base_dtype=dtype)
        randomise_b(model)
        sft_backward(model, [batch], impl=impl, use_bf16=bf16)
        grads[impl, bf16] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    ref = grads["torch", False]
    torch.testing.assert_close(grads["auto", False], ref, rtol=1e-4, atol=1e-6)
    rel = (grads["torch", True].float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


# ---- NF4 ---------------------------------------------------------------------------------------------------------


def decode_nf4(t):
    """NF4 dequantisation from the format's definition: two 4-bit codes per byte (high nibble first), each an
    index into NF4_LEVELS, times its block's absmax; absmax double-quantised: int8 / per-scale-block factor + the
    mean of all absmaxes. -> (weights, the per-block absmax as stored)."""
    codes = torch.stack([t.quantized_data >> 4, t.quantized_data & 15], dim=-1).flatten().long()
    n_sb = t.quantized_scalers.numel() // t.scaler_block_size
    absmax = (t.quantized_scalers.view(n_sb, -1).float() / t.quantization_factor[:, None]).flatten() + t.scaler_mean
    w = NF4_LEVELS[codes].view(-1, t.block_size) * absmax[:, None]
    return w.view(t.shape), absmax


def test_nf4_round_trip_within_the_format_bound_and_equal_to_the_library():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * torch.linspace(0.1, 3.0, 128)  # blocks of different scales
    q = lora.to_nf4(w)
    assert lora.is_nf4(q) and q.block_size == 64 and q.quantized_data.numel() == w.numel() // 2  # 4 bits a weight
    mine, absmax_stored = decode_nf4(q)
    # torchao stores the levels rounded to 4 decimals (-0.6962 for -0.69619...): its decoder agrees with this one
    # to 5e-5 of the block's absmax, and the LoRA layer's dequantisation is the library's exactly
    lib = q.get_original_weight()
    assert ((lib - mine).abs().view(-1, 64) <= 5e-5 * absmax_stored[:, None] + 1e-7).all()
    assert torch.equal(lora.dequantize(q), lib)
    x = torch.randn(3, 128, generator=gen)
    linear = torch.nn.Linear(128, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = lora.LoRALinear(linear, rank=0, alpha=1.0, dropout=0.0, nf4=True)  # the per-matmul dequantisation
    torch.testing.assert_close(layer(x), x @ lib.T, rtol=1e-6, atol=1e-6)
    # The bound: each weight goes to the nearest level of the block's true absmax s, so it errs by at most half
    # the widest gap between levels (1 - 0.6962)/2 of s; the stored absmax s' differs from s by at most one int8
    # step of its scale block, and the level (|l| <= 1) carries that too.
    blocks = w.view(-1, 64)
    s = blocks.abs().amax(dim=1)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    err = (mine.view(-1, 64) - blocks).abs()
    bound = half_gap * s + (s - absmax_stored).abs()
    assert (err <= bound[:, None] + 1e-6).all(), (err - bound[:, None]).max()
    centred = s - s.mean()
    step = 2 * centred.view(q.quantization_factor.numel(), -1).abs().amax(dim=1) / 256  # int8 step per scale block
    assert ((s - absmax_stored).abs().view(len(step), -1) <= step[:, None] + 1e-6).all()
    assert err.max() > 0  # a lossy format: a test that could not fail would see 0 here


def test_qlora_step_equals_the_same_step_on_the_dequantised_weights():
    tok = data.load_tokenizer("byte")
    batch = stack_rows(sft_batch(tok), "cpu")
    q = lora.apply(build_model(TINY, seed=1), flags(quantize="nf4", lora_targets="q,k,v,o,up"))
    assert all(lora.is_nf4(m.weight) for _, m in lora.lora_modules(q)) and len(lora.lora_modules(q)) == 14
    # the same model with each NF4 weight replaced by torchao's dequantisation, and plain LoRA on the same targets
    ref = lora.apply(build_model(TINY, seed=1), flags(lora_targets="q,k,v,o,up"))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in q.named_parameters():  # every NF4 weight: the projections --lora_targets left out too
            if lora.is_nf4(p):
                ref_params[name].copy_(p.get_original_weight())
    randomise_b(q)
    randomise_b(ref)
    losses = []
    for model in (q, ref):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss, _ = sft_backward(model, [batch], impl="torch")
        opt.step()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    pq = {n: p for n, p in q.named_parameters() if p.requires_grad}
    pr = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert pq.keys() == pr.keys() and len(pq) == 20
    for n in pq:
        torch.testing.assert_close(pq[n].grad, pr[n].grad, rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(pq[n], pr[n], rtol=1e-6, atol=1e-7, msg=n)


# ---- PEFT format, merge, continued training -----------------------------------------------------------------------


def test_peft_export_loads_in_peft_with_the_same_logits_and_merge_matches_merge_and_unload(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base_dir, adapter_dir, merged_dir = (str(tmp_path / n) for n in ("base", "adapter", "merged"))
    build_model(TINY, seed=1).save_pretrained(base_dir)
    cfg = flags(lora_targets="q,k,v,o,gate,up,down", lora_rank=4, lora_alpha=16.0)
    model = lora.apply(Llama.from_pretrained(base_dir, dtype=torch.float32), cfg).eval()
    randomise_b(model)
    lora.save_adapter(model, cfg, adapter_dir, base_dir)
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(ids)
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                               adapter_dir).eval()
        torch.testing.assert_close(peft_model(ids).logits.float(), ours, rtol=1e-5, atol=1e-5)
        with peft_model.disable_adapter():  # peft's adapters-off == ours
            with lora.adapters_off(model):
                torch.testing.assert_close(peft_model(ids).logits.float(), model.logits(ids), rtol=1e-5, atol=1e-5)
        peft_merged = peft_model.merge_and_unload()
        lora.save_merged(model, merged_dir)
        merged = LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        torch.testing.assert_close(merged(ids).logits.float(), peft_merged(ids).logits.float(), rtol=1e-5, atol=1e-5)
    # continued training: the adapter loads back into fresh adapters (and a mismatched rank is refused)
    again = lora.apply(Llama.from_pretrained(base_dir, dtype=torch.float32), replace_ns(cfg, lora_adapter=adapter_dir))
    with torch.no_grad():
        torch.testing.assert_close(again.eval().logits(ids), ours, rtol=0, atol=0)
    with pytest.raises(ValueError, match="r=4"):
        lora.apply(Llama.from_pretrained(base_dir), replace_ns(cfg, lora_adapter=adapter_dir, lora_rank=8))


def replace_ns(ns, **kw):
    return types.SimpleNamespace(**{**vars(ns), **kw})


def test_qlora_merge_folds_the_adapter_into_the_dequantised_weights(tmp_path):
    model = lora.apply(build_model(TINY, seed=1), flags(quantize="nf4")).eval()
    randomise_b(model)
    sd = lora.merged_state_dict(model)
    assert not any("lora_" in k for k in sd) and set(sd) == set(build_model(TINY, seed=1).state_dict())
    plain = build_model(TINY, seed=1)
    plain.load_state_dict(sd)
    ids = torch.randint(0, TINY.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(ids), model.logits(ids), rtol=1e-4, atol=1e-4)


# ---- DPO reference: the same weights with the adapters off ---------------------------------------------------------


def test_generation_and_held_out_loss_run_without_adapter_dropout():
    """A LoRA model left in training mode by the loop (dropout 0.5 on the adapters' input): sampling and the held-out
    loss see no dropout. References: greedy generation and the loss of the merged model (W + scale B A as a plain
    Llama, which has no dropout at all); the mode is restored afterwards."""
    from nanotulu.algos.sft import held_out_loss
    from nanotulu.generate import generate

    tok = data.load_tokenizer("byte")
    model = lora.apply(build_model(TINY, seed=1), flags(lora_dropout=0.5))
    randomise_b(model, seed=2)
    plain = build_model(TINY, seed=9)
    plain.load_state_dict(lora.merged_state_dict(model))
    model.train()
    prompts = [tok.encode("What is 2 + 3?"), tok.encode("Say hi")]
    kw = dict(max_new_tokens=12, eos_token_id=-1, greedy=True)
    got, want = generate(model, prompts, **kw), generate(plain, prompts, **kw)
    assert [o["tokens"] for o in got] == [o["tokens"] for o in want]
    assert model.training
    rows = sft_batch(tok, 3)
    loss = held_out_loss(model, rows, 2, "cpu", impl="torch")
    torch.testing.assert_close(loss, held_out_loss(plain, rows, 2, "cpu", impl="torch"), rtol=1e-5, atol=1e-6)
    assert model.training


def test_dpo_reference_with_adapters_off_is_the_base_model():
    from nanotulu.pairs import pair_docs, tokenize_pair

    tok = data.load_tokenizer("byte")
    rows, pairs = [], []
    for i in range(3):
        m = [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}!"}]
        pair = tokenize_pair({"chosen": m, "rejected": m[:1] + [{"role": "assistant", "content": "no"}]}, tok, "tulu",
                             64, True, f"pair {i}")
        pairs.append(pair)
        row = data.make_row(pair_docs(pair), 128, tok.pad_token_id)
        row["example_ids"] = [i]
        rows.append(row)
    batch = stack_pair_rows(rows, "cpu")
    base = build_model(TINY, seed=1)
    policy = lora.apply(build_model(TINY, seed=1), flags(lora_dropout=0.1))
    randomise_b(policy)
    with torch.no_grad():
        want, _ = pair_logps(base, batch, "torch")
        with lora.adapters_off(policy):
            got, _ = pair_logps(policy, batch, "torch")
            table, _ = compute_ref_logps(policy, pairs, 128, tok.pad_token_id, "cpu", "torch", 0, 1)  # cached path
        on, _ = pair_logps(policy.eval(), batch, "torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(table.float(), want.float(), rtol=1e-6, atol=1e-6)
    assert (on - want).abs().max() > 1e-3  # the adapters do change the policy
    # a DPO step of the adapted policy against that reference: gradients reach the adapters only
    policy.train()
    hp = DPOParams(loss_type="dpo_norm", beta=5.0)
    dpo_backward(policy, [batch], lambda m: want[m["pair_ids"]], hp, impl="torch")
    assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())


# ---- checkpoints: adapters and their optimizer state only ---------------------------------------------------------


def test_checkpoint_holds_adapters_only_and_resumes_them(tmp_path):
    tok = data.load_tokenizer("byte")
    model = lora.apply(build_model(TINY, seed=1), flags(quantize="nf4", lora_targets="q,v"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sft_backward(model, [stack_rows(sft_batch(tok), "cpu")], impl="torch")
    opt.step()
    path = checkpoint.save_checkpoint(str(tmp_path), 1, model, opt, {"data": {}}, rank=0)
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    model_keys = {k for k in saved if k.startswith("model.")}
    assert model_keys == {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}, model_keys
    fresh = lora.apply(build_model(TINY, seed=1), flags(quantize="nf4", lora_targets="q,v", seed=5))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    checkpoint.load_checkpoint(path, fresh, opt2, 0, 1)
    for (n, p), (_, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, p2), n
            assert torch.equal(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"]), n


# ---- FSDP2 on 2 gloo ranks == one process --------------------------------------------------------------------------


def _fsdp_worker(rank, world, port, dp, tp, rep, nf4, ac, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    tok = data.load_tokenizer("byte")
    rows = sft_batch(tok, 4)
    # dp_shard: NF4 scale blocks are sized so each FSDP shard holds whole ones; the one-process reference quantises
    # the same way (it is built before the process group exists)
    cfg = flags(quantize="nf4" if nf4 else "", lora_targets="q,k,v,o,gate,up,down", dp_shard=dp)

    def make():
        m = lora.apply(build_model(TINY, seed=1), cfg)
        randomise_b(m)
        return m

    ref = make()  # one process, the whole batch, before the group exists
    ref_loss, _ = sft_backward(ref, [stack_rows(rows, "cpu")], impl="torch")
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = parallel.build_mesh(world, dp, tp, "cpu", dp_replicate=rep)
        model = parallel.parallelize(make(), mesh, activation_checkpointing=ac, seq_len=64)
        dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
        loss, _ = sft_backward(model, [stack_rows(rows[dp_rank::dp_world], "cpu")], impl="torch", mesh=mesh)
        loss = parallel.all_reduce_sum(loss, parallel.dp_group(mesh))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        n_checked = 0
        for name, p in model.named_parameters():
            name = lora.clean_name(name)
            if not p.requires_grad:
                assert p.grad is None, name  # frozen: nothing computed, nothing reduced
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            r = ref_grads[name]
            err = (g - r).norm() / r.norm().clamp(min=1e-12)
            assert err <= 1e-5, f"gradient of {name} differs from one process by {err:.2e}"
            n_checked += 1
        assert n_checked == len(ref_grads)
        # the exported adapter, gathered from the shards, is the one-process adapter
        sd = lora.adapter_state_dict(model)
        want = {lora.peft_key(n.removesuffix(".lora_A").removesuffix(".lora_B"), n[-1]): p
                for n, p in ref.named_parameters() if p.requires_grad}
        assert sd.keys() == want.keys()
        for k in sd:
            torch.testing.assert_close(sd[k], want[k].detach(), rtol=0, atol=0)
        # generation's gathered copy keeps the adapters: its logits are the one-process adapted model's
        ids = stack_rows(rows[:2], "cpu")["input_ids"]
        with parallel.gathered(model) as g:
            assert sum(1 for _ in lora.lora_modules(g)) == 7 * TINY.num_hidden_layers
            got = g.logits(ids)
        torch.testing.assert_close(got, ref.logits(ids), rtol=1e-5, atol=1e-5)
        # so is the merged model (the base gathered from its shards, NF4 included)
        merged, want = lora.merged_state_dict(model), lora.merged_state_dict(ref)
        if rank == 0:
            assert merged.keys() == want.keys()
            for k in merged:
                torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert merged == {}
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dp,tp,rep,nf4,ac", [(2, 1, 1, False, False), (2, 1, 1, True, True), (1, 2, 1, False, False),
                                             (1, 1, 1, True, False), (1, 1, 2, True, False)],
                         ids=["fsdp2", "fsdp2-nf4-ac", "tp2", "fsdp2-one-rank-nf4", "hsdp-2x1-nf4"])
def test_gloo_ranks_match_one_process(dp, tp, rep, nf4, ac, tmp_path):
    """FSDP2 on 2 ranks (NF4 and activation checkpointing too), tensor parallel on 2, FSDP2 on the one rank a
    single-GPU run has (QLoRA's own case) and HSDP replicating over 2 ranks, each against one plain process."""
    torch.multiprocessing.spawn(_fsdp_worker, args=(dp * tp * rep, free_port(), dp, tp, rep, nf4, ac, str(tmp_path)),
                                nprocs=dp * tp * rep, join=True)


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_compiled_blocks_with_adapters_equal_eager(nf4, monkeypatch):
    """--compile with adapters (NF4 base too): the compiled blocks give eager's loss and adapter gradients, with no
    graph break. Traced with aot_eager as tests/test_step.py does (the inductor's C++ build is slow on 2 cores;
    NANOTULU_SLOW_TESTS=1 runs it)."""
    import functools

    from torch._dynamo.utils import counters

    if os.environ.get("NANOTULU_SLOW_TESTS") != "1":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    tok = data.load_tokenizer("byte")
    batch = stack_rows(sft_batch(tok), "cpu")
    cfg = flags(quantize="nf4" if nf4 else "")

    def make():
        m = lora.apply(build_model(TINY, seed=1), cfg)
        randomise_b(m)
        return m

    eager, compiled = make(), make()
    parallel.apply_compile(compiled)
    loss_e, _ = sft_backward(eager, [batch], impl="torch")
    loss_c, _ = sft_backward(compiled, [batch], impl="torch")
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    want = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    got = {lora.clean_name(n): p.grad for n, p in compiled.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(want) == 2 * 7 * TINY.num_hidden_layers
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])


# ---- memory accounting ----------------------------------------------------------------------------------------------


def test_computed_memory_matches_the_measured_model():
    """shape_memory (formula, no tensors) == training_memory of a built model (bytes read off its tensors)."""
    model = build_model(TINY, seed=1)
    full = lora.shape_memory(TINY, "full")
    assert full["trainable"] == sum(p.numel() for p in model.parameters())
    assert full["weights"] + full["grads"] + full["optimizer"] == lora.training_memory(model)["total"]
    lo = lora.apply(build_model(TINY, seed=1), flags(lora_rank=8), base_dtype=torch.bfloat16)
    want = lora.shape_memory(TINY, "lora", rank=8)
    assert want["trainable"] == lora.count_params(lo)[0]
    assert want["weights"] + want["grads"] + want["optimizer"] == lora.training_memory(lo)["total"]


# ---- the trainers end to end ---------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"},
                         {"role": "assistant", "content": f"{i % 7} + {i % 5} = {i % 7 + i % 5}."}]}


def pref(i):
    p = [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"}]
    return {"chosen": p + [{"role": "assistant", "content": f"{i % 7 + i % 5}."}],
            "rejected": p + [{"role": "assistant", "content": "No idea." * (1 + i % 2)}]}


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_then_dpo_on_its_adapter_then_rlvr_with_lora(tmp_path):
    """SFT trains an adapter (PEFT files, no merged model without --merge); DPO continues that adapter: its cached
    reference is the SFT model (base + adapter), so the first step's loss is exactly log 2 (policy == reference); a
    fresh-adapter DPO with the online reference (adapters off) likewise; GRPO with a KL term and PPO (value model
    with adapters) run with LoRA and export merged models."""
    import math

    from nanotulu import train_dpo, train_rlvr, train_sft

    base = str(tmp_path / "base")
    build_model(TINY, seed=3).save_pretrained(base)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(16)])
    dpo_data = write_jsonl(tmp_path / "dpo.jsonl", [pref(i) for i in range(8)])
    lo = ["--lora", "true", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--loss_impl", "torch",
          "--save_every", "0", "--tokenizer", "byte", "--data_cache_dir", ""]
    out = train_sft.main(["--model", base, "--data", sft_data, "--output_dir", str(tmp_path / "sft"), "--max_seq_len",
                          "128", "--batch_rows", "4", "--max_steps", "2", "--lr", "3e-2", *lo], finish=False)
    assert out == str(tmp_path / "sft" / "adapter") and not os.path.exists(tmp_path / "sft" / "final")
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base)
    dpo = ["--model", base, "--data", dpo_data, "--max_seq_len", "64", "--batch_pairs", "4", "--max_steps", "1",
           "--lr", "1e-3", "--ref_cache_dir", str(tmp_path / "ref"), *lo]
    final = train_dpo.main([*dpo, "--lora_adapter", out, "--output_dir", str(tmp_path / "dpo"), "--merge", "true"],
                           finish=False)
    first = read_metrics(tmp_path / "dpo")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5 and abs(first["rewards/margin"]) < 1e-5, first
    assert Llama.from_pretrained(final).cfg.hidden_size == TINY.hidden_size
    # the check above can fail: the same run with the reference taken with the adapters off (the base) differs
    sft_adapted = lora.apply(Llama.from_pretrained(base), flags(lora_adapter=out, lora_alpha=8.0))
    assert max(m.lora_B.abs().max() for _, m in lora.lora_modules(sft_adapted)) > 1e-3
    train_dpo.main([*dpo, "--ref_mode", "online", "--output_dir", str(tmp_path / "dpo_online")], finish=False)
    first = read_metrics(tmp_path / "dpo_online")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5, first
    rl = [*lo[:-2], "--model", final, "--data", write_jsonl(tmp_path / "rl.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "ground_truth": str(i + 1),
         "dataset": "gsm8k"} for i in range(4)]), "--num_samples", "2", "--prompts_per_step", "2",
        "--max_prompt_len", "48", "--max_new_tokens", "6", "--steps", "1", "--merge", "true"]
    train_rlvr.main([*rl, "--beta", "0.01", "--output_dir", str(tmp_path / "grpo")], finish=False)
    assert os.path.isfile(tmp_path / "grpo" / "final" / "config.json")
    train_rlvr.main([*rl, "--algo", "ppo", "--output_dir", str(tmp_path / "ppo")], finish=False)
    assert os.path.isfile(tmp_path / "ppo" / "final_value" / "config.json")


def test_killed_lora_run_resumes_to_the_same_losses(tmp_path):
    import subprocess
    import sys

    base = str(tmp_path / "base")
    build_model(TINY, seed=3).save_pretrained(base)
    args = ["--model", base, "--tokenizer", "byte", "--data", write_jsonl(tmp_path / "sft.jsonl",
                                                                          [chat(i) for i in range(24)]),
            "--max_seq_len", "128", "--batch_rows", "2", "--max_steps", "4", "--save_every", "2", "--lr", "1e-2",
            "--loss_impl", "torch", "--data_cache_dir", "", "--quantize", "nf4", "--lora_rank", "4"]
    env = dict(os.environ, NANOTULU_NO_BAR="1")

    def run(out, *extra):
        return subprocess.run([sys.executable, "-m", "nanotulu.train_sft", *args, "--output_dir", str(out), *extra],
                              env=env, capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "a").returncode == 0
    killed = run(tmp_path / "b", "--exit_after_steps", "3")
    assert killed.returncode == 3, killed.stderr[-2000:]
    done = run(tmp_path / "b")
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stderr[-2000:]
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_lora_pipeline_puts_adapters_on_the_full_sft_and_compares(monkeypatch, tmp_path):
    """`python -m nanotulu.pipeline --compare --rl both`, its trainers recorded instead of run: the full pipeline
    trains four stages; the LoRA and QLoRA pipelines reuse its SFT (same flags, its folder) and train DPO, GRPO and
    PPO with adapters at 5 x each preset's lr (Tülu 2's LoRA lr / full lr) from their own DPO model."""
    import dataclasses

    from nanotulu import pipeline, train_dpo, train_rlvr, train_sft
    from nanotulu.flags import resolve_flags

    ran = []

    def recorder(module, cls, variant=None):
        def record(argv, finish=True):  # a final/ and the run_config.json a trainer writes (what reuse compares)
            out = argv[argv.index("--output_dir") + 1]
            ran.append((os.path.relpath(out, tmp_path), argv))
            os.makedirs(os.path.join(out, "final"), exist_ok=True)
            with open(os.path.join(out, "final", "config.json"), "w") as f:
                f.write("{}")
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:  # for the curves
                f.write(json.dumps({"step": 1, "loss": 0.7, "rewards/accuracy": 0.5, "score": 0.3}) + "\n")
            with open(os.path.join(out, "run_config.json"), "w") as f:
                json.dump(dataclasses.asdict(resolve_flags(cls, module.EMBEDDED_PRESET, argv, variant)), f)
        return record

    monkeypatch.setattr(train_sft, "main", recorder(train_sft, train_sft.SFTConfig))
    monkeypatch.setattr(train_dpo, "main", recorder(train_dpo, train_dpo.DPOConfig))
    monkeypatch.setattr(train_rlvr, "main", recorder(train_rlvr, train_rlvr.RLVRConfig, train_rlvr.variant_defaults))
    monkeypatch.setattr(pipeline, "held_out_accuracy", lambda *a, **k: (0.5, {"gsm8k": 0.5}))
    monkeypatch.chdir(tmp_path)
    tables = pipeline.main(["--compare", "--rl", "both"])
    outs = [out for out, _ in ran]
    assert outs == ["runs/pipeline/sft", "runs/pipeline/dpo", "runs/pipeline/rlvr", "runs/pipeline/ppo",
                    "runs/pipeline-lora/dpo", "runs/pipeline-lora/rlvr", "runs/pipeline-lora/ppo",
                    "runs/pipeline-qlora/dpo", "runs/pipeline-qlora/rlvr", "runs/pipeline-qlora/ppo"], outs
    args = {out: argv for out, argv in ran}
    for method, quantize in (("lora", ""), ("qlora", "nf4")):
        for stage, preset in (("dpo", train_dpo.EMBEDDED_PRESET), ("rlvr", train_rlvr.EMBEDDED_PRESET),
                              ("ppo", train_rlvr.EMBEDDED_PPO_PRESET)):
            argv = args[f"runs/pipeline-{method}/{stage}"]
            value = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
            assert value["--lora"] == "true" and value["--quantize"] == quantize and value["--merge"] == "true"
            assert float(value["--lr"]) == pytest.approx(5 * preset["lr"])  # the last --lr given wins
            upstream = "runs/pipeline/sft" if stage == "dpo" else f"runs/pipeline-{method}/dpo"
            assert value["--model"] == os.path.join(upstream, "final")
    assert all("--lora" not in argv for out, argv in ran if out.startswith("runs/pipeline/"))
    assert list(tables) == ["full", "lora", "qlora"] and [t[0] for t in tables["lora"]] == \
        ["init", "sft", "dpo", "rlvr", "ppo"]
    rows = {line.split("|")[1].strip(): line for line in open(tmp_path / "runs/pipeline/comparison.md")
            if line.startswith("| ")}
    assert rows["sft"].count("(full's)") == 2 and "(full's)" not in rows["dpo (adapters)"]

"""nanotulu.model against transformers' LlamaForCausalLM (the reference), and packed attention against separate
forwards."""

import json
import os

import pytest
import torch

from nanotulu.model import Llama, LlamaConfig, build_model

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}

CONFIGS = [
    # (name, kwargs): GQA, tied / untied, llama3 rope scaling, rope_theta 500000
    ("gqa_tied_llama3", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    ("mha_untied", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                        rope_theta=10000.0, rope_scaling=None)),
    ("mqa_untied_llama3", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                               rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
]


def hf_model(seed, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, **kw)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so a swapped norm would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hf_checkpoint_loads_with_same_logits(tmp_path, name, kw):
    ref = hf_model(0, **kw)
    ref.save_pretrained(tmp_path / "hf")
    model = Llama.from_pretrained(str(tmp_path / "hf"))
    ids = torch.randint(0, 96, (3, 50))  # 50 > original_max_position_embeddings: the scaled band is used
    with torch.no_grad():
        want = ref(ids).logits
        got = model.logits(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_nanotulu_checkpoint_loads_in_transformers(tmp_path, name, kw):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      max_position_embeddings=256, **kw)
    model = build_model(cfg, seed=1)
    model.save_pretrained(str(tmp_path / "ours"))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model.logits(ids), rtol=1e-4, atol=1e-4)
    # and back: our own loader reads what we wrote
    again = Llama.from_pretrained(str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(again.logits(ids), model.logits(ids), rtol=0, atol=0)


def test_sharded_save_and_load(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, seed=2)
    model.save_pretrained(str(tmp_path / "sh"), max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "sh"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "sh")).eval()
    back = Llama.from_pretrained(str(tmp_path / "sh"))
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model.logits(ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back.logits(ids), model.logits(ids), rtol=0, atol=0)


def test_save_is_atomic_and_replaces(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    build_model(cfg, seed=3).save_pretrained(str(tmp_path / "ck"))
    m2 = build_model(cfg, seed=4)
    m2.save_pretrained(str(tmp_path / "ck"))  # overwrite an existing checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary or old directories left behind
    back = Llama.from_pretrained(str(tmp_path / "ck"))
    assert torch.equal(back.output_weight, m2.output_weight)


def test_bf16_forward_close_to_fp32():
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m32 = build_model(cfg, seed=5)
    m16 = build_model(cfg, seed=5, dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        a, b = m32.logits(ids), m16.logits(ids)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Packed sequences


def backends_here():
    out = ["sdpa"]
    if torch.cuda.is_available():
        out.append("flex")
        from nanotulu.model import _has_flash_attn, _has_torch_varlen
        if _has_flash_attn() or _has_torch_varlen():
            out.append("varlen")
    return out


@pytest.mark.parametrize("backend", backends_here())
def test_packed_equals_separate(backend):
    device = "cuda" if backend != "sdpa" else "cpu"
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_SCALING)
    model = build_model(cfg, seed=6, device=device, attn_backend=backend)
    lengths = [7, 13, 1, 9]
    docs = [torch.randint(0, 96, (n,), device=device) for n in lengths]
    ids = torch.cat(docs)[None]  # (1, 30)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    cu = torch.tensor([0, 7, 20, 21, 30], dtype=torch.int32, device=device)

    packed = model(ids, position_ids=pos, cu_seqlens=cu)
    g = torch.randn_like(packed)
    packed.backward(g)
    # lm_head is not used by forward (it returns hidden states), so it has no gradient
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads_packed) == len(list(model.parameters())) - 1
    model.zero_grad()

    outs = []
    for d in docs:
        outs.append(model(d[None]))
    sep = torch.cat(outs, dim=1)
    sep.backward(g)
    torch.testing.assert_close(packed, sep, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads_packed:
            # summation order differs (embedding rows sum over tokens): 1e-5 relative to the gradient scale
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads_packed[n], p.grad, rtol=1e-5, atol=1e-5 * scale, msg=n)


def test_packed_batch_of_rows():
    """cu_seqlens index the flattened (B*T) tokens: two rows of a batch, each with its own documents."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = build_model(cfg, seed=7)
    ids = torch.randint(0, 96, (2, 10))
    pos = torch.tensor([list(range(4)) + list(range(6)), list(range(10))])
    cu = torch.tensor([0, 4, 10, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, cu_seqlens=cu)
        want = torch.cat([model(ids[:1, :4]), model(ids[:1, 4:]), ], dim=1)
        torch.testing.assert_close(packed[:1], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[1:], model(ids[1:]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(str(tmp_path))
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    build_model(cfg).save_pretrained(str(tmp_path / "ok"))
    cfg_file = tmp_path / "ok" / "config.json"
    good = json.loads(cfg_file.read_text())

    cfg_file.write_text(json.dumps(dict(good, model_type="qwen2")))
    with pytest.raises(ValueError, match="config.json.*qwen2"):
        Llama.from_pretrained(str(tmp_path / "ok"))
    cfg_file.write_text(json.dumps(dict(good, attention_bias=True)))
    with pytest.raises(ValueError, match="attention_bias"):
        Llama.from_pretrained(str(tmp_path / "ok"))
    cfg_file.write_text(json.dumps(dict(good, intermediate_size=48)))  # shapes no longer match the weights
    with pytest.raises(ValueError, match="model.safetensors.*mlp.*shape"):
        Llama.from_pretrained(str(tmp_path / "ok"))
    cfg_file.write_text(json.dumps(dict(good, num_hidden_layers=2)))  # a layer's tensors are missing
    with pytest.raises(ValueError, match="missing tensors.*layers.1"):
        Llama.from_pretrained(str(tmp_path / "ok"))
    cfg_file.write_text(json.dumps(good))
    from safetensors.torch import load_file, save_file
    w = load_file(str(tmp_path / "ok" / "model.safetensors"))
    w["model.layers.0.self_attn.qq_proj.weight"] = w.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(w, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor.*qq_proj"):
        Llama.from_pretrained(str(tmp_path / "ok"))

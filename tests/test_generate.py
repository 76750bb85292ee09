"""nanotulu.generate against independent references: transformers' greedy generate, full (cache-free) forwards of
the model, the softmax formula for the sampler, and a single-process run for the FSDP2 path."""

import os

import pytest
import torch

from nanotulu.generate import generate, sample
from nanotulu.model import Llama, LlamaConfig, build_model

transformers = pytest.importorskip("transformers")

V = 96
PROMPT_LENGTHS = [5, 1, 12, 8]  # ragged: left padding of 7, 11, 0 and 4 tokens


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A tiny GQA Llama 3 (llama3 rope scaling, untied) in transformers and the same checkpoint loaded by nanotulu.
    Weights drawn with std 0.3 so the next-token distributions are peaked: greedy choices are not near-ties."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        initializer_range=0.3, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gen") / "hf"
    hf.save_pretrained(path)
    return hf, Llama.from_pretrained(str(path))


def hf_greedy(hf, prompts, max_new_tokens, eos):
    """transformers' own greedy generate on the left-padded batch -> new tokens per row, cut after the first EOS."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, P:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def full_forward_logprobs(model, prompt, tokens, temperature):
    """log_softmax(logits / T) of each new token from one cache-free forward over prompt + tokens (no padding)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(ids)[0] / temperature, dim=-1)  # (T, V)
    n = len(prompt)
    return [logp[n - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_greedy_matches_transformers(hf_and_ours):
    hf, model = hf_and_ours
    prompts = prompts_of(PROMPT_LENGTHS)
    # an EOS that greedy decoding actually emits mid-way for row 0, so rows stop at different steps
    eos = hf_greedy(hf, prompts, 12, eos=V + 1)[0][4]
    want = hf_greedy(hf, prompts, 12, eos=eos)
    got = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, greedy=True)
    assert [r["tokens"] for r in got] == want
    assert len(got[0]["tokens"]) <= 5 and got[0]["finish_reason"] == "stop"
    for r in got:
        assert r["finish_reason"] == ("stop" if r["tokens"][-1] == eos else "length")
        assert r["finish_reason"] == "stop" or len(r["tokens"]) == 12
    assert any(r["finish_reason"] == "length" for r in got)
    # temperature 0 means greedy
    got0 = generate(model, prompts, max_new_tokens=12, eos_token_id=[V + 5, eos], temperature=0.0)
    assert [r["tokens"] for r in got0] == want
    # prefill one prompt at a time (chunked rows write into the shared cache): same answers
    got1 = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, greedy=True, prefill_rows=1)
    assert [r["tokens"] for r in got1] == want


@pytest.mark.parametrize("temperature,top_k,top_p,greedy", [(1.0, 0, 1.0, False), (0.7, 5, 0.9, False),
                                                             (0.5, 0, 1.0, True)])
def test_logprobs_equal_full_forward(hf_and_ours, temperature, top_k, top_p, greedy):
    _, model = hf_and_ours
    prompts = prompts_of(PROMPT_LENGTHS, seed=1)
    got = generate(model, prompts, max_new_tokens=10, eos_token_id=3, temperature=temperature, top_k=top_k,
                   top_p=top_p, greedy=greedy, seed=123)
    for p, r in zip(prompts, got):
        assert len(r["logprobs"]) == len(r["tokens"]) > 0
        want = full_forward_logprobs(model, p, r["tokens"], temperature)
        torch.testing.assert_close(torch.tensor(r["logprobs"]), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_seed_reproduces_samples(hf_and_ours):
    _, model = hf_and_ours
    prompts = prompts_of(PROMPT_LENGTHS, seed=2)
    kw = dict(max_new_tokens=16, eos_token_id=-1, temperature=2.0)  # -1 never matches: always 16 tokens
    a = generate(model, prompts, seed=7, **kw)
    b = generate(model, prompts, seed=torch.Generator().manual_seed(7), **kw)
    c = generate(model, prompts, seed=8, **kw)
    assert a == b
    assert [r["tokens"] for r in a] != [r["tokens"] for r in c]
    assert all(r["finish_reason"] == "length" and len(r["tokens"]) == 16 for r in a)


def test_static_cache_logits_equal_full_forward():
    """The cache protocol generate uses (left padding, per-row position ids, slot masks), driven by hand: every
    step's logits over the whole vocabulary equal a full forward of the unpadded sequence."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    model = build_model(cfg, seed=3)
    lengths, steps = [4, 9, 1], 5
    seqs = prompts_of([n + steps for n in lengths], seed=3)  # prompt + the tokens fed during decode
    B, P, S = len(lengths), max(lengths), max(lengths) + steps
    ks = [torch.zeros(B, 1, S, cfg.head_dim) for _ in range(2)]
    vs = [torch.zeros(B, 1, S, cfg.head_dim) for _ in range(2)]
    ids = torch.zeros(B, P, dtype=torch.long)
    pos = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, 1, P, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad = P - n
        ids[b, pad:] = torch.tensor(seqs[b][:n])
        pos[b, pad:] = torch.arange(n)
        for i in range(P):
            for j in range(S):
                mask[b, 0, i, j] = (pad <= j <= i) or i == j
    with torch.no_grad():
        got = [model.logits(ids, pos, cache={"k": ks, "v": vs, "pos": torch.arange(P), "mask": mask})[:, -1]]
        for t in range(steps):
            tok = torch.tensor([[seqs[b][n + t]] for b, n in enumerate(lengths)])
            step_pos = torch.tensor([[n + t] for n in lengths])
            step_mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
            for b, n in enumerate(lengths):
                step_mask[b, 0, 0, P - n:P + t + 1] = True
            cache = {"k": ks, "v": vs, "pos": torch.tensor([P + t]), "mask": step_mask}
            got.append(model.logits(tok, step_pos, cache=cache)[:, -1])
        for b, n in enumerate(lengths):
            full = model.logits(torch.tensor([seqs[b]]))[0]  # (n + steps, V)
            for t in range(steps + 1):
                torch.testing.assert_close(got[t][b], full[n - 1 + t], rtol=1e-4, atol=1e-4)


def test_sampler_follows_the_filtered_softmax():
    """Empirical frequencies of `sample` against softmax(logits / T) after top-k and top-p, written out plainly."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 1.2])
    T, k, p, n = 0.8, 6, 0.85, 40000
    # reference: keep the 6 largest, then the most likely tokens until their mass reaches 0.85
    probs = torch.softmax(logits / T, dim=0)
    order = sorted(range(8), key=lambda i: -logits[i].item())[:k]
    kept, mass = [], 0.0
    top = torch.softmax(logits[order] / T, dim=0)
    for i, q in zip(order, top.tolist()):
        if mass >= p:
            break
        kept.append(i)
        mass += q
    want = torch.zeros(8)
    want[kept] = probs[kept] / probs[kept].sum()

    g = torch.Generator().manual_seed(0)
    noise = torch.empty(n, 8).exponential_(generator=g)
    tok, lp = sample(logits.expand(n, 8), noise, temperature=T, top_k=k, top_p=p)
    freq = torch.bincount(tok, minlength=8).float() / n
    torch.testing.assert_close(freq, want, rtol=0, atol=0.01)
    assert set(tok.tolist()) == set(kept)
    torch.testing.assert_close(lp, torch.log(probs[tok]), rtol=1e-5, atol=1e-5)  # unfiltered, tempered


def test_shared_prompt_cache_equals_repeated_prompts(hf_and_ours):
    """num_samples=n prefills each prompt once and copies its cache to its n rows: the same samples (fixed seed)
    and log-probs as the plain path with every prompt repeated n times (n prefills)."""
    _, model = hf_and_ours
    prompts = prompts_of(PROMPT_LENGTHS, seed=5)
    n = 3
    kw = dict(max_new_tokens=10, eos_token_id=7, temperature=1.5, top_k=40, seed=11)
    shared = generate(model, prompts, num_samples=n, **kw)
    repeated = generate(model, [p for p in prompts for _ in range(n)], **kw)
    assert len(shared) == len(prompts) * n
    assert [r["tokens"] for r in shared] == [r["tokens"] for r in repeated]
    assert [r["finish_reason"] for r in shared] == [r["finish_reason"] for r in repeated]
    for a, b in zip(shared, repeated):
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=1e-5, atol=1e-5)
    assert len({tuple(r["tokens"]) for r in shared[:n]}) > 1  # the samples of one prompt differ: real sampling
    greedy = generate(model, prompts, num_samples=2, max_new_tokens=10, eos_token_id=7, greedy=True, prefill_rows=1)
    assert [r["tokens"] for r in greedy[::2]] == [r["tokens"] for r in greedy[1::2]]
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, prompts, num_samples=0, **kw)


def test_stop_strings(hf_and_ours):
    _, model = hf_and_ours
    prompts = prompts_of(PROMPT_LENGTHS, seed=4)
    decode = lambda ids: "".join(chr(ord("A") + i % 26) + "." for i in ids)  # noqa: E731 (2 chars a token)
    free = generate(model, prompts, max_new_tokens=14, eos_token_id=-1, greedy=True)
    # a stop string spanning two tokens, taken from row 2's free output at tokens 6-7
    stop = decode(free[2]["tokens"])[13:16]
    got = generate(model, prompts, max_new_tokens=14, eos_token_id=-1, greedy=True, stop_strings=[stop],
                   decode=decode, check_every=5)
    for f, r in zip(free, got):
        text = decode(f["tokens"])
        if stop in text:  # cut after the token holding the stop string's last character
            n = (text.index(stop) + len(stop) + 1) // 2
            assert r["tokens"] == f["tokens"][:n] and r["finish_reason"] == "stop"
        else:
            assert r["tokens"] == f["tokens"] and r["finish_reason"] == "length"
        assert r["logprobs"] == f["logprobs"][:len(r["tokens"])]
    assert len(got[2]["tokens"]) == 8


def test_bad_input_is_refused_before_work(hf_and_ours):
    _, model = hf_and_ours  # max_position_embeddings 64
    ok = dict(max_new_tokens=4, eos_token_id=2)
    with pytest.raises(ValueError, match="prompt 1 has 70 tokens"):
        generate(model, [[1, 2], [1] * 70], **ok)
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model, [[1] * 60], max_new_tokens=10, eos_token_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], max_new_tokens=0, eos_token_id=2)
    with pytest.raises(ValueError, match="EOS"):
        generate(model, [[1, 2]], max_new_tokens=4, eos_token_id=None)
    with pytest.raises(ValueError, match="decode"):
        generate(model, [[1, 2]], stop_strings=["x"], **ok)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], **ok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, V + 3]], **ok)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, [[1, 2]], max_len=3, **ok)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2: two CPU processes (gloo) generate with a sharded model; tokens equal a single-process run.

FSDP_CFG = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)

# Run as a fresh interpreter per rank (not mp.spawn of this module, which would import transformers in each child).
FSDP_WORKER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from nanotulu.generate import generate
from nanotulu.model import LlamaConfig, build_model
rank, world, init_file, out, cfg, prompts = eval(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
model = build_model(LlamaConfig(**cfg), seed=5)
for block in model.model.layers.values():
    fully_shard(block)
fully_shard(model)
res = generate(model, prompts, max_new_tokens=8, eos_token_id=3, temperature=1.0, seed=rank)
torch.save({"res": res, "resharded": type(model.output_weight).__name__ == "DTensor"}, out)
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
"""


def test_fsdp2_generation_equals_single_process(tmp_path):
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    world = 2
    prompts = [prompts_of(PROMPT_LENGTHS[rank::world], seed=10 + rank) for rank in range(world)]  # per rank
    procs = [subprocess.Popen([sys.executable, "-c", FSDP_WORKER, repr(
        (rank, world, str(tmp_path / "init"), str(tmp_path / f"rank{rank}.pt"), FSDP_CFG, prompts[rank]))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, log
    model = build_model(LlamaConfig(**FSDP_CFG), seed=5)
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["resharded"]  # weights are sharded again after generation
        want = generate(model, prompts[rank], max_new_tokens=8, eos_token_id=3, temperature=1.0, seed=rank)
        assert [r["tokens"] for r in out["res"]] == [r["tokens"] for r in want]
        for a, b in zip(out["res"], want):
            torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=1e-5,
                                       atol=1e-5)


# Tensor parallel: the TP-sharded weights are gathered once per generate call; tokens equal a single process.
TP_WORKER = """
import sys, torch, torch.distributed as dist
from nanotulu import parallel
from nanotulu.generate import generate
from nanotulu.model import LlamaConfig, build_model
rank, world, init_file, out, cfg, prompts = eval(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
mesh = parallel.build_mesh(world, 1, world, "cpu")
model = parallel.parallelize(build_model(LlamaConfig(**cfg), seed=5), mesh)
res = generate(model, prompts, max_new_tokens=8, eos_token_id=3, greedy=True, num_samples=2)
torch.save({"res": res, "sharded": model.output_weight.placements[1].is_shard()}, out)
dist.barrier()
dist.destroy_process_group()
"""


def test_tensor_parallel_generation_equals_single_process(tmp_path):
    import subprocess
    import sys

    world, cfg = 2, {**FSDP_CFG, "tie_word_embeddings": False}  # lm_head and embedding both vocab-split
    prompts = prompts_of(PROMPT_LENGTHS, seed=12)
    procs = [subprocess.Popen([sys.executable, "-c", TP_WORKER, repr(
        (rank, world, str(tmp_path / "init"), str(tmp_path / f"rank{rank}.pt"), cfg, prompts))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, log
    want = generate(build_model(LlamaConfig(**cfg), seed=5), prompts, max_new_tokens=8, eos_token_id=3, greedy=True,
                    num_samples=2)
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["sharded"]  # the model is still TP-sharded after generating
        assert [r["tokens"] for r in out["res"]] == [r["tokens"] for r in want]
        for a, b in zip(out["res"], want):
            torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=1e-4,
                                       atol=1e-4)


def test_bench_cpu_smoke(tmp_path):
    """bench/bench_generate.py --cpu-smoke runs end to end (the GPU numbers come from the same code)."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_generate.py")
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fig = bench.main(["--cpu-smoke", "--json", str(tmp_path / "fig.json")])
    assert fig["nanotulu_tok_s"] > 0 and fig["hf_tok_s"] > 0 and 0 < fig["fraction_of_bound"]
    assert json.loads((tmp_path / "fig.json").read_text())["prompts"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graph path)")
def test_compiled_cuda_graph_equals_eager_on_gpu():
    """The compiled decode step replayed from a CUDA graph gives the eager step's tokens and log-probs. (On CPU the
    compiled step was checked by hand: compiling takes ~35 s on the 2-core CI machine.)"""
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = build_model(cfg, device="cuda", seed=6)
    prompts = prompts_of(PROMPT_LENGTHS, seed=6)
    for kw in (dict(greedy=True), dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)):
        want = generate(model, prompts, max_new_tokens=20, eos_token_id=3, **kw)
        for _ in range(2):  # the second call reuses the compilation with a new graph
            got = generate(model, prompts, max_new_tokens=20, eos_token_id=3, compile=True, max_len=40, **kw)
            assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
            # RLVR's call: groups of samples sharing a prefilled prompt, the cache length fixed across calls
            shared = generate(model, prompts[:2], max_new_tokens=20, eos_token_id=3, compile=True, max_len=40,
                              num_samples=2, **kw)
            plain = generate(model, [p for p in prompts[:2] for _ in range(2)], max_new_tokens=20, eos_token_id=3,
                             **kw)
            assert [r["tokens"] for r in shared] == [r["tokens"] for r in plain]
            assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
            for a, b in zip(got, want):
                torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=1e-4,
                                           atol=1e-4)

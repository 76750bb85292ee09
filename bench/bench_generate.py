"""Generation throughput: nanotulu.generate vs transformers' generate vs the HBM-bandwidth bound.

    python bench/bench_generate.py                 # GPU: Llama-3.2-1B shape, random bf16 weights, 256 x 256
    python bench/bench_generate.py --cpu-smoke     # CPU: a tiny shape, checks the script runs end to end

Both engines sample (temperature 1, no top-k/top-p: the RLVR setting) every prompt to exactly --new_tokens tokens
(no EOS can stop them), from the same weights and the same ragged prompts (lengths uniform in
[--min_prompt, --max_prompt]). tokens/s = prompts x new tokens / wall time of the whole call, prefill included.

The bound: a decode step must read every weight once, so no engine can beat
    weight bytes x decode steps / copy bandwidth
seconds, with the bandwidth measured here by a large device-to-device copy. A static KV cache also reads its whole
cache every step (prompts x cache slots x layers x 2 x kv heads x head dim x 2 bytes); the "weights + KV" line adds
that traffic, the best a static-cache engine can do. vLLM is not compared: it cannot be installed on this project's
machines (no network on the GPU hosts), so there is no backend for it.
"""

import argparse
import json
import time

import torch


from nanotulu.generate import generate
from nanotulu.model import LLAMA_3_2_1B, LlamaConfig, build_model

LLAMA_32_1B = LLAMA_3_2_1B
TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes):
    """Bytes per second of a device-to-device copy (read + write counted), best of several."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def hf_model_like(model, cfg, device, dtype):
    """transformers' LlamaForCausalLM holding the same weights (parameter names match one for one)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)  # a copy: HF holds its own
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf.to(device=device, dtype=dtype).eval()


def run_hf(hf, prompts, new_tokens, device):
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)


def greedy_check(model, cfg, prompts, new_tokens, device):
    """Greedy tokens of nanotulu.generate against transformers' greedy generate, both on fp32 copies of the weights
    (bf16 rounding would turn near-ties into differences). Returns "identical" or where the first row differs and
    by how much our top two logits were apart there (a near-tie, or a bug)."""
    import copy

    m32 = copy.deepcopy(model).float()
    hf = hf_model_like(m32, cfg, device, torch.float32)
    ours = [r["tokens"] for r in generate(m32, prompts, max_new_tokens=new_tokens, eos_token_id=-1, greedy=True)]
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                             eos_token_id=None)[:, P:].tolist()
    verdict = "identical"
    for b, (a, h) in enumerate(zip(ours, theirs)):
        if a != h:
            i = next(j for j in range(new_tokens) if a[j] != h[j])
            with torch.no_grad():
                top = m32.logits(torch.tensor([prompts[b] + a[:i]], device=device))[0, -1].topk(2).values
            verdict = f"row {b} differs at token {i} (our top-2 logit gap {float(top[0] - top[1]):.2e})"
            break
    del m32, hf
    return verdict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU, fp32")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--min_prompt", type=int, default=32)
    ap.add_argument("--max_prompt", type=int, default=128)
    ap.add_argument("--no_hf", action="store_true", help="skip transformers")
    ap.add_argument("--no_compile", action="store_true", help="eager decode step (no torch.compile / CUDA graph)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, cfg = torch.device("cpu"), torch.float32, TINY
        B, N, lo, hi, compile_ = 4, 8, 3, 12, False
        copy_bytes = 2**24
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --cpu-smoke")
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, LLAMA_32_1B
        B, N, lo, hi, compile_ = args.prompts, args.new_tokens, args.min_prompt, args.max_prompt, not args.no_compile
        copy_bytes = 2**30
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    model = build_model(cfg, device=device, dtype=dtype, seed=0).eval()

    def ours():
        return generate(model, prompts, max_new_tokens=N, eos_token_id=-1, temperature=1.0, seed=0,
                        compile=compile_)

    # first call: compilation and CUDA-graph capture at these shapes; the second call is timed
    _, first_s = timed(ours, device)
    res, ours_s = timed(ours, device)
    assert all(len(r["tokens"]) == N and r["finish_reason"] == "length" for r in res)
    tokens = B * N
    fig = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
               prompts=B, new_tokens=N, prompt_lengths=[lo, hi], compile=compile_,
               nanotulu_first_call_s=first_s, nanotulu_s=ours_s, nanotulu_tok_s=tokens / ours_s)

    if not args.no_hf:
        hf = hf_model_like(model, cfg, device, dtype)
        run_hf(hf, prompts[:2], 2, device)  # warm-up
        out, hf_s = timed(lambda: run_hf(hf, prompts, N, device), device)
        assert out.shape[1] == max(lengths) + N
        fig.update(hf_s=hf_s, hf_tok_s=tokens / hf_s, speedup_vs_hf=hf_s / ours_s)
        del hf

    if not args.no_hf:
        fig["greedy_vs_transformers"] = greedy_check(model, cfg, prompts[:4], 8, device)
        print(f"  greedy tokens vs transformers (fp32 copies, 4 prompts x 8 tokens): "
              f"{fig['greedy_vs_transformers']}", flush=True)

    bw = copy_bandwidth(device, copy_bytes)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    weight_elem = model.output_weight.element_size()  # the cache has the weights' dtype
    S = max(lengths) + N
    kv_bytes = B * S * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * weight_elem
    bound_s = weight_bytes * N / bw
    bound_kv_s = (weight_bytes + kv_bytes) * N / bw
    fig.update(copy_bandwidth_GBs=bw / 1e9, weight_GB=weight_bytes / 1e9, kv_cache_GB=kv_bytes / 1e9,
               bound_tok_s=tokens / bound_s, fraction_of_bound=bound_s / ours_s,
               bound_with_kv_tok_s=tokens / bound_kv_s, fraction_of_bound_with_kv=bound_kv_s / ours_s)

    print(f"device {fig['device']}, {dtype}, {B} prompts ({lo}-{hi} tokens) x {N} new tokens, "
          f"compile={compile_}")
    print(f"  nanotulu      {fig['nanotulu_tok_s']:>12,.0f} tok/s  ({ours_s:.2f} s; first call {first_s:.1f} s)")
    if "hf_tok_s" in fig:
        print(f"  transformers  {fig['hf_tok_s']:>12,.0f} tok/s  ({hf_s:.2f} s)  nanotulu is "
              f"{fig['speedup_vs_hf']:.1f}x")
    print(f"  bound         {fig['bound_tok_s']:>12,.0f} tok/s  (weights {weight_bytes / 1e9:.2f} GB x {N} steps at "
          f"{bw / 1e9:.0f} GB/s copy)  nanotulu at {100 * fig['fraction_of_bound']:.0f}%")
    print(f"  bound + KV    {fig['bound_with_kv_tok_s']:>12,.0f} tok/s  (+ static cache {kv_bytes / 1e9:.2f} GB a "
          f"step)  nanotulu at {100 * fig['fraction_of_bound_with_kv']:.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return fig


if __name__ == "__main__":
    main()

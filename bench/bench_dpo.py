"""One DPO training step: nanotulu (packed pairs, fused log-prob kernel, cached reference) vs what common DPO
trainers do (a transformers model; chosen and rejected concatenated into one padded batch; full logits;
log_softmax; gather).

    python bench/bench_dpo.py               # GPU: Llama-3.2-1B shape, random bf16 weights, 8 pairs x 2048 tokens
    python bench/bench_dpo.py --cpu-smoke   # CPU: a tiny shape, checks the script runs end to end

A step = forward + backward + AdamW step over the same pairs (dpo_norm, beta 5, reference log-probs given, as
both would read them from a cache). Pairs: prompt + chosen and prompt + rejected, each at most --seq_len tokens,
lengths drawn uniformly so padding matters as in real data. tokens/s counts real (non-padding) tokens of both
sequences; MFU = tokens/s x training FLOPs per token (ANCHORS.md) / the device's dense bf16 peak.
"""

import argparse
import time

import torch


from nanotulu import data, run
from nanotulu.model import LLAMA_3_2_1B, LlamaConfig, build_model, config_to_hf, num_flops_per_token
from nanotulu.data import stack_pair_rows
from nanotulu.algos.dpo import DPOParams, dpo_backward, dpo_loss
from nanotulu.pairs import pair_docs

TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)


def make_pairs(n, seq_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = int(torch.randint(seq_len // 8, seq_len // 2, (1,), generator=g))
        docs = {}
        for side in ("chosen", "rejected"):
            answer = int(torch.randint(seq_len // 8, seq_len - prompt + 1, (1,), generator=g))
            ids = torch.randint(0, vocab, (prompt + answer,), generator=g).tolist()
            docs[side] = {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}
        pairs.append({**docs, "id": i})
    return pairs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_nanotulu(cfg, pairs, device, capacity, steps, impl):
    model = build_model(cfg, device=device, dtype=torch.float32)
    if device.type == "cuda":  # what train_dpo does on a GPU: FSDP2 on one rank, bf16 params, fp32 master weights
        from nanotulu import parallel
        run.init_distributed()
        model = parallel.parallelize(model, parallel.build_mesh(1, -1, 1, device), bf16=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    bins = data.pack([len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs], capacity)
    rows = []
    for b in bins:
        row = data.make_row([d for j in b for d in pair_docs(pairs[j])], capacity, 0)
        row["example_ids"] = list(b)
        rows.append(row)
    micro = [stack_pair_rows([r], device) for r in rows]
    ref = torch.full((len(pairs), 2), -500.0, device=device)
    kw = dict(loss_type="dpo_norm", beta=5.0)

    def step():
        dpo_backward(model, micro, lambda m: ref[m["pair_ids"]], DPOParams(**kw), impl)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, device, steps), len(rows)


def run_baseline(cfg, pairs, device, steps):
    """transformers LlamaForCausalLM, bf16 on GPU, chosen and rejected concatenated into one padded batch."""
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                         if k not in ("architectures", "model_type")})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    T = max(len(s["input_ids"]) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    ids, labels, attn = ids.to(device), labels.to(device), attn.to(device)
    P = len(pairs)
    ref = torch.full((P, 2), -500.0, device=device)

    def step():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()  # (2P, T, V): what we avoid
        tgt = labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        mask = (tgt != -100).float()
        sums, counts = (logp * mask).sum(-1), mask.sum(-1)
        losses, _, _ = dpo_loss(sums[:P], sums[P:], ref[:, 0], ref[:, 1], counts[:P], counts[P:],
                                loss_type="dpo_norm", beta=5.0)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, device, steps), T


def timed(step, device, steps):
    step()  # warm-up (compilation, allocator)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no_baseline", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    cfg, impl = (LLAMA_3_2_1B, "auto") if device.type == "cuda" else (TINY, "torch")
    if args.cpu_smoke:
        args.pairs, args.seq_len, args.steps = 4, 128, 2
    pairs = make_pairs(args.pairs, args.seq_len, cfg.vocab_size)
    tokens = sum(len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs)
    capacity = 2 * args.seq_len
    flops = num_flops_per_token(cfg, args.seq_len)
    peak = run.peak_flops(device)
    results = []
    (sec, mem), n_rows = run_nanotulu(cfg, pairs, device, capacity, args.steps, impl)
    results.append(("nanotulu (packed, fused kernel)", sec, mem, f"{n_rows} rows x {capacity}"))
    if not args.no_baseline:
        torch.cuda.empty_cache() if device.type == "cuda" else None
        (sec, mem), T = run_baseline(cfg, pairs, device, args.steps)
        results.append(("transformers (padded, full logits)", sec, mem, f"{2 * args.pairs} x {T} padded"))
    print(f"DPO step, {args.pairs} pairs, sequences <= {args.seq_len} tokens, {tokens} real tokens, "
          f"device: {run.device_name()}")
    print("| engine | layout | step ms | tokens/s | peak GiB | MFU | speedup |\n|---|---|---|---|---|---|---|")
    base = results[-1][1]
    for name, sec, mem, layout in results:
        mfu = f"{tokens / sec * flops / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {layout} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | {mem:.2f} | {mfu} | "
              f"{base / sec:.2f}x |")
    run.finish_distributed()


if __name__ == "__main__":
    main()

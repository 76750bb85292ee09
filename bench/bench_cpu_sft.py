"""SFT on a CPU: one nanotulu optimizer step beside a plain transformers loop on the same documents, weights,
threads and machine, as real (non-padding) tokens per second, and where nanotulu's step spends its time.

    python bench/bench_cpu_sft.py                      # SmolLM-135M shape (30 layers, 576 wide, vocab 49152)
    python bench/bench_cpu_sft.py --layers 4 --docs 16  # a smaller, quicker figure on a busy machine
    python bench/bench_cpu_sft.py --profile             # + torch.profiler: nanotulu's step by op

Both sides start from the same random weights (no download) and train on the same Tulu-like documents (random
token ids, log-normal lengths around --doc_len, the first --prompt_frac of each masked as the prompt):
- nanotulu as train_sft runs a step: the documents packed best-fit decreasing into rows of --row_len tokens
  (data.PackedLoader), sft_backward (Tulu's "sum" loss through the fused chunked loss head) over micro-batches of
  one row, run.optimizer_step (clip, AdamW);
- the plain loop: transformers' LlamaForCausalLM (sdpa attention), the same documents in their order in
  micro-batches of --hf_batch, each padded to its longest with an attention mask, loss = labels= mean cross-entropy
  scaled to the step's sum loss, gradient accumulation, clip, torch.optim.AdamW with its defaults.
Each side runs --warmup steps, then --steps timed steps (the median printed); the two alternate step by step so
that load from other processes on the machine falls on both alike.
"""

import argparse
import statistics
import time

import torch

from nanotulu import data, machine, run
from nanotulu.model import LlamaConfig, build_model
from nanotulu.algos.sft import sft_backward
from nanotulu.flags import TrainFlags


def smollm_135m(layers, vocab):
    """SmolLM-135M's shape (a Llama: 9 heads of 64, 3 KV heads, SwiGLU 1536, tied embeddings)."""
    return LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, rope_theta=10000.0, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def make_docs(n, doc_len, row_len, vocab, prompt_frac, seed=0):
    """n documents {"input_ids", "labels"}: log-normal lengths (median doc_len, at most row_len), random ids, the
    first prompt_frac of each masked (-100) as a prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=g) * 0.6).exp().mul(doc_len).clamp(16, row_len).long().tolist()
    docs = []
    for n_tok in lengths:
        ids = torch.randint(0, vocab, (n_tok,), generator=g).tolist()
        n_prompt = int(n_tok * prompt_frac)
        docs.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return docs


def nanotulu_side(cfg, docs, row_len, lr):
    """-> (model, step(), rows): one optimizer step over all `docs`, as train_sft runs it on one CPU process."""
    model = build_model(cfg, seed=0)
    flags = TrainFlags(lr=lr)  # weight decay, clipping and AdamW as SFT's flags
    bins = data.pack([len(d["input_ids"]) for d in docs], row_len)  # best-fit decreasing, as PackedLoader
    rows = [data.make_row([docs[i] for i in b], row_len, 0) for b in bins]
    optimizer = run.make_optimizer(model, flags, torch.device("cpu"))
    model.train()

    def step():
        micro = data.micro_batches(rows, 1, torch.device("cpu"))
        sft_backward(model, micro)
        run.optimizer_step(model, optimizer, lr, flags.max_grad_norm)

    return model, step, len(rows)


def transformers_side(cfg, state_dict, docs, batch, lr):
    """-> (model, step()): one optimizer step over all `docs` in a plain transformers loop (padded micro-batches)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                      num_attention_heads=cfg.num_attention_heads,
                                      num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                                      max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                                      tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.load_state_dict(state_dict, strict=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = []
    for i in range(0, len(docs), batch):
        group = docs[i:i + batch]
        width = max(len(d["input_ids"]) for d in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, d in enumerate(group):
            n = len(d["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(d["input_ids"]), torch.tensor(d["labels"]), 1
        batches.append((ids, labels, mask))
    # trained positions (targets): a label after the first position of its document
    n_targets = sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in batches)

    def step():
        for ids, labels, mask in batches:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            (out.loss * n / n_targets).backward()  # mean over the micro-batch -> the step's sum loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def profile(step, top):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM-135M: 30)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM-135M: 49152)")
    p.add_argument("--docs", type=int, default=32, help="documents per optimizer step")
    p.add_argument("--doc_len", type=int, default=200, help="median document length in tokens")
    p.add_argument("--prompt_frac", type=float, default=0.3, help="share of each document masked as its prompt")
    p.add_argument("--row_len", type=int, default=1024, help="nanotulu's packed row length (--max_seq_len)")
    p.add_argument("--hf_batch", type=int, default=4, help="documents per padded micro-batch of the plain loop")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the physical cores, as the trainers)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables of one step of each")
    args = p.parse_args(argv)
    threads = machine.set_threads(args.threads)
    cfg = smollm_135m(args.layers, args.vocab)
    docs = make_docs(args.docs, args.doc_len, args.row_len, args.vocab, args.prompt_frac)
    real = sum(len(d["input_ids"]) for d in docs)

    model, nt_step, n_rows = nanotulu_side(cfg, docs, args.row_len, lr=1e-5)
    _, hf_step = transformers_side(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}, docs,
                                args.hf_batch, lr=1e-5)
    times = {"nanotulu": [], "transformers": []}
    for i in range(args.warmup + args.steps):
        for name, step in (("nanotulu", nt_step), ("transformers", hf_step)):
            t = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SFT step on CPU: {n_params / 1e6:.0f}M parameters ({args.layers} layers, vocab {args.vocab}), "
          f"{args.docs} documents = {real} real tokens per step (nanotulu: {n_rows} rows of {args.row_len}); "
          f"{threads} threads, torch {torch.__version__}; median of {args.steps} steps after {args.warmup}")
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = real / med
        print(f"  {name:<13} {med:7.2f} s/step  {real / med:8.0f} real tok/s   (steps: "
              f"{', '.join(f'{t:.2f}' for t in ts)})")
    print(f"  nanotulu / transformers: {result['nanotulu'] / result['transformers']:.2f}x")
    if args.profile:
        print("nanotulu, one step:")
        profile(nt_step, 25)
        print("transformers, one step:")
        profile(hf_step, 25)
    return result


if __name__ == "__main__":
    main()

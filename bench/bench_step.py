"""One training step of nanotulu as the trainers run it, and where its time goes: SFT and DPO, Llama-3.2-1B shape,
packed rows of 4096 tokens, random weights.

    python bench/bench_step.py                   # GPU: 1B shape, 8 rows x 4096 tokens per step, SFT then DPO
    python bench/bench_step.py --cpu-smoke       # CPU: a tiny shape, checks the script end to end (figures meaningless)
    python bench/bench_step.py --compile false --grad_sync every --fused_adamw false   # the switches, one by one

A step is what train_sft / train_dpo run per optimizer step: sft_backward / dpo_backward over the step's
micro-batches, then run.optimizer_step (clip, AdamW). The model is placed by parallel.place with the same flags as
the trainers (on a GPU: FSDP2 on one rank with bf16 parameters, per-block compile, fused AdamW, attention backend
"auto"). Documents are Tulu-like (log-normal lengths, median 600 tokens), packed best-fit decreasing.

Printed per stage: step time, tokens/s (row capacity, as the trainers count it, and real tokens), MFU (ANCHORS.md:
6 x non-embedding params + 12 x layers x hidden x row length FLOPs per token, over the device's dense bf16 peak),
peak memory, and a torch.profiler breakdown of one step into attention, matmuls, loss, norms, optimizer,
communication and other (device kernel time on a GPU, self CPU time of the ops on a CPU; kernels are grouped by
their names and the ranges they run in (see GROUPS), so an unrecognised kernel lands in "other" and shows among the
top kernels below the table).
"""

import argparse
import collections
import dataclasses
import time

import torch


from nanotulu import data, parallel, run
from nanotulu.model import LLAMA_3_2_1B, LlamaConfig, build_model, num_flops_per_token, pick_backend
from nanotulu.algos.dpo import DPOParams, dpo_backward
from nanotulu.algos.sft import sft_backward
from nanotulu.flags import RunFlags, TrainFlags, on_cuda_by_default
from nanotulu.pairs import pair_docs

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)

# name fragments (lower-case) -> group. An op or kernel takes the first group that matches its own name or the name
# of any range it runs in: the bench's "optimizer_step" and "loss_head" ranges, autograd nodes in backward
# ("_LinearLogprobsFnBackward", "ScaledDotProductFlashAttentionBackward"), FSDP's "FSDP::all_gather..." ranges.
# Compiled kernels carry the ops they fuse ("triton_red_fused_..._mean_mul_pow_rsqrt_..." is an RMSNorm).
GROUPS = [
    ("communication", ("nccl", "all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce", "c10d",
                       "gloo", "broadcast")),
    ("optimizer", ("optimizer", "adam", "multi_tensor", "clip_grad")),
    ("loss", ("loss_head", "logprob", "crossentropy", "cross_entropy", "_stats_kernel", "_grads_kernel")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "varlen", "flex")),
    ("norms", ("rsqrt", "rms_norm", "rmsnorm", "pow", "aten::mean", "meanbackward")),  # pow: only RMSNorm squares
    ("matmuls", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "cutlass", "nvjet", "sm90_xmma", "wgmma",
                 "cublas", "aten::linear")),
]


def group_of(names):
    """names: an op's or kernel's own name and those of the ranges it runs in -> its group."""
    low = [n.lower() for n in names]
    for group, keys in GROUPS:
        if any(k in n for n in low for k in keys):
            return group
    return "other"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--rows", type=int, default=None, help="packed rows per optimizer step (8 on GPU)")
    p.add_argument("--seq_len", type=int, default=None, help="row capacity in tokens (4096 on GPU)")
    p.add_argument("--micro_batch_rows", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile, autotuning)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    for f in dataclasses.fields(RunFlags):  # the trainers' own speed flags, with their defaults
        if f.name in ("compile", "grad_sync", "fused_adamw", "attn_backend", "loss_impl", "precision",
                      "activation_checkpointing"):
            p.add_argument(f"--{f.name}", type=str, default=str(f.default))
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.rows, args.seq_len = args.rows or 2, args.seq_len or 128
        args.steps, args.warmup = args.steps or 1, args.warmup if args.warmup is not None else 1
    else:
        args.rows, args.seq_len = args.rows or 8, args.seq_len or 4096
        args.steps, args.warmup = args.steps or 5, args.warmup if args.warmup is not None else 3
    return args


def doc_lengths(g, n, cap, median=600):
    """Tulu-like lengths: log-normal (sigma 0.9) around `median`, clipped to [16, cap]."""
    x = torch.exp(torch.randn(n, generator=g) * 0.9) * median
    return x.clamp(16, cap).long().tolist()


def sft_rows(n_rows, seq_len, vocab, seed=0):
    """n_rows packed rows of chat-like documents (the first third of each a prompt, no labels)."""
    g = torch.Generator().manual_seed(seed)
    lengths = doc_lengths(g, 4 * n_rows * seq_len // 600 + 8, seq_len, median=min(600, seq_len // 4))
    docs = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    bins = data.pack(lengths, seq_len)[:n_rows]  # BFD: the first rows are the fullest, as most of an epoch's are
    rows = []
    for b in bins:
        rows.append(data.make_row([docs[i] for i in b], seq_len, 0))
        rows[-1]["n_real"] = sum(lengths[i] for i in b)
    return rows


def dpo_rows(n_rows, seq_len, vocab, seed=0):
    """n_rows packed rows of (chosen, rejected) pairs sharing a prompt; a row holds whole pairs."""
    g = torch.Generator().manual_seed(seed)
    half = seq_len // 2
    pairs = []
    for i, n in enumerate(doc_lengths(g, 4 * n_rows * seq_len // 1200 + 8, half, median=min(600, half // 2))):
        prompt = max(1, n // 3)
        ids = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        sides = {}
        for side in ("chosen", "rejected"):
            answer = torch.randint(0, vocab, (max(1, n - prompt),), generator=g).tolist()
            sides[side] = {"input_ids": ids + answer, "labels": [-100] * prompt + answer}
        pairs.append({**sides, "id": i})
    bins = data.pack([len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs],
                     seq_len)[:n_rows]
    rows = []
    for b in bins:
        row = data.make_row([d for j in b for d in pair_docs(pairs[j])], seq_len, 0)
        row["example_ids"] = list(b)
        row["n_real"] = sum(len(d["input_ids"]) for j in b for d in pair_docs(pairs[j]))
        rows.append(row)
    return rows, len(pairs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the process's peak RSS


def profile_breakdown(step, device):
    """One step under torch.profiler -> ({group: ms}, [(ms, name, group)] top kernels or ops). GPU: device time of
    each kernel, grouped by its name and the ranges of the op that launched it. CPU: self time of every op."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from nanotulu import losses

    def ranged_loss_head(*a, **kw):  # the loss's forward ops inside a "loss_head" range
        head = plain_loss_head(*a, **kw)

        def ranged(hidden, weight):
            with record_function("loss_head"):
                return head(hidden, weight)
        return ranged

    plain_loss_head, losses.loss_head = losses.loss_head, ranged_loss_head
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            step()
            sync(device)
    finally:
        losses.loss_head = plain_loss_head
    times, per_name = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        ranges, p = [], e.cpu_parent
        while p is not None:
            ranges.append(p.name)
            p = p.cpu_parent
        if device.type == "cuda":
            items = [(k.name, k.duration) for k in e.kernels]
        else:
            items = [(e.name, e.self_cpu_time_total)]
        for name, us in items:
            group = group_of([name, e.name, *ranges])
            times[group] += us / 1e3
            per_name[(name, group)] += us / 1e3
    top = sorted(((ms, name, group) for (name, group), ms in per_name.items()), reverse=True)
    return times, top


def run_stage(stage, args, cfg, device, mesh, flags, use_bf16):
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0, attn_backend=flags.attn_backend)
    model = parallel.place(model, mesh, flags, use_bf16, seq_len=args.seq_len)
    opt = run.make_optimizer(model, dataclasses.replace(flags, lr=1e-5), device)
    mb = args.micro_batch_rows
    if stage == "sft":
        rows = sft_rows(args.rows, args.seq_len, cfg.vocab_size)
        micro = data.micro_batches(rows, mb, device)

        def backward():
            sft_backward(model, micro, flags.loss_impl, mesh, use_bf16)
    else:
        rows, n_pairs = dpo_rows(args.rows, args.seq_len, cfg.vocab_size)
        micro = data.micro_batches(rows, mb, device, stack=data.stack_pair_rows)
        ref = -2.0 * torch.rand(n_pairs, 2, device=device) * args.seq_len  # cached reference log-probs
        kw = dict(loss_type="dpo_norm", beta=5.0)

        def backward():
            dpo_backward(model, micro, lambda m: ref[m["pair_ids"]], DPOParams(**kw), flags.loss_impl, mesh,
                         use_bf16)
    if len(rows) < args.rows:
        raise ValueError(f"only {len(rows)} rows could be packed, --rows {args.rows} asked")

    def step():
        backward()
        with torch.profiler.record_function("optimizer_step"):  # clip + AdamW, named for the breakdown
            run.optimizer_step(model, opt, 1e-5, 1.0)

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.rows * args.seq_len
    real = sum(int((r["labels"] != -100).sum()) for r in rows)  # trained tokens
    real_all = sum(r["n_real"] for r in rows)  # tokens of documents, padding tails excluded
    out = {"stage": stage, "step_ms": dt * 1e3, "tok/s": tokens / dt, "real_tok/s": real_all / dt,
           "trained_tok/s": real / dt, "peak_gib": peak_memory_gib(device), "rows": len(rows),
           "padding": 1 - real_all / tokens}
    peak = run.peak_flops(device)
    out["mfu"] = num_flops_per_token(cfg, args.seq_len) * tokens / dt / peak if peak else None
    if not args.no_profile:
        out["profile"] = profile_breakdown(step, device)
    del model, opt
    return out


def print_stage(r, device):
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known peak for this device)"
    print(f"\n== {r['stage'].upper()} step: {r['rows']} rows, padding {100 * r['padding']:.1f}% ==")
    print(f"step {r['step_ms']:.1f} ms | {r['tok/s']:,.0f} tok/s (row capacity) | {r['real_tok/s']:,.0f} real tok/s | "
          f"{r['trained_tok/s']:,.0f} trained tok/s | MFU {mfu} | peak memory {r['peak_gib']:.2f} GiB"
          f"{'' if device.type == 'cuda' else ' (process RSS)'}")
    if "profile" not in r:
        return
    times, top = r["profile"]
    total = sum(times.values()) or 1.0
    what = "device kernel time" if device.type == "cuda" else "self CPU time of the ops"
    print(f"profile of one step ({what}, {total:.1f} ms):")
    for group in ("attention", "matmuls", "loss", "norms", "optimizer", "communication", "other"):
        print(f"  {group:<14} {times[group]:9.2f} ms  {100 * times[group] / total:5.1f}%")
    print("  top kernels:")
    for ms, name, group in top[:12]:
        print(f"    {ms:8.2f} ms  [{group}]  {name[:110]}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = run.init_distributed()
    cfg = TINY if args.cpu_smoke else LLAMA_3_2_1B
    flags = TrainFlags(**{k: getattr(args, k) for k in ("compile", "grad_sync", "fused_adamw", "attn_backend",
                                                       "loss_impl", "precision")},
                       activation_checkpointing=args.activation_checkpointing.lower() in ("1", "true", "yes", "on"))
    use_bf16 = flags.precision == "bf16" or (flags.precision == "auto" and device.type == "cuda")
    mesh = parallel.make_mesh(flags, world, device)
    print(f"device: {run.device_name()} | world {world} | model {'tiny' if args.cpu_smoke else 'Llama-3.2-1B'} "
          f"| {args.rows} rows x {args.seq_len} tokens, micro-batches of {args.micro_batch_rows} row(s)")
    print(f"attention {pick_backend(flags.attn_backend, device)} | compile "
          f"{on_cuda_by_default(flags.compile, 'compile', device)} | grad_sync {flags.grad_sync} | fused AdamW "
          f"{on_cuda_by_default(flags.fused_adamw, 'fused_adamw', device)} | bf16 {use_bf16} "
          f"({'FSDP policy' if mesh is not None else 'autocast'}) | loss {flags.loss_impl}")
    results = []
    for stage in args.stages:
        r = run_stage(stage, args, cfg, device, mesh, flags, use_bf16)
        if rank == 0:
            print_stage(r, device)
        results.append(r)
    run.finish_distributed()
    return results


if __name__ == "__main__":
    main()

"""Where the time of one RLVR (GRPO) step goes: generation vs training.

    python bench/bench_rlvr.py                 # GPU: Llama-3.2-1B shape, random weights (bf16 compute, fp32 master),
                                               # 32 prompts x 16 samples, 256-token prompts, 512 new tokens
    python bench/bench_rlvr.py --cpu-smoke     # CPU: a tiny shape, checks the script runs end to end

One step of nanotulu.train_rlvr's phases on one process, timed each: rollout (each prompt prefilled once for its
group; on CUDA the compiled, CUDA-graph decode step with a fixed cache length), score (random 0/10 rewards: the
verifiers are not run on random weights' answers), build_rows (packing plus the old-policy and reference log-prob
passes) and update (the GRPO forward + backward and optimizer step). Answers always run to --new_tokens (no EOS
can stop them), the worst case for generation. A first step is run untimed (compilation, CUDA graph capture,
allocator warm-up); the figures are of the second.
"""

import argparse
import json
import time
from types import SimpleNamespace

import torch


from nanotulu import parallel, run
from nanotulu.model import LLAMA_3_2_1B, LlamaConfig, build_model
from nanotulu.algos.grpo import GRPOParams, build_rows, group_advantages, update
from nanotulu.algos.rollout import RolloutParams, UpdateSchedule, rollout
from nanotulu.flags import TrainFlags

TINY = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(model, ref_model, optimizer, prompts, roll, hp, sched, mesh, device, use_bf16, seed):
    """The phases of train_rlvr.main for one step -> {phase: seconds}, response tokens."""
    tok = SimpleNamespace(eos_token_id=-1, pad_token_id=0)  # -1: no EOS, every answer runs to max_new_tokens
    times = {}
    sync(device)
    t = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    group_prompts, outs = rollout(model, prompts, roll, tok, gen, mesh)
    sync(device)
    times["rollout"], t = time.perf_counter() - t, time.perf_counter()
    rew = torch.randint(0, 2, (len(outs),), generator=torch.Generator().manual_seed(seed)).double() * 10
    adv, _ = group_advantages(rew, roll.num_samples)
    times["score"], t = time.perf_counter() - t, time.perf_counter()
    capacity = roll.max_prompt_len + roll.max_new_tokens
    rows = build_rows(model, ref_model, group_prompts, outs, adv, list(range(len(outs))), hp, capacity,
                      tok.pad_token_id, device, use_bf16, parallel.tp_group(mesh))
    sync(device)
    times["build_rows (old + ref log-probs)"], t = time.perf_counter() - t, time.perf_counter()
    update(model, optimizer, rows, hp, sched, 0, mesh, device, use_bf16)
    sync(device)
    times["update (GRPO fwd + bwd + step)"] = time.perf_counter() - t
    return times, sum(len(o["tokens"]) for o in outs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=512)
    ap.add_argument("--micro_batch_rows", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.01, help="KL coefficient (> 0: a reference model pass too)")
    ap.add_argument("--json", default="", help="write the figures to this file")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.prompts, args.num_samples, args.prompt_len, args.new_tokens, args.micro_batch_rows = 2, 4, 24, 16, 2

    rank, world, device = run.init_distributed()  # one process; on CUDA a group for FSDP2's bf16 compute
    model_cfg = TINY if args.cpu_smoke else LLAMA_3_2_1B
    cfg = TrainFlags(lr=1e-6)  # placement and optimizer flags, the trainers' defaults
    roll = RolloutParams(num_samples=args.num_samples, max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens)
    hp = GRPOParams(beta=args.beta, micro_batch_rows=args.micro_batch_rows)
    sched = UpdateSchedule(steps=1, num_mini_batches=1, lr=1e-6)
    use_bf16 = device.type == "cuda"
    mesh = parallel.make_mesh(cfg, world, device)
    capacity = args.prompt_len + args.new_tokens
    model = parallel.place(build_model(model_cfg, device=device, seed=0), mesh, cfg, use_bf16, seq_len=capacity)
    ref_model = None
    if args.beta > 0:
        ref_model = parallel.place(build_model(model_cfg, device=device, seed=0), mesh, cfg, use_bf16, seq_len=capacity)
        ref_model.requires_grad_(False)
    optimizer = run.make_optimizer(model, cfg, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, model_cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]

    one_step(model, ref_model, optimizer, prompts, roll, hp, sched, mesh, device, use_bf16, seed=1)  # warm-up
    times, new_tokens = one_step(model, ref_model, optimizer, prompts, roll, hp, sched, mesh, device, use_bf16,
                                 seed=2)
    total = sum(times.values())
    print(f"one RLVR step on {run.device_name()}: {args.prompts} prompts x {args.num_samples} samples, "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, model hidden {model_cfg.hidden_size} x "
          f"{model_cfg.num_hidden_layers} layers, beta {args.beta}")
    print(f"{'phase':<36} {'seconds':>9} {'share':>7}")
    for name, s in times.items():
        print(f"{name:<36} {s:>9.3f} {100 * s / total:>6.1f}%")
    print(f"{'total':<36} {total:>9.3f}   (generation {new_tokens / times['rollout']:.0f} new tokens/s)")
    fig = {"device": run.device_name(), "seconds": times, "total_s": total, "new_tokens": new_tokens,
           "generation_share": times["rollout"] / total, "prompts": args.prompts, "num_samples": args.num_samples}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    run.finish_distributed()
    return fig


if __name__ == "__main__":
    main()

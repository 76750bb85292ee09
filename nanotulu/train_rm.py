"""Reward-model training (Bradley-Terry), run with torchrun or plain python.

    torchrun --nproc_per_node 1 nanotulu/train_rm.py         # embedded default: from the embedded SFT model, CPU
    torchrun --nproc_per_node 8 nanotulu/train_rm.py --model runs/sft-8b/final --data prefs.jsonl \
        --output_dir runs/rm-8b

A reward model is the Llama backbone with a scalar head `score` (hidden -> 1) in place of the output projection.
Its reward for an answer is the score read at the answer's last token (its EOS). It is trained on the same
preference pairs as DPO, packed the same way (chosen and rejected as two documents of one row), with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), averaged over the pairs of a step. Tulu 3 initialised
its PPO value model from such a model. The vocabulary projection is gone, so the fused loss kernels have nothing
to do here: the head is one (H -> 1) product per token.

The algorithm is in algos/rm.py, the pair data in pairs.py. The output is a Hugging Face
LlamaForSequenceClassification checkpoint (one label) that transformers loads with
the same scores; train_rlvr.py --algo ppo can start its value model from it.

Defaults: open-instruct's Tulu 3 reward-model script (lr 3e-6, linear decay, 1 epoch, 2048 tokens).
"""

import os
from dataclasses import field

import numpy as np

from nanotulu import checkpoint, data, embedded, parallel, run
from nanotulu.algos.rm import RM_SUMS, evaluate_pairs, rm_backward
from nanotulu.flags import TrainFlags, recipe, shared
from nanotulu.model import num_flops_per_token
from nanotulu.pairs import load_pairs, pair_docs, pair_length
from nanotulu.train_sft import embedded_sft_model


@recipe(output_dir="runs/rm", lr=3e-6, lr_schedule="linear", warmup_ratio=0.0, save_every=200,
        help=dict(model="HF directory to start from (an SFT model); empty: embedded",
                  data="mix 'file[:amount],...' of chosen/rejected rows",
                  eval_data="held-out preference file(s); empty: hold out --eval_fraction of --data",
                  eval_every="held-out accuracy every N steps (0: end only)"))
class RMConfig(TrainFlags):
    """Bradley-Terry reward model on preference pairs. With no --model: the embedded SFT model and the shipped
    synthetic preference set, with a preset suited to them."""
    eval_fraction: float = field(default=0.05, metadata={"help": "share of pairs held out when no --eval_data"})
    max_seq_len: int = shared("max_seq_len", 2048, "per sequence; a row holds 2 x this many tokens")
    truncate: bool = shared("truncate", True, "cut over-long answers (false: drop the pair)")
    epochs: int = shared("epochs", 1)
    max_steps: int = shared("max_steps", 0)
    batch_rows: int = shared("batch_rows", 32)


# tuned on the 2-core CPU: lr 1e-4 reached 0.540 held-out accuracy, 1e-3 reached 0.605 (200 held-out pairs)
EMBEDDED_PRESET = dict(max_seq_len=256, lr=1e-3, warmup_ratio=0.1, batch_rows=8, save_every=50, eval_fraction=0.1)

def load_data(cfg, is_embedded, tok, template, rank):
    """-> (training pairs, held-out pairs)."""
    sources = data.parse_mix(cfg.data) if cfg.data else [(embedded.asset("dpo.jsonl"), None)]
    pairs = load_pairs(sources, tok, template, cfg.max_seq_len, cfg.truncate, cfg.seed)[0]
    if cfg.eval_data:
        held = load_pairs(data.parse_mix(cfg.eval_data), tok, template, cfg.max_seq_len, cfg.truncate, cfg.seed)[0]
    else:  # a seeded share of the training pairs, never trained on
        order = np.random.default_rng([cfg.seed, 7]).permutation(len(pairs))
        n_held = int(round(cfg.eval_fraction * len(pairs)))
        held, pairs = [pairs[i] for i in order[:n_held]], [pairs[i] for i in sorted(order[n_held:])]
    for i, p in enumerate(pairs):
        p["id"] = i  # the loader and stack_pair_rows index pairs by position
    if rank == 0:
        print(f"data: {len(pairs)} training pairs, {len(held)} held out")
    if not pairs:
        raise ValueError("no preference pairs left to train on")
    return pairs, held


def main(argv=None, finish=True):
    cfg, is_embedded, rank, world, device, use_bf16 = run.start(RMConfig, EMBEDDED_PRESET, argv, "preference")
    if done := run.finished_run(cfg, rank, finish):  # a rerun of a finished run: its final/
        return done
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)  # a bad --template fails before any work
    if rank == 0:
        print(data.describe_template(cfg.template, template, tok))
    pairs, held = load_data(cfg, is_embedded, tok, template, rank)
    capacity = 2 * cfg.max_seq_len
    run.check_one_step([pair_length(p) for p in pairs], capacity, cfg, world, what="pairs")

    # --- the model: backbone + a drawn score head (a causal LM's lm_head dropped) ------------------------------------
    model_dir = embedded_sft_model(rank) if is_embedded else cfg.model
    mesh = parallel.make_mesh(cfg, world, device)
    model = run.load_model(model_dir, tok, device, cfg, score_head=True)
    model.cfg.pad_token_id = tok.pad_token_id  # transformers finds each row's last real token by it
    model = parallel.place(model, mesh, cfg, use_bf16, seq_len=capacity)
    dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
    loader = data.PackedLoader(pairs, capacity=capacity, rows_per_step=cfg.batch_rows // dp_world, rank=dp_rank,
                               world_size=dp_world, seed=cfg.seed, pad_id=tok.pad_token_id, length_fn=pair_length,
                               to_docs=pair_docs)
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    optimizer = run.make_optimizer(model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, model, optimizer, loader, rank, world)

    def held_out():
        return evaluate_pairs(model, held, capacity, tok.pad_token_id, device, mesh, rank, world,
                              cfg.micro_batch_rows, use_bf16) if held else {}

    # --- training ---------------------------------------------------------------------------------------------------
    metrics = run.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), total_steps, rank, step, desc="rm",
                          report_to=cfg.report_to, config=vars(cfg))
    speed = run.Speed(device, num_flops_per_token(model.cfg, capacity), cfg.batch_rows * capacity, world)
    batches = run.step_batches(loader)
    model.train()
    while step < total_steps:
        micro = data.micro_batches(next(batches), cfg.micro_batch_rows, device, stack=data.stack_pair_rows)
        sums, n_pairs = rm_backward(model, micro, mesh, use_bf16)
        lr = run.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        grad_norm = run.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
        step += 1
        mean = dict(zip(RM_SUMS, parallel.all_reduce_sum(sums, parallel.dp_group(mesh)) / n_pairs))
        run.exit_if_asked(cfg, step)
        evals = held_out() if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps else {}
        metrics.log(step, {**mean, "rewards/margin": mean["rewards/chosen"] - mean["rewards/rejected"], **evals,
                           "lr": lr, "grad_norm": grad_norm, "pairs": n_pairs, **speed.tick()},
                    show=("loss", "accuracy", "eval/accuracy", "tok/s"))
        if rank == 0 and evals:
            print(f"held-out pairwise accuracy at step {step}: {float(evals['eval/accuracy']):.3f}")
        checkpoint.save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, loader, rank)
    metrics.close()
    return run.finish_run(cfg, model, is_embedded, tok, rank, finish, template)


if __name__ == "__main__":
    run.run_script(main)

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

The output is a Hugging Face LlamaForSequenceClassification checkpoint (one label) that transformers loads with
the same scores; train_rlvr.py --algo ppo can start its value model from it.

Defaults: open-instruct's Tulu 3 reward-model script (lr 3e-6, linear decay, 1 epoch, 2048 tokens).
"""

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from nanotulu import checkpoint, common, data, embedded, losses
from nanotulu.data import TEMPLATE_HELP_OWN
from nanotulu.model import num_flops_per_token
from nanotulu.train_dpo import embedded_sft_model, load_pairs, pair_docs, pair_length


@dataclass
class RMConfig(common.RunFlags):
    """Bradley-Terry reward model on preference pairs. With no --model: the embedded SFT model and the shipped
    synthetic preference set, with a preset suited to them."""
    model: str = field(default="", metadata={"help": "HF directory to start from (an SFT model); empty: embedded"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory or 'byte'; empty: the model's"})
    data: str = field(default="", metadata={"help": "mix 'file[:amount],...' of chosen/rejected rows"})
    eval_data: str = field(default="", metadata={"help": "held-out preference file(s); empty: hold out "
                                                         "--eval_fraction of --data"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of pairs held out when no --eval_data"})
    eval_every: int = field(default=0, metadata={"help": "held-out accuracy every N steps (0: end only)"})
    template: str = field(default="", metadata={"help": TEMPLATE_HELP_OWN})
    output_dir: str = "runs/rm"
    max_seq_len: int = field(default=2048, metadata={"help": "per sequence; a row holds 2 x this many tokens"})
    truncate: bool = field(default=True, metadata={"help": "cut over-long answers (false: drop the pair)"})
    epochs: int = 1
    max_steps: int = 0
    lr: float = 3e-6
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.0
    batch_rows: int = field(default=32, metadata={"help": "packed rows per optimizer step, all ranks"})
    micro_batch_rows: int = 1
    save_every: int = 200


# tuned on the 2-core CPU: lr 1e-4 reached 0.540 held-out accuracy, 1e-3 reached 0.605 (200 held-out pairs)
EMBEDDED_PRESET = dict(max_seq_len=256, lr=1e-3, warmup_ratio=0.1, batch_rows=8, save_every=50, eval_fraction=0.1)

RM_SUMS = ("loss", "accuracy", "rewards/chosen", "rewards/rejected")  # what rm_backward sums over pairs, in order


def last_token_index(batch):
    """(P, 2) flat index (into B*T) of the last token of each pair's chosen and rejected document."""
    return batch["cu_seqlens"][1:].long()[batch["doc_segments"]] - 1


def pair_rewards(model, batch, tp_group=None):
    """Rewards (P, 2) of the pairs of a stacked micro-batch: the score at each answer's last token."""
    scores = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], head=losses.score_head(tp_group),
                   max_seqlen=batch.get("max_seqlen"))
    return scores.float()[last_token_index(batch)]


def bradley_terry(r_chosen, r_rejected):
    """Per-pair loss -log sigmoid(r_c - r_r) (P,)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def rm_backward(model, micro, mesh=None, use_bf16=False):
    """Forward and backward over one step's micro-batches of packed pairs; the loss is the mean over every pair of
    the step (all micro-batches and data-parallel ranks, counted first). Returns (sums (4,) of this rank named by
    RM_SUMS, n_pairs of the step)."""
    dp_world = 1 if mesh is None else mesh["dp"].size()
    device = micro[0]["input_ids"].device
    n_pairs = common.all_reduce_sum(torch.tensor(float(sum(m["pair_ids"].numel() for m in micro)), device=device),
                                    common.dp_group(mesh))
    sums = torch.zeros(len(RM_SUMS), device=device)
    for m in common.grad_sync_on_last(model, micro):
        with common.precision(model, use_bf16):
            r = pair_rewards(model, m, common.tp_group(mesh))  # (P, 2)
        losses = bradley_terry(r[:, 0], r[:, 1])
        # x dp_world: data-parallel gradient reduction averages over ranks, the batch mean wants their sum
        (losses.sum() * dp_world / n_pairs).backward()
        r = r.detach()
        sums += torch.stack([losses.sum().detach(), (r[:, 0] > r[:, 1]).float().sum(), r[:, 0].sum(), r[:, 1].sum()])
    return sums, n_pairs


@torch.no_grad()
def evaluate_pairs(model, pairs, capacity, pad_id, device, mesh, rank, world, rows_per_pass, use_bf16):
    """Held-out pairwise accuracy and mean margin over every pair exactly once (rows split over data-parallel
    ranks; every rank runs as many forwards as the busiest: under FSDP/TP a forward is collective)."""
    dp_rank, dp_world = common.dp_coords(mesh, rank, world)
    bins = data.pack([pair_length(p) for p in pairs], capacity)
    mine, n_most = bins[dp_rank::dp_world], -(-len(bins) // dp_world)
    correct, margin, n = (torch.zeros((), device=device) for _ in range(3))
    model.eval()
    for i in range(0, n_most, rows_per_pass):
        rows = []
        for b in mine[i:i + rows_per_pass] or bins[:1]:
            row = data.make_row([d for j in b for d in pair_docs(pairs[j])], capacity, pad_id)
            row["example_ids"] = list(b)
            rows.append(row)
        batch = data.stack_pair_rows(rows, device)
        with common.precision(model, use_bf16):
            r = pair_rewards(model, batch, common.tp_group(mesh))
        if mine[i:i + rows_per_pass]:
            correct += (r[:, 0] > r[:, 1]).sum()
            margin += (r[:, 0] - r[:, 1]).sum()
            n += r.shape[0]
    model.train()
    tot = common.reduce_named({"correct": correct, "margin": margin, "n": n}, common.dp_group(mesh), device)
    return {"eval/accuracy": tot["correct"] / tot["n"], "eval/margin": tot["margin"] / tot["n"]}


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
    cfg, is_embedded, rank, world, device, use_bf16 = common.start(RMConfig, EMBEDDED_PRESET, argv, "preference")
    if done := common.finished_run(cfg, rank, finish):  # a rerun of a finished run: its final/
        return done
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)  # a bad --template fails before any work
    if rank == 0:
        print(data.describe_template(cfg.template, template, tok))
    pairs, held = load_data(cfg, is_embedded, tok, template, rank)
    capacity = 2 * cfg.max_seq_len
    common.check_one_step([pair_length(p) for p in pairs], capacity, cfg, world, what="pairs")

    # --- the model: backbone + a drawn score head (a causal LM's lm_head dropped) ------------------------------------
    model_dir = embedded_sft_model(rank) if is_embedded else cfg.model
    mesh = common.make_mesh(cfg, world, device)
    model = common.load_model(model_dir, tok, device, cfg, score_head=True)
    model.cfg.pad_token_id = tok.pad_token_id  # transformers finds each row's last real token by it
    model = common.place(model, mesh, cfg, use_bf16, seq_len=capacity)
    dp_rank, dp_world = common.dp_coords(mesh, rank, world)
    loader = data.PackedLoader(pairs, capacity=capacity, rows_per_step=cfg.batch_rows // dp_world, rank=dp_rank,
                               world_size=dp_world, seed=cfg.seed, pad_id=tok.pad_token_id, length_fn=pair_length,
                               to_docs=pair_docs)
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    optimizer = common.make_optimizer(model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, model, optimizer, loader, rank, world)

    def held_out():
        return evaluate_pairs(model, held, capacity, tok.pad_token_id, device, mesh, rank, world,
                              cfg.micro_batch_rows, use_bf16) if held else {}

    # --- training ---------------------------------------------------------------------------------------------------
    metrics = common.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), total_steps, rank, step, desc="rm",
                             report_to=cfg.report_to, config=vars(cfg))
    speed = common.Speed(device, num_flops_per_token(model.cfg, capacity), cfg.batch_rows * capacity, world)
    batches = common.step_batches(loader)
    model.train()
    while step < total_steps:
        micro = data.micro_batches(next(batches), cfg.micro_batch_rows, device, stack=data.stack_pair_rows)
        sums, n_pairs = rm_backward(model, micro, mesh, use_bf16)
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        grad_norm = common.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
        step += 1
        mean = dict(zip(RM_SUMS, common.all_reduce_sum(sums, common.dp_group(mesh)) / n_pairs))
        common.exit_if_asked(cfg, step)
        evals = held_out() if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps else {}
        metrics.log(step, {**mean, "rewards/margin": mean["rewards/chosen"] - mean["rewards/rejected"], **evals,
                           "lr": lr, "grad_norm": grad_norm, "pairs": n_pairs, **speed.tick()},
                    show=("loss", "accuracy", "eval/accuracy", "tok/s"))
        if rank == 0 and evals:
            print(f"held-out pairwise accuracy at step {step}: {float(evals['eval/accuracy']):.3f}")
        checkpoint.save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, loader, rank)
    metrics.close()
    return common.finish_run(cfg, model, is_embedded, tok, rank, finish, template)


if __name__ == "__main__":
    common.run_script(main)

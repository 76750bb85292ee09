"""Reward-model training (Bradley-Terry): the reward of an answer is the score head's value at its last token (its
EOS); the loss is -log sigmoid(r_chosen - r_rejected), averaged over the pairs of a step. The vocabulary projection
is gone, so no fused loss kernel is needed: the head is one (H -> 1) product per token. No hyperparameter besides
the script's learning rate and schedule."""

import torch
import torch.nn.functional as F

from nanotulu import losses
from nanotulu.pairs import every_pair_once
from nanotulu.parallel import dp_coords, dp_group, grad_sync_on_last, precision, reduce_named, step_mean, tp_group

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
    n_pairs, scale = step_mean(micro, lambda m: m["pair_ids"].numel(), mesh)
    sums = torch.zeros(len(RM_SUMS), device=n_pairs.device)
    for m in grad_sync_on_last(model, micro):
        with precision(model, use_bf16):
            r = pair_rewards(model, m, tp_group(mesh))  # (P, 2)
        loss = bradley_terry(r[:, 0], r[:, 1])
        (loss.sum() * scale).backward()
        r = r.detach()
        sums += torch.stack([loss.sum().detach(), (r[:, 0] > r[:, 1]).float().sum(), r[:, 0].sum(), r[:, 1].sum()])
    return sums, n_pairs


@torch.no_grad()
def evaluate_pairs(model, pairs, capacity, pad_id, device, mesh, rank, world, rows_per_pass, use_bf16):
    """Held-out pairwise accuracy and mean margin over every pair exactly once (pairs.every_pair_once)."""
    dp_rank, dp_world = dp_coords(mesh, rank, world)
    correct, margin, n = (torch.zeros((), device=device) for _ in range(3))
    model.eval()
    for batch, mine in every_pair_once(pairs, capacity, pad_id, device, dp_rank, dp_world, rows_per_pass):
        with precision(model, use_bf16):
            r = pair_rewards(model, batch, tp_group(mesh))
        if mine:
            correct += (r[:, 0] > r[:, 1]).sum()
            margin += (r[:, 0] - r[:, 1]).sum()
            n += r.shape[0]
    model.train()
    tot = reduce_named({"correct": correct, "margin": margin, "n": n}, dp_group(mesh), device)
    return {"eval/accuracy": tot["correct"] / tot["n"], "eval/margin": tot["margin"] / tot["n"]}

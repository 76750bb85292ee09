"""Supervised fine-tuning's step: Tulu 3's "sum" loss over packed rows through the fused cross-entropy head.

Each optimizer step's loss is (sum of token cross-entropies) / (number of trained tokens in the whole step, over
micro-batches and ranks), so every token weighs the same whatever the micro-batching. No hyperparameter besides the
loss implementation (the learning rate and schedule are the script's)."""

import torch

from nanotulu import data, losses
from nanotulu.model import eval_mode
from nanotulu.parallel import (all_reduce_sum, dp_group, grad_sync_on_last, precision, step_mean, tp_group,
                               trained_tokens)


def cross_entropy_sum(lp, _entropy, s, e):
    """The SFT loss of a chunk of tokens: the sum of their negative log-likelihoods."""
    return -lp.sum()


def token_loss_sum(model, m, impl, mesh):
    """Summed token cross-entropy of one stacked micro-batch (a scalar carrying the gradient)."""
    head = losses.loss_head(m["targets"], impl, tp_group(mesh), loss_fn=cross_entropy_sum, targets_only=True)
    return model(m["input_ids"], m["position_ids"], m["cu_seqlens"], head=head, max_seqlen=m.get("max_seqlen"))[0]


def sft_backward(model, micro, impl="auto", mesh=None, use_bf16=False):
    """Forward and backward over one optimizer step's micro-batches with Tulu 3's "sum" loss: each token's loss is
    divided by the number of trained tokens in the whole step (all micro-batches, all data-parallel ranks), which
    is counted before any backward. Leaves the step's gradient in .grad; returns (summed token loss of this rank,
    trained tokens of the step)."""
    n_tokens, scale = step_mean(micro, trained_tokens, mesh)
    loss_sum = torch.zeros((), device=n_tokens.device)
    for m in grad_sync_on_last(model, micro):
        with precision(model, use_bf16):
            token_loss = token_loss_sum(model, m, impl, mesh)
        (token_loss * scale).backward()
        loss_sum += token_loss.detach()
    return loss_sum, n_tokens


@torch.no_grad()
def held_out_loss(model, rows, micro_batch_rows, device, impl="auto", mesh=None, use_bf16=False):
    """Mean token cross-entropy over the held-out rows of every data-parallel rank (data.held_out_rows)."""
    sums = torch.zeros(2, device=device)  # summed token loss, trained tokens
    with eval_mode(model):  # no dropout (LoRA's)
        for m in data.micro_batches(rows, micro_batch_rows, device):
            with precision(model, use_bf16):
                sums[0] += token_loss_sum(model, m, impl, mesh).float()
            sums[1] += trained_tokens(m)
    sums = all_reduce_sum(sums, dp_group(mesh))
    return sums[0] / sums[1].clamp(min=1)

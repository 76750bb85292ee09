"""Loss heads: what the algorithms hand to `Llama.forward(head=...)` so the fused kernels see the final hidden
states and the output weight (gathered by FSDP for the call) and the (tokens x vocab) logits never exist.

One contract for every implementation: loss_head(...) gives head(hidden, weight) -> (loss, logp, entropy). The
choice of kernel (the --loss_impl flag) is made here and nowhere else:
- "auto" / "fused": the chunked kernel (kernels/chunked_loss.py) forms loss_fn's loss AND its gradient in the
  forward pass, chunk by chunk (6NHV; "fused": its Triton row kernels even on CPU, interpreted);
- "triton" / "torch": the tile kernels (kernels/linear_logprobs.py, 8NHV) give per-token log-probs with their
  backward, and loss_fn is applied to all tokens at once.
Without a loss_fn (no-grad reference / old-policy passes) the tile kernels give the log-probs. Under tensor parallel
the weight is this rank's vocab shard and the kernels combine the shards."""

import torch.distributed as dist
from torch.distributed.tensor import DTensor


def loss_head(targets, impl="auto", tp_group=None, loss_fn=None, cuts=None, entropy=False, temperature=1.0,
              targets_only=False):
    """A `head` for Llama.forward: hidden (B, T, H) and the output weight (V, H) -> (loss, logp, entropy).
    targets (B, T) with -100 where nothing is trained (log-prob 0 there).
    loss_fn(logp, entropy, s, e) -> scalar: the loss of tokens [s, e) from their fp32 log-probs (and entropies, or
    None); the head's loss is its sum over the chunks (None without loss_fn) and carries the gradient. cuts: host
    token offsets where a chunk may end (a term spanning several tokens, e.g. a DPO pair, stays in one chunk).
    logp (B*T,) fp32, detached when loss_fn is given; entropy (B*T,) of the distribution or None (asked with
    entropy=True; not available from the tile kernels under tensor parallel). temperature: logits / T.
    targets_only (SFT): on a CPU, only the positions with a target meet the output weight, and logp / entropy
    cover those positions only (in order)."""
    from nanotulu.kernels import chunked_loss, linear_logprobs as tiles

    if impl not in ("auto", "fused", "triton", "torch"):
        raise ValueError(f"--loss_impl {impl!r}: expected auto, fused, triton or torch")
    fused = loss_fn is not None and impl in ("auto", "fused")
    row_impl = "triton" if impl == "fused" else "auto"

    def head(hidden, weight):
        if temperature != 1.0:
            hidden = hidden / temperature  # logits / T == (hidden / T) @ W^T
        t = targets.reshape(-1)
        if tp_group is not None:
            # hidden: sequence-split DTensor (B, T/tp, H) per rank -> full (B, T, H) on every rank of the group (its
            # gradient comes back whole: the kernel sums dX over the group); weight: this rank's vocab rows
            hidden = hidden.full_tensor() if isinstance(hidden, DTensor) else hidden
            weight = weight.to_local() if isinstance(weight, DTensor) else weight
            tp = dict(vocab_start=weight.shape[0] * dist.get_rank(tp_group), tp_group=tp_group)
        else:
            tp = {}
        h = hidden.reshape(-1, hidden.shape[-1])
        if h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        if targets_only and not tp and h.device.type == "cpu":
            # prompt, padding and each document's last position (-100: 30-60% of an SFT row) would add 6HV FLOPs
            # each for a zero. Counting them reads a tensor back to the host: free on a CPU, a stall of the stream
            # on a GPU (left as is there).
            keep = (t != -100).nonzero().squeeze(1)
            h, t = h.index_select(0, keep), t.index_select(0, keep)
        if fused:
            return chunked_loss.fused_linear_loss(h, weight, t, loss_fn, row_impl=row_impl, cuts=cuts,
                                                  return_entropy=entropy, **tp)
        if tp:
            logp, ent = tiles.vocab_parallel_linear_logprobs(h, weight, t, tp["vocab_start"], tp_group, impl=impl), None
        elif entropy:
            logp, ent = tiles.linear_logprobs(h, weight, t, impl=impl, return_entropy=True)
        else:
            logp, ent = tiles.linear_logprobs(h, weight, t, impl=impl), None
        if loss_fn is None:
            return None, logp, ent
        loss = loss_fn(logp, ent, 0, t.numel())
        return loss, logp.detach(), None if ent is None else ent.detach()

    return head


def score_head(tp_group=None):
    """A `head` for a reward / value model's forward: one scalar per token (B*T,) from hidden (B, T, H) and the
    (1, H) score weight. Under tensor parallel the sequence-split hidden states are gathered first (the score
    weight is not split)."""
    def head(hidden, score_weight):
        if tp_group is not None:
            hidden = hidden.full_tensor() if isinstance(hidden, DTensor) else hidden
            score_weight = score_weight.full_tensor() if isinstance(score_weight, DTensor) else score_weight
        return (hidden.reshape(-1, hidden.shape[-1]) @ score_weight.to(hidden.dtype).T).squeeze(-1)

    return head

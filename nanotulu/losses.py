"""Loss heads: what the trainers hand to `Llama.forward(head=...)` so the fused kernels see the final hidden states
and the output weight (gathered by FSDP for the call) and the (tokens x vocab) logits never exist."""

import torch.distributed as dist


def loss_head(fn, targets, impl="auto", tp_group=None, **kw):
    """A `head` for Llama.forward: fused per-token loss from hidden (B, T, H) and the output weight (V, H).
    fn: "cross_entropy_sum" (a scalar), "logprobs" ((B*T,) log-probs, 8NHV with their backward), or "fused":
    kw are kernels.fused_linear_loss's loss_fn / cuts / return_entropy, the head returns (loss, logp, entropy)
    with the gradient formed in the forward pass (6NHV). impl "auto" and "fused" take the fused path for
    "cross_entropy_sum" too ("fused": Triton row kernels even on CPU, interpreted); "triton" / "torch" the 8NHV
    kernels. Under tensor parallel the weight is a vocab shard and the kernels combine the shards."""
    from nanotulu.kernels import chunked_loss, linear_logprobs as tiles

    fused = fn == "fused" or (fn == "cross_entropy_sum" and impl in ("auto", "fused"))
    row_impl = "triton" if impl == "fused" else "auto"
    if fn == "cross_entropy_sum" and fused:
        kw = dict(loss_fn=lambda lp, en, s, e: -lp.sum())

    def head(hidden, weight):
        if tp_group is not None:
            from torch.distributed.tensor import DTensor
            # hidden: sequence-split DTensor (B, T/tp, H) per rank -> full (B, T, H) on every rank of the group (its
            # gradient comes back whole: the kernel sums dX over the group); weight: this rank's vocab rows
            hidden = hidden.full_tensor() if isinstance(hidden, DTensor) else hidden
            local = weight.to_local() if isinstance(weight, DTensor) else weight
            h = hidden.reshape(-1, hidden.shape[-1]).to(local.dtype)
            start = local.shape[0] * dist.get_rank(tp_group)
            if fused:
                out = chunked_loss.fused_linear_loss(h, local, targets.reshape(-1), row_impl=row_impl, vocab_start=start,
                                                tp_group=tp_group, **kw)
                return out[0] if fn == "cross_entropy_sum" else out
            logps = tiles.vocab_parallel_linear_logprobs(h, local, targets.reshape(-1), start, tp_group,
                                                           impl=impl)
            if fn == "logprobs":
                return logps
            return -logps.sum()
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        if fn == "cross_entropy_sum" and h.device.type == "cpu":
            # CPU: only the positions with a target meet the (H x V) output weight; prompt, padding and each
            # document's last position (-100: 30-60% of an SFT row) would add 6 H V FLOPs each for a zero. Counting
            # them reads a tensor back to the host: free on a CPU, a stall of the stream on a GPU (left as is there).
            keep = (t != -100).nonzero().squeeze(1)
            h, t = h.index_select(0, keep), t.index_select(0, keep)
        if fused:
            out = chunked_loss.fused_linear_loss(h, weight, t, row_impl=row_impl, **kw)
            return out[0] if fn == "cross_entropy_sum" else out
        if fn == "cross_entropy_sum":
            return tiles.linear_cross_entropy(h, weight, t, reduction="sum", impl=impl)
        return tiles.linear_logprobs(h, weight, t, impl=impl, **kw)

    return head


def score_head(tp_group=None):
    """A `head` for a reward / value model's forward: one scalar per token (B*T,) from hidden (B, T, H) and the
    (1, H) score weight. Under tensor parallel the sequence-split hidden states are gathered first (the score
    weight is not split)."""
    def head(hidden, score_weight):
        if tp_group is not None:
            from torch.distributed.tensor import DTensor
            hidden = hidden.full_tensor() if isinstance(hidden, DTensor) else hidden
            score_weight = score_weight.full_tensor() if isinstance(score_weight, DTensor) else score_weight
        return (hidden.reshape(-1, hidden.shape[-1]) @ score_weight.to(hidden.dtype).T).squeeze(-1)

    return head

"""Triton kernels of nanotulu, installed as `nanotulu.kernels`.

linear_logprobs / linear_cross_entropy: log p(target) and cross-entropy of hidden @ weight.T without the (N, V)
logits (8NHV tile kernels or chunked torch; cross-entropy sum/mean: the 6NHV fused path below);
vocab_parallel_linear_logprobs: the same with the output
weight split over the vocab across ranks; logprob_stats / logprob_grads: the two primitives both are built on
(8NHV: kernels/linear_logprobs.py).
fused_linear_loss: any loss of the per-token log-probs (cross-entropy, DPO, GRPO) with its gradient formed in
the forward pass, chunk by chunk, at 6NHV (kernels/chunked_loss.py); plan_chunks / default_chunk_size: its chunks.
"""
from .chunked_loss import default_chunk_size, fused_linear_loss, plan_chunks
from .linear_logprobs import (
    linear_cross_entropy,
    linear_logprobs,
    logprob_grads,
    logprob_stats,
    vocab_parallel_linear_logprobs,
)

__all__ = [
    "fused_linear_loss",
    "plan_chunks",
    "default_chunk_size",
    "linear_logprobs",
    "linear_cross_entropy",
    "vocab_parallel_linear_logprobs",
    "logprob_stats",
    "logprob_grads",
]

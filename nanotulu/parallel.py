"""Parallelism for nanotulu's Llama: a 2-D device mesh (data-parallel shard x tensor parallel) and one function that
places a model on it, in the torchtitan order:

1. tensor parallel (TP) inside each block: column-parallel q/k/v and gate/up (each rank holds a slice of the heads /
   of the MLP width), row-parallel o and down (partial sums reduce-scattered back over the sequence), and sequence
   parallel norms (between the blocks the residual stream is split over the sequence, (B, T/tp, H) per rank, so
   norms and residual adds do 1/tp of the work and activations take 1/tp of the memory);
   outside the blocks: the embedding is split over the vocabulary (its lookup masks ids of other ranks and
   reduce-scatters into the sequence-split stream), the output weight too (vocab rows [r*V/tp, (r+1)*V/tp) on TP
   rank r; with tied embeddings it is the same tensor), and the fused loss runs vocab parallel
   (losses.loss_head -> kernels.vocab_parallel_linear_logprobs): no rank ever holds full logits;
2. optional activation checkpointing of each block;
3. optional per-block torch.compile;
4. FSDP2 `fully_shard` per block and at the root over the data-parallel dimension, with bf16 parameters and fp32
   gradient reduction when asked (on GPU); with --dp_replicate > 1, HSDP: sharded inside a replica group (a node),
   replicated across them.

The model file knows nothing of this: parallelize() wraps the submodules by name (HF names, blocks keyed by index).
With tp == 1 no TP is applied; with dp == 1 FSDP still wraps the model (one GPU gets bf16 compute with fp32 master
weights that way).

Under TP, every rank of a TP group sees the same rows (the loader splits rows by the dp coordinate only) and the
sequence length of every forward must divide by tp (sequence parallel splits it).
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

def build_mesh(world, dp_shard, tp, device, dp_replicate=1):
    """A (dp, tp) DeviceMesh over `world` ranks, dims named "dp" and "tp". dp_shard -1: world // (tp x dp_replicate).
    TP groups are consecutive ranks (on one node they share NVLink); dp groups stride over them.
    dp_replicate > 1 (HSDP): a (dp_replicate, dp_shard, tp) mesh; FSDP shards over dp_shard (inside a node) and
    replicates over dp_replicate (across nodes: one all-reduce of the sharded gradients instead of reduce-scatters
    over the slow links), and "dp" is the flattened (dp_replicate, dp_shard) dim the loader and the loss reductions
    use, so a (2, 2) HSDP run sees the data of a 4-way data-parallel run."""
    device = torch.device(device)
    if tp < 1 or dp_replicate < 1:
        raise ValueError(f"--tp {tp} and --dp_replicate {dp_replicate}: must be >= 1")
    if dp_shard == -1:
        if world % (tp * dp_replicate):
            raise ValueError(f"--tp {tp} x --dp_replicate {dp_replicate} does not divide the world size {world} "
                             "(processes started by torchrun)")
        dp_shard = world // (tp * dp_replicate)
    if dp_shard < 1 or dp_replicate * dp_shard * tp != world:
        what = f"--dp_replicate {dp_replicate} x " if dp_replicate > 1 else ""
        raise ValueError(f"{what}--dp_shard {dp_shard} x --tp {tp} = {dp_replicate * dp_shard * tp}, but {world} "
                         f"processes were started: the world size must equal "
                         f"{'dp_replicate x ' if dp_replicate > 1 else ''}dp_shard x tp "
                         f"(torchrun --nproc_per_node {dp_replicate * dp_shard * tp})")
    if not dist.is_initialized():
        raise ValueError("build_mesh needs torch.distributed initialised: start with torchrun")
    if dp_replicate == 1:
        return init_device_mesh(device.type, (dp_shard, tp), mesh_dim_names=("dp", "tp"))
    mesh = init_device_mesh(device.type, (dp_replicate, dp_shard, tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


def fsdp_mesh(mesh):
    """The mesh FSDP shards over: "dp" (1-D, plain FSDP), or ("dp_replicate", "dp_shard") (2-D, HSDP)."""
    names = mesh.mesh_dim_names
    return mesh["dp_replicate", "dp_shard"] if "dp_replicate" in names else mesh["dp"]


def check_tp_shapes(cfg, tp, seq_len=None):
    """Every size TP splits must divide by tp; raises before any work with the field that does not."""
    if tp == 1:
        return
    sizes = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
             "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}
    if seq_len is not None:
        sizes["row capacity (tokens per row, split by sequence parallel)"] = seq_len
    bad = [f"{name} = {n}" for name, n in sizes.items() if n % tp]
    if bad:
        raise ValueError(f"--tp {tp} must divide {', '.join(bad)}")


def apply_tp(model, tp_mesh):
    """Tensor + sequence parallel on the embedding, every block, the final norm and the output weight."""
    # Embedding: vocab-split weight (Shard(0)), full ids in, sequence-split stream out (one reduce-scatter).
    # Final norm: sequence parallel; its output stays a DTensor so loss_head can make it full for the loss.
    parallelize_module(model.model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(use_local_output=False),
    })
    if model.lm_head is not None:
        # Only its weight placement matters: forward passes model.output_weight to the fused loss head, which takes
        # the local vocab shard (lm_head's own forward, unused in training, would give vocab-split logits).
        parallelize_module(model.lm_head, tp_mesh,
                           ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False))
    for block in model.model.layers.values():
        parallelize_module(block, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            # self_attn(x, att): only x (the normed, sequence-split stream) is gathered; att (rotary tables,
            # document mask) is already full on every rank
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })

    def check_seq_len(module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        if input_ids.shape[1] % tp_mesh.size():
            raise ValueError(f"sequence length {input_ids.shape[1]} does not divide by --tp {tp_mesh.size()} "
                             "(sequence parallel splits it): make the row capacity a multiple of tp")

    model.register_forward_pre_hook(check_seq_len, with_kwargs=True)


def apply_ac(model):
    """Recompute each block's activations in backward: only the block inputs are kept."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in list(model.model.layers.items()):
        model.model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model):
    """Compile each block in place (module names, hence state-dict keys, stay as they are)."""
    for block in model.model.layers.values():
        block.compile(fullgraph=False)


def apply_fsdp(model, dp_mesh, bf16):
    """FSDP2 over the data-parallel dim: each block is one all-gather / reduce-scatter unit, the root holds the rest
    (embedding, final norm, lm_head; a tied output weight is the embedding, so they stay in one unit). A 2-D
    dp_mesh (replicate, shard) is HSDP."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    n = len(model.model.layers)
    for i, block in model.model.layers.items():
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=int(i) < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(model, mesh, bf16=False, compile=False, activation_checkpointing=False, seq_len=None):
    """Places `model` (fp32 weights, on its device) on `mesh` from build_mesh, in place; returns it.
    seq_len: the row capacity, checked against tp now rather than at the first forward."""
    tp = mesh["tp"].size()
    check_tp_shapes(model.cfg, tp, seq_len)
    if tp > 1:
        apply_tp(model, mesh["tp"])
        from nanotulu import lora
        lora.distribute_adapters(model, mesh["tp"])  # LoRA: adapters TP left plain become replicated DTensors
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    apply_fsdp(model, fsdp_mesh(mesh), bf16)
    return model

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

The rest of the library reaches FSDP and DTensors only through this file (place, grad_sync_on_last, precision,
the dp / tp groups and reductions, clip_grad_norm, gathered for generation); checkpoint.py (DCP) and losses.py
(vocab-parallel weights) are the two other files that see them (tests/test_architecture.py checks it).
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def mesh_shape(world, dp_shard, tp, dp_replicate=1):
    """(dp_replicate, dp_shard, tp) of the mesh build_mesh makes for `world` ranks, or a ValueError naming the flags
    when their product is not the world size; needs no process group, so the trainers check it before any data or
    weights load (run.check_before_load)."""
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
    return dp_replicate, dp_shard, tp


def build_mesh(world, dp_shard, tp, device, dp_replicate=1):
    """A (dp, tp) DeviceMesh over `world` ranks, dims named "dp" and "tp". dp_shard -1: world // (tp x dp_replicate).
    TP groups are consecutive ranks (on one node they share NVLink); dp groups stride over them.
    dp_replicate > 1 (HSDP): a (dp_replicate, dp_shard, tp) mesh; FSDP shards over dp_shard (inside a node) and
    replicates over dp_replicate (across nodes: one all-reduce of the sharded gradients instead of reduce-scatters
    over the slow links), and "dp" is the flattened (dp_replicate, dp_shard) dim the loader and the loss reductions
    use, so a (2, 2) HSDP run sees the data of a 4-way data-parallel run."""
    device = torch.device(device)
    dp_replicate, dp_shard, tp = mesh_shape(world, dp_shard, tp, dp_replicate)
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
    from nanotulu.lora import is_nf4

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # QLoRA on one shard rank (one GPU): FSDP2's world-size-1 shortcut copies only the first of the all-gather inputs
    # a tensor subclass declares, and torchao's NF4 declares three; with nothing to shard, NF4 weights stay outside
    ignored = {p for p in model.parameters() if is_nf4(p)} if dp_mesh.size(dp_mesh.ndim - 1) == 1 else set()
    n = len(model.model.layers)
    for i, block in model.model.layers.items():
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=int(i) < n - 1, ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored)


def replicate_adapters(model, tp_mesh):
    """After tensor parallel (parallel.apply_tp): ColwiseParallel shards every parameter of an adapted projection on
    dim 0 (W and B by output rows, A by rank: the forward then gathers the (tokens, r) activations, a small
    exchange), RowwiseParallel only the weight; here the adapters it left as plain tensors become replicated
    DTensors, so each forward runs in DTensor arithmetic (correct for any placement) and FSDP sees one kind of
    parameter."""
    from torch.distributed.tensor import distribute_tensor

    from nanotulu.lora import lora_modules

    mods = lora_modules(model)
    if not mods:
        return
    # SequenceParallel re-registers the norm weights as new Parameters, which require grad again: a LoRA model
    # trains its adapters (and a value model's score head) only
    for name, p in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B", "score.weight")):
            p.requires_grad_(False)
    for _, m in mods:
        if not isinstance(m.weight, DTensor) or not m.rank:
            continue
        for name in ("lora_A", "lora_B"):
            p = getattr(m, name)
            if not isinstance(p, DTensor):
                setattr(m, name, torch.nn.Parameter(distribute_tensor(p.detach(), tp_mesh, [Replicate()])))


def parallelize(model, mesh, bf16=False, compile=False, activation_checkpointing=False, seq_len=None):
    """Places `model` (fp32 weights, on its device) on `mesh` from build_mesh, in place; returns it.
    seq_len: the row capacity, checked against tp now rather than at the first forward."""
    tp = mesh["tp"].size()
    check_tp_shapes(model.cfg, tp, seq_len)
    if tp > 1:
        apply_tp(model, mesh["tp"])
        replicate_adapters(model, mesh["tp"])  # LoRA: adapters TP left plain become replicated DTensors
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    apply_fsdp(model, fsdp_mesh(mesh), bf16)
    return model


# ----------------------------------------------------------------------------------------------------------------
# What the trainers' steps need of the placement: the mesh from the flags, the placed model, gradient sync on the
# last micro-batch, the bf16 mechanism, the dp / tp groups and their reductions, full weights for generation.


def make_mesh(cfg, world, device):
    """The (dp, tp) mesh (with --dp_replicate > 1: (dp_replicate, dp_shard, tp), HSDP), or None for one CPU process
    (plain model, no wrappers). On a GPU FSDP2 is used even for one process: bf16 parameters in compute, fp32 master
    weights. cfg: any object with the run flags dp_shard, dp_replicate, tp."""
    if world > 1 or cfg.tp > 1 or device.type == "cuda":
        return build_mesh(world, cfg.dp_shard, cfg.tp, device, dp_replicate=cfg.dp_replicate)
    return None


def place(model, mesh, cfg, use_bf16, seq_len=None):
    """Applies tensor parallel / activation checkpointing / compile / FSDP2 from the flags (cfg.compile,
    cfg.grad_sync, cfg.activation_checkpointing), and records the gradient-sync choice that grad_sync_on_last
    reads."""
    from nanotulu.flags import on_cuda_by_default

    device = model.output_weight.device
    compile_blocks = on_cuda_by_default(cfg.compile, "compile", device)
    if cfg.grad_sync not in ("last", "every"):
        raise ValueError(f"--grad_sync {cfg.grad_sync!r}: expected last or every")
    if mesh is None:
        if compile_blocks:
            for block in model.model.layers.values():
                block.compile()  # in place: state-dict names stay HF's (torch.compile(block) adds "_orig_mod.")
        return model
    model = parallelize(model, mesh, bf16=use_bf16, compile=compile_blocks,
                        activation_checkpointing=cfg.activation_checkpointing, seq_len=seq_len)
    model.grad_sync_every_micro_batch = cfg.grad_sync == "every"
    return model


def grad_sync_on_last(model, micro):
    """Yields one step's micro-batches. Under FSDP the gradients are reduce-scattered (and all-reduced over HSDP
    replicas) only in the last micro-batch's backward; the earlier ones accumulate unsharded gradients locally, at
    the memory of one unsharded gradient copy. --grad_sync every reduces after each micro-batch instead."""
    skip = isinstance(model, FSDPModule) and not getattr(model, "grad_sync_every_micro_batch", False)
    for i, m in enumerate(micro):
        if skip:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        yield m


def precision(model, use_bf16):
    """The one bf16 mechanism of a forward: an FSDP2 model already computes with bf16 parameters (its
    MixedPrecisionPolicy), so autocast on top would only add casts; a plain model gets autocast."""
    device = model.output_weight.device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16 and not isinstance(model, FSDPModule))


def dp_coords(mesh, rank, world):
    """(rank within the data-parallel group, its size): the loader splits rows by these."""
    if mesh is None:
        return rank, world
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def dp_group(mesh):
    return None if mesh is None else mesh["dp"].get_group()


def tp_group(mesh):
    return None if mesh is None or mesh["tp"].size() == 1 else mesh["tp"].get_group()


def all_reduce_sum(x, group=None):
    """Sum of a tensor over the ranks (identity in a single process); no host sync. x must be on the model's
    device (NCCL reduces only CUDA tensors)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def step_mean(micro, count, mesh):
    """For a loss that is a mean over a whole optimizer step (every micro-batch, every data-parallel rank), counted
    before any backward. count(m): the items (trained tokens, pairs) of micro-batch m. -> (n: the step's items over
    every rank, scale: what each micro-batch's summed loss is multiplied by before its backward, dp_world / n:
    data-parallel gradient reduction averages over the ranks, the step's mean wants their sum)."""
    dp_world = 1 if mesh is None else mesh["dp"].size()
    device = micro[0]["input_ids"].device
    n = torch.as_tensor(sum(count(m) for m in micro), dtype=torch.float32, device=device)  # a new tensor: sum() made it
    n = all_reduce_sum(n, dp_group(mesh))
    return n, dp_world / n.clamp(min=1)


def trained_tokens(m):
    """The positions of a packed micro-batch that have a target (the loss's tokens)."""
    return (m["targets"] != -100).sum()


def reduce_named(sums, group, device):
    """Named per-rank sums {name: number or 0-d tensor} -> the same names summed over the ranks of `group`, with
    one all-reduce (on `device`) for all of them."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device) for v in sums.values()])
    return dict(zip(sums, all_reduce_sum(t, group)))


def clip_grad_norm(model, max_norm):
    """Clips in place; returns the total norm before clipping as a plain tensor (DTensor norms made full)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextlib.contextmanager
def gathered(model):
    """Yields a model with full, local weights (generation runs on it). A plain model is yielded as is. An FSDP2
    model is unsharded once (collective: every rank must enter) and a hook-free Llama sharing the gathered tensors
    is yielded; the model is resharded on exit. Under tensor parallel the unsharded parameters are still DTensors
    split over the TP group: each is all-gathered into a full copy (collective over the TP group, in parameter
    order on every rank), so every rank decodes with full weights and no collective per step."""
    from nanotulu.lora import clean_name, mirror
    from nanotulu.model import Llama

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules and not any(isinstance(p, DTensor) for p in model.parameters()):
        yield model
        return
    for m in fsdp_modules:
        m.unshard()  # after this, the parameters are the gathered tensors (DTensors on the TP mesh under TP)
    try:
        with torch.device("meta"):
            plain = Llama(model.cfg, model.attn_backend)
            mirror(model, plain)  # LoRA: the copy keeps the adapters (dropped, it would sample from the base)
        plain.train(model.training)
        tensors = {}
        for name, p in model.named_parameters():
            name = clean_name(name)  # without the activation checkpointing / compile wrappers' prefixes
            # TP: full_tensor() all-gathers the shards (a copy, freed on exit); otherwise by reference, no copy
            tensors[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        unexpected = plain.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise RuntimeError(f"the generation copy has no place for parameters {unexpected[:3]}")
        plain.inv_freq = model.inv_freq  # non-persistent buffers are not in state dicts
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"FSDP model lacks parameters {missing[:3]} after unshard")
        yield plain
    finally:
        for m in fsdp_modules:
            m.reshard()

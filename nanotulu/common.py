"""What the three train scripts share: flags from a dataclass, torch.distributed setup, the learning-rate schedule,
metrics (progress bar + JSONL), resumable checkpoints, and the embedded tiny model.

Kept as plain functions so each train_*.py reads top to bottom."""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import typing
import warnings

import torch
import torch.distributed as dist

from nanotulu.model import LlamaConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# The embedded tiny Llama: byte-level vocabulary (256 bytes + specials, padded to 264), small enough to train on a
# laptop CPU in minutes. Random init from a seed; no weights are shipped.
EMBEDDED_MODEL = LlamaConfig(vocab_size=264, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0,
                             max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Flags


@dataclasses.dataclass
class RunFlags:
    """Flags every trainer has (each train_*.py's config dataclass extends this one)."""
    seed: int = 42
    resume: bool = dataclasses.field(default=True, metadata={"help": "continue from the latest checkpoint"})
    precision: str = dataclasses.field(default="auto", metadata={"help": "bf16 | fp32 | auto (bf16 on GPU)"})
    attn_backend: str = dataclasses.field(default="auto", metadata={"help": "auto | sdpa | flex | varlen"})
    loss_impl: str = dataclasses.field(default="auto", metadata={"help": "fused loss: auto (chunked, "
                                                                          "6NHV) | fused | triton | torch"})
    dp_shard: int = dataclasses.field(default=-1, metadata={"help": "data-parallel shards (-1: world / tp)"})
    tp: int = dataclasses.field(default=1, metadata={"help": "tensor-parallel degree"})
    compile: bool = dataclasses.field(default=False, metadata={"help": "torch.compile each block"})
    activation_checkpointing: bool = False
    exit_after_steps: int = dataclasses.field(default=-1, metadata={"help": "testing: exit abruptly after N "
                                                                            "steps (as a kill would)"})


def parse_flags(cls, argv=None):
    """Command-line flags from a dataclass's fields (name -> --name, default -> default, the field's comment in
    metadata["help"]). Returns (config, set of the flags the user gave explicitly)."""
    parser = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            conv = _parse_bool
        elif kind in (int, float, str):
            conv = kind
        else:
            raise TypeError(f"flag --{f.name}: unsupported type {kind}")
        parser.add_argument(f"--{f.name}", type=conv, default=f.default, help=f.metadata.get("help", " "))
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    return cls(**vars(args)), given


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def apply_preset(cfg, preset, given):
    """Fields of `preset` (a dict) replace the defaults of cfg, but never a flag the user gave."""
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def start(cls, preset, argv, data_kind):
    """Every trainer's first lines: flags (the embedded preset when no --model), torch.distributed, seed.
    Returns (cfg, embedded, rank, world, device, use_bf16)."""
    cfg, given = parse_flags(cls, argv)
    embedded = not cfg.model
    if embedded:
        cfg = apply_preset(cfg, preset, given)
    elif not cfg.data:
        raise ValueError(f"--data is required with --model ({data_kind} files; the shipped toy data is for the "
                         "embedded default only)")
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return cfg, embedded, rank, world, device, use_bf16


# ----------------------------------------------------------------------------------------------------------------
# Distributed


def init_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Plain `python` runs as one process.
    Returns (rank, world_size, device)."""
    if not dist.is_initialized() and ("RANK" in os.environ or torch.cuda.is_available()):
        # a group even for one process: FSDP2 needs one, and one GPU runs FSDP2 for its bf16 mixed precision
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(x, group=None):
    """Sum of a tensor over the ranks (identity in a single process); no host sync."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def finish_distributed():
    if dist.is_initialized():
        dist.barrier()  # every rank done writing before the group goes away
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Schedule and metrics


def lr_at(step, total_steps, peak_lr, warmup_ratio, schedule="linear"):
    """Learning rate for optimizer step `step` (0-based): linear warmup over warmup_ratio * total steps, then
    linear decay to 0 ("linear") or constant ("constant"), as in Tulu 3's recipe."""
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule == "constant":
        return peak_lr
    if schedule != "linear":
        raise ValueError(f"--lr_schedule must be linear or constant, not {schedule!r}")
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def progress(iterable, desc, rank=0, **kw):
    """A tqdm bar on rank 0 (off with NANOTULU_NO_BAR=1, e.g. in logs and tests)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True,
                disable=rank != 0 or os.environ.get("NANOTULU_NO_BAR") == "1", **kw)


class Metrics:
    """One JSON line per step in `path`, and a tqdm progress bar with the latest values (rank 0 only)."""

    def __init__(self, path, total_steps, rank, start_step=0, desc="train"):
        from tqdm import tqdm

        self.rank = rank
        self.file = None
        self.bar = None
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                            disable=os.environ.get("NANOTULU_NO_BAR") == "1")

    def log(self, step, values, show=("loss", "lr", "tok/s")):
        if self.rank != 0:
            return
        row = {"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix({k: f"{row[k]:.4g}" for k in show if k in row}, refresh=False)
        self.bar.update(1)

    def close(self):
        if self.rank == 0:
            self.bar.close()
            self.file.close()


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(device):
    """Dense bf16 peak of the device, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


class Timer:
    """Wall time between ticks; synchronises CUDA so the figure is the device's, at one sync per step."""

    def __init__(self, device):
        self.device = device
        self.t = time.perf_counter()

    def tick(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary growth (RECIPE: a tokenizer that gained <pad> grows the embeddings to a multiple of 8)


@torch.no_grad()
def resize_vocab(model, new_size):
    """Grows embedding (and untied lm_head) rows to new_size; new rows are the mean of the old ones."""
    old = model.cfg.vocab_size
    if new_size == old:
        return model
    if new_size < old:
        raise ValueError(f"tokenizer needs {new_size} embedding rows, the model has {old}: will not shrink")
    emb = model.model.embed_tokens
    w = torch.cat([emb.weight, emb.weight.mean(0, keepdim=True).expand(new_size - old, -1)])
    emb.weight = torch.nn.Parameter(w)
    emb.num_embeddings = new_size
    if model.lm_head is not None:
        w = torch.cat([model.lm_head.weight, model.lm_head.weight.mean(0, keepdim=True).expand(new_size - old, -1)])
        model.lm_head.weight = torch.nn.Parameter(w)
        model.lm_head.out_features = new_size
    model.cfg.vocab_size = new_size
    return model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint for model + optimizer (sharded under FSDP, plain otherwise), and one
# small file per rank for what is not a tensor of the model (step, data loader position, RNG states).


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(ckpt_dir, step, model, optimizer, extra, rank, keep=2):
    """Writes ckpt_dir/step_{step:08d}: first into a temporary directory, renamed when every rank is done, so a
    crash mid-write never leaves a checkpoint that looks whole. `extra` (per rank): loader state, RNG, etc."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save({**extra, "rng": rng_state(), "step": step, "layout": checkpoint_layout(model)},
               os.path.join(tmp, f"extra_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    _barrier()
    return final


def resume(cfg, model, optimizer, data_state, rank, world):
    """With --resume, continues from the latest checkpoint in output_dir/checkpoints: model, optimizer, RNG and
    `data_state` (the data loader or prompt sampler: anything with state_dict/load_state_dict).
    Returns (checkpoint directory, the step to continue from)."""
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    latest = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is None:
        return ckpt_dir, 0
    extra = load_checkpoint(latest, model, optimizer, rank, world)
    data_state.load_state_dict(extra["data"])
    if rank == 0:
        print(f"resumed from {latest} at step {extra['step']}")
    return ckpt_dir, extra["step"]


def latest_checkpoint(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return None
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    return os.path.join(ckpt_dir, done[-1]) if done else None


def load_checkpoint(path, model, optimizer, rank, world_size):
    """Restores model, optimizer and RNG in place; returns this rank's `extra` dict (with "step")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extra_path = os.path.join(path, f"extra_rank{rank}.pt")
    n_saved = len([f for f in os.listdir(path) if f.startswith("extra_rank")])
    if n_saved != world_size or not os.path.isfile(extra_path):
        raise ValueError(f"{path}: written by {n_saved} ranks, this run has {world_size}: resume on the same mesh")
    extra = torch.load(extra_path, weights_only=False)
    saved, now = extra.get("layout"), checkpoint_layout(model)
    if saved is not None and None not in (saved["model"], now["model"]) and saved["model"] != now["model"]:
        diff = ", ".join(f"{k} {v} (this run: {now['model'].get(k)})" for k, v in saved["model"].items()
                         if now["model"].get(k) != v)
        raise ValueError(f"{path}: written by a model of another shape: {diff}")
    if saved is not None and saved["mesh"] != now["mesh"]:
        raise ValueError(f"{path}: written on mesh {saved['mesh']}, this run's is {now['mesh']}: resume with the "
                         "same --dp_shard and --tp")
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            dcp.load(sd, checkpoint_id=path)
        except (Exception, dcp.api.CheckpointException) as e:  # shapes or names differ (CheckpointException is a
            # BaseException whose last line names the tensor)
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
            raise ValueError(f"{path}: does not match this model/optimizer ({last[0][:300]})") from e
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    set_rng_state(extra["rng"])
    return extra


def checkpoint_layout(model):
    """What a resume must match besides the rank count: the model's shape and the mesh its parameters live on
    ({"dp": 2, "tp": 2}; None when not parallelised)."""
    from torch.distributed.tensor import DTensor

    c = getattr(model, "cfg", None)
    shape = None if c is None else {k: getattr(c, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "tie_word_embeddings")}
    p = next(model.parameters())
    mesh = dict(zip(p.device_mesh.mesh_dim_names, p.device_mesh.shape)) if isinstance(p, DTensor) else None
    return {"model": shape, "mesh": mesh}


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def full_state_dict(model):
    """The whole model's state dict as plain CPU tensors (gathers FSDP/TP shards). Under a process group only rank 0
    gets it (the others an empty dict), so a large model is not held in CPU memory once per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model, out_dir, tok_dir=None, rank=0):
    """Final Hugging Face checkpoint (gathered from shards), plus the tokenizer files when there are any."""
    sd = full_state_dict(model)
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=sd)
        if tok_dir:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.isfile(os.path.join(tok_dir, name)):
                    shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    _barrier()


# ----------------------------------------------------------------------------------------------------------------
# Training-step pieces shared by SFT, DPO and RLVR


def asset_path(name):
    return os.path.join(ASSETS, name)


def make_mesh(cfg, world, device):
    """The (dp, tp) mesh, or None for one CPU process (plain model, no wrappers). On a GPU FSDP2 is used even for
    one process: bf16 parameters in compute, fp32 master weights."""
    if world > 1 or cfg.tp > 1 or device.type == "cuda":
        from nanotulu import parallel
        return parallel.build_mesh(world, cfg.dp_shard, cfg.tp, device)
    return None


def load_model(path, tok, device, cfg):
    """An HF checkpoint in fp32 (master weights), embeddings grown to the tokenizer's vocabulary."""
    from nanotulu.model import Llama

    m = Llama.from_pretrained(path, dtype=torch.float32, device=device, attn_backend=cfg.attn_backend)
    return resize_vocab(m, max(tok.vocab_size, m.cfg.vocab_size))


def place(model, mesh, cfg, use_bf16, seq_len=None):
    """Applies tensor parallel / activation checkpointing / compile / FSDP2 from the flags (parallel.py)."""
    if mesh is None:
        if cfg.compile:
            for block in model.model.layers.values():
                block.compile()  # in place: state-dict names stay HF's (torch.compile(block) adds "_orig_mod.")
        return model
    from nanotulu import parallel
    return parallel.parallelize(model, mesh, bf16=use_bf16, compile=cfg.compile,
                                activation_checkpointing=cfg.activation_checkpointing, seq_len=seq_len)


def dp_coords(mesh, rank, world):
    """(rank within the data-parallel group, its size): the loader splits rows by these."""
    if mesh is None:
        return rank, world
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def dp_group(mesh):
    return None if mesh is None else mesh["dp"].get_group()


def tp_group(mesh):
    return None if mesh is None or mesh["tp"].size() == 1 else mesh["tp"].get_group()


def step_batches(loader):
    """Endless stream of per-step row lists over epochs; the loader's own state says where it resumes."""
    while True:
        yield from loader


def clip_grad_norm(model, max_norm):
    """Clips in place; returns the total norm before clipping as a plain tensor (DTensor norms made full)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_step(model, optimizer, lr, max_grad_norm):
    """Clip, set the learning rate, step, clear the gradients; returns the gradient norm before clipping."""
    grad_norm = clip_grad_norm(model, max_grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def loss_head(fn, targets, impl="auto", tp_group=None, **kw):
    """A `head` for Llama.forward: fused per-token loss from hidden (B, T, H) and the output weight (V, H).
    fn: "cross_entropy_sum" (a scalar), "logprobs" ((B*T,) log-probs, 8NHV with their backward), or "fused":
    kw are kernels.fused_linear_loss's loss_fn / cuts / return_entropy, the head returns (loss, logp, entropy)
    with the gradient formed in the forward pass (6NHV). impl "auto" and "fused" take the fused path for
    "cross_entropy_sum" too ("fused": Triton row kernels even on CPU, interpreted); "triton" / "torch" the 8NHV
    kernels. Under tensor parallel the weight is a vocab shard and the kernels combine the shards."""
    from nanotulu import kernels

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
                out = kernels.fused_linear_loss(h, local, targets.reshape(-1), row_impl=row_impl, vocab_start=start,
                                                tp_group=tp_group, **kw)
                return out[0] if fn == "cross_entropy_sum" else out
            logps = kernels.vocab_parallel_linear_logprobs(h, local, targets.reshape(-1), start, tp_group,
                                                           impl=impl)
            if fn == "logprobs":
                return logps
            return -logps.sum()
        h = hidden.reshape(-1, hidden.shape[-1])
        if h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        if fused:
            out = kernels.fused_linear_loss(h, weight, targets.reshape(-1), row_impl=row_impl, **kw)
            return out[0] if fn == "cross_entropy_sum" else out
        if fn == "cross_entropy_sum":
            return kernels.linear_cross_entropy(h, weight, targets.reshape(-1), reduction="sum", impl=impl)
        return kernels.linear_logprobs(h, weight, targets.reshape(-1), impl=impl, **kw)

    return head

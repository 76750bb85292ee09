"""What the three train scripts share to start and log a run: flags from a dataclass, torch.distributed setup and
the device mesh, loading and placing the model, the learning-rate schedule and optimizer step, metrics (progress bar
+ JSONL). Checkpoints are in checkpoint.py, the loss heads in losses.py.

Kept as plain functions so each train_*.py reads top to bottom."""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing

import torch
import torch.distributed as dist



# ----------------------------------------------------------------------------------------------------------------
# Flags


@dataclasses.dataclass
class RunFlags:
    """Flags every trainer has (each train_*.py's config dataclass extends this one)."""
    seed: int = 42
    weight_decay: float = 0.0  # Tulu 3: no weight decay in any stage
    max_grad_norm: float = 1.0
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


def start(cls, preset, argv, data_kind, variant=None):
    """Every trainer's first lines: flags (the embedded preset when no --model), torch.distributed, seed.
    preset: a dict, or a function of the parsed flags giving one. variant(cfg) -> dict: defaults that depend on
    another flag (RLVR's --algo ppo), applied first. Neither replaces a flag the user gave.
    Returns (cfg, embedded, rank, world, device, use_bf16)."""
    cfg, given = parse_flags(cls, argv)
    if variant is not None:
        cfg = apply_preset(cfg, variant(cfg), given)
    embedded = not cfg.model
    if embedded:
        cfg = apply_preset(cfg, preset(cfg) if callable(preset) else preset, given)
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
        os.environ.setdefault("MASTER_PORT", str(free_port()))
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


def free_port():
    """A TCP port free on this machine right now (for a single-process group and the tests' process groups)."""
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


class Speed:
    """Tokens/s (and MFU where the device's peak is known) of each optimizer step; synchronises CUDA so the figure
    is the device's, at one sync per step."""

    def __init__(self, device, flops_per_token, tokens_per_step, world):
        self.device, self.flops_per_token, self.tokens, self.world = device, flops_per_token, tokens_per_step, world
        self.peak = peak_flops(device)
        self.t = time.perf_counter()

    def tick(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        out = {"tok/s": self.tokens / dt}
        if self.peak:
            out["mfu"] = self.flops_per_token * self.tokens / dt / (self.peak * self.world)
        return out


def reduce_named(sums, group, device):
    """Named per-rank sums {name: number or 0-d tensor} -> the same names summed over the ranks of `group`, with
    one all-reduce for all of them."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device) for v in sums.values()])
    return dict(zip(sums, all_reduce_sum(t, group)))


def exit_if_asked(cfg, step):
    """--exit_after_steps: an abrupt stop after that step, as a killed job would (tests resume from the last
    checkpoint)."""
    if step == cfg.exit_after_steps:
        os._exit(3)


def finish_run(cfg, model, is_embedded, tok_dir, rank, finish=True):
    """Every trainer's last lines: the Hugging Face checkpoint in output_dir/final (with the tokenizer files of a
    real model), then the process group closed unless the caller runs more stages in this process."""
    from nanotulu import checkpoint

    out = os.path.join(cfg.output_dir, "final")
    checkpoint.save_hf(model, out, tok_dir=None if is_embedded else tok_dir, rank=rank)
    if rank == 0:
        print(f"saved {out}")
    if finish:
        finish_distributed()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training-step pieces shared by SFT, DPO and RLVR


def make_mesh(cfg, world, device):
    """The (dp, tp) mesh, or None for one CPU process (plain model, no wrappers). On a GPU FSDP2 is used even for
    one process: bf16 parameters in compute, fp32 master weights."""
    if world > 1 or cfg.tp > 1 or device.type == "cuda":
        from nanotulu import parallel
        return parallel.build_mesh(world, cfg.dp_shard, cfg.tp, device)
    return None


def load_model(path, tok, device, cfg, score_head=None):
    """An HF checkpoint in fp32 (master weights), embeddings grown to the tokenizer's vocabulary.
    score_head: see Llama.from_pretrained (True: a reward / value model)."""
    from nanotulu.model import Llama, resize_vocab

    m = Llama.from_pretrained(path, dtype=torch.float32, device=device, attn_backend=cfg.attn_backend,
                              score_head=score_head)
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


def make_optimizer(model, cfg, device):
    """AdamW with torch's default betas (0.9, 0.999) and eps 1e-8, as Tulu 3 trains; fused kernels on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def optimizer_step(model, optimizer, lr, max_grad_norm):
    """Clip, set the learning rate, step, clear the gradients; returns the gradient norm before clipping."""
    grad_norm = clip_grad_norm(model, max_grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm

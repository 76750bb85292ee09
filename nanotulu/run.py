"""A run's start-up and bookkeeping, shared by the train scripts: start() (flags, early checks, torch.distributed,
the run directory claimed), the run directory (one run at a time, resumed only with its flags), metrics (progress
bar + JSONL + optional loggers), the learning-rate schedule and the optimizer, and finish_run(). The flags are in
flags.py, placement and collectives in parallel.py, checkpoints in checkpoint.py, the algorithms in algos/.

Kept as plain functions so each train_*.py reads top to bottom."""

import dataclasses
import importlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from nanotulu.flags import UsageError, on_cuda_by_default, resolve_flags
from nanotulu.machine import set_threads
from nanotulu.parallel import clip_grad_norm


# ----------------------------------------------------------------------------------------------------------------
# Start-up


# CPU threads of the embedded runs: float sums split over threads round differently (one embedded SFT step's
# gradients differ by ~6e-8 between 1, 2, 3 and 4 threads), and hundreds of steps grow that into other models and
# accuracies; one fixed count gives the same embedded results on any machine of one CPU kind, whatever its cores.
EMBEDDED_THREADS = 2


def config_diff(saved, now):
    """Names of the flags that differ between two run configurations (dicts), outside RESUMABLE_CHANGES; compared
    as JSON text: nan equals nan, and numbers as the file stores them."""
    return [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES
            and json.dumps(saved.get(k)) != json.dumps(now.get(k))]


def start(cls, preset, argv, data_kind, variant=None):
    """Every trainer's first lines: flags (resolve_flags: the embedded preset when no --model), input paths and
    --output_dir checked, torch.distributed, the run directory claimed (lock, saved flags: open_run_dir), seed.
    Returns (cfg, embedded, rank, world, device, use_bf16)."""
    cfg = resolve_flags(cls, preset, argv, variant)
    open_reporters(cfg.report_to, None)  # an unknown logger or a missing package fails before any work
    embedded = not cfg.model
    # the embedded results depend on the thread count (see EMBEDDED_THREADS); any other run gets the cores
    set_threads(cfg.threads or (EMBEDDED_THREADS if embedded and not torch.cuda.is_available() else 0))
    if not embedded and not cfg.data:
        raise ValueError(f"--data is required with --model ({data_kind} files; the shipped toy data is for the "
                         "embedded default only)")
    check_input_paths(cfg)
    check_output_path(cfg.output_dir, "--output_dir", folder=True)
    rank, world, device = init_distributed()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    check_before_load(cfg, world, device, use_bf16)
    open_run_dir(cfg, rank)
    torch.manual_seed(cfg.seed)
    return cfg, embedded, rank, world, device, use_bf16


# ----------------------------------------------------------------------------------------------------------------
# Checks that run before any model loads: paths, and whether the data fills one optimizer step


def check_input_paths(cfg):
    """Every file and folder the flags name exists: --model / --ref_model (config.json), --tokenizer, each file of
    the --data and --eval_data mixes."""
    from nanotulu.data import parse_mix

    for flag in ("model", "ref_model"):
        path = getattr(cfg, flag, "")
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--{flag} {path}: not a Hugging Face model directory (no config.json)")
    if getattr(cfg, "tokenizer", "") not in ("", "byte") and not os.path.exists(cfg.tokenizer):
        raise ValueError(f"--tokenizer {cfg.tokenizer}: no such directory (or 'byte' for the byte tokenizer)")
    for flag in ("data", "eval_data"):
        for path, _ in parse_mix(getattr(cfg, flag, "")) if getattr(cfg, flag, "") else []:
            if not os.path.isfile(path):
                raise ValueError(f"--{flag} {getattr(cfg, flag)}: {path}: no such file")


def check_output_path(path, flag, folder):
    """Refuses at once an output that could not be written after hours of work: a file where a folder is wanted
    (or the reverse), a missing parent folder of an output file, or a folder this user cannot write into (for an
    output folder, the nearest existing one: the missing ones are created)."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and folder != os.path.isdir(p):
        want, got = ("folder", "file") if folder else ("file", "folder")
        raise ValueError(f"{flag} {path}: is a {got}; give a {want} name")
    if folder:
        target = p
        while not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise ValueError(f"{flag} {path}: {target} is a file, so no folder can be made under it")
    else:
        target = os.path.dirname(p)
        if not os.path.isdir(target):
            raise ValueError(f"{flag} {path}: the folder {target} does not exist")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {target} is not writable")


def planned_dp_world(cfg, world):
    """Data-parallel ranks of the mesh parallel.make_mesh will build (parallel.build_mesh checks the flags against the world
    size)."""
    return cfg.dp_shard if cfg.dp_shard > 0 else max(1, world // cfg.tp)


def check_one_step(lengths, capacity, cfg, world, what="examples", len_flag="--max_seq_len"):
    """Before the model loads: --batch_rows splits evenly over the data-parallel ranks and micro-batches, and the
    data packs into at least one optimizer step. lengths: tokens each item takes in a row. The count is the
    loader's own (best-fit decreasing: the row count depends only on the lengths), so the advice is exact."""
    from nanotulu.packing import pack

    dp = planned_dp_world(cfg, world)
    if cfg.batch_rows % (dp * cfg.micro_batch_rows):
        raise ValueError(f"--batch_rows {cfg.batch_rows} must be a multiple of data-parallel ranks ({dp}) x "
                         f"--micro_batch_rows ({cfg.micro_batch_rows})")
    n_rows = len(pack(lengths, capacity)) if lengths else 0
    if n_rows < cfg.batch_rows:
        unit = dp * cfg.micro_batch_rows
        fits = n_rows // unit * unit
        lower = f"--batch_rows (to {fits} at most)" if fits else "--batch_rows"
        raise ValueError(f"{len(lengths)} {what} pack into {n_rows} rows of {capacity} tokens: fewer than one step "
                         f"of {cfg.batch_rows // dp} rows x {dp} ranks (--batch_rows {cfg.batch_rows}): lower {lower} "
                         f"or {len_flag} (shorter rows: more of them), or add data")
    return n_rows


def check_before_load(cfg, world, device, use_bf16):
    """What the process count, the device and the model's config.json already decide, checked before any data is
    tokenized or weight read (an 8B model is 16-32 GB to read before a late error): the mesh shape against the
    world size, the attention backend against device and dtype, the sequence length against the model's."""
    from nanotulu import parallel

    parallel.mesh_shape(world, cfg.dp_shard, cfg.tp, cfg.dp_replicate)
    check_attn_backend(cfg.attn_backend, device, use_bf16)
    check_seq_len(cfg)


def check_attn_backend(name, device, use_bf16, training=True):
    """An --attn_backend the user chose that cannot run here: FlexAttention trains on CUDA only (torch 2.13 has no
    CPU backward for it: the first backward would fail), the varlen kernels (flash-attn's or torch's) need CUDA and
    bf16/fp16 inputs. "auto" is model.pick_backend's choice, which only picks what runs."""
    from nanotulu import model as M

    fix = "use --attn_backend sdpa (or auto)"
    if name == "flex" and device.type != "cuda" and training:
        raise ValueError(f"--attn_backend flex: FlexAttention has no backward pass on {device.type} in torch "
                         f"{torch.__version__.split('+')[0]}, so it cannot train here; {fix}")
    if name in ("varlen", "flash"):
        if device.type != "cuda":
            raise ValueError(f"--attn_backend {name}: variable-length attention kernels need a CUDA GPU, this run is "
                             f"on {device.type}; {fix}")
        if not use_bf16:
            raise ValueError(f"--attn_backend {name}: variable-length attention kernels take bf16/fp16 only, and this "
                             "run computes in fp32; add --precision bf16, or use --attn_backend sdpa or flex")
        if name == "flash" and not M._has_flash_attn():
            raise ValueError(f"--attn_backend flash: the flash-attn package is not installed (pip install "
                             f"'nanotulu[gpu]'); or use --attn_backend varlen (torch's own) or auto")
        if not (M._has_flash_attn() or M._has_torch_varlen()):
            raise ValueError(f"--attn_backend varlen: neither flash-attn nor torch's varlen attention (torch >= 2.9) "
                             f"is available; use --attn_backend flex or auto")


def sequence_length(cfg):
    """The longest sequence (positions 0..n-1 of one document) a trainer's flags allow -> (n, the flags that say
    so)."""
    if hasattr(cfg, "max_seq_len"):
        return cfg.max_seq_len, f"--max_seq_len {cfg.max_seq_len}"
    n = cfg.max_prompt_len + cfg.max_new_tokens
    return n, f"--max_prompt_len {cfg.max_prompt_len} + --max_new_tokens {cfg.max_new_tokens} = {n}"


def check_seq_len(cfg):
    """The sequence length of the flags within the model's max_position_embeddings (config.json of --model; the
    embedded model's with none): longer positions were never trained (and with llama3 RoPE scaling lie past the
    range the scaling was made for)."""
    from nanotulu.embedded import EMBEDDED_MODEL

    n, flags = sequence_length(cfg)
    where = "the embedded model"
    limit = EMBEDDED_MODEL.max_position_embeddings
    if cfg.model:
        where = os.path.join(cfg.model, "config.json")
        try:
            with open(where) as f:
                limit = json.load(f).get("max_position_embeddings")
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(limit, int) and n > limit:
        raise ValueError(f"{flags}: longer than the model's max_position_embeddings {limit} ({where}); lower it to "
                         f"{limit} at most")


# ----------------------------------------------------------------------------------------------------------------
# The run directory: one run at a time, resumed only with the flags it started with


# Flags a resumed run may change: when to stop and save, and how (not what) it computes. Any other difference
# (--lr, --model, --data, --max_steps: the lr schedule depends on it, ...) is another run.
RESUMABLE_CHANGES = ("resume", "exit_after_steps", "save_every", "eval_every", "verify_workers", "compile",
                     "activation_checkpointing", "threads")

_RUN_LOCKS = {}  # absolute output_dir -> its open, locked .lock file (held until release_run_dir or exit)


def open_run_dir(cfg, rank):
    """Rank 0 takes output_dir/.lock for the life of the process (fcntl.flock: the OS drops it when the process
    dies, so a crashed or killed run never leaves it stuck; a second run there fails at once), then checks
    output_dir/run_config.json: when an earlier run left checkpoints/ or final/ and --resume is on, every flag
    outside RESUMABLE_CHANGES must be the same, or the run refuses to start, naming the flags. --resume false
    starts over: the earlier checkpoints/, final/ and metrics are removed. Then the resolved flags are saved.
    Every rank raises rank 0's error."""
    error = None
    if rank == 0:
        try:
            _lock_run_dir(cfg.output_dir)
            _check_and_save_config(cfg)
        except ValueError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)


def _lock_run_dir(out):
    import fcntl
    import socket

    key = os.path.abspath(out)
    if key in _RUN_LOCKS:  # this process holds it already (a stage run again in one process)
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise ValueError(f"--output_dir {out}: another run is using it ({holder}): wait for it or stop it, or choose "
                         "another --output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _RUN_LOCKS[key] = f


def release_run_dir(out):
    f = _RUN_LOCKS.pop(os.path.abspath(out), None)
    if f is not None:
        f.close()  # closing the file drops the flock


def _check_and_save_config(cfg):
    import shutil

    path = os.path.join(cfg.output_dir, "run_config.json")
    now = dataclasses.asdict(cfg)
    earlier = [d for d in ("checkpoints", "final") if os.path.isdir(os.path.join(cfg.output_dir, d))]
    if cfg.resume and earlier and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = config_diff(saved, now)
        if diff:
            raise ValueError(f"{cfg.output_dir} holds a run with other flags (its {'/'.join(earlier)}; {path}): "
                             + "; ".join(f"--{k} {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
                             + ". Rerun with its flags to resume it, or --resume false to start over in this directory "
                             "(removes its checkpoints, final/ and metrics), or choose a new --output_dir")
    if not cfg.resume:
        for name in ("checkpoints", "final"):
            shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
        for name in ("metrics.jsonl", "eval.jsonl"):
            if os.path.isfile(os.path.join(cfg.output_dir, name)):
                os.remove(os.path.join(cfg.output_dir, name))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(now, f, indent=2)
    os.replace(tmp, path)


def truncate_jsonl(path, last_step):
    """Keeps the rows of a per-step JSONL file with step <= last_step (a resumed run replays the later steps and
    writes their rows again); a half-written last line of a killed run goes too."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


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


REPORTERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the extra it needs


def open_reporters(report_to, out_dir, config=None, name=None):
    """--report_to "jsonl,tensorboard,wandb" -> list of (log(step, row), close()) for the loggers besides the JSONL
    file (always written). out_dir None only checks the names and that the packages import. TensorBoard writes
    out_dir/tensorboard; W&B logs to project $WANDB_PROJECT (default nanotulu), offline with WANDB_MODE=offline."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    for n in names:
        if n not in REPORTERS:
            raise ValueError(f"--report_to {report_to!r}: unknown logger {n!r} (expected {', '.join(REPORTERS)})")
    modules = {}
    for n in names:
        if REPORTERS[n] is None:
            continue
        try:
            modules[n] = importlib.import_module("torch.utils.tensorboard" if n == "tensorboard" else n)
        except ImportError as e:
            raise ImportError(f"--report_to {n}: the {n} package is not installed (pip install "
                              f"'nanotulu[{REPORTERS[n]}]')") from e
    sinks = []
    if out_dir is None:
        return sinks

    def scalars(row):
        return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}

    if "tensorboard" in names:
        writer = modules["tensorboard"].SummaryWriter(os.path.join(out_dir, "tensorboard"))
        sinks.append((lambda step, row: [writer.add_scalar(k, v, step) for k, v in scalars(row).items()],
                      writer.close))
    if "wandb" in names:
        run = modules["wandb"].init(project=os.environ.get("WANDB_PROJECT", "nanotulu"), name=name, dir=out_dir,
                                    config=config)
        sinks.append((lambda step, row: run.log(scalars(row), step=step), run.finish))
    return sinks


class Metrics:
    """One JSON line per step in `path`, and a tqdm progress bar with the latest values (rank 0 only); with
    report_to, the same rows go to TensorBoard and/or Weights & Biases too (open_reporters)."""

    def __init__(self, path, total_steps, rank, start_step=0, desc="train", report_to="jsonl", config=None):
        from tqdm import tqdm

        self.rank = rank
        self.file = None
        self.bar = None
        self.sinks = []
        if rank == 0:
            self.sinks = open_reporters(report_to, os.path.dirname(os.path.abspath(path)), config, desc)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            truncate_jsonl(path, start_step)  # rows of the steps after the checkpoint are replayed: replaced
            self.file = open(path, "a")
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                            disable=os.environ.get("NANOTULU_NO_BAR") == "1")

    def log(self, step, values, show=("loss", "lr", "tok/s")):
        if self.rank != 0:
            return
        row = {"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for log, _ in self.sinks:
            log(step, row)
        self.bar.set_postfix({k: f"{row[k]:.4g}" for k in show if k in row}, refresh=False)
        self.bar.update(1)

    def close(self):
        for _, close in self.sinks:
            close()
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


def exit_if_asked(cfg, step):
    """--exit_after_steps: an abrupt stop after that step, as a killed job would (tests resume from the last
    checkpoint)."""
    if step == cfg.exit_after_steps:
        os._exit(3)


def finish_run(cfg, model, is_embedded, tok, rank, finish=True, template="tulu"):
    """Every trainer's last lines: the Hugging Face checkpoint in output_dir/final (with the tokenizer as trained:
    its files and the chat `template` used), then the process group closed unless the caller
    runs more stages in this process. A LoRA run writes its adapter (and the merged model): lora.export."""
    from nanotulu import checkpoint, lora

    if lora.enabled(cfg):
        out, saved = lora.export(cfg, model, is_embedded, tok, rank, template)
    else:
        out = saved = os.path.join(cfg.output_dir, "final")
        checkpoint.save_hf(model, out, tok=tok, template=template, rank=rank)
    if rank == 0:
        print(f"saved {saved}")
        release_run_dir(cfg.output_dir)
    if finish:
        finish_distributed()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model to train, its batches and its optimizer


def load_model(path, tok, device, cfg, score_head=None):
    """An HF checkpoint in fp32 (master weights); embeddings grown only for a tokenizer with more token ids than
    the model has rows (the vocabulary is kept otherwise). score_head: see Llama.from_pretrained (True: a reward /
    value model)."""
    from nanotulu.model import Llama, resize_vocab

    m = Llama.from_pretrained(path, dtype=torch.float32, device=device, attn_backend=cfg.attn_backend,
                              score_head=score_head)
    if getattr(tok, "n_ids", tok.vocab_size) <= m.cfg.vocab_size:
        return m
    return resize_vocab(m, max(tok.vocab_size, m.cfg.vocab_size))


def step_batches(loader):
    """Endless stream of per-step row lists over epochs; the loader's own state says where it resumes."""
    while True:
        yield from loader


def make_optimizer(model, cfg, device):
    """AdamW with torch's default betas (0.9, 0.999) and eps 1e-8, as Tulu 3 trains; one fused kernel for all
    parameters with --fused_adamw (default on CUDA), else torch's for-each implementation."""
    fused = on_cuda_by_default(cfg.fused_adamw, "fused_adamw", device)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def optimizer_step(model, optimizer, lr, max_grad_norm):
    """Clip, set the learning rate, step, clear the gradients; returns the gradient norm before clipping."""
    grad_norm = clip_grad_norm(model, max_grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------------------------------------------
# The command line's end: a user error is one clear message, the last thing the user reads


# What counts as the user's error: every check of flags, paths, data and checkpoints raises one of these with a
# message naming the flag, file, line or field. Anything else (a bug, CUDA out of memory) keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError)


def debug_wanted(argv):
    """--debug on the command line (removed from argv) or NANOTULU_DEBUG=1: user errors keep their traceback."""
    wanted = os.environ.get("NANOTULU_DEBUG", "").lower() not in ("", "0", "false", "no", "off")
    if "--debug" in argv:
        argv.remove("--debug")
        wanted = True
    return wanted


def run_script(main):
    """Every script's `if __name__ == "__main__"`: main(), with a user error (USER_ERRORS) printed as one line,
    `error: <message>`, with no traceback, and exit status 1 (2 for a refused flag, as argparse).

    Under torchrun the message must also survive the launcher. torchrun (torch 2.13) starts each rank as a child
    process; when one exits non-zero, the launcher itself fails: it logs "failed (exitcode: 1) local_rank: 0 ...",
    prints its own Python traceback (run.py -> launch_agent -> ChildFailedError, ~15 lines) and then the
    ChildFailedError block, whose last field, "traceback :", is the only place a child can fill: the launcher reads
    it from the JSON file named by TORCHELASTIC_ERROR_FILE in the child's environment ({"message": {"message",
    "extraInfo": {"py_callstack", "timestamp"}}}, as torch.distributed.elastic's @record writes it; without that
    file the field says "To enable traceback see: https://pytorch.org/..."). So each rank writes that file with
    the message alone as its "py_callstack": the block's root cause (the first rank to fail) then ends with
    `traceback : error: <message>`, followed only by the block's closing "====" line. Nothing a child does can
    come after the launcher's own output (short of exiting 0, which would tell scripts the run succeeded). The
    child's own line comes first, printed by rank 0 only (every rank raises the same check), without the
    "[rank0]:" prefix torch.distributed's excepthook would add to a traceback.

    --debug (anywhere on the command line) or NANOTULU_DEBUG=1 re-raises instead: the full traceback."""
    import time

    debug = debug_wanted(sys.argv)
    try:
        main()
    except USER_ERRORS as e:
        if debug:
            raise
        message = f"error: {e}"
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            record = {"message": {"message": f"{type(e).__name__}: {e}",
                                  "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
            with open(error_file, "w") as f:
                json.dump(record, f)
        if int(os.environ.get("RANK", "0")) == 0:
            print(message, file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()  # no warning about an undestroyed group after the message
        sys.stdout.flush()
        os._exit(2 if isinstance(e, UsageError) else 1)  # no atexit output (tqdm, process-group teardown) after it


def finished_run(cfg, rank, finish=True):
    """A rerun of a finished run is not trained again: with --resume on, a written output_dir/final (open_run_dir
    has refused the rerun already if its flags differ) means the run is done, whatever its checkpoints/ hold (none
    when --save_every exceeds its steps, which used to retrain it from step 0). Returns the path of that final/
    (the trainer returns it at once), or None: train."""
    out = os.path.join(cfg.output_dir, "final")
    if not (cfg.resume and os.path.isfile(os.path.join(out, "config.json"))):
        return None
    if rank == 0:
        print(f"{cfg.output_dir}: finished already ({out}, written with these flags): nothing to train; "
              "--resume false trains it again")
        release_run_dir(cfg.output_dir)
    if finish:
        finish_distributed()
    return out

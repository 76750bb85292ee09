"""Command-line flags from dataclasses: the flags every trainer shares, declared once, and the parser.

RunFlags holds the flags of how a run computes (seed, precision, parallelism, ...); TrainFlags adds the twelve that
every trainer has (model, data, output, learning rate, ...) with neutral defaults. Each train_*.py declares only
its own flags and gives the shared ones its recipe's defaults with @recipe(...). Flags that two or three trainers
share take their help text from SHARED_HELP through shared(). `--help` lists every flag with its default (and the
embedded preset after them)."""

import argparse
import dataclasses
import os
import sys
import types
import typing

from nanotulu.data import TEMPLATE_HELP_OWN


@dataclasses.dataclass
class RunFlags:
    """Flags every trainer has: how the run computes."""
    seed: int = dataclasses.field(default=42, metadata={"help": "seed of the data order, sampling and new weights"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={  # Tulu 3: no weight decay in any stage
        "help": "AdamW weight decay"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    resume: bool = dataclasses.field(default=True, metadata={"help": "continue from the latest checkpoint"})
    precision: str = dataclasses.field(default="auto", metadata={"help": "bf16 | fp32 | auto (bf16 on GPU)"})
    attn_backend: str = dataclasses.field(default="auto", metadata={"help": "auto | sdpa | flex | varlen"})
    loss_impl: str = dataclasses.field(default="auto", metadata={"help": "fused loss: auto (chunked, "
                                                                          "6NHV) | fused | triton | torch"})
    dp_shard: int = dataclasses.field(default=-1, metadata={"help": "data-parallel shards (-1: world / tp / "
                                                                     "dp_replicate)"})
    dp_replicate: int = dataclasses.field(default=1, metadata={"help": "HSDP: data-parallel replicas (e.g. nodes), "
                                                                       "each sharding over dp_shard ranks"})
    tp: int = dataclasses.field(default=1, metadata={"help": "tensor-parallel degree"})
    compile: str = dataclasses.field(default="auto", metadata={"help": "torch.compile each block: auto (on CUDA) | "
                                                                       "true | false"})
    grad_sync: str = dataclasses.field(default="last", metadata={"help": "FSDP gradient reduction: last (once per "
                                                                         "step, after the last micro-batch) | every"})
    fused_adamw: str = dataclasses.field(default="auto", metadata={"help": "fused AdamW kernel: auto (on CUDA) | "
                                                                           "true | false"})
    activation_checkpointing: bool = dataclasses.field(default=False, metadata={
        "help": "recompute each block's activations in the backward pass (less memory, ~1/3 more compute)"})
    report_to: str = dataclasses.field(default="jsonl", metadata={"help": "loggers, comma-separated: jsonl (always "
                                                                         "written), tensorboard, wandb"})
    exit_after_steps: int = dataclasses.field(default=-1, metadata={"help": "testing: exit abruptly after N "
                                                                            "steps (as a kill would)", "hidden": True})
    threads: int = dataclasses.field(default=0, metadata={"help": "CPU threads of each process (0: the physical "
                                                              "cores / processes per node; embedded: 2)"})


def _flag(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class TrainFlags(RunFlags):
    """The flags of every trainer, with neutral defaults (each script's @recipe gives its own)."""
    model: str = _flag("", "HF model directory to start from; empty: the embedded tiny Llama (after the embedded "
                           "stages before this one)")
    tokenizer: str = _flag("", "tokenizer directory or 'byte'; empty: the model's")
    data: str = _flag("", "mix 'file[:amount],...' (amount: 0.5 = fraction, 500 = rows)")
    template: str = _flag("", TEMPLATE_HELP_OWN)
    eval_data: str = _flag("", "held-out mix, as --data")
    eval_every: int = _flag(0, "held-out metrics every N steps (0: at the end)")
    output_dir: str = _flag("runs/out", "run directory: run_config.json, metrics.jsonl, checkpoints/, final/")
    lr: float = _flag(1e-6, "peak learning rate")
    lr_schedule: str = _flag("linear", "linear (decay to 0) | constant, after the warmup")
    warmup_ratio: float = _flag(0.0, "share of the optimizer steps warming up linearly")
    micro_batch_rows: int = _flag(1, "packed rows per forward/backward on each rank")
    save_every: int = _flag(200, "resumable checkpoint every N steps (0: never)")


# Flags two or three trainers share: one help text each (the default is the script's: shared(name, default)).
SHARED_HELP = {
    "ref_model": "reference model directory; empty: --model",
    "max_seq_len": "tokens per sequence; longer examples truncated",
    "truncate": "truncate over-long examples (false: drop them)",
    "tokenize_workers": "processes tokenizing the data, at most the CPUs (0/1: in-process)",
    "data_cache_dir": "tokenized-data cache shared by runs and ranks (must be shared by all nodes; '': none)",
    "epochs": "passes over the data",
    "max_steps": "stop after this many optimizer steps (0: epochs)",
    "batch_rows": "packed rows per optimizer step, all ranks",
    "beta": "the loss's beta (see docs/RECIPE.md)",
}

def shared(name, default, help_text=None):
    """A field for a flag of SHARED_HELP, with this script's default (and optionally a more precise help)."""
    return _flag(default, help_text or SHARED_HELP[name])


def recipe(help=None, **defaults):
    """Class decorator of a trainer's config: a dataclass whose inherited flags take `defaults` (the recipe's) and,
    for the names in `help`, that help text. The flags stay declared once, in TrainFlags."""
    def wrap(cls):
        inherited = {f.name: f for f in dataclasses.fields(cls.__mro__[1])}
        unknown = [n for n in {**defaults, **(help or {})} if n not in inherited]
        if unknown:
            raise TypeError(f"{cls.__name__}: recipe() names no inherited flag {unknown}")
        hints = typing.get_type_hints(cls.__mro__[1])
        for name in {**defaults, **(help or {})}:
            f = inherited[name]
            text = (help or {}).get(name, f.metadata.get("help", ""))
            cls.__annotations__ = {**getattr(cls, "__annotations__", {}), name: hints[name]}
            setattr(cls, name, _flag(defaults.get(name, f.default), text))
        return dataclasses.dataclass(cls)
    return wrap


def pick(cls, cfg, **over):
    """An algorithm's hyperparameters (dataclass cls) from the run's flags: each field of cls taken from the flag
    of its name (the algorithms never see the whole CLI config); `over` replaces some."""
    return cls(**{f.name: over.get(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cls)})


class UsageError(ValueError):
    """A flag the parser refuses (unknown, malformed value): raised instead of argparse's exit, so that run_script
    reports it like every other user error (and a caller of main(argv) can catch it)."""


class FlagParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {os.path.basename(self.prog)} --help)")


# --help in four groups; a flag not named here is a training flag (the algorithms' hyperparameters).
GROUPS = {
    "model and data": ("model", "tokenizer", "ref_model", "value_model", "data", "template", "eval_data", "max_seq_len",
                       "truncate", "max_prompt_len", "data_cache_dir", "eval_fraction", "ref_mode", "ref_cache_dir"),
    "training": (),
    "parallelism and speed": ("precision", "attn_backend", "loss_impl", "dp_shard", "dp_replicate", "tp", "compile",
                              "grad_sync", "fused_adamw", "activation_checkpointing", "threads", "tokenize_workers",
                              "verify_workers", "micro_batch_rows", "row_capacity", "compiled_decode"),
    "logging and output": ("output_dir", "save_every", "eval_every", "resume", "report_to", "eval_max_new_tokens"),
}
# flags that choose a variant of a trainer, whose defaults then change (resolve_flags' variant)
VARIANT_FLAGS = ("algo",)
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default after its description, except where there is none to show: a required flag, or a flag
    without a default (its description says what happens then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: %(default)r)".lstrip()


def parse_flags(cls, argv=None, preset=None, defaults=None):
    """Command-line flags from a dataclass's fields (name -> --name, default -> default, the field's help in
    metadata["help"], its --help group from GROUPS; metadata["hidden"]: a test hook, not listed). Every flag's help
    line shows its default (`defaults`: a dict that replaces some, e.g. RLVR's --algo ppo recipe); booleans take
    true|false; `preset` (the embedded default's overrides) is listed after the flags. --debug (see
    run.run_script) is listed too. Returns (config, set of the flags the user gave explicitly)."""
    epilog = None
    if preset:
        epilog = "with no --model (the embedded default), these replace the defaults above unless given: " + \
                 ", ".join(f"{k}={v}" for k, v in preset.items())
    parser = FlagParser(description=cls.__doc__, epilog=epilog, formatter_class=HelpFormatter)
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            conv, metavar = _parse_bool, "true|false"
        elif kind in (int, float, str):
            conv, metavar = kind, kind.__name__.upper()
        else:
            raise TypeError(f"flag --{f.name}: unsupported type {kind}")
        text = f.metadata.get("help", "").replace("%", "%%")
        default = (defaults or {}).get(f.name, f.default)
        groups[GROUP_OF.get(f.name, "training")].add_argument(
            f"--{f.name}", type=conv, default=default, metavar=metavar,
            help=argparse.SUPPRESS if f.metadata.get("hidden") else text)
    groups["logging and output"].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                              help="a user error shows its whole traceback (also NANOTULU_DEBUG=1)")
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)  # run_script has acted on it already
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    return cls(**args), given


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def apply_preset(cfg, preset, given):
    """Fields of `preset` (a dict) replace the defaults of cfg, but never a flag the user gave."""
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def resolve_flags(cls, preset, argv, variant=None):
    """The run's flags: the command line over the defaults; variant(cfg) -> dict: defaults that depend on another
    flag (RLVR's --algo ppo); with no --model the embedded preset (a dict, or a function of the flags giving one)
    over the defaults the command line leaves alone."""
    base, defaults = cls(), None
    if variant is not None:
        # the variant's defaults are the parser's (--algo ppo --help shows PPO's): the flag choosing the variant is
        # read first, from a parse that ignores the rest and never prints help
        first = FlagParser(add_help=False)
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name in VARIANT_FLAGS:
            if name in known:
                first.add_argument(f"--{name}", default=known[name].default)
        chosen, _ = first.parse_known_args(sys.argv[1:] if argv is None else argv)
        base = dataclasses.replace(base, **vars(chosen))
        defaults = variant(base)
    shown = preset(base) if callable(preset) else preset  # --help lists the preset of the default flags
    cfg, given = parse_flags(cls, argv, shown, defaults)
    if cfg.model:
        return cfg
    return apply_preset(cfg, preset(cfg) if callable(preset) else preset, given)


def on_cuda_by_default(value, flag, device):
    """A flag that is auto | true | false (auto: on for CUDA) -> bool; a clear error for anything else."""
    v = str(value).lower()
    if v == "auto":
        return device.type == "cuda"
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--{flag} {value!r}: expected auto, true or false")

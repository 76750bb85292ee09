"""LoRA and QLoRA: low-rank adapters on a frozen Llama, the base optionally held in 4-bit NF4, saved in the PEFT
format.

LoRA (Hu et al. 2021) freezes every weight of the model and learns, beside each targeted projection W (out, in),
two small matrices A (r, in) and B (out, r):

    y = x W^T + (alpha / r) * dropout(x) A^T B^T

A starts random (kaiming-uniform, as PEFT), B at zero, so the adapted model starts as the base model exactly.
QLoRA (Dettmers et al. 2023) also stores the frozen W in 4-bit NormalFloat (NF4: 16 levels placed at normal
quantiles, one absmax scale per block of 64 weights, the scales themselves quantised to int8 per block of 256
scales: "double quantisation"), dequantised for each matmul and never held whole in full precision.

NF4 comes from torchao (`torchao.quantization...nf4_tensor.NF4Tensor`, the tensor torchtune's QLoRA uses), not
bitsandbytes: torchao's NF4 is plain PyTorch ops (quantise, dequantise, F.linear on the dequantised weight), so the
same code runs on CPU (tests, the embedded pipeline) and on CUDA, and it implements FSDP2's all-gather hooks, so a
sharded run gathers the 4-bit data rather than a full-precision copy. bitsandbytes' 4-bit matmul is CUDA-first (no
CPU path in the versions this project runs) and is not installed here.

Layout: a targeted nn.Linear is replaced in place by a LoRALinear (an nn.Linear subclass keeping `weight` under
the same name, so the base state dict keys stay HF's, plus `lora_A` / `lora_B` parameters):
`model.layers.0.self_attn.q_proj.lora_A` is PEFT's `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

What the trainers call (each call site is marked `# LoRA` in train_sft.py, train_dpo.py, train_rlvr.py):
- LoRAFlags: the flags (--lora, --lora_rank, --lora_alpha, --lora_dropout, --lora_targets, --quantize nf4,
  --lora_adapter, --merge), mixed into each trainer's config;
- apply(model, cfg): freeze, wrap the targets (and quantise), before the model is placed on the mesh;
- adapters_off(model): a context in which every adapter is skipped: the DPO / RLVR reference is the same weights;
- save_adapter / load_adapter: the PEFT directory (adapter_config.json + adapter_model.safetensors);
- merged_state_dict: W + (alpha/r) B A (NF4 dequantised) for a plain Hugging Face checkpoint (--merge);
- finish_run: the trainers' last lines with LoRA (adapter, and the merged model with --merge).
Checkpoints for resume hold the trainable (adapter) parameters and their optimizer state only: checkpoint.py
leaves frozen parameters out of the DCP state dict.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# --lora_targets short names -> module names inside each block (nanotulu/model.py, the same as HF's)
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
NF4_BLOCK = 64  # weights per absmax scale (QLoRA's block size)
NF4_SCALER_BLOCK = 256  # scales per int8 scale block (QLoRA's double quantisation)


@dataclasses.dataclass
class LoRAFlags:
    """The adapter flags every policy trainer has (Tülu 2's QLoRA: rank 64, alpha 16, dropout 0.1, all
    attention and feed-forward projections)."""
    lora: bool = dataclasses.field(default=False, metadata={"help": "train LoRA adapters on a frozen base"})
    lora_rank: int = dataclasses.field(default=64, metadata={"help": "rank r of each adapter: B (out, r) x A (r, in)"})
    lora_alpha: float = dataclasses.field(default=16.0, metadata={"help": "adapter scale alpha / r"})
    lora_dropout: float = dataclasses.field(default=0.1, metadata={"help": "dropout on the adapters' input"})
    lora_targets: str = dataclasses.field(default="q,k,v,o,gate,up,down", metadata={
        "help": "projections that get adapters: " + ", ".join(TARGETS)})
    quantize: str = dataclasses.field(default="", metadata={
        "help": "'' | nf4: QLoRA, the frozen block projections held in 4-bit NF4 (implies --lora)"})
    lora_adapter: str = dataclasses.field(default="", metadata={
        "help": "PEFT adapter directory to continue training (e.g. DPO on top of an SFT adapter)"})
    merge: bool = dataclasses.field(default=False, metadata={
        "help": "with LoRA, also write output_dir/final: the merged Hugging Face model (always on for the embedded "
                "model, whose base exists nowhere else)"})


def enabled(cfg):
    return bool(getattr(cfg, "lora", False) or getattr(cfg, "quantize", "") or getattr(cfg, "lora_adapter", ""))


def check_flags(cfg):
    """Bad LoRA flags fail before any model loads."""
    if not enabled(cfg):
        return
    if cfg.quantize not in ("", "nf4"):
        raise ValueError(f"--quantize {cfg.quantize!r}: expected nf4 (or nothing)")
    if cfg.lora_rank < 1:
        raise ValueError(f"--lora_rank {cfg.lora_rank}: must be at least 1")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora_dropout {cfg.lora_dropout}: must be in [0, 1)")
    target_names(cfg.lora_targets)
    if cfg.quantize and cfg.tp > 1:
        raise ValueError("--quantize nf4 with --tp > 1: NF4 weights cannot be split by tensor parallel here; use "
                         "--lora without --quantize, or FSDP (--dp_shard) alone")
    if getattr(cfg, "ref_model", ""):
        raise ValueError("--ref_model with LoRA: the reference is the base model with the adapters off, so no "
                         "second model is loaded; leave --ref_model empty")
    if cfg.lora_adapter and getattr(cfg, "ref_mode", "") == "online" and getattr(cfg, "loss_type", "") != "simpo":
        raise ValueError("--ref_mode online with --lora_adapter: the reference is the policy at its start (base + "
                         "that adapter), which only the cached reference pass keeps; use --ref_mode cached")
    if cfg.lora_adapter and not os.path.isfile(os.path.join(cfg.lora_adapter, "adapter_config.json")):
        raise ValueError(f"--lora_adapter {cfg.lora_adapter}: no adapter_config.json (not a PEFT adapter directory)")


def target_names(spec):
    """'q,k,v' -> ['self_attn.q_proj', ...]; an unknown name is refused."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise ValueError(f"--lora_targets {spec!r}: unknown {bad} (choose from {', '.join(TARGETS)})")
    return [TARGETS[n] for n in names]


# ----------------------------------------------------------------------------------------------------------------
# NF4 (torchao)


_NF4 = None  # torchao's nf4_tensor module, imported on first use


def _nf4():
    """torchao's NF4 module. Imported once, into a global: each forward calls this, and torch.compile traces it (a
    functools.cache would be traced through, and the logging below is a graph break)."""
    global _NF4
    if _NF4 is None:
        import logging

        # torchao's import warns for each CUDA extension it cannot load (none of which NF4 uses): silenced for it
        log = logging.getLogger("torchao")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
        except ImportError as e:
            raise ImportError("--quantize nf4 needs torchao (pip install 'nanotulu[lora]')") from e
        finally:
            log.setLevel(level)
        _NF4 = nf4_tensor
    return _NF4


def to_nf4(w, shards=1):
    """(out, in) float weight -> torchao NF4Tensor: blocks of 64 weights, int8 scales double-quantised in blocks
    of 256 scales (QLoRA's sizes). A matrix whose block count 256 does not divide (small test and embedded shapes)
    uses the largest power-of-two scale block that does: the same format, a few more second-level scales.
    shards: FSDP's row shards; each must hold whole scale blocks (torchao splits the packed data, the scales and
    the second-level scales alike)."""
    if w.numel() % (NF4_BLOCK * shards) or w.shape[0] % shards:
        raise ValueError(f"NF4: a weight of shape {tuple(w.shape)} does not divide into blocks of {NF4_BLOCK} "
                         f"weights on each of {shards} FSDP shards")
    n_blocks = w.numel() // NF4_BLOCK
    scaler_block = math.gcd(n_blocks // shards, NF4_SCALER_BLOCK)
    return _nf4().to_nf4(w.detach().contiguous(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)


def is_nf4(t):
    return type(t).__name__ == "NF4Tensor"


def dequantize(w, dtype=None):
    """A base weight as a plain tensor: NF4 dequantised by torchao (its get_original_weight), else itself."""
    if is_nf4(w):
        return w.get_original_weight().to(dtype or w.dtype)
    return w if dtype is None else w.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The adapted linear layer


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (weight (out, in), plain or NF4) plus a trainable low-rank update:
    y = x W^T + scale * dropout(x) A^T B^T, A (r, in), B (out, r), scale = alpha / r. rank 0: no adapter (a frozen,
    possibly quantised, projection that --lora_targets leaves out)."""

    def __init__(self, base, rank, alpha, dropout, nf4=False, base_dtype=None, seed=0, shards=1):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight.detach()
        w = to_nf4(w, shards) if nf4 else (w if base_dtype is None else w.to(base_dtype))
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_parameter("bias", None)
        self.rank, self.scale, self.dropout = rank, (alpha / rank if rank else 0.0), dropout
        self.adapters_on = True
        if rank:
            dev = base.weight.device
            # PEFT's default init: A kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero. Drawn from
            # a generator of its own, so every rank of a sharded run draws the same adapters.
            gen = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(self.in_features)
            a = (torch.rand(rank, self.in_features, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            self.lora_A = nn.Parameter(a.to(dev))  # (r, in), fp32 master weights
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))  # (out, r)

    def forward(self, x):
        if is_nf4(self.weight):  # dequantised for this matmul only; torchao's autograd function saves the 4-bit
            # weight for backward (not a full-precision copy) and dequantises again there
            y = _nf4().linear_nf4(x, self.weight)
        else:
            y = F.linear(x, self.weight)
        if not self.rank or not self.adapters_on:
            return y
        a, b = self.lora_A, self.lora_B
        h = F.dropout(x, self.dropout, self.training)
        return y + F.linear(F.linear(h, a.to(y.dtype)), b.to(y.dtype)) * self.scale

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}, " \
               f"nf4={is_nf4(self.weight)}"


def lora_modules(model):
    """(name, LoRALinear) pairs, names without wrapper prefixes (activation checkpointing, compile)."""
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def mirror(src, dst):
    """Gives dst, a plain Llama on the meta device (parallel.gathered's hook-free copy for generation), src's adapter
    modules: the same rank, scale, dropout and on/off state. Loading src's tensors into dst then fills them."""
    for name, m in lora_modules(src):
        parent_name, attr = name.rsplit(".", 1)
        parent = dst.get_submodule(parent_name)
        shell = LoRALinear(getattr(parent, attr), m.rank, m.scale * m.rank, m.dropout)
        shell.adapters_on = m.adapters_on
        setattr(parent, attr, shell)


def clean_name(name):
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "").replace("_fsdp_wrapped_module.",
                                                                                                "")


def apply(model, cfg, base_dtype=None, train_head=False):
    """In place, before the model is placed on the mesh: freezes every parameter, replaces each targeted projection
    of every block by a LoRALinear (with --quantize nf4 every block projection, targeted or not, is held in NF4),
    and with --lora_adapter loads that adapter. base_dtype: the frozen full-precision weights' storage dtype (bf16
    on GPU: no fp32 master copy is needed for a weight that never changes); None keeps them.
    train_head: the value / reward head `score` stays trainable (PPO's value model). Returns the model."""
    if not enabled(cfg):
        return model
    targets = set(target_names(cfg.lora_targets))
    nf4 = cfg.quantize == "nf4"
    for p in model.parameters():
        p.requires_grad_(False)
    if base_dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(base_dtype)
    for i, block in model.model.layers.items():
        for j, name in enumerate(TARGETS.values()):
            if name not in targets and not nf4:
                continue
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            rank = cfg.lora_rank if name in targets else 0
            # one seed per (run seed, layer, projection): the same adapters on every rank and every restart
            seed = (cfg.seed * 1_000_003 + int(i) * 31 + j) % 2**63
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, cfg.lora_alpha, cfg.lora_dropout, nf4=nf4,
                                             seed=seed, shards=fsdp_shards(cfg)))
    if train_head and model.score is not None:
        model.score.weight.data = model.score.weight.data.float()
        model.score.weight.requires_grad_(True)
    if cfg.lora_adapter:
        load_adapter(model, cfg.lora_adapter)
    return model


def fsdp_shards(cfg):
    """The ranks FSDP will shard each weight over (parallel.build_mesh's dp_shard), read before the mesh exists."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if getattr(cfg, "dp_shard", -1) > 0:
        return cfg.dp_shard
    return max(1, world // (getattr(cfg, "tp", 1) * getattr(cfg, "dp_replicate", 1)))


@contextlib.contextmanager
def adapters_off(model):
    """Inside: every adapter is skipped, so the model computes its frozen base (the DPO / RLVR reference, with no
    second model in memory). A model without adapters is unchanged."""
    mods = [m for _, m in lora_modules(model)]
    was = [m.adapters_on for m in mods]
    for m in mods:
        m.adapters_on = False
    try:
        yield model
    finally:
        for m, w in zip(mods, was):
            m.adapters_on = w


def dpo_reference(cfg, model, reference, fingerprint, kw):
    """train_dpo's reference side with LoRA, from the placed policy (no second model): -> (ref_model, tables) as
    train_dpo.reference. Fresh adapters start with B = 0, so the policy at step 0 is its base and the reference is
    the policy with the adapters off (online: every step; cached: one pass, keyed as the base's, plus ":nf4" for a
    quantised base). With --lora_adapter the reference is the policy at its start, base + that adapter: one cached
    pass with the adapters on, before the first step, keyed by the adapter's files too."""
    n = len(kw["pair_sets"])
    if cfg.loss_type == "simpo":
        return None, [None] * n
    if cfg.ref_mode == "online":
        return model, [None] * n
    tag = (":nf4" if cfg.quantize else "") + (":adapter:" + fingerprint(cfg.lora_adapter) if cfg.lora_adapter else "")
    with contextlib.nullcontext() if cfg.lora_adapter else adapters_off(model):
        _, tables = reference(cfg, load_placed=lambda path: model, tag=tag, **kw)
    return None, tables


# ----------------------------------------------------------------------------------------------------------------
# Counting


def count_params(model):
    """-> (trainable, total) parameter counts; an NF4 weight counts its logical elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def training_memory(model):
    """Bytes of weights, gradients and AdamW state of a model as it trains here: each trainable parameter has a
    gradient and two AdamW moments of its own dtype; a frozen one only its storage (NF4: packed codes + int8 scales
    + fp32 second-level scales, read from the tensor). -> dict of bytes."""
    weights = 0
    for p in model.parameters():
        if is_nf4(p):
            weights += sum(t.numel() * t.element_size() for t in (p.quantized_data, p.quantized_scalers,
                                                                   p.quantization_factor, p.scaler_mean, p.nf4))
        else:
            weights += p.numel() * p.element_size()
    train = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"weights": weights, "grads": train, "optimizer": 2 * train, "total": weights + 3 * train}


def shape_memory(cfg, mode, rank=64, targets="q,k,v,o,gate,up,down", dtype_bytes=4, base_bytes=2):
    """Computed (no tensor made) for a LlamaConfig: trainable parameters and bytes of weights + gradients + AdamW
    state for mode 'full' (every weight trained, fp32 master weights: dtype_bytes), 'lora' (frozen base in bf16:
    base_bytes, fp32 adapters) or 'qlora' (block projections NF4: 0.5 B per weight + one int8 scale per 64 +
    one fp32 scale per 64 x 256, the rest bf16). -> dict."""
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out), "gate": (f, h), "up": (f, h),
              "down": (h, f)}
    proj = L * sum(o * i for o, i in shapes.values())
    other = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + L * 2 * h + h  # embeddings, norms
    total = proj + other
    if mode == "full":
        return {"trainable": total, "total": total, "weights": total * dtype_bytes, "grads": total * dtype_bytes,
                "optimizer": 2 * total * dtype_bytes}
    names = [s.strip() for s in targets.split(",")]
    adapters = L * sum(rank * (o + i) for n, (o, i) in shapes.items() if n in names)
    if mode == "lora":
        base = total * base_bytes
    elif mode == "qlora":
        base = proj * (0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALER_BLOCK)) + other * base_bytes
    else:
        raise ValueError(f"mode {mode!r}: full, lora or qlora")
    return {"trainable": adapters, "total": total + adapters, "weights": base + adapters * dtype_bytes,
            "grads": adapters * dtype_bytes, "optimizer": 2 * adapters * dtype_bytes}


# ----------------------------------------------------------------------------------------------------------------
# The PEFT format


def peft_key(name, part):
    """'model.layers.0.self_attn.q_proj', 'A' -> PEFT's key for LlamaForCausalLM."""
    return f"base_model.model.{name}.lora_{part}.weight"


def adapter_state_dict(model):
    """{PEFT key: full CPU tensor} of every adapter (gathered from FSDP / TP shards; only the trainable parameters
    travel, never the base). Under a process group every rank must call it; all get the tensors."""
    from nanotulu.checkpoint import trainable_state_dict

    sd = trainable_state_dict(model)
    out = {}
    for name, t in sd.items():
        name = clean_name(name)
        for part in ("A", "B"):
            if name.endswith(f".lora_{part}"):
                out[peft_key(name.removesuffix(f".lora_{part}"), part)] = t.float().contiguous()
    return out


def adapter_config(cfg, base_path):
    short = {v.split(".")[1]: k for k, v in TARGETS.items()}  # q_proj -> q
    mods = sorted(v.split(".")[1] for v in target_names(cfg.lora_targets))
    assert all(m in short for m in mods)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "target_modules": mods, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "revision": None}


def save_adapter(model, cfg, out_dir, base_path, rank=0):
    """Writes out_dir/adapter_config.json + adapter_model.safetensors (PEFT's names, fp32), which
    `peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_path), out_dir)` loads. Every rank calls
    it (the gather is collective); rank 0 writes, into a temporary directory renamed over out_dir."""
    from safetensors.torch import save_file

    from nanotulu.model import replace_dir

    sd = adapter_state_dict(model)
    if rank != 0:
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir), dir=parent)
    try:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config(cfg, base_path), f, indent=2)
        save_file(sd, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_adapter(path):
    """-> (adapter_config dict, {PEFT key: tensor}); refuses what this LoRA does not implement."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    if acfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {acfg.get('peft_type')!r}; only LORA adapters load")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if acfg.get(key, plain) != plain:
            raise ValueError(f"{cfg_path}: {key}={acfg[key]!r} is not supported (plain LoRA only)")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_path}: rank_pattern / alpha_pattern are not supported (one rank and alpha)")
    st = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(st):
        raise FileNotFoundError(f"{st}: missing")
    return acfg, load_file(st)


@torch.no_grad()
def load_adapter(model, path):
    """Copies a PEFT adapter's A and B into the model's LoRALinear modules (before placement); its rank and alpha
    must match the flags'. Every adapted module must find its two tensors, and every tensor its module."""
    acfg, sd = read_adapter(path)
    mods = dict(lora_modules(model))
    used = set()
    for name, m in mods.items():
        if not m.rank:
            continue
        if acfg["r"] != m.rank or abs(acfg["lora_alpha"] / acfg["r"] - m.scale) > 1e-12:
            raise ValueError(f"{path}/adapter_config.json: r={acfg['r']}, lora_alpha={acfg['lora_alpha']}; the flags "
                             f"give --lora_rank {m.rank} and scale {m.scale:g}: pass the adapter's")
        for part in ("A", "B"):
            key = peft_key(name, part)
            if key not in sd:
                raise ValueError(f"{path}/adapter_model.safetensors: no tensor {key!r} (the adapter targets other "
                                 "projections than --lora_targets)")
            p = getattr(m, f"lora_{part}")
            if tuple(sd[key].shape) != tuple(p.shape):
                raise ValueError(f"{path}/adapter_model.safetensors: {key!r} has shape {tuple(sd[key].shape)}, the "
                                 f"model needs {tuple(p.shape)}")
            p.copy_(sd[key].to(p.dtype))
            used.add(key)
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"{path}/adapter_model.safetensors: tensors with no adapted module: {extra[:3]}")


# ----------------------------------------------------------------------------------------------------------------
# Merging and the final export


@torch.no_grad()
def merged_state_dict(model, dtype=torch.float32):
    """The model's Hugging Face state dict with every adapter folded in: W + scale * B A (NF4 W dequantised by
    torchao), no lora_* keys. On a placed model every rank calls it (full tensors gathered, on rank 0 only; the
    others get {})."""
    import torch.distributed as dist

    from nanotulu.checkpoint import gathered_tensor

    sd, mods = {}, dict(lora_modules(model))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for name, p in model.named_parameters():
        name = clean_name(name)
        if name.endswith((".lora_A", ".lora_B")):
            continue
        p = gathered_tensor(p)  # collective for a shard: every rank, in the same order
        w = dequantize(p).to(dtype) if rank0 else None
        owner = mods.get(name.removesuffix(".weight"))
        if owner is not None and owner.rank:
            a, b = owner.lora_A, owner.lora_B
            a, b = gathered_tensor(a), gathered_tensor(b)
            if rank0:
                w = w + owner.scale * (b.to(dtype) @ a.to(dtype))
        if rank0:
            sd[name] = w.cpu().contiguous()
    return sd


def save_merged(model, out_dir, tok=None, template="tulu", rank=0):
    """A merged Hugging Face checkpoint (checkpoint.save_hf's files, with adapters folded into the weights)."""
    from nanotulu import checkpoint

    sd = merged_state_dict(model)
    checkpoint.save_hf(model, out_dir, tok=tok, template=template, rank=rank, state_dict=sd)


def export(cfg, model, is_embedded, tok, rank, template="tulu"):
    """run.finish_run's export for a LoRA run: the PEFT adapter in output_dir/adapter (its base: --model), and with
    --merge (always for the embedded model, whose base exists nowhere else) the merged Hugging Face model in
    output_dir/final. -> (final/ when merged, else adapter/; what was saved, in words)."""
    adapter_dir = save_adapter(model, cfg, os.path.join(cfg.output_dir, "adapter"), os.path.abspath(cfg.model)
                               if cfg.model else "", rank)
    if not (cfg.merge or is_embedded):
        return adapter_dir, adapter_dir
    out = os.path.join(cfg.output_dir, "final")
    save_merged(model, out, tok, template, rank)
    return out, f"{adapter_dir} and the merged model {out}"

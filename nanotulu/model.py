"""The Llama 3 family in one file, with Hugging Face checkpoint loading and saving.

Architecture (Llama 3 / 3.1 / 3.2, as in Hugging Face `LlamaForCausalLM`):
- token embedding, then `num_hidden_layers` pre-norm blocks, then a final RMSNorm;
- RMSNorm in fp32: x * rsqrt(mean(x^2) + eps), cast back, times a learned weight;
- rotary position embeddings in the "rotate half" layout HF stores q/k in, theta from the config (500000 for
  Llama 3), with the optional "llama3" rope_scaling that stretches low frequencies for long context;
- grouped-query attention: num_key_value_heads <= num_attention_heads, no biases;
- SwiGLU MLP: down(silu(gate(x)) * up(x));
- output projection `lm_head`, or the embedding matrix itself when tie_word_embeddings (Llama 3.2 1B/3B).

The forward returns the final-normed hidden states (B, T, H), not logits: the training losses take these and the
output weight (`model.output_weight`) into a fused kernel, so the (tokens x vocab) logits never exist in training.
`model.logits(...)` gives full logits for evaluation and tests.

Packed sequences: several documents share a row; `position_ids` restart at 0 for each one and `cu_seqlens` (int32,
boundaries over the flattened B*T tokens, like flash-attn's varlen) keeps attention inside each document. Backends:
- "sdpa": scaled_dot_product_attention with a block-diagonal causal mask (the reference; runs everywhere);
- "flex": FlexAttention with a (B, 1, T, T) block mask from each row's document ids (GPU);
- "varlen": flash-attn's varlen function if installed, else torch's own varlen attention (GPU); GQA is passed to
  the kernel, and the longest document (`max_seqlen`) comes from the loader as a python int, so no forward reads
  a device tensor back.
"auto" picks varlen or flex on CUDA and sdpa on CPU; fp32 q/k/v on CUDA get flex (the varlen kernels take 16-bit only).

Generation passes a static KV cache (see nanotulu/generate.py): a dict with per-layer "k" and "v" lists of
(B, n_kv_heads, S, head_dim) tensors, "pos" (T,) the cache slots this call writes, and "mask" (B, 1, T, S) bool,
True where a query may attend to a cache slot.
"""

import contextlib
import functools
import inspect
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #                                    "original_max_position_embeddings"} or None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


# Published shapes (docs/RECIPE.md), for benchmarks with random weights.
LLAMA_3_2_1B = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           tie_word_embeddings=True, max_position_embeddings=131072)


def config_from_hf(d, source="config.json"):
    """An HF config.json dict -> LlamaConfig, refusing what this model does not implement."""
    if d.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type is {d.get('model_type')!r}; nanotulu implements 'llama' only")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"{source}: {key}=true is not a Llama 3 architecture (no biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (SwiGLU uses silu)")
    rs = d.get("rope_scaling")
    if rs is not None and rs.get("rope_type", rs.get("type")) not in ("llama3", "default"):
        raise ValueError(f"{source}: rope_scaling type {rs.get('rope_type', rs.get('type'))!r} is not supported")
    if rs is not None and rs.get("rope_type", rs.get("type")) == "default":
        rs = None
    known = set(LlamaConfig.__dataclass_fields__) - {"extra", "rope_scaling"}
    kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
    if "rope_parameters" in d and "rope_theta" not in d:  # newer transformers writes rope_parameters
        rp = d["rope_parameters"]
        kwargs["rope_theta"] = rp.get("rope_theta", 500000.0)
        if rp.get("rope_type", "default") == "llama3":
            rs = dict(rp)
    for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if required not in d:
            raise ValueError(f"{source}: missing field {required!r}")
    kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
    # rope_parameters (transformers 5) stays in extra: config_to_hf writes it back in that form
    extra = {k: v for k, v in d.items() if k not in known and k != "rope_scaling"}
    return LlamaConfig(**kwargs, rope_scaling=rs, extra=extra)


def config_to_hf(cfg):
    """LlamaConfig -> config.json: the fields read (config_from_hf's extra) written back, RoPE in the form the
    input had (transformers 5's rope_parameters, or rope_theta + rope_scaling)."""
    d = {k: v for k, v in cfg.extra.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    d.update({k: v for k, v in asdict(cfg).items() if k != "extra"})
    if "rope_parameters" in d:
        rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
        d["rope_parameters"] = {**d["rope_parameters"], **rope, "rope_theta": cfg.rope_theta}
        del d["rope_theta"], d["rope_scaling"]
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", attention_bias=False,
             mlp_bias=False, attention_dropout=0.0)
    return d


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(cfg):
    """(head_dim/2,) fp32 inverse frequencies, with the llama3 scaling applied when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # llama3: wavelengths longer than old_len/low_freq_factor are divided by `factor`, those shorter than
    # old_len/high_freq_factor kept, and the band between interpolated smoothly.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq, position_ids, dtype):
    # position_ids (B, T) -> cos, sin (B, T, 1, head_dim), computed in fp32 then cast (as HF does)
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, :, None, :].to(dtype), emb.sin()[:, :, None, :].to(dtype)


def apply_rope(x, cos, sin):
    # x (B, T, n_heads, head_dim); the "rotate half" convention: pairs are (i, i + head_dim/2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention backends for packed rows


@functools.cache
def _has_flash_attn():
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


@functools.cache
def _has_torch_varlen():
    """torch's own varlen attention (torch >= 2.9). A submodule: `hasattr(torch.nn.attention, "varlen")` is False
    until something imports it, so it is imported here."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
        return True
    except ImportError:
        return False


VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn's and torch's varlen kernels take nothing else


def pick_backend(name, device, dtype=None):
    """The attention backend for packed rows of q/k/v in `dtype` (None: assume 16-bit) on `device`.
    "auto": varlen (flash-attn, else torch's) on CUDA when available, else flex on CUDA, sdpa elsewhere.
    varlen (asked for or auto) with an fp32 q/k/v on CUDA becomes flex: both varlen kernels refuse fp32 (an fp32
    model without autocast, the fp32 reference runs), flex runs any dtype.
    Called by Llama.forward outside any compiled region only (never in the KV-cache decode step): the probes
    import flash_attn / torch's varlen module, which dynamo cannot trace under fullgraph=True."""
    if name not in ("auto", "sdpa", "flex", "varlen"):
        raise ValueError(f"unknown attention backend {name!r} (auto, sdpa, flex, varlen)")
    if device.type != "cuda":
        return "sdpa" if name == "auto" else name
    if name == "auto":
        name = "varlen" if _has_flash_attn() or _has_torch_varlen() else "flex"
    if name == "varlen" and dtype is not None and dtype not in VARLEN_DTYPES:
        return "flex"
    return name


def attention_dtype(x):
    """The dtype q/k/v will have in attention: autocast's on x's device when enabled, else x's own."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):  # "meta" has no autocast state
        return torch.get_autocast_dtype(dev)
    return x.dtype


def document_ids(cu_seqlens, B, T):
    """cu_seqlens (n_segments + 1,) over the flattened B*T tokens -> (B, T) int32 segment index of each token
    (no host sync). Segments never cross rows (make_row ends each row's last segment at its capacity)."""
    cu = cu_seqlens.to(torch.int32)
    flat = torch.arange(B * T, device=cu.device, dtype=torch.int32)
    return torch.searchsorted(cu[1:].contiguous(), flat, right=True).view(B, T)


def attention_meta(backend, cu_seqlens, B, T, device, max_seqlen=None, per_document=None):
    """What the chosen backend needs to keep documents apart, computed once per forward and shared by all layers.
    max_seqlen: the longest document, a python int from the loader (stack_rows); None: T, an upper bound that is
    always right (documents never cross rows). Nothing here reads a device tensor back to the host, but for
    per-document sdpa.
    per_document (sdpa; None: on CPU): a host list of the (start, end) segments over the B*T tokens, attended one
    by one with a causal sdpa each, instead of one (B, T, T) block-diagonal mask: the mask makes every row cost
    T^2 (masked tiles are computed too), the segments sum(L^2) / 2: at 2048-token rows of ~300-token documents,
    ~7x less attention work. On a CPU reading cu_seqlens costs nothing; on a GPU it would stall the stream (and
    the GPU backends, varlen and flex, skip masked tiles anyway)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    if per_document is None:
        # single-process CPU runs only: a 2-rank gloo PPO step with it differed from one process by 4e-4 (relative,
        # one norm weight's change; tests/test_ppo_step.py) for a reason not yet found, while the mask agrees
        per_document = device.type == "cpu" and (not dist.is_initialized() or dist.get_world_size() == 1)
    if backend == "sdpa" and per_document:
        bounds = cu_seqlens.tolist()
        return list(zip(bounds[:-1], bounds[1:]))
    if backend == "sdpa":
        d = document_ids(cu, B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return (d[:, :, None] == d[:, None, :]) & causal  # (B, T, T)
    if backend == "flex":
        # one (B, 1, T, T) block mask with each row's own document ids: B * (T/128)^2 blocks, not (B*T/128)^2
        from torch.nn.attention.flex_attention import create_block_mask

        doc = document_ids(cu, B, T)  # (B, T)

        def document_causal(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)

        return create_block_mask(document_causal, B, None, T, T, device=device)
    if backend == "varlen":
        return cu, T if max_seqlen is None else int(max_seqlen), varlen_kernel()
    raise ValueError(f"unknown attention backend {backend!r} (sdpa, flex, varlen, auto)")


_flex_compiled = None


def varlen_kernel():
    """-> kernel(q (N, nh, hd), k/v (N, nkv, hd), cu, max_len) -> (N, nh, hd), causal within each cu segment:
    flash-attn's varlen function if installed, else torch's. Both take GQA directly (fewer k/v heads), so K/V are
    never repeated (but for torch's first varlen API, which had no GQA flag). Chosen in attention_meta, outside the
    compiled blocks, so the blocks trace one plain call."""
    if _has_flash_attn():
        from flash_attn import flash_attn_varlen_func

        def flash(q, k, v, cu, max_len):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return flash
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # by torch version
    takes_gqa = "enable_gqa" in params

    def torch_varlen(q, k, v, cu, max_len):
        gqa = {}
        if k.shape[1] != q.shape[1]:
            if takes_gqa:
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **gqa)
    return torch_varlen


def attend(q, k, v, backend, meta):
    """q (B, T, nh, hd), k/v (B, T, nkv, hd) -> (B, T, nh, hd), causal within each document."""
    B, T, nh, hd = q.shape
    if isinstance(meta, list):  # sdpa per document: (start, end) segments over the flattened B*T tokens
        qf, kf, vf = (t.reshape(B * T, -1, hd).transpose(0, 1) for t in (q, k, v))  # (heads, B*T, hd)
        y = torch.cat([F.scaled_dot_product_attention(qf[None, :, s:e], kf[None, :, s:e], vf[None, :, s:e],
                                                      is_causal=True, enable_gqa=k.shape[2] != nh)[0]
                       for s, e in meta], dim=1)  # (nh, B*T, hd)
        return y.transpose(0, 1).reshape(B, T, nh, hd)
    if meta is None or backend == "sdpa":
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=None if meta is None else meta[:, None],
                                           is_causal=meta is None, enable_gqa=k.shape[2] != nh)
        return y.transpose(1, 2)
    if backend == "flex":
        global _flex_compiled
        from torch.nn.attention.flex_attention import flex_attention

        if torch.compiler.is_compiling():  # inside a compiled block: dynamo lowers flex_attention itself
            flex = flex_attention
        else:
            if _flex_compiled is None:  # compiled once: eager flex materialises the scores
                _flex_compiled = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
            flex = _flex_compiled
        y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=meta,
                 enable_gqa=k.shape[2] != nh)  # (B, nh, T, hd)
        return y.transpose(1, 2)
    cu, max_len, kernel = meta  # varlen
    qf, kf, vf = (t.reshape(B * T, -1, hd) for t in (q, k, v))
    return kernel(qf, kf, vf, cu, max_len).reshape(B, T, nh, hd)


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class AttnInputs:
    """What every attention layer of one forward shares, built once by Llama.forward."""
    cos: torch.Tensor  # (B, T, 1, head_dim) rotary tables
    sin: torch.Tensor
    backend: str  # "sdpa" | "flex" | "varlen" (pick_backend)
    meta: object  # the backend's document-mask data from attention_meta; None: plain causal attention
    cache: dict | None = None  # the static KV cache during generation (see the module docstring)
    max_seqlen: int | None = None  # longest document (python int, from the loader); None: T


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which KV-cache slot this layer writes during generation
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, att):
        B, T, _ = x.shape
        # -1 heads: under tensor parallel each rank holds only its share of the heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, att.cos, att.sin), apply_rope(k, att.cos, att.sin)
        cache = att.cache
        if cache is None:
            y = attend(q, k, v, att.backend, att.meta)
        else:  # static KV cache: write this call's keys/values into their slots, attend over the whole cache
            k_cache, v_cache = cache["k"][self.layer_idx], cache["v"][self.layer_idx]  # (B, nkv, S, hd)
            k_cache.index_copy_(2, cache["pos"], k.transpose(1, 2).to(k_cache.dtype))
            v_cache.index_copy_(2, cache["pos"], v.transpose(1, 2).to(v_cache.dtype))
            # GQA without enable_gqa (which sends masked SDPA to the slow math kernel on GPU): the g query heads
            # sharing a KV head are folded into the query-length axis, (B, nkv, g*T, hd)
            nkv, S = k_cache.shape[1], k_cache.shape[2]
            g = q.shape[2] // nkv
            qf = q.transpose(1, 2).reshape(B, nkv, g * T, -1)
            mask = cache["mask"][:, :, None].expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
            y = F.scaled_dot_product_attention(qf, k_cache, v_cache, attn_mask=mask)
            y = y.view(B, nkv * g, T, -1).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, att):
        x = x + self.self_attn(self.input_layernorm(x), att)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg, attn_backend="auto", score_head=False):
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend
        # The same module names as HF's LlamaForCausalLM, so state dicts match name for name. Layers are keyed by
        # index in a ModuleDict so parallel.py can wrap each block.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)}),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        # score_head: a reward or value model (HF LlamaForSequenceClassification, one label) reads one scalar per
        # token through `score` (H -> 1) instead of projecting to the vocabulary, and keeps no lm_head
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False) if score_head else None
        untied = not cfg.tie_word_embeddings and not score_head
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if untied else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def output_weight(self):
        """The output projection handed to a forward `head`: (V, H) lm_head, or the embedding when tied; (1, H)
        `score` for a reward / value model."""
        if self.score is not None:
            return self.score.weight
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed=None, std=0.02):
        """Fills a model built on the meta device and moved with `to_empty`: normal(0, std) matrices, unit norms."""
        gen = None if seed is None else torch.Generator(device=self.output_weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        self.inv_freq.copy_(rope_inv_freq(self.cfg))

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, cache=None, head=None, max_seqlen=None):
        """input_ids (B, T) -> final-normed hidden states (B, T, H), or head(hidden, output_weight) when a head
        (e.g. a fused loss) is given: called inside forward, so FSDP has the output weight gathered for it.
        max_seqlen: the longest document of a packed batch as a python int (stack_rows gives it), so the varlen
        kernel's launch size needs no read of cu_seqlens from the device."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        if cache is not None:  # KV-cache generation: attention is SDPA over the cache, no backend to choose (and the
            backend, meta = "sdpa", None  # compiled decode step must not trace pick_backend's imports)
        else:
            backend = pick_backend(self.attn_backend, input_ids.device, attention_dtype(x))
            meta = attention_meta(backend, cu_seqlens, B, T, input_ids.device, max_seqlen)
        att = AttnInputs(cos, sin, backend, meta, cache, max_seqlen)
        for block in self.model.layers.values():
            x = block(x, att)
        h = self.model.norm(x)
        return h if head is None else head(h, self.output_weight)

    def logits(self, input_ids, position_ids=None, cu_seqlens=None, cache=None):
        """Full (B, T, V) fp32 logits, for evaluation, generation and tests; training never calls this."""
        h = self(input_ids, position_ids, cu_seqlens, cache)
        return F.linear(h, self.output_weight).float()

    # ------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, attn_backend="auto", score_head=None):
        """Reads an HF directory: config.json + model.safetensors, or sharded model-*.safetensors with
        model.safetensors.index.json. dtype None keeps the checkpoint's dtype.
        score_head: None reads a reward model (LlamaForSequenceClassification) as one and a causal LM as one; True
        makes a reward / value model of either (a causal LM's lm_head is dropped and a new score head drawn);
        False refuses a reward model."""
        from safetensors import safe_open

        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: missing (not a Hugging Face model directory)")
        with open(cfg_path) as f:
            cfg = config_from_hf(json.load(f), cfg_path)
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]  # tensor name -> shard file
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map = None
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        is_reward_model = "LlamaForSequenceClassification" in cfg.extra.get("architectures", [])
        if is_reward_model and score_head is False:
            raise ValueError(f"{cfg_path}: a reward model (LlamaForSequenceClassification), not a causal LM")
        if is_reward_model and cfg.extra.get("num_labels", len(cfg.extra.get("id2label", {0: 0}))) != 1:
            raise ValueError(f"{cfg_path}: a reward model needs exactly one label")
        score_head = is_reward_model if score_head is None else score_head
        with torch.device("meta"):
            model = cls(cfg, attn_backend, score_head=score_head)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        state = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise FileNotFoundError(f"{fpath}: shard named in {index_path} is missing")
            with safe_open(fpath, framework="pt", device=str(device or "cpu")) as f:
                for name in f.keys():
                    if name not in expected:
                        if (cfg.tie_word_embeddings or score_head) and name == "lm_head.weight":
                            continue  # some tied checkpoints still carry a copy; a reward model has no lm_head
                        raise ValueError(f"{fpath}: unexpected tensor {name!r} for this Llama config")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(expected[name]):
                        raise ValueError(f"{fpath}: tensor {name!r} has shape {tuple(t.shape)}, "
                                         f"config.json implies {tuple(expected[name])}")
                    state[name] = t if dtype is None else t.to(dtype)
        if score_head and "score.weight" not in state:  # a value / reward model started from a causal LM: a new
            # head of std 1/sqrt(H+1) (as open-instruct initialises its value heads), from a fixed seed
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(1, cfg.hidden_size, generator=gen) / math.sqrt(cfg.hidden_size + 1)
            state["score.weight"] = w.to(dtype=dtype or torch.float32, device=device or "cpu")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_inv_freq(cfg).to(device or "cpu")
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, state_dict=None):
        """Writes config.json + safetensors (sharded above max_shard_bytes, with an index) that transformers'
        LlamaForCausalLM loads. Atomic: written to a temporary directory beside `path`, then renamed over it.
        `state_dict` lets a sharded run pass full tensors gathered from its ranks."""
        from safetensors.torch import save_file

        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        if self.cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        dtypes = {v.dtype for v in sd.values()}
        cfg = config_to_hf(self.cfg)
        if self.score is not None:  # transformers' LlamaForSequenceClassification, one scalar label
            cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
                       label2id={"LABEL_0": 0})
        cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        cfg["dtype"] = cfg["torch_dtype"]  # the name newer transformers reads
        # shards: consecutive tensors until the size limit
        shards, cur, cur_bytes = [], {}, 0
        for name, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if cur and cur_bytes + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, cur_bytes = {}, 0
            cur[name] = t
            cur_bytes += nbytes
        shards.append(cur)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path), dir=parent)
        try:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            if len(shards) == 1:
                save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                    weight_map.update({name: fname for name in shard})
                total = sum(t.numel() * t.element_size() for t in sd.values())
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            umask = os.umask(0o022)
            os.umask(umask)
            for name in os.listdir(tmp):  # safetensors writes 0600, mkdtemp makes 0700: the umask's modes instead
                os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def replace_dir(tmp, path):
    """Renames directory tmp to path; an existing path is moved aside first and removed after, so a crash at any
    point leaves either the old or the new directory whole."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path), dir=os.path.dirname(os.path.abspath(path)))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


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



@contextlib.contextmanager
def eval_mode(module):
    """Inside: the module in eval mode (no dropout: the Llama has none, LoRA's adapters do), its mode restored on
    exit. Generation and held-out evaluation run inside it, whatever mode the training loop left."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def build_model(cfg, device="cpu", dtype=torch.float32, seed=0, attn_backend="auto"):
    """A freshly initialised model: built on the meta device (no memory), then materialised and filled."""
    with torch.device("meta"):
        model = Llama(cfg, attn_backend)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model.to(dtype)


def num_flops_per_token(cfg, seq_len):
    """Training FLOPs per token (ANCHORS.md): 6 x non-embedding params (lm_head included) + 12 x L x H x T."""
    d, L, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    attn = d * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    params = L * (attn + 3 * d * f + 2 * d) + d + cfg.vocab_size * d
    return 6 * params + 12 * L * d * seq_len

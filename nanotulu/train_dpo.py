"""Direct preference optimisation (Tulu 3 stage 2), run with torchrun or plain python.

    torchrun --nproc_per_node 1 nanotulu/train_dpo.py        # embedded default: after the embedded SFT, on CPU
    torchrun --nproc_per_node 8 nanotulu/train_dpo.py --model runs/sft-8b/final --data prefs.jsonl \
        --output_dir runs/dpo-8b

Each preference pair (chosen and rejected answers to one prompt) is one item of the packed loader: both sequences
land in the same row, as two documents of its cu_seqlens. The fused kernel gives per-token log-probs of the
answer tokens (prompt tokens masked), summed per document into sequence log-probs. Reference log-probs are
computed once, before training, in a no-grad pass, and cached on disk under a hash of everything they depend on,
so no reference model is held in memory while training (or --ref_mode online keeps one).
"""

import bisect
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanotulu import checkpoint, common, data, embedded, lora, losses
from nanotulu.data import TEMPLATE_HELP_OWN
from nanotulu.model import num_flops_per_token

LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


@dataclass
class DPOConfig(lora.LoRAFlags, common.RunFlags):  # LoRA: its flags
    """Preference tuning. Defaults are Tulu 3 8B's DPO recipe; with no --model the embedded SFT model and the
    shipped synthetic preference set are used with a preset suited to them."""
    model: str = field(default="", metadata={"help": "HF directory of the SFT model; empty: the embedded one"})
    ref_model: str = field(default="", metadata={"help": "reference model directory; empty: --model"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory or 'byte'; empty: the model's"})
    data: str = field(default="", metadata={"help": "mix 'file[:amount],...' of chosen/rejected rows"})
    eval_data: str = field(default="", metadata={"help": "held-out mix, as --data: reward accuracy and margin "
                                                         "logged as eval/..."})
    eval_every: int = field(default=0, metadata={"help": "held-out metrics every N steps and at the end (0: at "
                                                         "the end)"})
    template: str = field(default="", metadata={"help": TEMPLATE_HELP_OWN})
    output_dir: str = "runs/dpo"
    loss_type: str = field(default="dpo_norm", metadata={"help": "dpo | dpo_norm | simpo | ipo"})
    beta: float = 5.0
    gamma_beta_ratio: float = 0.3
    label_smoothing: float = 0.0
    max_seq_len: int = field(default=2048, metadata={"help": "per sequence; a row holds 2 x this many tokens"})
    truncate: bool = field(default=True, metadata={"help": "cut over-long answers (false: drop the pair)"})
    epochs: int = 1
    max_steps: int = 0
    lr: float = 5e-7
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.1
    batch_pairs: int = field(default=128, metadata={"help": "preference pairs per optimizer step, all ranks "
                                                            "(packed into as many rows as they need)"})
    micro_batch_rows: int = field(default=1, metadata={"help": "packed rows per forward/backward on each rank"})
    ref_mode: str = field(default="cached", metadata={"help": "cached (one no-grad pass, on disk) | online"})
    ref_cache_dir: str = field(default="~/.cache/nanotulu/ref_logps", metadata={"help": "reference cache folder"})
    tokenize_workers: int = field(default=8, metadata={"help": "processes tokenizing the data (0/1: in-process)"})
    data_cache_dir: str = field(default="~/.cache/nanotulu/tokenized", metadata={
        "help": "tokenized-data cache shared by runs and ranks (must be shared by all nodes; '': none)"})
    save_every: int = 200


EMBEDDED_PRESET = dict(max_seq_len=256, lr=3e-6, beta=5.0, batch_pairs=8, save_every=50, epochs=1,
                       ref_cache_dir="runs/ref_cache")
EMBEDDED_SFT_DIR = "runs/sft"


# ----------------------------------------------------------------------------------------------------------------
# The loss


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, len_chosen, len_rejected, *, loss_type, beta,
             gamma_beta_ratio=0.3, label_smoothing=0.0):
    """Per-pair preference losses (docs/RECIPE.md). Inputs (P,): answer log-likelihoods summed over tokens, and the
    answer token counts. Returns (losses (P,), rewards_chosen (P,), rewards_rejected (P,)); the rewards are
    beta x the policy-minus-reference log-likelihood in the loss's own normalisation (simpo: no reference)."""
    if loss_type in ("dpo_norm", "ipo"):  # every L per token
        pi_chosen, pi_rejected = pi_chosen / len_chosen, pi_rejected / len_rejected
        ref_chosen, ref_rejected = ref_chosen / len_chosen, ref_rejected / len_rejected
    if loss_type == "simpo":
        chosen, rejected = pi_chosen / len_chosen, pi_rejected / len_rejected
        z = chosen - rejected - gamma_beta_ratio
    elif loss_type in ("dpo", "dpo_norm", "ipo"):
        chosen, rejected = pi_chosen - ref_chosen, pi_rejected - ref_rejected
        z = chosen - rejected
    else:
        raise ValueError(f"--loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        s = label_smoothing
        losses = -(1 - s) * F.logsigmoid(beta * z) - s * F.logsigmoid(-beta * z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ----------------------------------------------------------------------------------------------------------------
# Data: pairs of (chosen, rejected), prompt masked, both in one packed row


def tokenize_pair(row, tok, template, max_seq_len, truncate, where):
    """A preference row -> {"chosen": doc, "rejected": doc} with labels only on the final answer, or None when too
    long and truncate is off. `where` (file:line) names the row in errors."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: field '{name}': expected a non-empty list of messages")
        if isinstance(row.get("prompt"), list) and msgs[0].get("role") == "assistant":
            msgs[:0] = row["prompt"]  # some sets keep the prompt apart
        if msgs[-1].get("role") != "assistant":
            raise ValueError(f"{where}: field '{name}': the last message must be the assistant answer")
        if not isinstance(msgs[-1].get("content"), str) or not msgs[-1]["content"].strip():
            raise ValueError(f"{where}: field '{name}': empty answer")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{where}: chosen and rejected differ before their last message (different prompts)")
    try:
        data.validate_messages(chosen, field="chosen")
        data.validate_messages(rejected, field="rejected")
        prompt = tok.encode(data.render_chat(chosen[:-1], template, tok.eos_token, True, tok.bos_token))
        out = {}
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            ids = tok.encode(data.render_chat(msgs, template, tok.eos_token, False, tok.bos_token))
            labels = [data.IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
            out[name] = {"input_ids": ids, "labels": labels}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    too_long = max(len(out["chosen"]["input_ids"]), len(out["rejected"]["input_ids"])) > max_seq_len
    if too_long:
        if not truncate or len(prompt) >= max_seq_len:
            return None
        for doc in out.values():  # keep the prompt whole, cut the answers
            doc["input_ids"], doc["labels"] = doc["input_ids"][:max_seq_len], doc["labels"][:max_seq_len]
    out["truncated"] = too_long
    return out


def _pair_row(row, where, tok, template, max_seq_len, truncate):
    return tokenize_pair(row, tok, template, max_seq_len, truncate, where)


def load_pairs(sources, tok, template, max_seq_len, truncate, seed, workers=0, cache_dir=""):
    """-> (pairs, stats). pairs[i] = {"chosen": doc, "rejected": doc, "id": i}. Each file is tokenized once
    (data.tokenize_file: `workers` processes, cached in `cache_dir`), then the mix selects rows."""
    stats = {"rows": 0, "pairs": 0, "truncated": 0, "dropped_too_long": 0}
    pairs = []
    fn = functools.partial(_pair_row, tok=tok, template=template, max_seq_len=max_seq_len, truncate=truncate)
    settings = {"max_seq_len": max_seq_len, "truncate": truncate}
    for k, (path, amount) in enumerate(sources):
        lines, tokenized = data.tokenize_file(path, fn, "pairs", tok, template, settings, workers, cache_dir)
        done = dict(zip(lines, tokenized))
        chosen_rows = data.select_rows([(line, None) for line in lines], amount, np.random.default_rng([seed, k]))
        stats["rows"] += len(chosen_rows)
        for line_no, _ in chosen_rows:
            pair = done[line_no]
            if pair is None:
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += pair["truncated"]
            pairs.append({"chosen": pair["chosen"], "rejected": pair["rejected"], "id": len(pairs)})
    stats["pairs"] = len(pairs)
    return pairs, stats


def pair_length(pair):
    return len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])


def pair_docs(pair):
    return [pair["chosen"], pair["rejected"]]


def segment_sums(values, cu_seqlens, n_segments):
    """values (N,) per token -> (n_segments,) sums per cu_seqlens segment, without a host sync."""
    seg = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(values.numel(), device=values.device,
                                                                       dtype=cu_seqlens.dtype), right=True)
    return torch.zeros(n_segments, device=values.device, dtype=values.dtype).index_add_(0, seg, values)


def pair_logps(model, batch, impl, tp_group=None, pair_loss=None):
    """Policy (or reference) answer log-likelihoods of the pairs in a stacked micro-batch:
    -> (logps (P, 2) summed over answer tokens, counts (P, 2) answer tokens), chosen in column 0.
    With pair_loss(logps (p, 2), counts (p, 2), p0, p1) -> summed loss of pairs [p0, p1), on impl auto / fused the
    kernel forms that loss and its gradient in the forward pass, in chunks cut on pair starts (6NHV), and the
    result is (logps detached, counts, loss)."""
    n_seg = batch["cu_seqlens"].numel() - 1
    counts = segment_sums((batch["targets"].reshape(-1) != data.IGNORE_INDEX).float(), batch["cu_seqlens"], n_seg)
    idx = batch["doc_segments"]  # (P, 2) segment index of each pair's chosen and rejected document
    if pair_loss is None or impl not in ("auto", "fused"):
        head = losses.loss_head("logprobs", batch["targets"], impl, tp_group)
        logps = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], head=head,
                      max_seqlen=batch.get("max_seqlen"))  # (B*T,)
        sums = segment_sums(logps, batch["cu_seqlens"], n_seg)[idx]
        if pair_loss is None:
            return sums, counts[idx]
        return sums, counts[idx], pair_loss(sums, counts[idx], 0, idx.shape[0])
    starts = batch["pair_starts"]  # host ints, in token order: a chunk [s, e) holds whole pairs p0 <= p < p1
    n_tok = batch["targets"].numel()
    seg = torch.searchsorted(batch["cu_seqlens"][1:].contiguous(),
                             torch.arange(n_tok, device=idx.device, dtype=batch["cu_seqlens"].dtype), right=True)

    def loss_fn(lp, _entropy, s, e):
        p0, p1 = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
        sums = torch.zeros(n_seg, device=lp.device, dtype=lp.dtype).index_add(0, seg[s:e], lp)
        return pair_loss(sums[idx[p0:p1]], counts[idx[p0:p1]], p0, p1)

    head = losses.loss_head("fused", batch["targets"], impl, tp_group, loss_fn=loss_fn,
                            cuts=starts + batch["row_starts"])
    loss, logps, _ = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], head=head,
                           max_seqlen=batch.get("max_seqlen"))
    return segment_sums(logps, batch["cu_seqlens"], n_seg)[idx], counts[idx], loss


# ----------------------------------------------------------------------------------------------------------------
# Reference log-probs: one no-grad pass, cached on disk


def file_fingerprint(directory):
    """sha256 naming a model directory's weights without reading them (re-hashing 16 GB per rank on every start of
    an 8B run was the cost): config.json's content, and for each safetensors file its name, size, modification
    time (ns) and header (tensor names, dtypes, shapes, offsets and metadata). Rewriting any weight changes the
    time, so the key changes; a copy that keeps times (cp -p, rsync -t) keeps it; a copy that does not only costs
    a recomputed reference pass."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == "config.json":
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
        elif name.endswith(".safetensors"):
            st = os.stat(path)
            with open(path, "rb") as f:
                head = f.read(8)  # little-endian u64: length of the JSON header that follows
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                header = f.read(min(n, st.st_size))
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode() + head + header)
    return h.hexdigest()


def pair_hashes(pairs):
    """(P,) int64: a hash of each pair's tokens and labels, stored in the cache to refuse a shifted table."""
    out = np.empty(len(pairs), dtype=np.int64)
    for i, p in enumerate(pairs):
        h = hashlib.blake2b(digest_size=8)
        for doc in pair_docs(p):
            h.update(np.asarray(doc["input_ids"], dtype=np.int64).tobytes())
            h.update(np.asarray(doc["labels"], dtype=np.int64).tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.int64)[0]
    return torch.from_numpy(out)


def ref_cache_key(model_fingerprint, hashes, max_seq_len, loss_type, template):
    # The token ids already depend on tokenizer, template text and truncation; the names are added for clarity.
    h = hashlib.sha256()
    for part in (model_fingerprint, str(max_seq_len), loss_type, str(template)):
        h.update(part.encode() + b"\0")
    h.update(hashes.numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_ref_logps(model, pairs, capacity, pad_id, device, impl, rank, world, rows_per_pass=1, tp_group=None,
                      dp_group=None, use_bf16=False):
    """(P, 2) reference answer log-likelihoods and (P, 2) answer token counts, every pair exactly once: rows packed in
    dataset order, split over data-parallel ranks, results placed by pair id and summed over ranks."""
    lengths = [pair_length(p) for p in pairs]
    bins = data.pack(lengths, capacity)
    table = torch.zeros(len(pairs), 2, device=device)
    counts = torch.zeros(len(pairs), 2, device=device)
    model.eval()
    mine = bins[rank::world]
    # every rank runs as many forwards as the busiest one (under FSDP/TP a forward is collective): a rank out of
    # rows runs one on the first row and throws the result away
    n_most = -(-len(bins) // world)
    for i in common.progress(range(0, n_most, rows_per_pass), "reference log-probs", rank):
        rows = []
        for b in mine[i:i + rows_per_pass] or bins[:1]:
            row = data.make_row([d for j in b for d in pair_docs(pairs[j])], capacity, pad_id)
            row["example_ids"] = list(b)
            rows.append(row)
        batch = data.stack_pair_rows(rows, device)
        with common.precision(model, use_bf16):
            lp, n = pair_logps(model, batch, impl, tp_group)
        if mine[i:i + rows_per_pass]:
            table[batch["pair_ids"]] = lp.float()
            counts[batch["pair_ids"]] = n
    if world > 1:  # every pair was computed on exactly one rank: a sum places them all
        common.all_reduce_sum(table, dp_group)
        common.all_reduce_sum(counts, dp_group)
    model.train()
    return table, counts


def load_or_compute_ref(cfg, key, hashes, compute, rank, device=None):
    """The cached table for `key`, else compute() and cache it. Correct without a shared file system: every rank
    reads its own cache_dir, the ranks agree on hit or miss (one all-reduce) before compute()'s collectives, all of
    them compute when any one misses, and every rank writes its own copy (temporary name, then renamed: ranks
    sharing a directory replace the file with the same content)."""
    cache_dir = os.path.expanduser(cfg.ref_cache_dir)
    path = os.path.join(cache_dir, f"ref_logps_{key}.pt")
    cached, bad = None, False
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        bad = cached["key"] != key or not torch.equal(cached["pair_hashes"], hashes)
    # [ranks missing the file, ranks holding a file of other data], summed over every rank
    votes = torch.tensor([float(cached is None), float(bad)], device=device)
    if dist.is_initialized():
        dist.all_reduce(votes)
    if votes[1] > 0:
        where = path if bad else f"the cache of another rank ({int(votes[1])} ranks)"
        raise ValueError(f"{where}: reference cache does not match this data (pairs shifted or changed); delete it "
                         "to recompute")
    if votes[0] == 0:
        if rank == 0:
            print(f"reference log-probs: cache hit {path}")
        return cached["logps"], path, True
    logps, _ = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{rank}-{os.getpid()}"
    torch.save({"key": key, "pair_hashes": hashes, "logps": logps.cpu()}, tmp)
    os.replace(tmp, path)
    if rank == 0:
        print(f"reference log-probs: computed ({int(votes[0])} ranks had no cache) and cached in {path}")
    return logps.cpu(), path, False


# ----------------------------------------------------------------------------------------------------------------

DPO_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected",
            "answer_tokens")  # what dpo_backward sums over a step's pairs, in order


def dpo_backward(model, micro, ref_logps, loss_kwargs, impl="auto", mesh=None, use_bf16=False):
    """Forward and backward over one optimizer step's micro-batches of packed pairs. The batch loss is the mean
    over every pair of the step (all micro-batches and data-parallel ranks, counted first). ref_logps(micro) ->
    (P, 2) reference log-likelihoods, or None (simpo). Leaves the gradient in .grad; returns (sums (7,) of this
    rank, named by DPO_SUMS; n_pairs of the step)."""
    dp_world = 1 if mesh is None else mesh["dp"].size()
    device = micro[0]["input_ids"].device
    n_pairs = common.all_reduce_sum(torch.tensor(float(sum(m["pair_ids"].numel() for m in micro)), device=device),
                                    common.dp_group(mesh))
    sums = torch.zeros(7, device=device)
    for m in common.grad_sync_on_last(model, micro):
        ref = ref_logps(m)

        def pair_loss(pi, counts, p0, p1):  # summed loss of pairs [p0, p1)
            r = torch.zeros_like(pi) if ref is None else ref[p0:p1]
            return dpo_loss(pi[:, 0], pi[:, 1], r[:, 0], r[:, 1], counts[:, 0], counts[:, 1], **loss_kwargs)[0].sum()

        with common.precision(model, use_bf16):
            pi, counts, loss = pair_logps(model, m, impl, common.tp_group(mesh), pair_loss)  # (P, 2), (P, 2), ()
        # x dp_world: data-parallel gradient reduction averages over ranks, the batch mean wants their sum
        (loss * dp_world / n_pairs).backward()
        ref = torch.zeros_like(pi) if ref is None else ref
        losses, rc, rr = dpo_loss(pi[:, 0].detach(), pi[:, 1].detach(), ref[:, 0], ref[:, 1], counts[:, 0],
                                  counts[:, 1], **loss_kwargs)
        sums += torch.stack([losses.sum().detach(), rc.sum(), rr.sum(), (rc > rr).float().sum(),
                             pi[:, 0].detach().sum(), pi[:, 1].detach().sum(), counts.sum()])
    return sums, n_pairs


def check_flags(cfg):
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if cfg.ref_mode not in ("cached", "online"):
        raise ValueError(f"--ref_mode {cfg.ref_mode!r}: expected cached or online")


def check_one_step(pairs, cfg, world):
    """Before any model loads: the pairs fill at least one optimizer step of --batch_pairs, which every
    data-parallel rank can share."""
    dp = common.planned_dp_world(cfg, world)
    if cfg.batch_pairs < dp:
        raise ValueError(f"--batch_pairs {cfg.batch_pairs}: fewer pairs per step than data-parallel ranks ({dp}): "
                         "raise --batch_pairs")
    if len(pairs) < cfg.batch_pairs:
        raise ValueError(f"{len(pairs)} pairs: fewer than one step of --batch_pairs {cfg.batch_pairs}: lower "
                         f"--batch_pairs (to {len(pairs)} at most), or add data")


def embedded_sft_model(rank):
    """The embedded DPO starts from the embedded SFT model: reused if it exists, else trained now."""
    model_dir = os.path.join(EMBEDDED_SFT_DIR, "final")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        if rank == 0:
            print(f"no {model_dir}: running the embedded SFT first")
        from nanotulu import train_sft
        train_sft.main(["--output_dir", EMBEDDED_SFT_DIR], finish=False)
    return model_dir


def load_data(cfg, is_embedded, tok, template, rank, mix=None):
    """Preference pairs of the --data mix (the shipped synthetic set for the embedded default), or of `mix`."""
    sources = data.parse_mix(mix or cfg.data) if (mix or cfg.data) else [(embedded.asset("dpo.jsonl"), None)]
    pairs, stats = load_pairs(sources, tok, template, cfg.max_seq_len, cfg.truncate, cfg.seed, cfg.tokenize_workers,
                              cfg.data_cache_dir)
    if rank == 0:
        print(f"{'held-out ' if mix else ''}data: {stats['pairs']} pairs of {stats['rows']} rows; truncated "
              f"{stats['truncated']}, dropped too "
              f"long {stats['dropped_too_long']}")
    if not pairs:
        raise ValueError("no preference pairs left to train on")
    return pairs


def reference(cfg, ref_dir, pair_sets, template, tok, load_placed, mesh, device, use_bf16, rank, world, tag=""):
    """The reference side of the loss, before the policy exists (the two are never in memory together):
    -> (ref_model, ref_tables): the frozen model for --ref_mode online, else for each list of pairs in pair_sets
    (training pairs, held-out pairs) the (P, 2) table of cached reference log-likelihoods (computed in one no-grad
    pass on a cache miss, the reference model loaded at most once); (None, None) for simpo. tag: added to the
    cache key (a LoRA run's NF4 base or starting adapter: lora.dpo_reference)."""
    if cfg.loss_type == "simpo":
        return None, [None] * len(pair_sets)
    if cfg.ref_mode == "online":
        ref_model = load_placed(ref_dir).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        return ref_model, [None] * len(pair_sets)
    fingerprint = file_fingerprint(ref_dir) + tag
    dp_rank, dp_world = common.dp_coords(mesh, rank, world)
    loaded = []
    tables = []
    for pairs in pair_sets:
        if not pairs:  # no held-out set
            tables.append(None)
            continue
        hashes = pair_hashes(pairs)
        key = ref_cache_key(fingerprint, hashes, cfg.max_seq_len, cfg.loss_type, template)

        def compute(pairs=pairs):
            if not loaded:
                loaded.append(load_placed(ref_dir))
            return compute_ref_logps(loaded[0], pairs, 2 * cfg.max_seq_len, tok.pad_token_id, device, cfg.loss_impl,
                                     dp_rank, dp_world, cfg.micro_batch_rows, common.tp_group(mesh),
                                     common.dp_group(mesh), use_bf16)

        table, _, _ = load_or_compute_ref(cfg, key, hashes, compute, rank, device)
        tables.append(table.to(device))
    loaded.clear()  # the reference model is freed before the policy is loaded
    return None, tables


@torch.no_grad()
def held_out_metrics(model, rows, ref_logps, loss_kwargs, micro_batch_rows, device, impl="auto", mesh=None,
                     use_bf16=False):
    """Held-out preference metrics over the rows of every data-parallel rank (data.held_out_rows): mean loss,
    reward accuracy and reward margin, keyed eval/... . ref_logps(micro) as in dpo_backward."""
    sums = torch.zeros(4, device=device)  # loss, accurate pairs, margin, pairs
    for m in data.micro_batches(rows, micro_batch_rows, device, stack=data.stack_pair_rows):
        with common.precision(model, use_bf16):
            pi, counts = pair_logps(model, m, impl, common.tp_group(mesh))
        pi = pi.float()
        ref = ref_logps(m)
        ref = torch.zeros_like(pi) if ref is None else ref
        losses_, rc, rr = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1], **loss_kwargs)
        sums += torch.stack([losses_.sum(), (rc > rr).float().sum(), (rc - rr).sum(),
                             torch.tensor(float(len(losses_)), device=device)])
    sums = common.all_reduce_sum(sums, common.dp_group(mesh))
    n = sums[3].clamp(min=1)
    return {"eval/loss": sums[0] / n, "eval/rewards/accuracy": sums[1] / n, "eval/rewards/margin": sums[2] / n}


def main(argv=None, finish=True):
    cfg, is_embedded, rank, world, device, use_bf16 = common.start(DPOConfig, EMBEDDED_PRESET, argv, "preference")
    check_flags(cfg)
    lora.check_flags(cfg)  # LoRA
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)  # a bad --template fails before any work
    pairs = load_data(cfg, is_embedded, tok, template, rank)
    eval_pairs = load_data(cfg, is_embedded, tok, template, rank, mix=cfg.eval_data) if cfg.eval_data else []
    capacity = 2 * cfg.max_seq_len  # a row holds at least one whole pair
    check_one_step(pairs, cfg, world)  # before the embedded SFT and the reference pass
    model_dir = embedded_sft_model(rank) if is_embedded else cfg.model
    mesh = common.make_mesh(cfg, world, device)

    def load_placed(path):
        m = lora.apply(common.load_model(path, tok, device, cfg), cfg, torch.bfloat16 if use_bf16 else None)  # LoRA
        return common.place(m, mesh, cfg, use_bf16, seq_len=capacity)

    # --- reference log-probs, then the policy -----------------------------------------------------------------------
    if lora.enabled(cfg):  # LoRA: the policy first; its reference is itself with the adapters off (no second model)
        model = load_placed(model_dir)
        ref_model, (ref_table, eval_ref_table) = lora.dpo_reference(cfg, model, reference, file_fingerprint, dict(
            ref_dir=model_dir, pair_sets=[pairs, eval_pairs], template=template, tok=tok, mesh=mesh, device=device,
            use_bf16=use_bf16, rank=rank, world=world))
    else:
        ref_model, (ref_table, eval_ref_table) = reference(cfg, cfg.ref_model or model_dir, [pairs, eval_pairs],
                                                           template, tok, load_placed, mesh, device, use_bf16, rank,
                                                           world)
        model = load_placed(model_dir)

    def ref_logps(m, table=None):  # (P, 2) reference log-likelihoods of a micro-batch's pairs, or None (simpo)
        table = ref_table if table is None else table
        if ref_model is not None:
            with torch.no_grad(), common.precision(ref_model, use_bf16), lora.adapters_off(ref_model):  # LoRA
                return pair_logps(ref_model, m, cfg.loss_impl, common.tp_group(mesh))[0].float()
        return None if table is None else table[m["pair_ids"]]

    # --- packed loader of pairs, optimizer, resume ------------------------------------------------------------------
    dp_rank, dp_world = common.dp_coords(mesh, rank, world)
    # exactly --batch_pairs pairs per step over all ranks (RECIPE: 128), packed into as many rows as they take
    loader = data.CountedLoader(pairs, cfg.batch_pairs, capacity, rank=dp_rank, world_size=dp_world, seed=cfg.seed,
                                pad_id=tok.pad_token_id, length_fn=pair_length, to_docs=pair_docs)
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    eval_rows = data.held_out_rows(eval_pairs, capacity, dp_rank, dp_world, tok.pad_token_id, pair_length,
                                   pair_docs) if eval_pairs else None
    optimizer = common.make_optimizer(model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, model, optimizer, loader, rank, world)

    # --- training ---------------------------------------------------------------------------------------------------
    loss_kwargs = dict(loss_type=cfg.loss_type, beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio,
                       label_smoothing=cfg.label_smoothing)
    metrics = common.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), total_steps, rank, step, desc="dpo",
                             report_to=cfg.report_to, config=vars(cfg))
    speed = common.Speed(device, num_flops_per_token(model.cfg, capacity), 0, world)
    batches = common.step_batches(loader)
    model.train()
    while step < total_steps:
        rows = next(batches)
        speed.tokens = len(rows) * dp_world * capacity  # rows per step vary with the pairs' lengths (padding counted)
        micro = data.micro_batches(rows, cfg.micro_batch_rows, device, stack=data.stack_pair_rows)
        sums, n_pairs = dpo_backward(model, micro, ref_logps, loss_kwargs, cfg.loss_impl, mesh, use_bf16)
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        grad_norm = common.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
        step += 1
        mean = dict(zip(DPO_SUMS, common.all_reduce_sum(sums, common.dp_group(mesh)) / n_pairs))
        common.exit_if_asked(cfg, step)
        mean.pop("answer_tokens")
        row = {**mean, "rewards/margin": mean["rewards/chosen"] - mean["rewards/rejected"], "lr": lr,
               "grad_norm": grad_norm, "pairs": n_pairs, **speed.tick()}
        if eval_rows is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row.update(held_out_metrics(model, eval_rows, lambda m: ref_logps(m, eval_ref_table), loss_kwargs,
                                        cfg.micro_batch_rows, device, cfg.loss_impl, mesh, use_bf16))
            speed.t = time.perf_counter()  # the evaluation is not training time
        metrics.log(step, row, show=("loss", "rewards/accuracy", "rewards/margin", "eval/rewards/accuracy", "tok/s"))
        checkpoint.save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, loader, rank)
    metrics.close()
    finish_run = lora.finish_run if lora.enabled(cfg) else common.finish_run  # LoRA: adapter (+ merged) export
    return finish_run(cfg, model, is_embedded, tok, rank, finish, template)


if __name__ == "__main__":
    main()

"""Direct preference optimisation: the loss, the pair log-likelihoods through the fused head, the reference
log-probs (one no-grad pass, cached on disk), the step's forward and backward, held-out metrics.

Each pair (chosen and rejected answers to one prompt) is two documents of one packed row; per-token log-probs of
the answer tokens are summed per document. On the chunked path the kernel forms the DPO loss of each chunk of whole
pairs and its gradient in the forward pass (losses.loss_head with loss_fn and cuts on the pair starts)."""

import bisect
import dataclasses
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanotulu import data, losses
from nanotulu.model import eval_mode
from nanotulu.pairs import every_pair_once
from nanotulu.parallel import all_reduce_sum, dp_group, grad_sync_on_last, precision, step_mean, tp_group

LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


@dataclasses.dataclass
class DPOParams:
    """The DPO loss's hyperparameters (docs/RECIPE.md)."""
    loss_type: str = "dpo_norm"
    beta: float = 5.0
    gamma_beta_ratio: float = 0.3
    label_smoothing: float = 0.0


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
        losses_ = (z - 1 / (2 * beta)) ** 2
    else:
        s = label_smoothing
        losses_ = -(1 - s) * F.logsigmoid(beta * z) - s * F.logsigmoid(-beta * z)
    return losses_, beta * chosen.detach(), beta * rejected.detach()


def pair_losses(pi, ref, counts, hp):
    """dpo_loss of pairs given as (P, 2) tables, chosen in column 0; ref None: zeros (simpo)."""
    ref = torch.zeros_like(pi) if ref is None else ref
    return dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1], **dataclasses.asdict(hp))


def segment_sums(values, cu_seqlens, n_segments):
    """values (N,) per token -> (n_segments,) sums per cu_seqlens segment, without a host sync."""
    seg = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(values.numel(), device=values.device,
                                                                       dtype=cu_seqlens.dtype), right=True)
    return torch.zeros(n_segments, device=values.device, dtype=values.dtype).index_add_(0, seg, values)


def pair_logps(model, batch, impl, tp_group=None, pair_loss=None):
    """Policy (or reference) answer log-likelihoods of the pairs in a stacked micro-batch:
    -> (logps (P, 2) summed over answer tokens, counts (P, 2) answer tokens), chosen in column 0.
    With pair_loss(logps (p, 2), counts (p, 2), p0, p1) -> summed loss of pairs [p0, p1), the head forms that loss
    per chunk of whole pairs (cut on pair starts) and the result is (logps detached, counts, loss)."""
    n_seg = batch["cu_seqlens"].numel() - 1
    counts = segment_sums((batch["targets"].reshape(-1) != data.IGNORE_INDEX).float(), batch["cu_seqlens"], n_seg)
    idx = batch["doc_segments"]  # (P, 2) segment index of each pair's chosen and rejected document
    loss_fn, cuts = None, None
    if pair_loss is not None:
        starts = batch["pair_starts"]  # host ints, in token order: a chunk [s, e) holds whole pairs p0 <= p < p1
        seg = torch.searchsorted(batch["cu_seqlens"][1:].contiguous(),
                                 torch.arange(batch["targets"].numel(), device=idx.device,
                                              dtype=batch["cu_seqlens"].dtype), right=True)

        def loss_fn(lp, _entropy, s, e):
            p0, p1 = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            sums = torch.zeros(n_seg, device=lp.device, dtype=lp.dtype).index_add(0, seg[s:e], lp)
            return pair_loss(sums[idx[p0:p1]], counts[idx[p0:p1]], p0, p1)

        cuts = starts + batch["row_starts"]
    head = losses.loss_head(batch["targets"], impl, tp_group, loss_fn=loss_fn, cuts=cuts)
    loss, logps, _ = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], head=head,
                           max_seqlen=batch.get("max_seqlen"))  # logps (B*T,)
    sums = segment_sums(logps, batch["cu_seqlens"], n_seg)[idx]
    return (sums, counts[idx]) if pair_loss is None else (sums, counts[idx], loss)


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
    """(P, 2) reference answer log-likelihoods and (P, 2) answer token counts, every pair exactly once
    (pairs.every_pair_once: rows split over data-parallel ranks), results placed by pair id and summed over
    ranks."""
    table = torch.zeros(len(pairs), 2, device=device)
    counts = torch.zeros(len(pairs), 2, device=device)
    model.eval()
    for batch, mine in every_pair_once(pairs, capacity, pad_id, device, rank, world, rows_per_pass,
                                       desc="reference log-probs"):
        with precision(model, use_bf16):
            lp, n = pair_logps(model, batch, impl, tp_group)
        if mine:
            table[batch["pair_ids"]] = lp.float()
            counts[batch["pair_ids"]] = n
    if world > 1:  # every pair was computed on exactly one rank: a sum places them all
        all_reduce_sum(table, dp_group)
        all_reduce_sum(counts, dp_group)
    model.train()
    return table, counts


def load_or_compute_ref(cache_dir, key, hashes, compute, rank, device):
    """The cached table for `key` in cache_dir, else compute() and cache it. Correct without a shared file system:
    every rank reads its own cache_dir, the ranks agree on hit or miss (one all-reduce, on `device`) before
    compute()'s collectives, all of them compute when any one misses, and every rank writes its own copy
    (temporary name, then renamed: ranks sharing a directory replace the file with the same content)."""
    cache_dir = os.path.expanduser(cache_dir)
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
# The step

DPO_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected",
            "answer_tokens")  # what dpo_backward sums over a step's pairs, in order


def dpo_backward(model, micro, ref_logps, hp, impl="auto", mesh=None, use_bf16=False):
    """Forward and backward over one optimizer step's micro-batches of packed pairs. The batch loss is the mean
    over every pair of the step (all micro-batches and data-parallel ranks, counted first). ref_logps(micro) ->
    (P, 2) reference log-likelihoods, or None (simpo). hp: DPOParams. Leaves the gradient in .grad; returns (sums
    (7,) of this rank, named by DPO_SUMS; n_pairs of the step)."""
    n_pairs, scale = step_mean(micro, lambda m: m["pair_ids"].numel(), mesh)
    sums = torch.zeros(len(DPO_SUMS), device=n_pairs.device)
    for m in grad_sync_on_last(model, micro):
        ref = ref_logps(m)

        def pair_loss(pi, counts, p0, p1):  # summed loss of pairs [p0, p1)
            return pair_losses(pi, None if ref is None else ref[p0:p1], counts, hp)[0].sum()

        with precision(model, use_bf16):
            pi, counts, loss = pair_logps(model, m, impl, tp_group(mesh), pair_loss)  # (P, 2), (P, 2), ()
        (loss * scale).backward()
        losses_, rc, rr = pair_losses(pi.detach(), ref, counts, hp)
        sums += torch.stack([losses_.sum().detach(), rc.sum(), rr.sum(), (rc > rr).float().sum(),
                             pi[:, 0].detach().sum(), pi[:, 1].detach().sum(), counts.sum()])
    return sums, n_pairs


@torch.no_grad()
def held_out_metrics(model, rows, ref_logps, hp, micro_batch_rows, device, impl="auto", mesh=None, use_bf16=False):
    """Held-out preference metrics over the rows of every data-parallel rank (data.held_out_rows): mean loss,
    reward accuracy and reward margin, keyed eval/... . ref_logps(micro) as in dpo_backward."""
    sums = torch.zeros(4, device=device)  # loss, accurate pairs, margin, pairs
    with eval_mode(model):  # no dropout (LoRA's)
        for m in data.micro_batches(rows, micro_batch_rows, device, stack=data.stack_pair_rows):
            with precision(model, use_bf16):
                pi, counts = pair_logps(model, m, impl, tp_group(mesh))
            losses_, rc, rr = pair_losses(pi.float(), ref_logps(m), counts, hp)
            sums += torch.stack([losses_.sum(), (rc > rr).float().sum(), (rc - rr).sum(),
                                 torch.tensor(float(len(losses_)), device=device)])
    sums = all_reduce_sum(sums, dp_group(mesh))
    n = sums[3].clamp(min=1)
    return {"eval/loss": sums[0] / n, "eval/rewards/accuracy": sums[1] / n, "eval/rewards/margin": sums[2] / n}

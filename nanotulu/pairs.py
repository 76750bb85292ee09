"""Preference pairs, for DPO and the reward model alike: a row with `chosen` and `rejected` message lists (sharing
every turn but the last) -> two tokenized documents, prompt masked, that the packed loader keeps in one row; the
pair hashes that key DPO's reference cache; and every_pair_once, the one loop that runs a model over every pair
exactly once across the data-parallel ranks (DPO's reference pass, the reward model's held-out accuracy)."""

import functools
import hashlib

import numpy as np
import torch

from nanotulu import data
from nanotulu.run import progress


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


def pair_hashes(pairs):
    """(P,) int64: a hash of each pair's tokens and labels, stored in the reference cache to refuse a shifted
    table."""
    out = np.empty(len(pairs), dtype=np.int64)
    for i, p in enumerate(pairs):
        h = hashlib.blake2b(digest_size=8)
        for doc in pair_docs(p):
            h.update(np.asarray(doc["input_ids"], dtype=np.int64).tobytes())
            h.update(np.asarray(doc["labels"], dtype=np.int64).tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.int64)[0]
    return torch.from_numpy(out)


def every_pair_once(pairs, capacity, pad_id, device, rank, world, rows_per_pass=1, desc=None):
    """Yields (batch, mine): stacked micro-batches (data.stack_pair_rows) of rows packed from `pairs` in dataset
    order and split over the data-parallel ranks (rank, world), so every pair is in exactly one batch with mine
    True on exactly one rank. Every rank yields as many batches as the busiest one (under FSDP/TP a forward is
    collective): a rank out of rows gets the first row again, with mine False (its results are thrown away).
    desc: a progress bar (rank 0)."""
    bins = data.pack([pair_length(p) for p in pairs], capacity)
    mine, n_most = bins[rank::world], -(-len(bins) // world)
    passes = range(0, n_most, rows_per_pass)
    for i in progress(passes, desc, rank) if desc else passes:
        rows = []
        for b in mine[i:i + rows_per_pass] or bins[:1]:
            row = data.make_row([d for j in b for d in pair_docs(pairs[j])], capacity, pad_id)
            row["example_ids"] = list(b)
            rows.append(row)
        yield data.stack_pair_rows(rows, device), bool(mine[i:i + rows_per_pass])

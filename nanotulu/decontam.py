"""N-gram decontamination: drop training examples whose prompts overlap an evaluation set.

    python -m nanotulu.decontam --train sft.jsonl prefs.parquet --eval gsm8k.jsonl ifeval.jsonl --out decontam/

Tulu 3 removed a training example when it contained a large enough share of an eval item's 8-grams. Here:
- Text: training examples contribute their user turns (SFT/RLVR `messages`, preference `chosen`/`rejected`,
  an optional `prompt`); each user turn is a separate segment, so no n-gram spans two turns. Eval items are one
  text each (a field such as `prompt`/`question`, or the user turns of RLVR `messages`).
- Normalisation: lower-case, every character that is not a letter or digit (str.isalnum) becomes a space, then
  words are the whitespace-separated pieces. So "Hello,  World!" and "hello world" are the same two words.
  (Scripts written without spaces, such as Chinese or Japanese, thus make one long word per run of text.)
- Share: for eval item e with D distinct n-grams and training row t, share = |{n-grams of e present in t}| / D.
  Row t is contaminated by e when share > threshold (strictly above, as in open-instruct's search.py).
  An eval item shorter than n words counts as one n-gram: its whole word sequence (k < n words), looked up among
  the training row's k-grams; so a 3-word item matches every row that contains those 3 words in a row.
  An eval item with no words at all can match nothing; the report counts such items.
- Speed: no Python sets of strings. Each word is hashed once (Python's 64-bit str hash), n-gram hashes are
  combined from word hashes with vectorised numpy uint64 arithmetic, the eval n-grams are one sorted array, and
  each chunk of training rows is looked up with np.searchsorted; pair counting is np.unique over integer keys.
- Hash collisions: 64-bit hashes. With G ~ 1e6 distinct eval n-grams and ~1e8 training n-grams, the expected
  number of chance collisions is ~1e8 * 1e6 / 2**64 ~ 5e-6 for a whole run, and one collision only adds 1/D to
  one share. Python's str hash is salted per process, which is fine: all hashes of a run live in one process.

Outputs in --out: one filtered copy of each training file (same name and format; JSONL keeps the kept lines byte
for byte, blank lines included; Parquet keeps the schema), report.json (per eval file: items, items matched,
training rows hit per training file, example matches; per training file: rows, rows removed, rows kept),
matches.jsonl (every (eval item, training row) pair above the threshold), and a printed table.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from nanotulu.data import read_rows
from nanotulu.flags import HelpFormatter

DEFAULT_EVAL_FIELDS = ("prompt", "question", "text", "problem", "instruction")  # tried in order, then `messages`
CHUNK_ROWS = 8192  # training rows hashed and looked up together: big enough for numpy, small enough for memory
PAIR_BUDGET = 1 << 23  # max (row, eval item) pairs expanded at once (an n-gram shared by many eval items fans out)

# Fixed odd 64-bit multipliers, one per position in an n-gram: multiplying a uniform 64-bit word hash by an odd
# constant is a bijection mod 2**64, so the weighted sum stays uniform and word order matters.
_POSITION_MULTIPLIERS = (np.random.default_rng(0x7A11).integers(0, 2**63, size=64, dtype=np.uint64) * 2 + 1).astype(
    np.uint64
)


# ----------------------------------------------------------------------------------------------------------------
# Text extraction and normalisation


class _NonAlnumToSpace(dict):
    """str.translate table: maps every non-alphanumeric character to a space. Filled lazily (a table over all of
    Unicode would be huge); CPython's translate caches ASCII lookups, so this is ~5x faster than a regex."""

    def __missing__(self, code_point):
        value = chr(code_point) if chr(code_point).isalnum() else " "  # (None would delete the character)
        self[code_point] = value
        return value


_TRANSLATE_TABLE = _NonAlnumToSpace()


def normalize(text):
    """Lower-case, non-alphanumerics -> spaces, whitespace collapsed: 'Hello,  World!' -> 'hello world'."""
    return " ".join(text.lower().translate(_TRANSLATE_TABLE).split())


def _words(text):
    return text.lower().translate(_TRANSLATE_TABLE).split()


def _user_turns(messages, where):
    """User-turn contents of a message list; `where` ('file:line: field') names bad input in errors."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}[{i}]: expected a message {{'role': ..., 'content': ...}}")
        if message["role"] == "user":
            if not isinstance(message["content"], str):
                raise ValueError(f"{where}[{i}].content: expected a string, got {type(message['content']).__name__}")
            turns.append(message["content"])
    return turns


def train_segments(row, path, line_no):
    """The texts of a training row that are checked for contamination: its user turns (SFT / RLVR `messages`,
    preference `chosen` and `rejected`, deduplicated) and a `prompt` (string or message list) if present."""
    where = f"{path}:{line_no}"
    segments = []
    if "messages" in row:
        segments += _user_turns(row["messages"], f"{where}: field 'messages'")
    for field in ("chosen", "rejected"):
        if field in row:
            segments += _user_turns(row[field], f"{where}: field '{field}'")
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            segments.append(prompt)
        else:
            segments += _user_turns(prompt, f"{where}: field 'prompt'")
    if not any(field in row for field in ("messages", "chosen", "rejected", "prompt")):
        raise ValueError(f"{where}: no 'messages', 'chosen'/'rejected' or 'prompt' field (have: {sorted(row)})")
    return list(dict.fromkeys(segments))  # chosen and rejected share their user turns: count them once


def pick_eval_field(rows, path, eval_field=None):
    """The field holding the eval text: `eval_field` if given, else the first of DEFAULT_EVAL_FIELDS, then
    `messages`, present in the first row."""
    first = rows[0][1]
    candidates = [eval_field] if eval_field else list(DEFAULT_EVAL_FIELDS) + ["messages"]
    for field in candidates:
        if field in first:
            return field
    raise ValueError(
        f"{path}:{rows[0][0]}: no eval text field: looked for {candidates}, the row has {sorted(first)}"
        + ("" if eval_field else "; name the field with --eval_field")
    )


def eval_text(row, field, path, line_no):
    """An eval item's text: the field's string, or the user turns of a message list joined by newlines."""
    where = f"{path}:{line_no}: field '{field}'"
    if field not in row:
        raise ValueError(f"{where}: missing (the file's first row has it)")
    value = row[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_user_turns(value, where))
    raise ValueError(f"{where}: expected a string or a message list, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Hashing


def _mix64(x):
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array: spreads every input bit over all output bits."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def word_hashes(texts):
    """Texts -> (word_hash (W,) uint64: every word of every text, in order; n_words (S,) int64: words per text)."""
    word_lists = [_words(t) for t in texts]
    n_words = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
    all_words = [w for ws in word_lists for w in ws]
    word_hash = np.fromiter(map(hash, all_words), dtype=np.int64, count=len(all_words)).view(np.uint64)
    return word_hash, n_words


def kgram_hashes(word_hash, n_words, k):
    """Hashes of every k-gram lying inside one text. Returns (hashes (G,) uint64, text index (G,) int64).
    hash = mix(sum_j word_hash[i + j] * M_j + k): M_j odd constants, +k so grams of different k differ."""
    if k > len(_POSITION_MULTIPLIERS):
        raise ValueError(f"n-gram size {k} too large (at most {len(_POSITION_MULTIPLIERS)})")
    text_end = np.repeat(np.cumsum(n_words), n_words)  # (W,) one past the last word of each word's text
    starts = np.nonzero(np.arange(len(word_hash)) + k <= text_end)[0]
    gram = np.full(len(starts), k, dtype=np.uint64)
    for j in range(k):
        gram += word_hash[starts + j] * _POSITION_MULTIPLIERS[j]
    text_of_word = np.repeat(np.arange(len(n_words)), n_words)
    return _mix64(gram), text_of_word[starts]


# ----------------------------------------------------------------------------------------------------------------
# Eval index and matching


def build_eval_index(texts, ngram):
    """Eval texts -> index dict:
    grams (U,) sorted distinct gram hashes; owner_start (U+1,) and owners: the eval items holding grams[u] are
    owners[owner_start[u]:owner_start[u+1]] (CSR); n_grams (E,) distinct grams per item (0 for an empty item);
    lengths: the gram sizes to compute for training rows (ngram, plus each k < ngram of a short item)."""
    word_hash, n_words = word_hashes(texts)
    grams, items = kgram_hashes(word_hash, n_words, ngram)
    lengths = [ngram]
    short_lengths = np.unique(n_words[(n_words > 0) & (n_words < ngram)])
    for k in short_lengths.tolist():
        short_grams, short_items = kgram_hashes(word_hash, n_words, k)
        is_whole_item = n_words[short_items] == k  # the item's only k-gram: all its words
        short_grams, short_items = short_grams[is_whole_item], short_items[is_whole_item]
        grams, items = np.concatenate([grams, short_grams]), np.concatenate([items, short_items])
        lengths.append(k)
    # Distinct (gram, item) pairs, sorted by gram: lexsort puts items in order within a gram.
    order = np.lexsort((items, grams))
    grams, items = grams[order], items[order]
    keep = np.ones(len(grams), dtype=bool)
    keep[1:] = (grams[1:] != grams[:-1]) | (items[1:] != items[:-1])
    grams, items = grams[keep], items[keep]
    unique_grams, owner_start = np.unique(grams, return_index=True)
    # Prefilter: a bit per bucket of the top hash bits, ~8 buckets per eval gram, so ~90% of training grams
    # (which mostly are not eval grams) are rejected with one memory read instead of a binary search.
    filter_bits = int(min(26, max(16, np.ceil(np.log2(len(unique_grams) + 1)) + 3)))
    prefilter = np.zeros(1 << filter_bits, dtype=bool)
    prefilter[unique_grams >> np.uint64(64 - filter_bits)] = True
    return {
        "grams": unique_grams,
        "prefilter": prefilter,
        "filter_shift": np.uint64(64 - filter_bits),
        "owner_start": np.append(owner_start, len(grams)).astype(np.int64),
        "owners": items.astype(np.int64),
        "n_grams": np.bincount(items, minlength=len(texts)).astype(np.int64),
        "lengths": lengths,
        "n_words": n_words,
    }


def match_texts(index, texts, text_row, n_rows, threshold):
    """Finds contaminated rows. texts: the segments of n_rows training rows; text_row (S,) the row of each segment.
    Returns (row (M,), eval item (M,), share (M,)) for every pair with share > threshold, sorted by row then item."""
    if len(index["grams"]) == 0:  # every eval item was empty
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    word_hash, n_words = word_hashes(texts)
    row_parts, unique_parts = [], []
    for k in index["lengths"]:
        grams, text_idx = kgram_hashes(word_hash, n_words, k)
        maybe = np.nonzero(index["prefilter"][grams >> index["filter_shift"]])[0]
        grams, text_idx = grams[maybe], text_idx[maybe]
        u = np.searchsorted(index["grams"], grams)
        u[u == len(index["grams"])] = 0
        hit = index["grams"][u] == grams
        row_parts.append(np.asarray(text_row)[text_idx[hit]])
        unique_parts.append(u[hit])
    n_unique = len(index["grams"])
    # Each distinct eval gram counts once per row, however often the row repeats it.
    key = np.unique(np.concatenate(row_parts) * n_unique + np.concatenate(unique_parts))
    hit_row, hit_gram = key // n_unique, key % n_unique
    fan_out = index["owner_start"][hit_gram + 1] - index["owner_start"][hit_gram]  # eval items per hit gram
    # Expand (row, gram) to (row, item) in pieces of whole rows, so a gram shared by thousands of eval items
    # cannot blow up memory.
    per_row = np.bincount(hit_row, weights=fan_out, minlength=n_rows).astype(np.int64)
    piece_of_row = (np.cumsum(per_row) - per_row) // PAIR_BUDGET
    bounds = np.searchsorted(piece_of_row[hit_row], np.unique(piece_of_row[hit_row]))
    bounds = np.append(bounds, len(hit_row))
    out_row, out_item, out_share = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows_ab, fan_ab, start_ab = hit_row[a:b], fan_out[a:b], index["owner_start"][hit_gram[a:b]]
        first = np.cumsum(fan_ab) - fan_ab  # position of each hit's first owner in the expanded arrays
        owner_pos = np.arange(fan_ab.sum()) - np.repeat(first - start_ab, fan_ab)
        pair_key, count = np.unique(
            np.repeat(rows_ab, fan_ab) * len(index["n_grams"]) + index["owners"][owner_pos], return_counts=True
        )
        pair_row, pair_item = pair_key // len(index["n_grams"]), pair_key % len(index["n_grams"])
        share = count / index["n_grams"][pair_item]
        above = share > threshold
        out_row.append(pair_row[above])
        out_item.append(pair_item[above])
        out_share.append(share[above])
    if not out_row:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(out_row), np.concatenate(out_item), np.concatenate(out_share)


# ----------------------------------------------------------------------------------------------------------------
# Files


def write_filtered(path, out_path, removed_lines):
    """Copies a training file without the rows at `removed_lines` (1-based, as read_rows numbers them)."""
    removed = set(int(x) for x in removed_lines)
    if path.endswith(".parquet"):
        from nanotulu.data import optional_import

        pq = optional_import("pyarrow.parquet", "data", f"{path}: writing Parquet")
        table = pq.read_table(path)
        keep = [i for i in range(table.num_rows) if i + 1 not in removed]
        pq.write_table(table.take(keep), out_path)
        return
    # newline="" keeps line endings as they are and splits lines exactly as read_rows' text-mode reading does.
    with open(path, encoding="utf-8", newline="") as src, open(out_path, "w", encoding="utf-8", newline="") as dst:
        for line_no, line in enumerate(src, start=1):
            if line_no not in removed:
                dst.write(line)


def check_decontam_flags(train_paths, eval_paths, ngram, threshold, out_dir):
    if not 1 <= ngram <= len(_POSITION_MULTIPLIERS):
        raise ValueError(f"--ngram must be >= 1 (and <= {len(_POSITION_MULTIPLIERS)}), got {ngram}")
    if not 0 <= threshold < 1:
        raise ValueError(f"--threshold must be in [0, 1) (a row goes when its share is above it), got {threshold}")
    if not train_paths or not eval_paths:
        raise ValueError("need at least one --train and one --eval file")
    for path in list(train_paths) + list(eval_paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{path}: not readable")
    names = [os.path.basename(p) for p in train_paths]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two --train files are named {name}: their filtered copies would collide in {out_dir}")
    for path in train_paths:
        if os.path.abspath(os.path.join(out_dir, os.path.basename(path))) == os.path.abspath(path):
            raise ValueError(f"{path}: --out {out_dir} would overwrite this training file")


def _read(path):
    try:
        return read_rows(path)
    except UnicodeDecodeError as e:  # read_rows' message would not name the file
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from e


def decontaminate(train_paths, eval_paths, out_dir, ngram=8, threshold=0.5, eval_field=None, max_examples=5):
    """Runs the whole pass (see the module docstring) and returns the report dict also written to report.json."""
    check_decontam_flags(train_paths, eval_paths, ngram, threshold, out_dir)
    t0 = time.time()

    # Eval items of all files in one index; item_file / item_line say where each came from.
    item_text, item_file, item_line, eval_fields = [], [], [], []
    for f, path in enumerate(eval_paths):
        rows = _read(path)
        field = pick_eval_field(rows, path, eval_field)
        eval_fields.append(field)
        for line_no, row in rows:
            item_text.append(eval_text(row, field, path, line_no))
            item_file.append(f)
            item_line.append(line_no)
    item_file, item_line = np.array(item_file, dtype=np.int64), np.array(item_line, dtype=np.int64)
    index = build_eval_index(item_text, ngram)

    os.makedirs(out_dir, exist_ok=True)
    train_report, all_matches = [], []  # all_matches: (train file, train line, item, share) arrays per chunk
    for t, path in enumerate(train_paths):
        rows = _read(path)
        removed_lines = []
        for start in tqdm(range(0, len(rows), CHUNK_ROWS), desc=os.path.basename(path), unit="chunk", disable=None):
            chunk = rows[start : start + CHUNK_ROWS]
            texts, text_row = [], []
            for r, (line_no, row) in enumerate(chunk):
                segments = train_segments(row, path, line_no)
                texts += segments
                text_row += [r] * len(segments)
            row, item, share = match_texts(index, texts, np.array(text_row, dtype=np.int64), len(chunk), threshold)
            lines = np.array([chunk[r][0] for r in row.tolist()], dtype=np.int64)
            all_matches.append((np.full(len(row), t), lines, item, share))
            removed_lines.append(np.unique(lines))
        removed_lines = np.concatenate(removed_lines) if removed_lines else np.zeros(0, np.int64)
        out_path = os.path.join(out_dir, os.path.basename(path))
        write_filtered(path, out_path, removed_lines)
        train_report.append(
            {"file": path, "out": out_path, "rows": len(rows), "rows_removed": len(removed_lines),
             "rows_kept": len(rows) - len(removed_lines)}
        )
        del rows

    m_file, m_line, m_item, m_share = (np.concatenate(parts) for parts in zip(*all_matches))
    eval_report = []
    for f, path in enumerate(eval_paths):
        in_file = item_file[m_item] == f
        items_of_file = item_file == f
        rows_hit = {}
        for t, train_path in enumerate(train_paths):
            sel = in_file & (m_file == t)
            rows_hit[train_path] = int(len(np.unique(m_line[sel])))
        examples = []
        for i in np.nonzero(in_file)[0][:max_examples].tolist():
            examples.append({
                "eval": f"{path}:{int(item_line[m_item[i]])}",
                "eval_text": item_text[m_item[i]][:300],
                "train": f"{train_paths[int(m_file[i])]}:{int(m_line[i])}",
                "share": round(float(m_share[i]), 4),
            })
        eval_report.append({
            "file": path,
            "field": eval_fields[f],
            "items": int(items_of_file.sum()),
            "items_empty": int((items_of_file & (index["n_words"] == 0)).sum()),
            "items_short": int((items_of_file & (index["n_words"] > 0) & (index["n_words"] < ngram)).sum()),
            "items_matched": int(len(np.unique(m_item[in_file]))),
            "matches": int(in_file.sum()),
            "train_rows_hit": rows_hit,
            "examples": examples,
        })

    report = {"ngram": ngram, "threshold": threshold, "seconds": round(time.time() - t0, 2),
              "eval": eval_report, "train": train_report}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "matches.jsonl"), "w") as f:
        for file_idx, line, item, share in zip(m_file.tolist(), m_line.tolist(), m_item.tolist(), m_share.tolist()):
            f.write(json.dumps({"eval": eval_paths[item_file[item]], "eval_line": int(item_line[item]),
                                "train": train_paths[file_idx], "train_line": line, "share": round(share, 6)}) + "\n")
    return report


def print_report(report, file=None):
    file = file or sys.stdout  # looked up at call time, so redirected stdout is honoured
    print(f"n-gram {report['ngram']}, share > {report['threshold']}, {report['seconds']} s", file=file)
    print(f"{'eval file':40} {'items':>8} {'matched':>8} {'empty':>6} {'short':>6}  training rows hit", file=file)
    for e in report["eval"]:
        hits = ", ".join(f"{os.path.basename(k)}: {v}" for k, v in e["train_rows_hit"].items())
        print(f"{os.path.basename(e['file'])[-40:]:40} {e['items']:8d} {e['items_matched']:8d} {e['items_empty']:6d} "
              f"{e['items_short']:6d}  {hits}", file=file)
    print(f"{'training file':40} {'rows':>10} {'removed':>8} {'kept':>10}  -> filtered copy", file=file)
    for t in report["train"]:
        name = os.path.basename(t["file"])[-40:]
        print(f"{name:40} {t['rows']:10d} {t['rows_removed']:8d} {t['rows_kept']:10d}  -> {t['out']}", file=file)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanotulu.decontam", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--train", nargs="+", required=True, help="training files (JSONL / Parquet, any Tulu format)")
    p.add_argument("--eval", nargs="+", required=True, help="evaluation files (JSONL / Parquet)")
    p.add_argument("--out", required=True, help="output folder: filtered training files, report.json, matches.jsonl")
    p.add_argument("--ngram", type=int, default=8, help="words per n-gram (Tulu 3: 8)")
    p.add_argument("--threshold", type=float, default=0.5, help="remove a row when an eval item's share is above this")
    p.add_argument("--eval_field", default=None,
                   help=f"eval text field (None: first of {', '.join(DEFAULT_EVAL_FIELDS)}, messages)")
    p.add_argument("--eval-field", dest="eval_field", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--examples", type=int, default=5, help="example matches per eval file in the report")
    args = p.parse_args(argv)
    try:
        from nanotulu.run import check_output_path

        check_output_path(args.out, "--out", folder=True)
        report = decontaminate(args.train, args.eval, args.out, args.ngram, args.threshold, args.eval_field,
                               args.examples)
    except (ValueError, OSError) as e:
        sys.exit(f"decontam: error: {e}")
    print_report(report)


if __name__ == "__main__":
    main()

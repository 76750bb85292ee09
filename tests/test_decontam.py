"""Tests of nanotulu.decontam against hand-checked examples and a brute-force reference built on Python sets of
word tuples (no hashing, its own normalisation)."""

import json
import os
import random

import numpy as np
import pytest

from nanotulu import decontam

GSM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)  # 29 words -> 22 distinct 8-grams
TWENTY = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
    "seventeen eighteen nineteen twenty"  # 20 distinct words -> 13 8-grams


def ref_words(text):
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def ref_grams(words, k):
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def ref_matches(eval_texts, train_rows, n, threshold):
    """Brute force: {(row, item): share}. train_rows: list of lists of user-turn texts."""
    out = {}
    for e, text in enumerate(eval_texts):
        words = ref_words(text)
        if not words:
            continue
        k = min(n, len(words))  # an item shorter than n words is one gram: all of it
        item = ref_grams(words, k)
        for r, turns in enumerate(train_rows):
            row = set().union(*[ref_grams(ref_words(t), k) for t in turns]) if turns else set()
            share = len(item & row) / len(item)
            if share > threshold:
                out[(r, e)] = share
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def sft(user, answer="ok"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# ----------------------------------------------------------------------------------------------------------------


def test_normalize_hand_example():
    assert decontam.normalize("Hello,  WORLD!\tIt's x_y.\n Café—déjà-vu") == "hello world it s x y café déjà vu"


def random_text(rng, vocab, n_words):
    words = []
    for _ in range(n_words):
        w = rng.choice(vocab)
        if rng.random() < 0.2:
            w = w.upper()
        words.append(w + rng.choice(["", "", "", ",", "!", " -", "_", "...", "\n"]))
    return " ".join(words)


@pytest.mark.parametrize("n,threshold,pair_budget", [(1, 0.0, 1 << 23), (2, 0.3, 1 << 23), (3, 0.5, 1 << 23),
                                                     (8, 0.5, 1 << 23), (3, 0.0, 5), (4, 0.99, 1)])
def test_match_texts_equals_brute_force(n, threshold, pair_budget, monkeypatch):
    # Small vocabulary so n-grams repeat across items and rows; pair_budget tiny = the expansion in many pieces.
    monkeypatch.setattr(decontam, "PAIR_BUDGET", pair_budget)
    rng = random.Random(n * 100 + pair_budget)
    vocab = ["a", "b", "c", "Déjà", "x1", "the", "of"]
    eval_texts = [random_text(rng, vocab, rng.randint(0, 12)) for _ in range(40)] + ["?!", ""]
    train_rows = []
    for _ in range(150):
        turns = [random_text(rng, vocab, rng.randint(0, 25)) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.2:  # plant (part of) an eval item
            e = rng.choice(eval_texts)
            turns.append(random_text(rng, vocab, 3) + " " + e[: rng.randint(0, len(e))].upper())
        train_rows.append(turns)

    index = decontam.build_eval_index(eval_texts, n)
    texts = [t for turns in train_rows for t in turns]
    text_row = np.array([r for r, turns in enumerate(train_rows) for _ in turns], dtype=np.int64)
    rows, items, shares = decontam.match_texts(index, texts, text_row, len(train_rows), threshold)
    got = {(r, e): s for r, e, s in zip(rows.tolist(), items.tolist(), shares.tolist())}

    want = ref_matches(eval_texts, train_rows, n, threshold)
    assert len(want) > 10  # the data must exercise matching
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key])


def test_short_item_is_one_gram():
    # "what is love" has 3 < 8 words: it matches rows holding those 3 words in order, nothing else.
    index = decontam.build_eval_index(["What is love?"], 8)
    texts = ["So, WHAT is love baby", "what love is", "what", "tell me: what is  love"]
    rows, items, shares = decontam.match_texts(index, texts, np.arange(4), 4, 0.5)
    assert rows.tolist() == [0, 3] and items.tolist() == [0, 0] and shares.tolist() == [1.0, 1.0]


def test_near_miss_boundary_hand_checked():
    # TWENTY has 13 8-grams. Its first 13 words hold 6 of them (6/13 = 0.46, kept); 14 words hold 7 (0.54, out).
    index = decontam.build_eval_index([TWENTY], 8)
    words = TWENTY.split()
    texts = ["blah " + " ".join(words[:13]), " ".join(words[:14]) + " blah", " ".join(words[6:])]
    rows, items, shares = decontam.match_texts(index, texts, np.arange(3), 3, 0.5)
    assert rows.tolist() == [1, 2]
    assert shares.tolist() == pytest.approx([7 / 13, 7 / 13])
    # turns are separate: an n-gram may not span two user turns of one row
    turns = [" ".join(words[:7]), " ".join(words[7:14])]  # 7 words each: no 8-gram; joined they would hold 7
    rows, _, _ = decontam.match_texts(index, turns, np.array([0, 0]), 1, 0.0)
    assert rows.tolist() == []


# ----------------------------------------------------------------------------------------------------------------
# End to end: files in, filtered files and report out


@pytest.fixture
def planted(tmp_path):
    """An eval file and SFT / preference / RLVR training files with planted overlaps; returns paths and the
    line numbers that must go."""
    ev = tmp_path / "gsm.jsonl"
    write_jsonl(ev, [{"question": GSM, "answer": "72"}, {"question": TWENTY}, {"question": "Unrelated text."}])
    sft_path = tmp_path / "sft.jsonl"
    sft_rows = [
        sft("What is the capital of France?"),  # 1 kept
        sft(GSM),  # 2 exact copy
        sft("Write a poem about the sea."),  # 3 kept
        sft(GSM.upper().replace(",", "").replace(" ", " ... ", 4) + "!!"),  # 4 case and punctuation changed
        sft("Please solve the following problem step by step. " + GSM + " Show your work."),  # 5 embedded
        sft(" ".join(TWENTY.split()[:13]) + " and more words"),  # 6 near miss: 6/13 of the n-grams, kept
        sft("Tell me a joke.", answer=GSM),  # 7 the copy is in the answer, not a user turn: kept
        {"messages": [{"role": "system", "content": GSM}, {"role": "user", "content": "hi"}]},  # 8 system: kept
        sft(" ".join(TWENTY.split()[:14])),  # 9 14 words: 7/13 > 0.5, removed
    ]
    write_jsonl(sft_path, sft_rows)
    # CRLF line endings and a blank line must survive byte for byte.
    with open(sft_path, "ab") as f:
        f.write(b"\r\n" + json.dumps(sft("last row, kept")).encode() + b"\r\n")
    pref_path = tmp_path / "pref.jsonl"
    pair = [{"role": "user", "content": GSM}]
    write_jsonl(pref_path, [
        {"chosen": pair + [{"role": "assistant", "content": "72"}],
         "rejected": pair + [{"role": "assistant", "content": "70"}]},
        {"prompt": "A different question?", "chosen": [{"role": "user", "content": "A different question?"},
                                                        {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "A different question?"}, {"role": "assistant", "content": "b"}]},
        {"prompt": TWENTY.title(), "chosen": [], "rejected": []},
    ])
    import pyarrow as pa
    import pyarrow.parquet as pq

    rlvr_path = tmp_path / "rlvr.parquet"
    rlvr = [
        {"messages": [{"role": "user", "content": "Compute 2+2."}], "ground_truth": "4", "dataset": "gsm8k"},
        {"messages": [{"role": "user", "content": f"Question: {GSM}"}], "ground_truth": "72", "dataset": "gsm8k"},
        {"messages": [{"role": "user", "content": "Compute 3+3."}], "ground_truth": "6", "dataset": "gsm8k"},
    ]
    pq.write_table(pa.Table.from_pylist(rlvr), rlvr_path)
    removed = {str(sft_path): {2, 4, 5, 9}, str(pref_path): {1, 3}, str(rlvr_path): {2}}
    return str(ev), [str(sft_path), str(pref_path), str(rlvr_path)], removed


def test_end_to_end_filtered_files_and_report(planted, tmp_path):
    ev, train, removed = planted
    out = tmp_path / "out"
    report = decontam.decontaminate(train, [ev], str(out), ngram=8, threshold=0.5)

    # JSONL: the filtered file is the original minus exactly the removed lines, byte for byte.
    for path in train[:2]:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        want = b"".join(line for i, line in enumerate(lines, start=1) if i not in removed[path])
        with open(out / os.path.basename(path), "rb") as f:
            assert f.read() == want
    # Parquet: the kept rows, same schema.
    import pyarrow.parquet as pq

    original, filtered = pq.read_table(train[2]), pq.read_table(out / "rlvr.parquet")
    assert filtered.schema == original.schema
    kept = [r for i, r in enumerate(original.to_pylist(), start=1) if i not in removed[train[2]]]
    assert filtered.to_pylist() == kept

    # The report agrees with the files and with the planted rows.
    with open(out / "report.json") as f:
        assert json.load(f) == report
    for t in report["train"]:
        assert t["rows_removed"] == len(removed[t["file"]])
        assert t["rows_kept"] == len(decontam.read_rows(t["out"])) == t["rows"] - t["rows_removed"]
    (e,) = report["eval"]
    assert (e["field"], e["items"], e["items_matched"], e["items_empty"], e["items_short"]) == ("question", 3, 2, 0, 1)
    assert e["train_rows_hit"] == {p: len(removed[p]) for p in train}
    with open(out / "matches.jsonl") as f:
        matches = [json.loads(line) for line in f]
    assert len(matches) == e["matches"] == sum(len(v) for v in removed.values())
    assert {(m["train"], m["train_line"]) for m in matches} == {(p, i) for p in train for i in removed[p]}
    assert {m["eval_line"] for m in matches} == {1, 2}
    assert len(e["examples"]) == 5 and all(x["share"] > 0.5 for x in e["examples"])
    assert e["examples"][0] == {"eval": f"{ev}:1", "eval_text": GSM, "train": f"{train[0]}:2", "share": 1.0}


def test_cli_and_eval_formats(planted, tmp_path, capsys):
    _, train, _ = planted
    # RLVR rows as the eval set: text = user turns of `messages` (the assistant reference answer is ignored).
    ev = tmp_path / "rlvr_eval.jsonl"
    write_jsonl(ev, [{"messages": [{"role": "user", "content": TWENTY}, {"role": "assistant", "content": GSM}],
                      "ground_truth": "x", "dataset": "math"}])
    decontam.main(["--train", *train, "--eval", str(ev), "--out", str(tmp_path / "o"), "--threshold", "0.5"])
    printed = capsys.readouterr().out
    assert "rlvr_eval.jsonl" in printed and "sft.jsonl" in printed
    report = json.load(open(tmp_path / "o" / "report.json"))
    assert report["eval"][0]["field"] == "messages"
    assert report["eval"][0]["train_rows_hit"] == {train[0]: 1, train[1]: 1, train[2]: 0}  # sft:9, pref:3
    # --eval-field picks another field; --ngram 1 with threshold 0.9: every word of the item must appear.
    ev2 = tmp_path / "custom.jsonl"
    write_jsonl(ev2, [{"prompt": "ignored", "body": "compute 3 3"}])
    report = decontam.decontaminate(train, [str(ev2)], str(tmp_path / "o2"), ngram=1, threshold=0.9,
                                    eval_field="body")
    assert report["eval"][0]["train_rows_hit"] == {train[0]: 0, train[1]: 0, train[2]: 1}


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file (and line and field where there is one)


def test_errors(planted, tmp_path):
    ev, train, _ = planted
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"--ngram must be >= 1 \(and <= 64\), got 0"):
        decontam.decontaminate(train, [ev], out, ngram=0)
    with pytest.raises(ValueError, match="--ngram must be >= 1"):
        decontam.decontaminate(train, [ev], out, ngram=65)
    with pytest.raises(ValueError, match="--threshold"):
        decontam.decontaminate(train, [ev], out, threshold=1.0)
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        decontam.decontaminate(train, [missing], out)

    no_field = tmp_path / "nofield.jsonl"
    write_jsonl(no_field, [{"answer": "1"}])
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: no eval text field.*--eval_field"):
        decontam.decontaminate(train, [str(no_field)], out)
    later = tmp_path / "later.jsonl"
    write_jsonl(later, [{"question": "a"}, {"question": "b"}, {"text": "c"}])
    with pytest.raises(ValueError, match=r"later.jsonl:3: field 'question': missing"):
        decontam.decontaminate(train, [str(later)], out)

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl: not UTF-8"):
        decontam.decontaminate(train, [str(latin1)], out)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(sft("x")) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        decontam.decontaminate([str(bad_json)], [ev], out)
    no_messages = tmp_path / "nomsg.jsonl"
    write_jsonl(no_messages, [sft("x"), {"text": "y"}])
    with pytest.raises(ValueError, match=r"nomsg.jsonl:2: no 'messages'"):
        decontam.decontaminate([str(no_messages)], [ev], out)
    bad_content = tmp_path / "badcontent.jsonl"
    write_jsonl(bad_content, [{"messages": [{"role": "user", "content": 5}]}])
    with pytest.raises(ValueError, match=r"badcontent.jsonl:1: field 'messages'\[0\].content: expected a string"):
        decontam.decontaminate([str(bad_content)], [ev], out)
    with pytest.raises(ValueError, match="would overwrite"):
        decontam.decontaminate(train, [ev], os.path.dirname(train[0]))

    with pytest.raises(SystemExit, match="decontam: error: --ngram must be >= 1"):
        decontam.main(["--train", train[0], "--eval", ev, "--out", out, "--ngram", "0"])

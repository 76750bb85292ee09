"""Data path: templates (hand-written expected text, and transformers' apply_chat_template as the reference for
Jinja), tokenizers (transformers as the reference for tokenizer.json), masks checked token by token, mixing,
and bad input named by file, line and field."""

import json
import os

import pytest

from nanotulu.data import (ByteTokenizer, load_sft_dataset, load_tokenizer, parse_mix, render_chat, select_rows,
                           tokenize_sft)

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

# The tulu template written as a Jinja chat template (from docs/RECIPE.md's description), rendered by transformers as
# an independent check of the built-in renderer.
TULU_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

# A template in the style of Llama 3's: BOS, headers, and a raise_exception for system turns.
OTHER_JINJA = """{{ bos_token }}{% for message in messages %}
{% if message['role'] == 'system' %}{{ raise_exception('this template takes no system turn') }}{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

CORPUS = ["Hello! How are you today?", "2+2? The answer is 4.", "Be brief. Hi there, friend.",
          "<|user|>\n<|assistant|>\n<|system|>\n", "What is 47 + 38? 7+8=15, write 5 carry 1."] * 20


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def make_hf_dir(directory, chat_template=TULU_JINJA, eos="</s>", pad=None):
    """A tiny byte-level BPE trained here, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": "<s>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    if eos is not None:
        config["eos_token"] = {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
                               "rstrip": False, "single_word": False, "special": True}  # a form HF also writes
    if pad is not None:
        config["pad_token"] = pad
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


# ---------------------------------------------------------------------------------------------------------------
# Templates


def test_tulu_template_hand_checked():
    assert render_chat(MULTI_TURN, "tulu", eos_token="</s>") == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n4</s>")
    prompt = MULTI_TURN[:4]
    assert render_chat(prompt, "tulu", eos_token="</s>", add_generation_prompt=True) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n")
    assert render_chat(prompt, "tulu", eos_token="</s>") == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("gen", [False, True])
def test_tulu_and_jinja_match_transformers(hf_reference, n, gen):
    msgs = MULTI_TURN[:n]
    expected = hf_reference.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_chat(msgs, "tulu", eos_token="</s>", add_generation_prompt=gen) == expected
    assert render_chat(msgs, TULU_JINJA, eos_token="</s>", add_generation_prompt=gen) == expected
    user_msgs = [m for m in msgs if m["role"] != "system"]
    if not user_msgs:
        return
    expected = hf_reference.apply_chat_template(user_msgs, chat_template=OTHER_JINJA, tokenize=False,
                                                add_generation_prompt=gen)
    assert render_chat(user_msgs, OTHER_JINJA, eos_token="</s>", bos_token="<s>",
                       add_generation_prompt=gen) == expected


def test_template_failure_is_a_clear_error():
    with pytest.raises(ValueError, match="chat template failed to render.*no system turn"):
        render_chat(MULTI_TURN, OTHER_JINJA, eos_token="</s>")
    with pytest.raises(ValueError, match="chat template failed to render"):
        render_chat(MULTI_TURN, "{% for m in messages %}{{ m.content + 1 }}{% endfor %}", eos_token="</s>")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("é<|endoftext|>a<pad>") == [0xC3, 0xA9, 256, 97, 257]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.vocab_size) == (256, 257, 258, 264)
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template is None
    assert tok.decode([0xC3, 0xA9, 256, 97]) == "é<|endoftext|>a"
    assert tok.decode([0xC3, 0xA9, 256, 97], skip_special_tokens=True) == "éa"
    assert tok.decode([97, 263, 98]) == "ab"  # a padding row of the embedding decodes to nothing


def test_hf_tokenizer_matches_transformers(hf_dir, hf_reference):
    tok = load_tokenizer(hf_dir)
    for text in ["Hello! How are you?", "<|user|>\n2+2?\n", "a</s>b", "unseen wörds ✓"]:
        assert tok.encode(text) == hf_reference.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("4</s>")[-1] == tok.eos_token_id == hf_reference.convert_tokens_to_ids("</s>")
    assert tok.bos_token == "<s>" and tok.bos_token_id == hf_reference.convert_tokens_to_ids("<s>")
    # RECIPE: no pad token -> none added (the vocabulary is kept); the EOS id fills packed rows' tails
    assert tok.pad_token is None and tok.pad_token_id == tok.eos_token_id
    assert tok.n_ids == len(hf_reference) and tok.vocab_size % 8 == 0 and tok.vocab_size >= tok.n_ids
    assert tok.chat_template == TULU_JINJA


def test_hf_tokenizer_pad_kept_and_template_forms(tmp_path):
    d = make_hf_dir(tmp_path / "a", pad="<s>", chat_template=[{"name": "default", "template": "X"},
                                                            {"name": "tool_use", "template": "Y"}])
    tok = load_tokenizer(d)
    assert tok.pad_token == "<s>" and tok.chat_template == "X"
    d = make_hf_dir(tmp_path / "b", chat_template=None)
    assert load_tokenizer(d).chat_template is None
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("Z")
    assert load_tokenizer(d).chat_template == "Z"


def test_tokenizer_without_eos(tmp_path):
    d = make_hf_dir(tmp_path / "noeos", eos=None)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'eos_token': missing"):
        load_tokenizer(d)
    d = make_hf_dir(tmp_path / "badeos", eos="<|not_a_token|>")
    with pytest.raises(ValueError, match=r"field 'eos_token': token '<\|not_a_token\|>' is not in"):
        load_tokenizer(d)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------------------
# Masks


def test_masks_multi_turn_token_by_token_byte():
    tok = ByteTokenizer()
    eos = tok.eos_token
    # (text, trained?) in order; RECIPE: headers, system and user turns masked; answer + EOS (+ "\n") trained
    segments = [("<|system|>\nBe brief.\n", False), ("<|user|>\nHi\n", False), ("<|assistant|>\n", False),
                ("Hello!", True), (eos, True), ("\n", True), ("<|user|>\n2+2?\n", False),
                ("<|assistant|>\n", False), ("4", True), (eos, True)]
    ids, labels = [], []
    for text, trained in segments:
        piece = [tok.eos_token_id] if text == eos else list(text.encode("utf-8"))
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    out = tokenize_sft(MULTI_TURN, tok, "tulu")
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    # add_bos: one more masked token in front
    out = tokenize_sft(MULTI_TURN, tok, "tulu", add_bos=True)
    assert out["input_ids"] == [tok.bos_token_id] + ids and out["labels"] == [-100] + labels
    out = tokenize_sft(MULTI_TURN, tok, "tulu", max_len=10)
    assert out["input_ids"] == ids[:10] and out["labels"] == labels[:10]


def trained_spans(tok, out):
    """Decoded text of each run of trained tokens."""
    spans, run = [], []
    for t, lab in zip(out["input_ids"], out["labels"]):
        if lab != -100:
            assert lab == t
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


def test_masks_hf_tokenizer_tulu(hf_dir):
    tok = load_tokenizer(hf_dir)
    out = tokenize_sft(MULTI_TURN, tok, "tulu")
    assert tok.decode(out["input_ids"]) == render_chat(MULTI_TURN, "tulu", eos_token="</s>")
    assert trained_spans(tok, out) == ["Hello!</s>\n", "4</s>"]


def test_masks_jinja_match_hf_prefix_rule(hf_dir, hf_reference):
    # For a Jinja template the RECIPE rule is computed with transformers' own renders and tokens.
    tok = load_tokenizer(hf_dir)
    msgs = [m for m in MULTI_TURN if m["role"] != "system"]

    def n_tokens(prefix, gen):
        text = hf_reference.apply_chat_template(prefix, chat_template=OTHER_JINJA, tokenize=False,
                                                add_generation_prompt=gen)
        return len(hf_reference.encode(text, add_special_tokens=False))

    full = hf_reference.apply_chat_template(msgs, chat_template=OTHER_JINJA, tokenize=False)
    ids = hf_reference.encode(full, add_special_tokens=False)
    labels = list(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            start = 0 if i == 0 else n_tokens(msgs[:i], False)
            end = n_tokens(msgs[: i + 1], i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant")
            labels[start:end] = [-100] * (end - start)
    out = tokenize_sft(msgs, tok, OTHER_JINJA)
    assert out["input_ids"] == ids and out["labels"] == labels
    assert any(x != -100 for x in labels)


# ---------------------------------------------------------------------------------------------------------------
# Files, mixing and bad input


def sft_row(i, n_turns=1):
    msgs = []
    for t in range(n_turns):
        msgs += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": f"a{i}.{t}"}]
    return {"messages": msgs, "id": i}


def test_parse_mix():
    assert parse_mix("a.jsonl:1.0,b.jsonl:500, c.parquet") == [("a.jsonl", 1.0), ("b.jsonl", 500),
                                                               ("c.parquet", None)]
    assert parse_mix("dir/x.jsonl:0.25") == [("dir/x.jsonl", 0.25)]
    for bad in ["a.jsonl:abc", "a.jsonl:0", "a.jsonl:-1", ":5", ""]:
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_select_rows_amounts():
    import numpy as np

    rows = [(i + 1, {"i": i}) for i in range(10)]
    half = select_rows(rows, 0.5, np.random.default_rng(0))
    assert len(half) == 5 and len(set(r[0] for r in half)) == 5
    up = select_rows(rows, 25, np.random.default_rng(0))  # two full copies + 5 distinct extra rows
    counts = [sum(1 for r in up if r[0] == line) for line in range(1, 11)]
    assert len(up) == 25 and sorted(counts) == [2] * 5 + [3] * 5
    assert select_rows(rows, 2.0, np.random.default_rng(0)) == rows * 2
    assert select_rows(rows, None, np.random.default_rng(0)) == rows
    assert select_rows(rows, "3", np.random.default_rng(1)) == select_rows(rows, 3, np.random.default_rng(1))


def test_load_sft_dataset_mix_and_counts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = ByteTokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", [sft_row(i) for i in range(10)])
    b = str(tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([sft_row(100 + i, n_turns=2) for i in range(4)]), b)
    examples, stats = load_sft_dataset([(a, 0.5), (b, 10)], tok, "tulu", seed=3)
    assert stats["rows_read"] == {a: 10, b: 4} and stats["rows_selected"] == {a: 5, b: 10}
    assert stats["examples"] == len(examples) == 15
    assert {e["source"] for e in examples} == {a, b}
    ex = next(e for e in examples if e["source"] == b)
    row = sft_row(100 + ex["line"] - 1, n_turns=2)
    assert ex["input_ids"] == tokenize_sft(row["messages"], tok)["input_ids"]  # Parquet line = row index + 1
    again, _ = load_sft_dataset([(a, 0.5), (b, 10)], tok, "tulu", seed=3)
    assert again == examples  # deterministic for a seed
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)

    # truncation / dropping, counted
    only_user = {"messages": [{"role": "user", "content": "nothing to learn"}]}
    long_prompt = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}
    c = write_jsonl(tmp_path / "c.jsonl", [sft_row(1), only_user, long_prompt])
    n_short = len(tokenize_sft(sft_row(1)["messages"], tok)["input_ids"])
    examples, stats = load_sft_dataset([(c, None)], tok, "tulu", max_len=n_short + 5, truncate=True)
    # the long prompt is cut before its answer: truncated, then dropped for having no trained token
    assert (stats["examples"], stats["truncated"], stats["dropped_no_trained_token"]) == (1, 1, 2)
    examples, stats = load_sft_dataset([(c, None)], tok, "tulu", max_len=n_short + 5, truncate=False)
    assert (stats["examples"], stats["dropped_too_long"], stats["dropped_no_trained_token"]) == (1, 1, 1)
    assert all(len(e["input_ids"]) <= n_short + 5 for e in examples)


@pytest.mark.parametrize("lines, pattern", [
    (['{"messages": []}'], r"f\.jsonl:1: messages: expected a non-empty list"),
    ([json.dumps(sft_row(0)), '{"messages": [oops'], r"f\.jsonl:2: malformed JSON"),
    ([json.dumps(sft_row(0)), '{"prompt": "x"}'], r"f\.jsonl:2: field 'messages': missing"),
    ([json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})],
     r"f\.jsonl:1: messages\[1\]\.role: unknown role 'bot'"),
    ([json.dumps({"messages": [{"role": "user", "content": 3}]})],
     r"f\.jsonl:1: messages\[0\]\.content: expected a string, got int"),
    ([json.dumps({"messages": [{"role": "user"}]})], r"f\.jsonl:1: messages\[0\]\.content: missing"),
    ([], r"f\.jsonl: empty file"),
])
def test_bad_input_names_file_line_field(tmp_path, lines, pattern):
    path = write_jsonl(tmp_path / "f.jsonl", lines)
    with pytest.raises(ValueError, match=pattern):
        load_sft_dataset([(path, None)], ByteTokenizer(), "tulu")


def test_template_failure_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [sft_row(0), {"messages": MULTI_TURN}])
    with pytest.raises(ValueError, match=r"f\.jsonl:2: chat template failed to render.*no system turn"):
        load_sft_dataset([(path, None)], ByteTokenizer(), OTHER_JINJA)


# ---------------------------------------------------------------------------------------------------------------
# Tokenized once: worker processes and the on-disk cache


def chat_rows(n, salt=""):
    return [{"messages": [{"role": "system", "content": f"S{i}{salt}"}, {"role": "user", "content": f"q{i} " * (i % 5)},
                          {"role": "assistant", "content": f"a{i}"}, {"role": "user", "content": "more?"},
                          {"role": "assistant", "content": "no." * (1 + i % 3)}]} for i in range(n)]


def test_tokenize_workers_equal_in_process(tmp_path, hf_dir):
    import functools

    from nanotulu import data

    tok = load_tokenizer(hf_dir)
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(40))
    fn = functools.partial(data._sft_row, tok=tok, template="tulu", add_bos=False)
    one = data.tokenize_file(path, fn, "sft", tok, "tulu", {}, workers=0)
    two = data.tokenize_file(path, fn, "sft", tok, "tulu", {}, workers=2, min_rows_per_worker=1)
    assert one == two and one[0] == list(range(1, 41))
    assert one[1][7] == tokenize_sft(chat_rows(40)[7]["messages"], tok, "tulu")
    bad = write_jsonl(tmp_path / "bad.jsonl", chat_rows(30) + [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:31: messages\[0\]\.role: unknown role 'bot'"):
        data.tokenize_file(bad, fn, "sft", tok, "tulu", {}, workers=2, min_rows_per_worker=1)


def test_tokenized_cache_hit_miss_and_other_ranks(tmp_path, monkeypatch):
    import torch.distributed as dist

    from nanotulu import data

    tok = ByteTokenizer()
    cache = str(tmp_path / "cache")
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(12))
    first, stats = load_sft_dataset([(path, 0.5)], tok, "tulu", max_len=40, cache_dir=cache)
    assert len(os.listdir(cache)) == 1 and not [f for f in os.listdir(cache) if ".tmp" in f]
    real = data._read_and_tokenize
    calls = []

    def counted(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(data, "_read_and_tokenize", counted)
    # a second run, with another mix amount and max_len: the same file tokenized -> read from the cache
    again, _ = load_sft_dataset([(path, 0.5)], tok, "tulu", max_len=40, cache_dir=cache)
    assert again == first and calls == []
    other, _ = load_sft_dataset([(path, None)], tok, "tulu", max_len=80, cache_dir=cache)
    assert calls == [] and len(other) == 12
    # another rank (rank 1 of a group) reads what rank 0 wrote, tokenizing nothing
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert load_sft_dataset([(path, 0.5)], tok, "tulu", max_len=40, cache_dir=cache)[0] == first and calls == []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    # what changes the tokens misses: the template, add_bos, the tokenizer, and the file itself
    load_sft_dataset([(path, None)], tok, TULU_JINJA, cache_dir=cache)
    load_sft_dataset([(path, None)], tok, "tulu", add_bos=True, cache_dir=cache)
    assert len(calls) == 2
    write_jsonl(path, chat_rows(12, salt="!"))  # same name, new content (and size, time)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    changed, _ = load_sft_dataset([(path, 0.5)], tok, "tulu", max_len=40, cache_dir=cache)
    assert len(calls) == 3 and changed != first
    text = tok.decode(changed[0]["input_ids"])
    assert text.startswith("<|system|>\nS") and "!" in text
    hf = load_tokenizer(make_hf_dir(tmp_path / "tok"))
    load_sft_dataset([(path, 0.5)], hf, "tulu", max_len=40, cache_dir=cache)
    assert len(calls) == 4


# ---------------------------------------------------------------------------------------------------------------
# Incremental prefix counts: the masks of every prefix encoded whole, at O(turns) cost


def tricky_chats(seed=0, n=60):
    import random

    rng = random.Random(seed)
    pieces = ["Hello", " world", "2+2?", "  ", "\n", "é✓", "</s>", "<|user|>", "x ", " .", "?\n\n", "<s>", "4", "\t"]
    chats = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": "".join(rng.choices(pieces, k=rng.randint(0, 4)))})
        for t in range(rng.randint(1, 4)):
            for role in ("user", "assistant"):
                msgs.append({"role": role, "content": "".join(rng.choices(pieces, k=rng.randint(0, 6)))})
            if rng.random() < 0.2:
                msgs.append({"role": "system", "content": "".join(rng.choices(pieces, k=rng.randint(1, 3)))})
        if rng.random() < 0.3:
            msgs.append({"role": "user", "content": "last"})
        chats.append(msgs)
    return chats


def other_tokenizer_dirs(root):
    """Pre-tokenizer styles that treat a text's start or whitespace runs specially: GPT-2 style ByteLevel with a
    prefix space, and Metaspace (sentencepiece style, prepending '▁' to the first piece only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    dirs = []
    for name, pre, dec in (("prefix_space", pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()),
                           ("metaspace", pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace())):
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre, dec
        alphabet = (pre_tokenizers.ByteLevel.alphabet() if name == "prefix_space"
                    else list("▁abcdefghijklmnopqrstuvwxyz"))
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                      initial_alphabet=alphabet)
        tok.train_from_iterator(CORPUS, trainer)
        d = root / name
        d.mkdir()
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        dirs.append(str(d))
    return dirs


def test_incremental_masks_equal_whole_prefix_encodes(hf_dir, tmp_path):
    toks = [ByteTokenizer(), load_tokenizer(hf_dir)] + [load_tokenizer(d) for d in other_tokenizer_dirs(tmp_path)]
    chats = tricky_chats() + [MULTI_TURN]
    for tok in toks:
        for msgs in chats:
            for add_bos in (False, True):
                fast = tokenize_sft(msgs, tok, "tulu", add_bos=add_bos)
                slow = tokenize_sft(msgs, tok, "tulu", add_bos=add_bos, incremental=False)
                assert fast == slow, (tok.name, msgs, add_bos)

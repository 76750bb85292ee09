"""Data path: templates (hand-written expected text, and transformers' apply_chat_template as the reference for
Jinja), tokenizers (transformers as the reference for tokenizer.json), masks checked token by token, mixing,
and bad input named by file, line and field."""

import json
import os

import pytest

from nanotulu.data import (ByteTokenizer, load_sft_dataset, load_tokenizer, parse_mix, render_chat, select_rows,
 For a Jinja template the RECIPE rule                       tokenize_sft)

MULTI_TURN = [
 For a Jinja template the RECIPE rule{"role": "system", "content": "Be brief."},
 For a Jinja template the RECIPE rule{"role": "user", "content": "Hi"},
 For a Jinja template the RECIPE rule{"role": "assistant", "content": "Hello!"},
 For a Jinja template the RECIPE rule{"role": "user", "content": "2+2?"},
 For a Jinja template the RECIPE rule{"role": "assistant", "content": "4"},
]

# The tulu template written as a Jinja chat template (from docs/RECIPE.md's description), rendered by transformers as
# an independent check of the built-in renderer.
TULU_JINJA = (
 For a Jinja template the RECIPE rule"{% for message in messages %}"
 For a Jinja template the RECIPE rule"{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
 For a Jinja template the RECIPE rule"{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
 For a Jinja template the RECIPE rule"{% elif message['role'] == 'assistant' %}"
 For a Jinja template the RECIPE rule"{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
 For a Jinja template the RECIPE rule"{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
 For a Jinja template the RECIPE rule"{% endif %}"
 For a Jinja template the RECIPE rule"{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
 For a Jinja template the RECIPE rule"{% endfor %}"
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
 For a Jinja template the RECIPE rule      "<|user|>\n<|assistant|>\n<|system|>\n", "What is 47 + 38? 7+8=15, write 5 carry 1."] * 20


def write_jsonl(path, rows):
 For a Jinja template the RECIPE rulewith open(path, "w", encoding="utf-8") as f:
 For a Jinja template the RECIPE rule    for r in rows:
 For a Jinja template the RECIPE rule        f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
 For a Jinja template the RECIPE rulereturn str(path)


def make_hf_dir(directory, chat_template=TULU_JINJA, eos="</s>", pad=None):
 For a Jinja template the RECIPE rule"""A tiny byte-level BPE trained here, saved as tokenizer.json + tokenizer_config.json."""
 For a Jinja template the RECIPE rulefrom tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

 For a Jinja template the RECIPE ruletok = Tokenizer(models.BPE())
 For a Jinja template the RECIPE ruletok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
 For a Jinja template the RECIPE ruletok.decoder = decoders.ByteLevel()
 For a Jinja template the RECIPE ruletrainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<s>", "</s>"],
 For a Jinja template the RECIPE rule                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
 For a Jinja template the RECIPE ruletok.train_from_iterator(CORPUS, trainer)
 For a Jinja template the RECIPE ruleos.makedirs(directory, exist_ok=True)
 For a Jinja template the RECIPE ruletok.save(os.path.join(directory, "tokenizer.json"))
 For a Jinja template the RECIPE ruleconfig = {"bos_token": "<s>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
 For a Jinja template the RECIPE ruleif eos is not None:
 For a Jinja template the RECIPE rule    config["eos_token"] = {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
 For a Jinja template the RECIPE rule                           "rstrip": False, "single_word": False, "special": True}  # a form HF also writes
 For a Jinja template the RECIPE ruleif pad is not None:
 For a Jinja template the RECIPE rule    config["pad_token"] = pad
 For a Jinja template the RECIPE ruleif chat_template is not None:
 For a Jinja template the RECIPE rule    config["chat_template"] = chat_template
 For a Jinja template the RECIPE rulewith open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
 For a Jinja template the RECIPE rule    json.dump(config, f)
 For a Jinja template the RECIPE rulereturn str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
 For a Jinja template the RECIPE rulereturn make_hf_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
 For a Jinja template the RECIPE rulefrom transformers import AutoTokenizer

 For a Jinja template the RECIPE rulereturn AutoTokenizer.from_pretrained(hf_dir)


# ---------------------------------------------------------------------------------------------------------------
# Templates


def test_tulu_template_hand_checked():
 For a Jinja template the RECIPE ruleassert render_chat(MULTI_TURN, "tulu", eos_token="</s>") == (
 For a Jinja template the RECIPE rule    "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n4</s>")
 For a Jinja template the RECIPE ruleprompt = MULTI_TURN[:4]
 For a Jinja template the RECIPE ruleassert render_chat(prompt, "tulu", eos_token="</s>", add_generation_prompt=True) == (
 For a Jinja template the RECIPE rule    "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n")
 For a Jinja template the RECIPE ruleassert render_chat(prompt, "tulu", eos_token="</s>") == (
 For a Jinja template the RECIPE rule    "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("gen", [False, True])
def test_tulu_and_jinja_match_transformers(hf_reference, n, gen):
 For a Jinja template the RECIPE rulemsgs = MULTI_TURN[:n]
 For a Jinja template the RECIPE ruleexpected = hf_reference.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
 For a Jinja template the RECIPE ruleassert render_chat(msgs, "tulu", eos_token="</s>", add_generation_prompt=gen) == expected
 For a Jinja template the RECIPE ruleassert render_chat(msgs, TULU_JINJA, eos_token="</s>", add_generation_prompt=gen) == expected
 For a Jinja template the RECIPE ruleuser_msgs = [m for m in msgs if m["role"] != "system"]
 For a Jinja template the RECIPE ruleif not user_msgs:
 For a Jinja template the RECIPE rule    return
 For a Jinja template the RECIPE ruleexpected = hf_reference.apply_chat_template(user_msgs, chat_template=OTHER_JINJA, tokenize=False,
 For a Jinja template the RECIPE rule                                            add_generation_prompt=gen)
 For a Jinja template the RECIPE ruleassert render_chat(user_msgs, OTHER_JINJA, eos_token="</s>", bos_token="<s>",
 For a Jinja template the RECIPE rule                   add_generation_prompt=gen) == expected


def test_template_failure_is_a_clear_error():
 For a Jinja template the RECIPE rulewith pytest.raises(ValueError, match="chat template failed to render.*no system turn"):
 For a Jinja template the RECIPE rule    render_chat(MULTI_TURN, OTHER_JINJA, eos_token="</s>")
 For a Jinja template the RECIPE rulewith pytest.raises(ValueError, match="chat template failed to render"):
 For a Jinja template the RECIPE rule    render_chat(MULTI_TURN, "{% for m in messages %}{{ m.content + 1 }}{% endfor %}", eos_token="</s>")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer():
 For a Jinja template the RECIPE ruletok = load_tokenizer("byte")
 For a Jinja template the RECIPE ruleassert isinstance(tok, ByteTokenizer)
 For a Jinja template the RECIPE ruleassert tok.encode("é<|endoftext|>a<pad>") == [0xC3, 0xA9, 256, 97, 257]
 For a Jinja template the RECIPE ruleassert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.vocab_size) == (256, 257, 258, 264)
 For a Jinja template the RECIPE ruleassert tok.eos_token == "<|endoftext|>" and tok.chat_template is None
 For a Jinja template the RECIPE ruleassert tok.decode([0xC3, 0xA9, 256, 97]) == "é<|endoftext|>a"
 For a Jinja template the RECIPE ruleassert tok.decode([0xC3, 0xA9, 256, 97], skip_special_tokens=True) == "éa"
 For a Jinja template the RECIPE ruleassert tok.decode([97, 263, 98]) == "ab"  # a padding row of the embedding decodes to nothing


def test_hf_tokenizer_matches_transformers(hf_dir, hf_reference):
 For a Jinja template the RECIPE ruletok = load_tokenizer(hf_dir)
 For a Jinja template the RECIPE rulefor text in ["Hello! How are you?", "<|user|>\n2+2?\n", "a</s>b", "unseen wörds ✓"]:
 For a Jinja template the RECIPE rule    assert tok.encode(text) == hf_reference.encode(text, add_special_tokens=False)
 For a Jinja template the RECIPE rule    assert tok.decode(tok.encode(text)) == text
 For a Jinja template the RECIPE ruleassert tok.encode("4</s>")[-1] == tok.eos_token_id == hf_reference.convert_tokens_to_ids("</s>")
 For a Jinja template the RECIPE ruleassert tok.bos_token == "<s>" and tok.bos_token_id == hf_reference.convert_tokens_to_ids("<s>")
 For a Jinja template the RECIPE rule# docs/RECIPE.md: no pad token -> <pad> added, distinct from EOS, embeddings a multiple of 8
 For a Jinja template the RECIPE rulen_before = len(hf_reference)
 For a Jinja template the RECIPE ruleassert tok.pad_token_id == n_before and tok.pad_token_id != tok.eos_token_id
 For a Jinja template the RECIPE ruleassert tok.vocab_size % 8 == 0 and tok.vocab_size >= n_before + 1
 For a Jinja template the RECIPE ruleassert tok.encode("x<pad>")[-1] == tok.pad_token_id
 For a Jinja template the RECIPE ruleassert tok.chat_template == TULU_JINJA


def test_hf_tokenizer_pad_kept_and_template_forms(tmp_path):
 For a Jinja template the RECIPE ruled = make_hf_dir(tmp_path / "a", pad="<s>", chat_template=[{"name": "default", "template": "X"},
 For a Jinja template the RECIPE rule                                                        {"name": "tool_use", "template": "Y"}])
 For a Jinja template the RECIPE ruletok = load_tokenizer(d)
 For a Jinja template the RECIPE ruleassert tok.pad_token == "<s>" and tok.chat_template == "X"
 For a Jinja template the RECIPE ruled = make_hf_dir(tmp_path / "b", chat_template=None)
 For a Jinja template the RECIPE ruleassert load_tokenizer(d).chat_template is None
 For a Jinja template the RECIPE rulewith open(os.path.join(d, "chat_template.jinja"), "w") as f:
 For a Jinja template the RECIPE rule    f.write("Z")
 For a Jinja template the RECIPE ruleassert load_tokenizer(d).chat_template == "Z"


def test_tokenizer_without_eos(tmp_path):
 For a Jinja template the RECIPE ruled = make_hf_dir(tmp_path / "noeos", eos=None)
 For a Jinja template the RECIPE rulewith pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'eos_token': missing"):
 For a Jinja template the RECIPE rule    load_tokenizer(d)
 For a Jinja template the RECIPE ruled = make_hf_dir(tmp_path / "badeos", eos="<|not_a_token|>")
 For a Jinja template the RECIPE rulewith pytest.raises(ValueError, match=r"field 'eos_token': token '<\|not_a_token\|>' is not in"):
 For a Jinja template the RECIPE rule    load_tokenizer(d)
 For a Jinja template the RECIPE rulewith pytest.raises(FileNotFoundError):
 For a Jinja template the RECIPE rule    load_tokenizer(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------------------
# Masks


def test_masks_multi_turn_token_by_token_byte():
 For a Jinja template the RECIPE ruletok = ByteTokenizer()
 For a Jinja template the RECIPE ruleeos = tok.eos_token
 For a Jinja template the RECIPE rule# (text, trained?) in order; docs/RECIPE.md: headers, system and user turns masked; answer + EOS (+ "\n") trained
 For a Jinja template the RECIPE rulesegments = [("<|system|>\nBe brief.\n", False), ("<|user|>\nHi\n", False), ("<|assistant|>\n", False),
 For a Jinja template the RECIPE rule            ("Hello!", True), (eos, True), ("\n", True), ("<|user|>\n2+2?\n", False),
 For a Jinja template the RECIPE rule            ("<|assistant|>\n", False), ("4", True), (eos, True)]
 For a Jinja template the RECIPE ruleids, labels = [], []
 For a Jinja template the RECIPE rulefor text, trained in segments:
 For a Jinja template the RECIPE rule    piece = [tok.eos_token_id] if text == eos else list(text.encode("utf-8"))
 For a Jinja template the RECIPE rule    ids += piece
 For a Jinja template the RECIPE rule    labels += piece if trained else [-100] * len(piece)
 For a Jinja template the RECIPE ruleout = tokenize_sft(MULTI_TURN, tok, "tulu")
 For a Jinja template the RECIPE ruleassert out["input_ids"] == ids
 For a Jinja template the RECIPE ruleassert out["labels"] == labels
 For a Jinja template the RECIPE rule# add_bos: one more masked token in front
 For a Jinja template the RECIPE ruleout = tokenize_sft(MULTI_TURN, tok, "tulu", add_bos=True)
 For a Jinja template the RECIPE ruleassert out["input_ids"] == [tok.bos_token_id] + ids and out["labels"] == [-100] + labels
 For a Jinja template the RECIPE ruleout = tokenize_sft(MULTI_TURN, tok, "tulu", max_len=10)
 For a Jinja template the RECIPE ruleassert out["input_ids"] == ids[:10] and out["labels"] == labels[:10]


def trained_spans(tok, out):
 For a Jinja template the RECIPE rule"""Decoded text of each run of trained tokens."""
 For a Jinja template the RECIPE rulespans, run = [], []
 For a Jinja template the RECIPE rulefor t, lab in zip(out["input_ids"], out["labels"]):
 For a Jinja template the RECIPE rule    if lab != -100:
 For a Jinja template the RECIPE rule        assert lab == t
 For a Jinja template the RECIPE rule        run.append(t)
 For a Jinja template the RECIPE rule    elif run:
 For a Jinja template the RECIPE rule        spans.append(tok.decode(run))
 For a Jinja template the RECIPE rule        run = []
 For a Jinja template the RECIPE ruleif run:
 For a Jinja template the RECIPE rule    spans.append(tok.decode(run))
 For a Jinja template the RECIPE rulereturn spans


def test_masks_hf_tokenizer_tulu(hf_dir):
 For a Jinja template the RECIPE ruletok = load_tokenizer(hf_dir)
 For a Jinja template the RECIPE ruleout = tokenize_sft(MULTI_TURN, tok, "tulu")
 For a Jinja template the RECIPE ruleassert tok.decode(out["input_ids"]) == render_chat(MULTI_TURN, "tulu", eos_token="</s>")
 For a Jinja template the RECIPE ruleassert trained_spans(tok, out) == ["Hello!</s>\n", "4</s>"]


def test_masks_jinja_match_hf_prefix_rule(hf_dir, hf_reference):
 For a Jinja template the RECIPE rule# For a Jinja template the RECIPE rule is computed with transformers' own renders and tokens.
 For a Jinja template the RECIPE ruletok = load_tokenizer(hf_dir)
 For a Jinja template the RECIPE rulemsgs = [m for m in MULTI_TURN if m["role"] != "system"]

 For a Jinja template the RECIPE ruledef n_tokens(prefix, gen):
 For a Jinja template the RECIPE rule    text = hf_reference.apply_chat_template(prefix, chat_template=OTHER_JINJA, tokenize=False,
 For a Jinja template the RECIPE rule                                            add_generation_prompt=gen)
 For a Jinja template the RECIPE rule    return len(hf_reference.encode(text, add_special_tokens=False))

 For a Jinja template the RECIPE rulefull = hf_reference.apply_chat_template(msgs, chat_template=OTHER_JINJA, tokenize=False)
 For a Jinja template the RECIPE ruleids = hf_reference.encode(full, add_special_tokens=False)
 For a Jinja template the RECIPE rulelabels = list(ids)
 For a Jinja template the RECIPE rulefor i, m in enumerate(msgs):
 For a Jinja template the RECIPE rule    if m["role"] != "assistant":
 For a Jinja template the RECIPE rule        start = 0 if i == 0 else n_tokens(msgs[:i], False)
 For a Jinja template the RECIPE rule        end = n_tokens(msgs[: i + 1], i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant")
 For a Jinja template the RECIPE rule        labels[start:end] = [-100] * (end - start)
 For a Jinja template the RECIPE ruleout = tokenize_sft(msgs, tok, OTHER_JINJA)
 For a Jinja template the RECIPE ruleassert out["input_ids"] == ids and out["labels"] == labels
 For a Jinja template the RECIPE ruleassert any(x != -100 for x in labels)


# ---------------------------------------------------------------------------------------------------------------
# Files, mixing and bad input


def sft_row(i, n_turns=1):
 For a Jinja template the RECIPE rulemsgs = []
 For a Jinja template the RECIPE rulefor t in range(n_turns):
 For a Jinja template the RECIPE rule    msgs += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": f"a{i}.{t}"}]
 For a Jinja template the RECIPE rulereturn {"messages": msgs, "id": i}


def test_parse_mix():
 For a Jinja template the RECIPE ruleassert parse_mix("a.jsonl:1.0,b.jsonl:500, c.parquet") == [("a.jsonl", 1.0), ("b.jsonl", 500),
 For a Jinja template the RECIPE rule                                                           ("c.parquet", None)]
 For a Jinja template the RECIPE ruleassert parse_mix("dir/x.jsonl:0.25") == [("dir/x.jsonl", 0.25)]
 For a Jinja template the RECIPE rulefor bad in ["a.jsonl:abc", "a.jsonl:0", "a.jsonl:-1", ":5", ""]:
 For a Jinja template the RECIPE rule    with pytest.raises(ValueError):
 For a Jinja template the RECIPE rule        parse_mix(bad)


def test_select_rows_amounts():
 For a Jinja template the RECIPE ruleimport numpy as np

 For a Jinja template the RECIPE rulerows = [(i + 1, {"i": i}) for i in range(10)]
 For a Jinja template the RECIPE rulehalf = select_rows(rows, 0.5, np.random.default_rng(0))
 For a Jinja template the RECIPE ruleassert len(half) == 5 and len(set(r[0] for r in half)) == 5
 For a Jinja template the RECIPE ruleup = select_rows(rows, 25, np.random.default_rng(0))  # two full copies + 5 distinct extra rows
 For a Jinja template the RECIPE rulecounts = [sum(1 for r in up if r[0] == line) for line in range(1, 11)]
 For a Jinja template the RECIPE ruleassert len(up) == 25 and sorted(counts) == [2] * 5 + [3] * 5
 For a Jinja template the RECIPE ruleassert select_rows(rows, 2.0, np.random.default_rng(0)) == rows * 2
 For a Jinja template the RECIPE ruleassert select_rows(rows, None, np.random.default_rng(0)) == rows
 For a Jinja template the RECIPE ruleassert select_rows(rows, "3", np.random.default_rng(1)) == select_rows(rows, 3, np.random.default_rng(1))


def test_load_sft_dataset_mix_and_counts(tmp_path):
 For a Jinja template the RECIPE ruleimport pyarrow as pa
 For a Jinja template the RECIPE ruleimport pyarrow.parquet as pq

 For a Jinja template the RECIPE ruletok = ByteTokenizer()
 For a Jinja template the RECIPE rulea = write_jsonl(tmp_path / "a.jsonl", [sft_row(i) for i in range(10)])
 For a Jinja template the RECIPE ruleb = str(tmp_path / "b.parquet")
 For a Jinja template the RECIPE rulepq.write_table(pa.Table.from_pylist([sft_row(100 + i, n_turns=2) for i in range(4)]), b)
 For a Jinja template the RECIPE ruleexamples, stats = load_sft_dataset([(a, 0.5), (b, 10)], tok, "tulu", seed=3)
 For a Jinja template the RECIPE ruleassert stats["rows_read"] == {a: 10, b: 4} and stats["rows_selected"] == {a: 5, b: 10}
 For a Jinja template the RECIPE ruleassert stats["examples"] == len(examples) == 15
 For a Jinja template the RECIPE ruleassert {e["source"] for e in examples} == {a, b}
 For a Jinja template the RECIPE ruleex = next(e for e in examples if e["source"] == b)
 For a Jinja template the RECIPE rulerow = sft_row(100 + ex["line"] - 1, n_turns=2)
 For a Jinja template the RECIPE ruleassert ex["input_ids"] == tokenize_sft(row["messages"], tok)["input_ids"]  # Parquet line = row index + 1
 For a Jinja template the RECIPE ruleagain, _ = load_sft_dataset([(a, 0.5), (b, 10)], tok, "tulu", seed=3)
 For a Jinja template the RECIPE ruleassert again == examples  # deterministic for a seed
 For a Jinja template the RECIPE ruleassert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)

 For a Jinja template the RECIPE rule# truncation / dropping, counted
 For a Jinja template the RECIPE ruleonly_user = {"messages": [{"role": "user", "content": "nothing to learn"}]}
 For a Jinja template the RECIPE rulelong_prompt = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}
 For a Jinja template the RECIPE rulec = write_jsonl(tmp_path / "c.jsonl", [sft_row(1), only_user, long_prompt])
 For a Jinja template the RECIPE rulen_short = len(tokenize_sft(sft_row(1)["messages"], tok)["input_ids"])
 For a Jinja template the RECIPE ruleexamples, stats = load_sft_dataset([(c, None)], tok, "tulu", max_len=n_short + 5, truncate=True)
 For a Jinja template the RECIPE rule# the long prompt is cut before its answer: truncated, then dropped for having no trained token
 For a Jinja template the RECIPE ruleassert (stats["examples"], stats["truncated"], stats["dropped_no_trained_token"]) == (1, 1, 2)
 For a Jinja template the RECIPE ruleexamples, stats = load_sft_dataset([(c, None)], tok, "tulu", max_len=n_short + 5, truncate=False)
 For a Jinja template the RECIPE ruleassert (stats["examples"], stats["dropped_too_long"], stats["dropped_no_trained_token"]) == (1, 1, 1)
 For a Jinja template the RECIPE ruleassert all(len(e["input_ids"]) <= n_short + 5 for e in examples)


@pytest.mark.parametrize("lines, pattern", [
 For a Jinja template the RECIPE rule(['{"messages": []}'], r"f\.jsonl:1: messages: expected a non-empty list"),
 For a Jinja template the RECIPE rule([json.dumps(sft_row(0)), '{"messages": [oops'], r"f\.jsonl:2: malformed JSON"),
 For a Jinja template the RECIPE rule([json.dumps(sft_row(0)), '{"prompt": "x"}'], r"f\.jsonl:2: field 'messages': missing"),
 For a Jinja template the RECIPE rule([json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})],
 For a Jinja template the RECIPE rule r"f\.jsonl:1: messages\[1\]\.role: unknown role 'bot'"),
 For a Jinja template the RECIPE rule([json.dumps({"messages": [{"role": "user", "content": 3}]})],
 For a Jinja template the RECIPE rule r"f\.jsonl:1: messages\[0\]\.content: expected a string, got int"),
 For a Jinja template the RECIPE rule([json.dumps({"messages": [{"role": "user"}]})], r"f\.jsonl:1: messages\[0\]\.content: missing"),
 For a Jinja template the RECIPE rule([], r"f\.jsonl: empty file"),
])
def test_bad_input_names_file_line_field(tmp_path, lines, pattern):
 For a Jinja template the RECIPE rulepath = write_jsonl(tmp_path / "f.jsonl", lines)
 For a Jinja template the RECIPE rulewith pytest.raises(ValueError, match=pattern):
 For a Jinja template the RECIPE rule    load_sft_dataset([(path, None)], ByteTokenizer(), "tulu")


def test_template_failure_names_file_and_line(tmp_path):
 For a Jinja template the RECIPE rulepath = write_jsonl(tmp_path / "f.jsonl", [sft_row(0), {"messages": MULTI_TURN}])
 For a Jinja template the RECIPE rulewith pytest.raises(ValueError, match=r"f\.jsonl:2: chat template failed to render.*no system turn"):
 For a Jinja template the RECIPE rule    load_sft_dataset([(path, None)], ByteTokenizer(), OTHER_JINJA)

"""Chat templates of real checkpoints: chatml and Llama 3 style templates with {% generation %} blocks, whose
assistant masks transformers computes (apply_chat_template(..., return_assistant_tokens_mask=True)) as the
reference for nanotulu's prefix-render masks; and SFT with no --template training with the checkpoint's own
template (tulu for a tokenizer without one and for the embedded model), saying so."""

import json
import os

import pytest

from nanotulu import data, train_sft
from nanotulu.data import ByteTokenizer, describe_template, load_tokenizer, resolve_template, tokenize_sft

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "</s>"]

# chatml as in Qwen / SmolLM instruct models (a default system prompt when none is given); the generation block
# covers what nanotulu trains of an answer: its text, <|im_end|> and the newline after it (the tulu rule: the
# newline that ends an answer belongs to it).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 instruct's layout: BOS, role headers, <|eot_id|> ending each turn (the answer's generation block is its
# trimmed text and <|eot_id|>, as in transformers' documentation of assistant masks).
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 47 + 38?"},
     {"role": "assistant", "content": "7+8=15, write 5 carry 1: 85."}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "3"},
     {"role": "assistant", "content": " four "}, {"role": "user", "content": "five?"},
     {"role": "assistant", "content": "six\n\nseven"}],
]

CORPUS = ["Hello! How are you today?", "What is 2+2? The answer is 4.", "Be brief. Hi there, friend.",
          "system user assistant You are a helpful assistant.", "And 47 + 38? 7+8=15, write 5 carry 1: 85.",
          "one two three four five six seven"] * 20


def make_tokenizer_dir(directory, chat_template, eos, bos=None, pad=None):
    """A tiny byte-level BPE with the chat special tokens, trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 4096}
    if bos is not None:
        config["bos_token"] = bos
    if pad is not None:
        config["pad_token"] = pad
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.mark.parametrize("template,eos,bos", [(CHATML, "<|im_end|>", None),
                                              (LLAMA3, "<|eot_id|>", "<|begin_of_text|>")], ids=["chatml", "llama3"])
def test_masks_equal_transformers_assistant_masks(tmp_path, template, eos, bos):
    from transformers import AutoTokenizer

    directory = make_tokenizer_dir(tmp_path / "tok", template, eos, bos)
    tok = load_tokenizer(directory)
    hf = AutoTokenizer.from_pretrained(directory)
    assert resolve_template("", tok) == template  # no --template: the checkpoint's own
    for chat in CHATS:
        ref = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ours = tokenize_sft(chat, tok, resolve_template("", tok))
        assert ours["input_ids"] == list(ref["input_ids"])
        trained = [int(label != -100) for label in ours["labels"]]
        assert trained == list(ref["assistant_masks"]), chat
        assert sum(trained) > 0


def test_default_template_choice_is_said():
    byte = ByteTokenizer()
    assert resolve_template("", byte) == "tulu"  # the embedded model
    assert describe_template("", "tulu", byte) == "template: tulu (the tokenizer 'byte' has no chat_template of " \
                                                  "its own)"
    assert describe_template("tulu", "tulu", byte) == "template: tulu (--template tulu)"


def tiny_checkpoint(directory, vocab_size=368):
    from nanotulu.model import LlamaConfig, build_model

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=512,
                      tie_word_embeddings=True)
    build_model(cfg, seed=0).save_pretrained(str(directory))
    return str(directory)


SFT_ROWS = [{"messages": chat} for chat in CHATS] * 4


@pytest.mark.parametrize("own", [CHATML, None], ids=["own-chatml", "no-template"])
def test_sft_trains_with_the_checkpoints_template(tmp_path, capsys, own):
    """No --template: a checkpoint with a chat template trains with it and exports it; one without trains with
    tulu; either way the run prints which."""
    model = tiny_checkpoint(tmp_path / "model")
    make_tokenizer_dir(model, own, "<|im_end|>")
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    out = tmp_path / "out"
    train_sft.main(["--model", model, "--data", str(rows), "--output_dir", str(out), "--max_steps", "1",
                    "--batch_rows", "1", "--max_seq_len", "128", "--tokenize_workers", "0", "--data_cache_dir", ""],
                   finish=False)
    printed = capsys.readouterr().out
    with open(out / "final" / "tokenizer_config.json") as f:
        exported = json.load(f)["chat_template"]
    if own is not None:
        assert f"template: the checkpoint's own chat_template ({model}; --template tulu for Tulu 3's)" in printed
        assert exported == CHATML
    else:
        assert f"template: tulu (the tokenizer '{model}' has no chat_template of its own)" in printed
        assert exported == data.TULU_CHAT_TEMPLATE

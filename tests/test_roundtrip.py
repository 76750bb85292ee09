"""Real-use round trip: a Hugging Face Llama with its own BPE tokenizer and its own chat template is fine-tuned with
the tulu template; the exported checkpoint carries that template (as Jinja) and the tokens training used, and
transformers' apply_chat_template + LlamaForCausalLM.generate on it give the tokens nanotulu's eval and generate
give. transformers is the independent reference throughout."""

import json
import os

import pytest
import torch

from nanotulu.data import TULU_CHAT_TEMPLATE, load_tokenizer, render_tulu, resolve_template

transformers = pytest.importorskip("transformers")
from test_data import make_hf_dir  # noqa: E402 (tests/ is on sys.path under pytest)

# The base tokenizer's own template: different headers from tulu's, so a mix-up shows in every token.
BASE_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant: {% endif %}")

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "You add."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "system", "content": "Now be loud."},
     {"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "7!"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
]


def test_tulu_jinja_renders_exactly_render_tulu():
    """The Jinja form saved in checkpoints, rendered by transformers, == render_tulu, on every prefix of multi-turn
    chats with system turns, with and without the generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for chat in CHATS:
        for n in range(1, len(chat) + 1):
            for gen in (False, True):
                rendered, _ = render_jinja_template([chat[:n]], chat_template=TULU_CHAT_TEMPLATE,
                                                    add_generation_prompt=gen, eos_token="</s>", bos_token="<s>")
                assert rendered[0] == render_tulu(chat[:n], "</s>", gen), (chat[:n], gen)


def test_template_flag_values(tmp_path):
    byte = load_tokenizer("byte")
    hf = load_tokenizer(make_hf_dir(tmp_path / "tok", chat_template=BASE_TEMPLATE))
    assert resolve_template("tulu", hf) == "tulu" and resolve_template("hf", hf) == BASE_TEMPLATE
    assert resolve_template(None, hf) == BASE_TEMPLATE and resolve_template("", byte) == "tulu"
    f = tmp_path / "t.jinja"
    f.write_text(BASE_TEMPLATE)
    assert resolve_template(str(f), byte) == BASE_TEMPLATE
    f.write_text(TULU_CHAT_TEMPLATE)  # the exported tulu Jinja is the built-in tulu (same text, same masks)
    assert resolve_template(str(f), hf) == "tulu"
    with pytest.raises(ValueError, match=r"--template 'chatml': expected 'tulu' .*'hf' .*Jinja file \(no such file\)"):
        resolve_template("chatml", hf)
    with pytest.raises(ValueError, match=r"--template hf: the tokenizer 'byte' has no chat_template"):
        resolve_template("hf", byte)
    f.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="does not compile"):
        resolve_template(str(f), hf)


def test_bad_template_fails_before_any_work(tmp_path):
    from nanotulu import train_dpo, train_sft

    # a model directory with a config and no weights, a data file of one unreadable row: reading either fails, so
    # only a template check that runs first gives the template errors
    model = tmp_path / "config_only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 264, "hidden_size": 32,
                                                   "intermediate_size": 64, "num_hidden_layers": 1,
                                                   "num_attention_heads": 4}))
    (tmp_path / "rows.jsonl").write_text("not json\n")
    byte_only = ["--tokenizer", "byte", "--data", str(tmp_path / "rows.jsonl"), "--output_dir", str(tmp_path / "o")]
    for main in (train_sft.main, train_dpo.main):
        with pytest.raises(ValueError, match="--template hf: the tokenizer 'byte' has no chat_template"):
            main(["--model", str(model), *byte_only, "--template", "hf"], finish=False)
        with pytest.raises(ValueError, match="--template 'llama3'"):
            main(["--model", str(model), *byte_only, "--template", "llama3"], finish=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny transformers Llama + BPE tokenizer (own template, no pad), SFT for 2 steps with tulu -> final dir."""
    root = tmp_path_factory.mktemp("roundtrip")
    base = make_hf_dir(root / "base", chat_template=BASE_TEMPLATE)
    n_vocab = transformers.AutoTokenizer.from_pretrained(base).vocab_size
    config = transformers.LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base)  # safetensors beside the tokenizer files
    rows = root / "sft.jsonl"
    rows.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 4))
    from nanotulu import train_sft

    out = train_sft.main(["--model", base, "--data", str(rows), "--output_dir", str(root / "sft"), "--max_seq_len",
                          "128", "--batch_rows", "2", "--max_steps", "2", "--lr", "1e-3", "--save_every", "0",
                          "--loss_impl", "torch", "--template", "tulu"])
    return base, out


def test_export_carries_template_tokens_and_vocab(exported):
    base, final = exported
    with open(os.path.join(final, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["chat_template"] == TULU_CHAT_TEMPLATE  # trained with tulu, not the base's BASE_TEMPLATE
    assert (cfg["eos_token"], cfg["bos_token"], cfg.get("pad_token")) == ("</s>", "<s>", None)  # no pad added
    ours = load_tokenizer(base)  # what training used: the base tokenizer, unchanged
    hf = transformers.AutoTokenizer.from_pretrained(final)
    assert hf.pad_token is None and len(hf) == len(transformers.AutoTokenizer.from_pretrained(base))
    assert (hf.eos_token_id, hf.bos_token_id) == (ours.eos_token_id, ours.bos_token_id)
    with open(os.path.join(final, "config.json")) as f:
        model_cfg = json.load(f)
    with open(os.path.join(base, "config.json")) as f:
        base_cfg = json.load(f)
    assert model_cfg["vocab_size"] == base_cfg["vocab_size"]  # the vocabulary kept: the base's shape
    assert model_cfg["pad_token_id"] is None and model_cfg["eos_token_id"] == ours.eos_token_id
    for chat in CHATS[:3]:
        for gen, msgs in ((False, chat), (True, chat[:-1])):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert text == render_tulu(msgs, "</s>", gen)
            assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    # the next stage (DPO, RLVR, eval, generate: --template left empty) reads tulu back from the checkpoint
    assert resolve_template(None, load_tokenizer(final)) == "tulu"
    assert resolve_template(None, load_tokenizer(base)) == BASE_TEMPLATE


def test_transformers_generate_equals_nanotulu_eval_and_generate(exported, tmp_path):
    from nanotulu import eval as nt_eval
    from nanotulu import generate as nt_generate

    _, final = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    prompts = [("Be brief.", "2+2?"), (None, "What is 2+3?")]
    rlvr = tmp_path / "rlvr.jsonl"
    rlvr.write_text("".join(json.dumps({"messages": ([{"role": "system", "content": s}] if s else [])
                                       + [{"role": "user", "content": q}], "ground_truth": "4",
                                       "dataset": "string_match"}) + "\n" for s, q in prompts))
    results = nt_eval.main(["--model", final, "--data", str(rlvr), "--max_new_tokens", "12", "--dtype", "float32",
                            "--device", "cpu", "--out", str(tmp_path / "res.json"), "--verify_workers", "0"])
    for k, (system, question) in enumerate(prompts):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False)
        want = out[0, ids.shape[1]:].tolist()
        if hf_tok.eos_token_id in want:
            want = want[:want.index(hf_tok.eos_token_id) + 1]
        assert len(want) > 3  # a real answer to compare, not an immediate EOS
        argv = ["--model", final, "--prompt", question, "--max_new_tokens", "12", "--device", "cpu"]
        got = nt_generate.main(argv + (["--system", system] if system else []))
        assert got["prompt_ids"] == ids[0].tolist()
        assert got["tokens"] == want
        sample = results["samples"][k]
        assert sample["prompt_tokens"] == ids.shape[1] and sample["new_tokens"] == len(want)
        assert sample["response"] == hf_tok.decode(want, skip_special_tokens=True)


def test_eval_and_generate_refuse_bad_templates_before_loading(exported, tmp_path):
    from nanotulu import eval as nt_eval
    from nanotulu import generate as nt_generate

    _, final = exported
    rlvr = tmp_path / "r.jsonl"
    rlvr.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "ground_truth": "x",
                                "dataset": "string_match"}) + "\n")
    with pytest.raises(SystemExit, match="--template hf: the tokenizer 'byte' has no chat_template"):
        nt_eval.main(["--model", final, "--tokenizer", "byte", "--data", str(rlvr), "--template", "hf"])
    with pytest.raises(SystemExit, match="--template 'vicuna': expected"):
        nt_eval.main(["--model", final, "--data", str(rlvr), "--template", "vicuna"])
    with pytest.raises(SystemExit, match="--template 'vicuna': expected"):
        nt_generate.main(["--model", final, "--prompt", "hi", "--template", "vicuna"])

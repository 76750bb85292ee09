"""What a run leaves behind and what the README tells a user to type: exported config.json keeps the input's
fields (transformers 5's rope_parameters included, checked by loading it back in transformers), the vocabulary and
special tokens are kept (no pad added), an embedded export carries tokenizer files AutoTokenizer loads, a finished
run is recognised on a rerun, and every README command names existing flags and paths an earlier command writes."""

import contextlib
import io
import json
import os
import re
import shlex

import pytest
import torch

from nanotulu import data, train_dpo, train_rlvr, train_rm, train_sft
from nanotulu.flags import parse_flags
from nanotulu.model import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# config.json round trip


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}], ids=["default", "llama3"])
def test_config_keeps_input_fields_and_rope_parameters(tmp_path, rope):
    import transformers

    kw = {} if rope is None else {"rope_parameters": rope}
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                      tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "in")
    Llama.from_pretrained(str(tmp_path / "in")).save_pretrained(str(tmp_path / "out"))
    with open(tmp_path / "in" / "config.json") as f:
        given = json.load(f)
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)
    assert "rope_parameters" in given and "rope_theta" not in given  # transformers 5's form
    for key, value in given.items():
        if key not in ("transformers_version", "dtype"):  # dtype: the weights' own, written as saved
            assert written.get(key, "<missing>") == value, key
    assert "rope_theta" not in written and "rope_scaling" not in written  # the form the input had
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters == hf.config.rope_parameters
    ids = torch.arange(40).view(1, 40) % 96
    torch.testing.assert_close(back(ids).logits, hf(ids).logits)


def test_pad_equal_to_eos_is_kept(tmp_path):
    from test_templates import make_tokenizer_dir

    directory = make_tokenizer_dir(tmp_path / "tok", None, eos="<|im_end|>", pad="<|im_end|>")
    tok = data.load_tokenizer(directory)
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id  # no <pad> added
    os.makedirs(tmp_path / "out")
    tok.save(str(tmp_path / "out"), "tulu")
    with open(tmp_path / "out" / "tokenizer_config.json") as f:
        assert json.load(f)["pad_token"] == "<|im_end|>"
    with open(os.path.join(directory, "tokenizer.json")) as f, open(tmp_path / "out" / "tokenizer.json") as g:
        assert json.load(f)["model"]["vocab"] == json.load(g)["model"]["vocab"]
        g.seek(0)
        assert "<pad>" not in g.read()


# ---------------------------------------------------------------------------------------------------------------
# The embedded export and a rerun of a finished run


def test_embedded_export_loads_in_transformers_and_a_finished_run_is_not_retrained(tmp_path, capsys):
    from transformers import AutoTokenizer

    rows = tmp_path / "sft.jsonl"
    with open(os.path.join(ROOT, "nanotulu", "assets", "sft.jsonl")) as f:
        rows.write_text("".join(f.readline() for _ in range(40)))
    out = tmp_path / "run"
    argv = ["--data", str(rows), "--output_dir", str(out), "--max_steps", "2", "--batch_rows", "2",
            "--max_seq_len", "256", "--save_every", "100", "--tokenize_workers", "0", "--data_cache_dir", ""]
    final = train_sft.main(argv, finish=False)
    assert not os.path.exists(out / "checkpoints")  # --save_every 100 > 2 steps: no checkpoint, only final/

    hf = AutoTokenizer.from_pretrained(final)  # the byte tokenizer as tokenizer files
    byte = data.ByteTokenizer()
    chat = [{"role": "user", "content": "What is 47 + 38? ✓"}, {"role": "assistant", "content": "85"}]
    text = data.render_tulu(chat, byte.eos_token)
    assert hf.apply_chat_template(chat, tokenize=False) == text
    assert hf.encode(text, add_special_tokens=False) == byte.encode(text) and hf.decode(byte.encode(text)) == text
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (256, 257, 258)
    assert isinstance(data.load_tokenizer(final), data.ByteTokenizer)  # read back in-process as the same class

    metrics = (out / "metrics.jsonl").read_text()
    stamp = os.stat(os.path.join(final, "model.safetensors")).st_mtime_ns
    capsys.readouterr()
    assert train_sft.main(argv, finish=False) == final  # the same command again
    assert "finished already" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == metrics
    assert os.stat(os.path.join(final, "model.safetensors")).st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------------------------------
# README commands, as printed


TRAINERS = {"train_sft": train_sft.SFTConfig, "train_dpo": train_dpo.DPOConfig, "train_rlvr": train_rlvr.RLVRConfig,
            "train_rm": train_rm.RMConfig}


class _Stop(Exception):
    pass


def pipeline_outputs(monkeypatch, tmp_path):
    """The final/ folders `python -m nanotulu.pipeline` (its defaults) writes, relative to where it runs: its stages
    run as trainer mains, recorded here instead of trained."""
    from nanotulu import pipeline

    ran = []

    def record(argv, finish=True):
        ran.append(os.path.join(argv[argv.index("--output_dir") + 1], "final"))
        if len(ran) == 3:
            raise _Stop

    for module in (train_sft, train_dpo, train_rlvr):
        monkeypatch.setattr(module, "main", record)
    monkeypatch.setattr(pipeline, "held_out_accuracy", lambda *a, **k: (0.0, {}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Stop):
        pipeline.main([])
    return set(ran)


def readme_commands():
    """(block number, argv) of each command in README.md's bash blocks: continuation lines joined, comments and
    `pip install ... &&` prefixes dropped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    out = []
    for b, block in enumerate(blocks):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and argv[0] != "pip":
                    out.append((b, argv))
    return out


def help_flags(main):
    """The --flags an argparse entry point's --help lists."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["--help"])
    return set(re.findall(r"(--[a-z_]+)", buf.getvalue()))


def test_readme_commands_name_existing_flags_and_written_paths(monkeypatch, tmp_path):
    from nanotulu import decontam, pipeline
    from nanotulu import eval as nt_eval

    entry = {"nanotulu.eval": help_flags(nt_eval.main), "nanotulu.pipeline": help_flags(pipeline.main),
             "nanotulu.decontam": help_flags(decontam.main)}
    from_pipeline = pipeline_outputs(monkeypatch, tmp_path)
    assert "runs/pipeline/rlvr/final" in from_pipeline
    written, checked = {}, 0  # block -> paths written by its earlier commands
    for block, argv in readme_commands():
        if argv[:3] == ["python", "-m", "pytest"]:
            continue
        nproc = 1
        if argv[0] == "torchrun":
            assert argv[1] == "--nproc_per_node", argv
            nproc, argv = int(argv[2]), argv[3:]
            target, flags = (argv[1], argv[2:]) if argv[0] == "-m" else (argv[0], argv[1:])
        else:
            assert argv[:2] == ["python", "-m"], argv
            target, flags = argv[2], argv[3:]
        name = target.removeprefix("nanotulu/").removesuffix(".py").removeprefix("nanotulu.")
        given = dict(zip(flags[::2], flags[1::2]))
        if name in TRAINERS:  # the trainer's own parser: unknown flags or bad values raise
            cfg, _ = parse_flags(TRAINERS[name], flags)
            from nanotulu import parallel
            parallel.mesh_shape(nproc, cfg.dp_shard, cfg.tp, cfg.dp_replicate)
            written.setdefault(block, set()).add(os.path.join(cfg.output_dir, "final"))
        else:
            assert f"nanotulu.{name}" in entry, argv
            unknown = {f for f in flags if f.startswith("--")} - entry[f"nanotulu.{name}"]
            assert not unknown, (argv, unknown)
            if name == "pipeline":
                written.setdefault(block, set()).update(from_pipeline)
        for flag in ("--model", "--value_model", "--ref_model"):
            path = given.get(flag)
            if path and not path.startswith("/"):  # /ckpt/...: the user's own checkpoint
                assert path in written.get(block, set()), f"{' '.join(argv)}: {path} is written by no command " \
                                                          f"before it in its block"
        for path in re.findall(r"nanotulu/assets/[\w.]+", " ".join(flags)):
            assert os.path.isfile(os.path.join(ROOT, path)), path
        checked += 1
    assert checked >= 15

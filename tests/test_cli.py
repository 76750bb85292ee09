"""What a user sees when a run cannot start: one clear message as the last line (also under torchrun, whose
launcher prints its own block after a failed child), and the checks that need only the flags, the process count
and config.json (mesh shape, attention backend, sequence length) made before any tokenizer, data or weight loads."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from nanotulu import train_dpo, train_rlvr, train_sft
from nanotulu.run import check_attn_backend, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "NANOTULU_NO_BAR": "1", "PYTHONPATH": ROOT}
ENV.pop("NANOTULU_DEBUG", None)


def run(args, env=ENV):
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def torchrun(script_args, env=ENV):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                "--master_port", str(free_port())] + script_args, env)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_plain_python_bad_flag_ends_with_one_line():
    p = run([sys.executable, "nanotulu/train_sft.py", "--bad"])
    assert p.returncode == 2
    assert lines(p.stderr) == ["error: unrecognized arguments: --bad (see train_sft.py --help)"]


def test_torchrun_bad_flag_is_the_last_line():
    p = torchrun(["nanotulu/train_sft.py", "--bad"])
    assert p.returncode != 0
    msg = "error: unrecognized arguments: --bad (see train_sft.py --help)"
    out = lines(p.stdout + p.stderr)
    assert out[-1].strip("=") == "" and out[-2].strip() == "traceback : " + msg, "\n".join(out[-6:])
    assert msg in lines(p.stderr) and "nanotulu/run.py" not in p.stderr


def test_torchrun_user_error_is_the_last_line(tmp_path):
    """torchrun's launcher prints its own traceback and ChildFailedError block after a child fails, whatever the
    child does; the child fills the block's last field ("traceback :") through TORCHELASTIC_ERROR_FILE, so the
    message is the last line before the block's closing border, and the child prints no traceback of its own."""
    msg = "error: --tp 3 x --dp_replicate 1 does not divide the world size 1 (processes started by torchrun)"
    p = torchrun(["nanotulu/train_sft.py", "--tp", "3", "--output_dir", str(tmp_path / "run")])
    assert p.returncode != 0
    out = lines(p.stdout + p.stderr)
    assert out[-1].strip("=") == "" and out[-2].strip() == "traceback : " + msg, "\n".join(out[-6:])
    assert msg in lines(p.stderr)  # the child's own line, before the launcher's output
    assert "[rank0]" not in p.stderr and "nanotulu/" not in p.stderr.replace("nanotulu/train_sft.py", "")
    assert not os.path.exists(tmp_path / "run" / "run_config.json")  # refused before the run directory is claimed

    # --debug (or NANOTULU_DEBUG=1) brings the child's traceback back
    p = torchrun(["nanotulu/train_sft.py", "--tp", "3", "--debug", "--output_dir", str(tmp_path / "run")])
    assert "nanotulu/parallel.py" in p.stderr and "ValueError" in p.stderr
    p = run([sys.executable, "nanotulu/train_sft.py", "--tp", "3"], env={**ENV, "NANOTULU_DEBUG": "1"})
    assert "Traceback" in p.stderr and lines(p.stderr)[-1].startswith("ValueError: --tp 3")


def test_refused_flag_change_is_the_last_line(tmp_path):
    """The changed-flags refusal (raised after the process group exists, on every rank) ends the output too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "final").mkdir()
    saved = {**dataclasses.asdict(train_sft.SFTConfig(output_dir=str(out))), "lr": 123.0}
    (out / "run_config.json").write_text(json.dumps(saved))
    p = run([sys.executable, "nanotulu/train_sft.py", "--output_dir", str(out), "--lr", "1e-3"])
    assert p.returncode == 1
    assert lines(p.stderr)[-1].startswith(f"error: {out} holds a run with other flags"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# Checks before any load: a model directory with config.json only (no tokenizer, no weights) proves the order:
# reaching the tokenizer or the weights would fail with another message.


@pytest.fixture
def config_only(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    return ["--model", str(model), "--data", str(data), "--output_dir", str(tmp_path / "out")]


def test_mesh_checked_before_load(config_only):
    with pytest.raises(ValueError, match=r"--tp 3 x --dp_replicate 1 does not divide the world size 1"):
        train_sft.main(config_only + ["--tp", "3"])
    with pytest.raises(ValueError, match=r"--dp_shard 2 x --tp 1 = 2, but 1 processes were started"):
        train_dpo.main(config_only + ["--dp_shard", "2"])


def test_attention_backend_checked_before_load(config_only):
    with pytest.raises(ValueError, match="--attn_backend flex: FlexAttention has no backward pass on cpu"):
        train_sft.main(config_only + ["--attn_backend", "flex"])
    with pytest.raises(ValueError, match="--attn_backend varlen: .* need a CUDA GPU, this run is on cpu"):
        train_sft.main(config_only + ["--attn_backend", "varlen"])
    # on a GPU: fp32 compute is refused for varlen, and flash needs the flash-attn package
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="--attn_backend varlen: .* bf16/fp16 only, and this run computes in fp32"):
        check_attn_backend("varlen", cuda, use_bf16=False)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="--attn_backend flash: the flash-attn package is not installed"):
            check_attn_backend("flash", cuda, use_bf16=True)
    check_attn_backend("flex", cuda, use_bf16=False)  # flex trains on CUDA in fp32 and bf16
    check_attn_backend("sdpa", torch.device("cpu"), use_bf16=False)


def test_sequence_length_checked_before_load(config_only):
    with pytest.raises(ValueError, match=r"--max_seq_len 512: longer than the model's max_position_embeddings 256 "
                                         r"\(.*model/config.json\); lower it to 256 at most"):
        train_sft.main(config_only + ["--max_seq_len", "512"])
    with pytest.raises(ValueError, match=r"--max_prompt_len 200 \+ --max_new_tokens 100 = 300: longer than"):
        train_rlvr.main(config_only + ["--max_prompt_len", "200", "--max_new_tokens", "100"])
    # within the limit the run goes on, and fails only where the tokenizer loads (this directory has none)
    with pytest.raises(FileNotFoundError, match="tokenizer.json: no such file"):
        train_sft.main(config_only + ["--max_seq_len", "256"])

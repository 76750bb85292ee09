"""Runs that protect the user's time and data: checks before the model loads, the saved run configuration, one run
per output directory, metrics without replayed duplicates, group-readable outputs, --help with every default, the
data-mix syntax everywhere, and optional dependencies that name their extra."""

import dataclasses
import fcntl
import json
import os
import re
import subprocess
import sys

import pytest

from nanotulu import data, eval as nt_eval, rewards, run, train_dpo, train_rlvr, train_sft
from nanotulu.model import LlamaConfig, build_model

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def config_only_model(tmp_path):
    """A model directory with config.json and no weights: any run that loads the model fails on the weights, so a
    run that fails with another message did so before loading it."""
    d = tmp_path / "no_weights"
    build_model(TINY, seed=0).save_pretrained(str(d))
    for name in os.listdir(d):
        if name.endswith(".safetensors"):
            os.remove(d / name)
    return str(d)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def chat(i):
    a, b = i % 7, i % 5
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]


# ---- 1. checks before the model loads ------------------------------------------------------------------------------


def test_sft_too_little_data_fails_before_the_model_with_advice(tmp_path):
    model = config_only_model(tmp_path)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": chat(i)} for i in range(30)])
    # 30 examples of ~50 tokens fill 1 row of 4096 tokens (counted by hand: 30 x 50 < 4096)
    with pytest.raises(ValueError) as e:
        train_sft.main(["--model", model, "--tokenizer", "byte", "--data", path, "--output_dir",
                        str(tmp_path / "out")])
    msg = str(e.value)
    assert "30 examples pack into 1 rows of 4096 tokens" in msg and "16 rows x 1 ranks" in msg, msg
    assert "--batch_rows (to 1 at most)" in msg and "--max_seq_len" in msg, msg
    # and batch_rows that do not split over micro-batches, also before the model
    with pytest.raises(ValueError, match=r"--batch_rows 3 must be a multiple of .* --micro_batch_rows \(2\)"):
        train_sft.main(["--model", model, "--tokenizer", "byte", "--data", path, "--output_dir",
                        str(tmp_path / "out"), "--batch_rows", "3", "--micro_batch_rows", "2"])


def test_dpo_too_little_data_fails_before_the_reference_pass(tmp_path):
    model = config_only_model(tmp_path)
    rows = [{"chosen": chat(i), "rejected": chat(i)[:1] + [{"role": "assistant", "content": "no idea"}]}
            for i in range(10)]
    path = write_jsonl(tmp_path / "dpo.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        train_dpo.main(["--model", model, "--tokenizer", "byte", "--data", path, "--output_dir", str(tmp_path / "o"),
                        "--ref_cache_dir", str(cache)])
    assert "10 pairs: fewer than one step of --batch_pairs 128" in str(e.value), e.value
    assert "lower --batch_pairs (to 10 at most)" in str(e.value), e.value
    assert not cache.exists()  # no reference pass ran


def test_missing_inputs_and_unwritable_outputs_fail_at_once(tmp_path):
    model = config_only_model(tmp_path)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": chat(i)} for i in range(4)])
    with pytest.raises(ValueError, match=r"--data .*missing.jsonl: no such file"):
        train_sft.main(["--model", model, "--tokenizer", "byte", "--data", f"{path},{tmp_path}/missing.jsonl:10"])
    with pytest.raises(ValueError, match="--model .*: not a Hugging Face model directory"):
        train_sft.main(["--model", str(tmp_path), "--data", path])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="--output_dir .*afile: is a file"):
        train_sft.main(["--model", model, "--tokenizer", "byte", "--data", path, "--output_dir",
                        str(tmp_path / "afile")])
    with pytest.raises(ValueError, match="afile is a file, so no folder"):
        train_sft.main(["--model", model, "--tokenizer", "byte", "--data", path, "--output_dir",
                        str(tmp_path / "afile" / "run")])


def test_eval_out_in_a_missing_folder_fails_before_generating(tmp_path):
    model = config_only_model(tmp_path)
    rows = write_jsonl(tmp_path / "t.jsonl", [{"messages": chat(1)[:1], "ground_truth": "1", "dataset": "gsm8k"}])
    with pytest.raises(SystemExit, match=r"--out /missing/x.json: the folder /missing does not exist"):
        nt_eval.main(["--model", model, "--tokenizer", "byte", "--data", rows, "--out", "/missing/x.json"])
    with pytest.raises(SystemExit, match="is a folder"):
        nt_eval.main(["--model", model, "--tokenizer", "byte", "--data", rows, "--out", str(tmp_path)])


def test_rlvr_prompts_per_step_checked_before_the_model(tmp_path):
    model = config_only_model(tmp_path)
    rows = write_jsonl(tmp_path / "r.jsonl", [{"messages": chat(i)[:1], "ground_truth": str(i % 7 + i % 5),
                                                "dataset": "gsm8k"} for i in range(5)])
    with pytest.raises(ValueError, match=r"--prompts_per_step 48 .* at most the 5 prompts of --data"):
        train_rlvr.main(["--model", model, "--tokenizer", "byte", "--data", rows, "--output_dir", str(tmp_path / "o")])


# ---- 2. saved configuration, lock, metrics on resume, modes --------------------------------------------------------


def run_sft(args, check=True):
    env = dict(os.environ, NANOTULU_NO_BAR="1")
    out = subprocess.run([sys.executable, "-m", "nanotulu.train_sft", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


def fixture(tmp_path):
    model_dir = tmp_path / "tiny"
    build_model(TINY, seed=3).save_pretrained(str(model_dir))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat(i)} for i in range(48)])
    return ["--model", str(model_dir), "--tokenizer", "byte", "--data", path, "--max_seq_len", "128",
            "--batch_rows", "2", "--lr", "1e-3", "--max_steps", "6", "--save_every", "2", "--seed", "7"]


def steps_logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_resume_keeps_one_metrics_row_per_step_and_refuses_other_flags(tmp_path):
    args, out = fixture(tmp_path), str(tmp_path / "run")
    old_umask = os.umask(0o022)
    try:
        killed = run_sft([*args, "--output_dir", out, "--exit_after_steps", "3"], check=False)
        assert killed.returncode == 3, killed.stderr[-2000:]
        assert steps_logged(out) == [1, 2]  # step 3 died before its row; the checkpoint is at step 2
        with open(os.path.join(out, "run_config.json")) as f:
            saved = json.load(f)
        assert saved["lr"] == 1e-3 and saved["max_seq_len"] == 128 and saved["model"].endswith("tiny")

        # another --lr (and --seed) refuses to resume, naming the fields, before touching anything
        with pytest.raises(ValueError) as other:
            train_sft.main([*args, "--output_dir", out, "--lr", "2e-3", "--seed", "8"])
        assert "--lr 0.001 there, 0.002 now; --seed 7 there, 8 now" in str(other.value), other.value
        assert "--resume false to start over" in str(other.value)
        assert steps_logged(out) == [1, 2] and not os.path.exists(os.path.join(out, "final"))

        # the same flags (a new --save_every is allowed) resume: each step logged once
        train_sft.main([*args, "--output_dir", out, "--save_every", "3"])
        assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
        # outputs get the umask's mode (022: group and others read), not mkdtemp's 0700
        for d in ("final", "checkpoints", os.path.join("checkpoints", "step_00000003")):
            assert os.stat(os.path.join(out, d)).st_mode & 0o777 == 0o755, d
        assert os.stat(os.path.join(out, "final", "model.safetensors")).st_mode & 0o777 == 0o644

        # --resume false starts over with the new flags: old checkpoints and rows gone
        train_sft.main([*args, "--output_dir", out, "--lr", "2e-3", "--max_steps", "2", "--resume", "false"])
        assert steps_logged(out) == [1, 2]
        assert not os.path.exists(os.path.join(out, "checkpoints"))  # max_steps 2: no checkpoint before the end
    finally:
        os.umask(old_umask)


def test_truncate_jsonl_keeps_rows_up_to_the_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 2}\n{"ste')  # a killed writer's last line
    run.truncate_jsonl(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 2}\n'


def test_a_second_run_in_a_locked_directory_fails_and_a_dead_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    script = (f"import fcntl, time\nf = open({str(out / '.lock')!r}, 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
              "f.write('pid 1234 on elsewhere'); f.flush()\nprint('locked', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = train_sft.SFTConfig(output_dir=str(out))
        with pytest.raises(ValueError, match=r"another run is using it \(pid 1234 on elsewhere\)"):
            run.open_run_dir(cfg, rank=0)
    finally:
        holder.kill()
        holder.wait()
    run.open_run_dir(cfg, rank=0)  # the OS dropped the dead process's lock
    try:
        with open(out / ".lock") as f:  # and this process holds it now
            with pytest.raises(OSError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        run.release_run_dir(str(out))


# ---- 3. --help, flag spelling, embedded assets, data mixes, optional dependencies ----------------------------------


def help_text(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return " ".join(out.stdout.split())  # argparse wraps lines


def help_entries(text, flags):
    """{flag: its entry in the options list}: the text from the flag to the next flag of `flags` (in order)."""
    listed = text[text.index("options:"):]
    starts, pos = [], 0
    for flag in flags:
        pos = listed.index(flag + " ", pos)
        starts.append(pos)
    return {flag: listed[a:b] for flag, a, b in zip(flags, starts, starts[1:] + [len(listed)])}


@pytest.mark.parametrize("module,cls,preset", [
    ("nanotulu.train_sft", train_sft.SFTConfig, train_sft.EMBEDDED_PRESET),
    ("nanotulu.train_dpo", train_dpo.DPOConfig, train_dpo.EMBEDDED_PRESET),
    ("nanotulu.train_rlvr", train_rlvr.RLVRConfig, train_rlvr.EMBEDDED_PRESET)])
def test_trainer_help_shows_every_default_and_the_embedded_preset(module, cls, preset):
    # each flag's group, description and default: tests/test_help.py; here the embedded preset after them
    text = help_text(module)
    for f in dataclasses.fields(cls):
        assert f.name == "exit_after_steps" or f"--{f.name} " in text, f.name
    tail = text[text.index("with no --model (the embedded default)"):]
    for k, v in preset.items():
        assert f"{k}={v}" in tail, k
    if module == "nanotulu.train_sft":
        assert "--lr FLOAT peak learning rate (default: 5e-06)" in text
        assert "max_seq_len=384, epochs=1, lr=0.001" in tail


NO_DEFAULT = {"nanotulu.eval": ("--model", "--data", "--tokenizer", "--template", "--add_bos", "--compile"),
              "nanotulu.decontam": ("--train", "--eval", "--out", "--eval_field")}


@pytest.mark.parametrize("module", ["nanotulu.eval", "nanotulu.decontam", "nanotulu.pipeline", "nanotulu.embedded"])
def test_other_entry_points_show_every_default(module):
    text = help_text(module)
    usage = text[:text.index("options:")]
    flags = list(dict.fromkeys(re.findall(r"(--[a-z_]+)", usage)))
    assert len(flags) >= 2
    for flag, entry in help_entries(text, flags).items():
        # a default shown, except where there is none: required flags, switches, and None (the text says what then)
        assert "default" in entry or flag in NO_DEFAULT.get(module, ()), (module, flag, entry)
    assert "(default: None)" not in text
    if module == "nanotulu.decontam":
        assert "--eval_field" in text and "--eval-field" not in text


def test_decontam_old_flag_spelling_still_works(tmp_path):
    from nanotulu import decontam

    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": chat(i)} for i in range(3)])
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"q": "What is 1 + 1?"}])
    for flag in ("--eval_field", "--eval-field"):
        out = tmp_path / flag.strip("-")
        decontam.main(["--train", train, "--eval", ev, "--out", str(out), "--eval_field" if flag == "--eval_field"
                       else "--eval-field", "q", "--ngram", "4"])
        assert json.load(open(out / "report.json"))["eval"][0]["field"] == "q"
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match="--out .*f: is a file"):
        decontam.main(["--train", train, "--eval", ev, "--out", str(tmp_path / "f")])


def test_embedded_writes_assets_only_when_asked(tmp_path):
    from nanotulu import embedded

    before = {n: os.stat(embedded.asset(n)).st_mtime_ns for n in os.listdir(embedded.ASSETS)}
    for args in ([], ["--help"]):
        out = subprocess.run([sys.executable, "-m", "nanotulu.embedded", *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "--write" in out.stdout, out.stderr
    assert before == {n: os.stat(embedded.asset(n)).st_mtime_ns for n in os.listdir(embedded.ASSETS)}
    embedded.main(["--write", "--out_dir", str(tmp_path)])
    for name in before:  # the generator still makes exactly the shipped files
        assert (tmp_path / name).read_bytes() == open(embedded.asset(name), "rb").read(), name


def test_rlvr_and_eval_take_the_data_mix_syntax(tmp_path):
    rows = [{"messages": chat(i)[:1], "ground_truth": str(i % 7 + i % 5), "dataset": "gsm8k"} for i in range(4)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows[:2])
    mixed = rewards.load_rlvr_mix(f"{a}:6,{b}:0.5", seed=1)
    # 6 of 4 rows: each row once in file order, then 2 more drawn without replacement; 0.5 of 2 rows: one row
    assert [r["source"] for r in mixed[:4]] == [f"{a}:{n}" for n in range(1, 5)]
    assert len(mixed) == 7 and len({r["source"] for r in mixed[4:6]}) == 2 and mixed[6]["source"].startswith(b)
    cfg = train_rlvr.RLVRConfig(model="m", data=f"{a}:3", eval_data=f"{b}")
    tasks, prompts, eval_rows = train_rlvr.load_tasks(cfg, False, data.load_tokenizer("byte"), "tulu")
    assert len(tasks) == len(prompts) == 3 and len(eval_rows) == 2


def test_missing_optional_dependency_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"reading Parquet needs pyarrow.*pip install 'nanotulu\[data\]'"):
        data.read_rows(str(path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'nanotulu\[plot\]'"):
        data.optional_import("matplotlib", "plot", "the pipeline's curves.png")

"""--report_to: the JSONL file always, TensorBoard and Weights & Biases (offline mode) receiving the same rows, read
back with each package's own reader; unknown or missing loggers fail with a clear error."""

import glob
import json
import os
import sys
import time

import pytest

from nanotulu import run

ROWS = [{"loss": 2.5, "lr": 1e-4, "tok/s": 100.0}, {"loss": 2.0, "lr": 2e-4, "tok/s": 110.0},
        {"loss": 1.5, "lr": 1e-4, "tok/s": 120.0, "note": "text is JSONL only"}]


def log_rows(out_dir, report_to):
    m = run.Metrics(os.path.join(out_dir, "metrics.jsonl"), len(ROWS), 0, desc="t", report_to=report_to,
                       config={"lr": 1e-4})
    for step, row in enumerate(ROWS, start=1):
        m.log(step, row)
    m.close()
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_jsonl_always(tmp_path):
    assert log_rows(str(tmp_path), "jsonl") == [{"step": i + 1, **r} for i, r in enumerate(ROWS)]


def test_tensorboard_gets_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_rows(str(tmp_path), "jsonl,tensorboard")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr", "tok/s"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.0), (3, 1.5)]


def wandb_history(path):
    """The history rows of an offline .wandb file: W&B's record log (a LevelDB-style log of 32 KiB blocks, each
    record chunk behind a 7-byte header: crc 4, length 2, type 1 = full / 2 first / 3 middle / 4 last, after a
    7-byte file header) of wandb_internal_pb2.Record protobufs; None until the run's exit record is on disk."""
    from wandb.proto import wandb_internal_pb2 as pb

    b = open(path, "rb").read()
    pos, chunk, rows, finished = 7, b"", [], False
    while pos + 7 <= len(b):
        if 32768 - pos % 32768 < 7:  # a block tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = int.from_bytes(b[pos + 4:pos + 6], "little"), b[pos + 6]
        if n == 0 and kind == 0:
            break
        chunk += b[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            finished = finished or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows if finished else None


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_rows(str(tmp_path), "jsonl,wandb")
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1
    for _ in range(120):  # W&B's own process may still be writing after finish() returns
        history = wandb_history(runs[0])
        if history is not None:
            break
        time.sleep(0.5)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, row in zip(history, ROWS):
        assert {k: h[k] for k in ("loss", "lr", "tok/s")} == {k: row[k] for k in ("loss", "lr", "tok/s")}
        assert "note" not in h


def test_unknown_or_missing_logger(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--report_to 'jsonl,mlflow': unknown logger 'mlflow'"):
        run.open_reporters("jsonl,mlflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with pytest.raises(ImportError, match=r"--report_to wandb: the wandb package is not installed \(pip install "
                                          r"'nanotulu\[wandb\]'\)"):
        run.open_reporters("wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"nanotulu\[tensorboard\]"):
        run.open_reporters("jsonl,tensorboard", None)

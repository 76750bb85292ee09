"""Loading RLVR rows (messages, ground_truth, dataset) with every ground truth validated at load time."""

from nanotulu.rewards.dispatch import verifier_pairs
from nanotulu.rewards.gsm8k import parse_number
from nanotulu.rewards.ifeval import parse_ifeval_ground_truth

def _validate_ground_truth(name, gt):
    """Raises ValueError when gt cannot be used by verifier `name` (checked once, at load time)."""
    if name == "gsm8k":
        if isinstance(gt, bool) or not isinstance(gt, (str, int, float)) or parse_number(str(gt)) is None:
            raise ValueError(f"gsm8k ground truth must be a number, got {gt!r}")
    elif name == "math":
        if not isinstance(gt, str) or not gt.strip():
            raise ValueError(f"math ground truth must be a non-empty LaTeX string, got {gt!r}")
    elif name == "ifeval":
        parse_ifeval_ground_truth(gt)
    elif name == "string_match":
        if not isinstance(gt, str) or not gt.strip():
            raise ValueError(f"string_match ground truth must be a non-empty string, got {gt!r}")


def load_rlvr_rows(path):
    """Reads RLVR rows (messages, ground_truth, dataset) from JSONL/Parquet and validates every row ->
    [dict(prompt_messages, ground_truth, dataset, source="path:line")]. A final assistant message is the reference
    answer and is dropped from the prompt. Errors name the file, line and field."""
    from nanotulu.data import read_rows

    rows = []
    for line_no, row in read_rows(path):
        where = f"{path}:{line_no}"
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list of messages")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"{where}: messages[{k}] must be a dict with role system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{k}].content must be a string")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]  # the reference answer
        if not prompt or prompt[-1]["role"] != "user":
            raise ValueError(f"{where}: field 'messages': the prompt (without a final assistant answer) must end "
                             "with a user message")
        if "ground_truth" not in row or row["ground_truth"] is None:
            raise ValueError(f"{where}: missing field 'ground_truth'")
        if "dataset" not in row or row["dataset"] is None:
            raise ValueError(f"{where}: missing field 'dataset' (the verifier name)")
        dataset = row["dataset"]
        if isinstance(dataset, str):
            dataset = dataset.lower()
        elif isinstance(dataset, list) and dataset and all(isinstance(d, str) for d in dataset):
            dataset = [d.lower() for d in dataset]
        else:
            raise ValueError(f"{where}: field 'dataset' must be a verifier name or a non-empty list of names")
        ground_truth = row["ground_truth"]
        try:
            for name, gt in verifier_pairs(dataset, ground_truth):
                _validate_ground_truth(name, gt)
        except ValueError as e:
            field = "dataset" if str(e).startswith("unknown verifier") else "ground_truth"
            raise ValueError(f"{where}: field '{field}': {e}") from None
        rows.append({"prompt_messages": prompt, "ground_truth": ground_truth, "dataset": dataset, "source": where})
    return rows

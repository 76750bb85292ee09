"""nanotulu's IFEval verifier against IFEval's reference implementation (lm-eval's copy of Google's code) on Google's
published GPT-4 responses: at least 99.5% of the instruction checks agree. Reads ../shared/data (the repo's parent);
skipped when the data or lm-eval (the `ifeval-ref` extra) is absent. See bench/ifeval_agreement.py."""

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ifeval_agreement.py"
_SPEC = importlib.util.spec_from_file_location("ifeval_agreement", _SCRIPT)
ifeval_agreement = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ifeval_agreement)


def test_agreement_with_ifeval_reference():
    for path in (ifeval_agreement.RESPONSES, ifeval_agreement.INPUT_DATA):
        if not path.exists():
            pytest.skip(f"{path} is absent (Google's IFEval responses and input_data.jsonl, read from ../shared)")
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval (IFEval's reference implementation) is not installed: pip install -e '.[ifeval-ref]'")
    pairs = ifeval_agreement.load_examples(ifeval_agreement.RESPONSES, ifeval_agreement.INPUT_DATA)
    checks, disagreements = ifeval_agreement.agreement(pairs)
    assert checks >= 800  # the 541 responses hold 834 checks
    assert (checks - len(disagreements)) / checks >= 0.995, disagreements

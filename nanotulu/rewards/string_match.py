"""string_match verifier: the text inside the last `<answer>...</answer>` (else the whole response) equals the ground
truth after lower-casing and removing punctuation, articles and extra spaces."""

import re
import string

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text):
    """SQuAD-style normal form: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT_TABLE)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def verify_string_match(response, ground_truth):
    """1.0 when the last <answer>...</answer> (else the whole response) equals the ground truth after
    normalize_answer, else 0.0."""
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"string_match ground truth must be a non-empty string, got {ground_truth!r}")
    tagged = re.findall(r"<answer>(.*?)</answer>", response, flags=re.DOTALL)
    answer = tagged[-1] if tagged else response.split("</think>")[-1]
    return float(normalize_answer(answer) == normalize_answer(ground_truth))

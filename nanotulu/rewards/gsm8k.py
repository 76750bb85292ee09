"""gsm8k verifier: the last number in the response (thousands commas removed, signs and decimals kept) equals the
ground truth numerically ("18.00" == "18"). The ground truth must be a number."""

import re
from decimal import Decimal, InvalidOperation


# "1,234,567.5" -> "1234567.5": a comma followed by exactly three digits inside a number is a thousands separator;
# "3,4,5" (a list) is left alone.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number, with a minus sign only when the '-' is not a hyphen or an operator between words/numbers ("pages 10-12"
# ends in 12, not -12; "5-3=2" ends in 2).
_NUMBER = re.compile(r"(?:(?<![\w.)\]])-)?(?:\d+(?:\.\d+)?|\.\d+)")
# The Unicode minus sign (U+2212, typeset math: "−5") reads as '-'; other dashes (en dash in "10–12") stay ranges.
_MINUS = "\u2212"


def parse_number(text):
    """'1,234.50' -> Decimal('1234.50'); None when the text is not one number."""
    try:
        return Decimal(_THOUSANDS.sub("", text.strip()).replace("$", "").replace(_MINUS, "-").strip())
    except InvalidOperation:
        return None


def extract_last_number(response):
    """The last number of a response as a Decimal (thousands commas removed), or None."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", response.replace(_MINUS, "-")))
    return Decimal(numbers[-1]) if numbers else None


def verify_gsm8k(response, ground_truth):
    """1.0 when the last number in the response equals the numeric ground truth ("18.0" == "18"), else 0.0."""
    target = parse_number(str(ground_truth))
    if target is None:
        raise ValueError(f"gsm8k ground truth must be a number, got {ground_truth!r}")
    answer = extract_last_number(response)
    return float(answer is not None and answer == target)

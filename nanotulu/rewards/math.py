"""math verifier: the answer is taken from the last `\\boxed{}`, else a "Final Answer: ..." line, else the last
`$...$`, else the whole text, and compared with the ground truth for mathematical equivalence by math-verify (1/2 ==
0.5 == \\dfrac12, units and `^\\circ` dropped). The ground truth is raw LaTeX as in the Tulu 3 MATH data
(`\\frac{1}{2}`, no `$`): math-verify finds no LaTeX in it unless it is wrapped, so we wrap it in `\\boxed{}` before
parsing.

This module is named after its verifier; the package's other modules import the standard library's math absolutely
(`import math`), which this file never shadows.
"""

import re
import threading
from functools import lru_cache

# Seconds math-verify may spend on one parse / comparison (its own SIGALRM timeout). In worker processes this is set
# just above the pool's per-answer timeout, so that the pool's kill is what normally stops a hanging answer.
MATH_TIMEOUT_S = 5


def _last_braced(text, command):
    """Content of the last `command{...}` in text, braces balanced; `\\boxed 5` (no braces) gives '5'."""
    start = text.rfind(command)
    while start >= 0:
        i = start + len(command)
        if text.startswith("{", i):
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            # unbalanced (a cut-off answer): look for an earlier, complete one
        elif text.startswith(" ", i):
            token = text[i + 1 :].split("$")[0].split()
            if token:
                return token[0]
        start = text.rfind(command, 0, start)
    return None


_FINAL_ANSWER = re.compile(r"final answer\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)
_MINERVA_TAIL = re.compile(r"^\s*the final answer is\s*|\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)
# $$...$$ or $...$; an escaped dollar (\$, a currency sign in LaTeX) neither opens nor closes math mode, so
# "$\$18.90$" holds "\$18.90".
_DOLLARS = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$((?:\\.|[^\\$])+?)\$", re.DOTALL)


def extract_math_answer(response):
    """-> (answer text, how): the last \\boxed{} (or \\fbox{}), else the last "Final Answer: ..." line (Minerva:
    "Final Answer: The final answer is $x$. I hope it is correct."), else the last $...$, else the whole response."""
    boxed = _last_braced(response, "\\boxed")
    if boxed is None:
        boxed = _last_braced(response, "\\fbox")
    if boxed is not None:
        return boxed.strip(), "boxed"
    finals = _FINAL_ANSWER.findall(response)
    if finals:
        line = _MINERVA_TAIL.sub("", finals[-1].strip())
        inner = _DOLLARS.findall(line)
        answer = (inner[-1][0] or inner[-1][1]) if inner else line
        return answer.strip().rstrip("."), "final_answer"
    dollars = _DOLLARS.findall(response)
    if dollars:
        return (dollars[-1][0] or dollars[-1][1]).strip(), "dollars"
    return response.strip(), "raw"


def _normalize_latex(s):
    """Cheap normal form for the exact-match fast path (no sympy): '\\dfrac{1}{2}.' -> '\\frac{1}{2}'."""
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("$", "")
    return re.sub(r"\s+", "", s).rstrip(".")


_INTEGER = re.compile(r"^-?\d{1,30}$")


def _math_timeouts():
    # SIGALRM only works in the main thread: elsewhere run math-verify without its timeout.
    if threading.current_thread() is threading.main_thread():
        return MATH_TIMEOUT_S
    return None


@lru_cache(maxsize=4096)
def _parse_math_gold(ground_truth):
    from math_verify import LatexExtractionConfig, parse  # lazy: ~0.7 s import, only math rows need it

    return parse("\\boxed{" + ground_truth + "}", [LatexExtractionConfig()], parsing_timeout=_math_timeouts())


def verify_math(response, ground_truth):
    """1.0 when the extracted answer is mathematically equivalent to the raw-LaTeX ground truth (math-verify)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as math_verify_equal

    ground_truth = str(ground_truth).strip()
    if not ground_truth:
        raise ValueError("math ground truth is empty")
    answer, how = extract_math_answer(response)
    if not answer:
        return 0.0
    norm_answer, norm_truth = _normalize_latex(answer), _normalize_latex(ground_truth)
    if norm_answer == norm_truth:
        return 1.0  # fast path, no sympy
    if _INTEGER.match(norm_answer) and _INTEGER.match(norm_truth):
        return float(int(norm_answer) == int(norm_truth))  # two plain integers: exact, sympy would agree
    timeout = _math_timeouts()
    gold = _parse_math_gold(ground_truth)
    if how == "raw":
        # No delimiters: let math-verify find the last expression itself (LaTeX or plain "1/2").
        pred = parse(answer, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout)
    else:
        pred = parse("\\boxed{" + answer + "}", [LatexExtractionConfig()], parsing_timeout=timeout)
        if not pred:
            pred = parse(answer, [ExprExtractionConfig()], parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return float(math_verify_equal(gold, pred, timeout_seconds=timeout))

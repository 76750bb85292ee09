"""Verifiable rewards for RLVR: verifiers, batch verification in worker processes, and the RLVR row loader.

A verifier maps (response, ground_truth) -> score in [0, 1]. The RL reward is the score times `scale` (Tulu 3: 10),
or `nonstop_penalty` for an answer cut off by the length limit when a penalty is set.

Verifiers (`VERIFIERS`, names as in the `dataset` column, compared lower-case):
- gsm8k: the last number in the response (thousands commas removed, signs and decimals kept) equals the ground truth
  numerically ("18.00" == "18"). The ground truth must be a number.
- math: the answer is taken from the last `\\boxed{}`, else a "Final Answer: ..." line, else the last `$...$`, else the
  whole text, and compared with the ground truth for mathematical equivalence by math-verify (1/2 == 0.5 == \\dfrac12,
  units and `^\\circ` dropped). The ground truth is raw LaTeX as in the Tulu 3 MATH data (`\\frac{1}{2}`, no `$`):
  math-verify finds no LaTeX in it unless it is wrapped, so we wrap it in `\\boxed{}` before parsing.
- ifeval: instruction following. Three ground-truth formats are read (a JSON string or an already-parsed object):
    1. Google IFEval: {"instruction_id_list": [ids], "kwargs": [one dict of arguments per id]}.
    2. open-instruct IFEvalG (Tulu 3.1+ data): [{"instruction_id": [ids], "kwargs": [...]}] (JSON or Python literal).
    3. Tulu 3 RLVR-IFeval: {"func_name": "validate_lowercase", "N": null, ...}: one checking function of
       open-instruct's `if_functions` and its arguments (null = unused); see `TULU_IF_FUNCTIONS`.
  Score = fraction of instructions followed (all-or-nothing with `ifeval_all_or_nothing=True`). An empty answer scores
  0 (otherwise "no commas" would reward saying nothing). Text up to a closing `</think>` is ignored.
- string_match: the text inside the last `<answer>...</answer>` (else the whole response) equals the ground truth
  after lower-casing and removing punctuation, articles and extra spaces.

Several verifiers per row: `dataset` may be a list; the score is the mean of the verifiers' scores. `ground_truth`
is then either one value shared by all verifiers, or a list with one ground truth per verifier (same length).

Batch verification (`verify_batch`) runs in worker processes (forkserver, else spawn: math-verify's timeouts use
SIGALRM, which only works in a process's main thread) with a timeout per answer: a worker stuck on an answer is killed
and replaced, a worker that dies is replaced, and the answer it held scores 0 and is counted. Answers longer than
`max_chars` score 0 without any work. The pool persists across calls (RLVR calls once per rollout batch) and is shut
down at exit. `workers=0` verifies in-process: fastest for cheap verifiers (gsm8k, simple ifeval), but with no
protection from a hanging answer beyond math-verify's own timeouts.

language:response_language without langdetect: `detect_language` is a small heuristic. The Unicode script decides
the language where only one language of IFEval's list uses it (Thai, Hangul, Hebrew, Bengali, Gurmukhi, Gujarati,
Tamil, Telugu, Kannada, Malayalam); Han without kana is Chinese, with kana Japanese; Arabic script is Urdu or Persian
when their extra letters show, else Arabic; Cyrillic is Ukrainian or Bulgarian by their distinctive letters/words,
else Russian; Devanagari is Marathi or Nepali by a few frequent words, else Hindi; Latin script is decided by counting
frequent function words of each Latin-script language (plus Vietnamese and Polish letters), English when nothing
else scores more. It is right on ordinary sentences (see the tests), not on short or mixed-language text.
"""

import ast
import atexit
import collections
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import string
import threading
import time
from decimal import Decimal, InvalidOperation
from functools import lru_cache

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# gsm8k
# ---------------------------------------------------------------------------------------------------------------------

# "1,234,567.5" -> "1234567.5": a comma followed by exactly three digits inside a number is a thousands separator;
# "3,4,5" (a list) is left alone.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number, with a minus sign only when the '-' is not a hyphen or an operator between words/numbers ("pages 10-12"
# ends in 12, not -12; "5-3=2" ends in 2).
_NUMBER = re.compile(r"(?:(?<![\w.)\]])-)?(?:\d+(?:\.\d+)?|\.\d+)")


def _parse_number(text):
    """'1,234.50' -> Decimal('1234.50'); None when the text is not one number."""
    try:
        return Decimal(_THOUSANDS.sub("", text.strip()).replace("$", "").strip())
    except InvalidOperation:
        return None


def extract_last_number(response):
    """The last number of a response as a Decimal (thousands commas removed), or None."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", response))
    return Decimal(numbers[-1]) if numbers else None


def verify_gsm8k(response, ground_truth):
    """1.0 when the last number in the response equals the numeric ground truth ("18.0" == "18"), else 0.0."""
    target = _parse_number(str(ground_truth))
    if target is None:
        raise ValueError(f"gsm8k ground truth must be a number, got {ground_truth!r}")
    answer = extract_last_number(response)
    return float(answer is not None and answer == target)


# ---------------------------------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------------------------------

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
_DOLLARS = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$", re.DOTALL)


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


# ---------------------------------------------------------------------------------------------------------------------
# ifeval: language heuristic (langdetect is not available)
# ---------------------------------------------------------------------------------------------------------------------

# (first code point, last code point, language or script name) for scripts that mark their language.
_SCRIPTS = [
    (0x0E00, 0x0E7F, "th"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"), (0x3130, 0x318F, "ko"),
    (0x0590, 0x05FF, "he"), (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"), (0x0A80, 0x0AFF, "gu"),
    (0x0B80, 0x0BFF, "ta"), (0x0C00, 0x0C7F, "te"), (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"),
    (0x3040, 0x30FF, "kana"), (0x4E00, 0x9FFF, "han"), (0x3400, 0x4DBF, "han"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0x0400, 0x04FF, "cyrillic"), (0x0900, 0x097F, "devanagari"),
]

# Frequent function words of the Latin-script languages in IFEval's list (our own short lists).
_LATIN_WORDS = {
    "en": "the and is are of to in that it you with for this was have not be on as at by they what which we".split(),
    "es": "el la los las que y en un una es por con para no se del lo su como más pero muy está son".split(),
    "pt": "o os as que e em um uma é não do da dos das para com por se mais mas você muito são está".split(),
    "fr": "le la les de des et est un une que qui en du pas pour dans ce il je vous nous sur avec au sont".split(),
    "de": "der die das und ist nicht ein eine zu den von mit sich auf für dem es ich sie auch wir im sind".split(),
    "it": "il lo la gli le di che e è un una non per con del della sono anche ma questo nel alla".split(),
    "sw": "na ya wa kwa ni katika za cha hii kuwa yake lakini pia sana wewe mimi hapa watu kama".split(),
    "fi": "ja on ei se että hän oli ovat mutta kun joka tämä myös niin kuin minä sinä hyvin mitä".split(),
    "pl": "i w nie na się z że do to jest jak ale od po tak za co jego czy być".split(),
    "vi": "và là của có không những một các trong được cho người này với đã để khi tôi bạn".split(),
}
_VIETNAMESE_LETTERS = set("ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ")
_POLISH_LETTERS = set("ąćęłńśźż")

# Language names IFEval may ask for (ISO 639-1), as in its instructions_util.LANGUAGE_CODES.
IFEVAL_LANGUAGES = (
    "en es pt ar hi fr ru de ja it bn uk th ur ta te bg ko pl he fa vi ne sw kn mr gu pa ml fi zh".split()
)


def detect_language(text):
    """A small script + function-word heuristic standing in for langdetect (see the module docstring). Returns an
    ISO 639-1 code, or None when the text has no letters."""
    counts = collections.Counter()
    for ch in text:
        cp = ord(ch)
        if cp < 0x80:
            if ch.isalpha():
                counts["latin"] += 1
            continue
        for lo, hi, name in _SCRIPTS:
            if lo <= cp <= hi:
                counts[name] += 1
                break
        else:
            if ch.isalpha():
                counts["latin"] += 1  # accented Latin letters and anything unlisted
    if not counts:
        return None
    if counts["kana"]:
        counts["han"] += counts.pop("kana")
        script = max(counts, key=counts.get)
        return "ja" if script == "han" else script if script != "latin" else _latin_language(text)
    script = max(counts, key=counts.get)
    if script == "han":
        return "zh"
    if script == "arabic":
        if re.search("[ٹڈڑںےھ]", text):
            return "ur"
        if re.search("[پچژگی]", text):
            return "fa"
        return "ar"
    if script == "cyrillic":
        if re.search("[їєґі]", text.lower()):
            return "uk"
        if re.search(r"\b(?:съм|със|във|това|които|ще)\b", text.lower()):
            return "bg"
        return "ru"
    if script == "devanagari":
        if re.search("(?:आहे|आणि|आहेत)", text):
            return "mr"
        if re.search("(?:छ|हुन्छ|गर्न)", text):
            return "ne"
        return "hi"
    if script == "latin":
        return _latin_language(text)
    return script


def _latin_language(text):
    lowered = text.lower()
    letters = collections.Counter(ch for ch in lowered if ch in _VIETNAMESE_LETTERS or ch in _POLISH_LETTERS)
    words = re.findall(r"[^\W\d_]+", lowered)
    scores = {lang: 0.0 for lang in _LATIN_WORDS}
    vocab = {lang: set(ws) for lang, ws in _LATIN_WORDS.items()}
    for w in words:
        for lang, ws in vocab.items():
            if w in ws:
                scores[lang] += 1
    scores["vi"] += sum(n for ch, n in letters.items() if ch in _VIETNAMESE_LETTERS)
    scores["pl"] += sum(n for ch, n in letters.items() if ch in _POLISH_LETTERS)
    best = max(scores, key=scores.get)
    # English wins ties and texts without evidence (all-caps headlines, lists of names).
    return best if scores[best] > scores["en"] else "en"


# ---------------------------------------------------------------------------------------------------------------------
# ifeval: Google IFEval's 25 instruction types
# ---------------------------------------------------------------------------------------------------------------------

_RELATIONS = ("less than", "at least")


def _compare(count, relation, threshold):
    return count < threshold if relation == "less than" else count >= threshold


def count_words(text):
    """IFEval counts `\\w+` tokens (nltk's RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


_ABBREVIATIONS = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Prof|Sr|Jr|Inc|Ltd|Co|vs|etc|No|Fig|approx)\.", re.IGNORECASE)


def split_sentences(text):
    """Sentences ending in . ! or ? followed by a space or the end. Periods of abbreviations (Mr., e.g., U.S.),
    decimals (3.14), web addresses (example.com) and ellipses do not end a sentence. An approximation of IFEval's
    regex splitter; text without a final stop counts as a sentence."""
    t = " " + text.replace("\n", " ") + " "
    t = _ABBREVIATIONS.sub(r"\1<prd>", t)
    t = re.sub(r"\b(e\.g|i\.e|a\.m|p\.m)\.", lambda m: m.group(1).replace(".", "<prd>") + "<prd>", t, flags=re.I)
    t = re.sub(r"\b([A-Z])\.(?=[A-Z]\.)", r"\1<prd>", t)  # U.S.A.
    t = re.sub(r"(\d)\.(\d)", r"\1<prd>\2", t)
    t = re.sub(r"\.(com|org|net|edu|gov|io)\b", r"<prd>\1", t)
    t = t.replace("...", "<prd><prd><prd>")
    parts = re.split(r"(?<=[.!?])[\"')\]]*\s+", t)
    return [p.replace("<prd>", ".").strip() for p in parts if p.replace("<prd>", "").strip(" .!?\"')]")]


def _keywords_existence(text, *, keywords):
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def _keywords_frequency(text, *, keyword, frequency, relation):
    return _compare(len(re.findall(re.escape(keyword.strip()), text, flags=re.IGNORECASE)), relation, frequency)


def _keywords_forbidden_words(text, *, forbidden_words):
    return not any(re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE) for w in forbidden_words)


def _keywords_letter_frequency(text, *, letter, let_frequency, let_relation):
    return _compare(text.lower().count(letter.strip().lower()), let_relation, let_frequency)


def _language_response_language(text, *, language):
    detected = detect_language(text)
    return detected is None or detected == language  # IFEval: undetectable counts as followed


def _length_number_sentences(text, *, num_sentences, relation):
    return _compare(len(split_sentences(text)), relation, num_sentences)


def _length_number_paragraphs(text, *, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1  # a divider at the very start or end
            else:
                return False  # two dividers in a row
    return count == num_paragraphs


def _length_number_words(text, *, num_words, relation):
    return _compare(count_words(text), relation, num_words)


def _length_nth_paragraph_first_word(text, *, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", text)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def _content_number_placeholders(text, *, num_placeholders):
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def _content_postscript(text, *, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.search(pattern, text.lower(), flags=re.MULTILINE))


def _format_number_bullet_lists(text, *, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _format_constrained_response(text):
    return any(option in text.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def _format_number_highlighted_sections(text, *, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def _format_multiple_sections(text, *, section_spliter, num_sections):
    sections = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(sections) - 1 >= num_sections


def _format_json_format(text):
    body = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _format_title(text):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _combination_two_responses(text):
    parts = text.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False  # an empty response between two separators
    return len(answers) == 2 and answers[0] != answers[1]


def _combination_repeat_prompt(text, *, prompt_to_repeat):
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _startend_end_checker(text, *, end_phrase):
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _case_capital_word_frequency(text, *, capital_frequency, capital_relation):
    # IFEval tokenizes with nltk.word_tokenize; \w+ words differ only in contractions ("DON'T": 2 words in both).
    capitals = [w for w in re.findall(r"\w+", text) if w.isupper()]
    return _compare(len(capitals), capital_relation, capital_frequency)


def _case_english_capital(text):
    return text.isupper() and detect_language(text) in ("en", None)


def _case_english_lowercase(text):
    return text.islower() and detect_language(text) in ("en", None)


def _punctuation_no_comma(text):
    return "," not in text


def _startend_quotation(text):
    t = text.strip()
    return len(t) > 1 and t[0] == '"' and t[-1] == '"'


# The 25 instruction types of Google's IFEval, id -> checker(text, **kwargs) -> bool, with IFEval's argument names:
#   keywords:existence                       keywords
#   keywords:frequency                       keyword, frequency, relation
#   keywords:forbidden_words                 forbidden_words
#   keywords:letter_frequency                letter, let_frequency, let_relation
#   language:response_language               language (ISO 639-1, see IFEVAL_LANGUAGES; heuristic detection)
#   length_constraints:number_sentences      num_sentences, relation
#   length_constraints:number_paragraphs     num_paragraphs (paragraphs separated by ***)
#   length_constraints:number_words          num_words, relation
#   length_constraints:nth_paragraph_first_word  num_paragraphs, nth_paragraph, first_word (paragraphs split by \n\n)
#   detectable_content:number_placeholders   num_placeholders
#   detectable_content:postscript            postscript_marker
#   detectable_format:number_bullet_lists    num_bullets
#   detectable_format:constrained_response   -
#   detectable_format:number_highlighted_sections  num_highlights
#   detectable_format:multiple_sections      section_spliter (sic), num_sections
#   detectable_format:json_format            -
#   detectable_format:title                  -
#   combination:two_responses                -
#   combination:repeat_prompt                prompt_to_repeat
#   startend:end_checker                     end_phrase
#   change_case:capital_word_frequency       capital_frequency, capital_relation
#   change_case:english_capital              -
#   change_case:english_lowercase            -
#   punctuation:no_comma                     -
#   startend:quotation                       -
# relation arguments are "less than" or "at least".
IFEVAL_INSTRUCTIONS = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keywords_frequency,
    "keywords:forbidden_words": _keywords_forbidden_words,
    "keywords:letter_frequency": _keywords_letter_frequency,
    "language:response_language": _language_response_language,
    "length_constraints:number_sentences": _length_number_sentences,
    "length_constraints:number_paragraphs": _length_number_paragraphs,
    "length_constraints:number_words": _length_number_words,
    "length_constraints:nth_paragraph_first_word": _length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": _content_number_placeholders,
    "detectable_content:postscript": _content_postscript,
    "detectable_format:number_bullet_lists": _format_number_bullet_lists,
    "detectable_format:constrained_response": _format_constrained_response,
    "detectable_format:number_highlighted_sections": _format_number_highlighted_sections,
    "detectable_format:multiple_sections": _format_multiple_sections,
    "detectable_format:json_format": _format_json_format,
    "detectable_format:title": _format_title,
    "combination:two_responses": _combination_two_responses,
    "combination:repeat_prompt": _combination_repeat_prompt,
    "startend:end_checker": _startend_end_checker,
    "change_case:capital_word_frequency": _case_capital_word_frequency,
    "change_case:english_capital": _case_english_capital,
    "change_case:english_lowercase": _case_english_lowercase,
    "punctuation:no_comma": _punctuation_no_comma,
    "startend:quotation": _startend_quotation,
}

# ---------------------------------------------------------------------------------------------------------------------
# ifeval: Tulu 3 RLVR-IFeval's checking functions (open-instruct if_functions), by func_name. Their semantics differ
# from Google's (exact counts, "around", paragraphs split by "* * *", ...): the prompts of that data were written for
# these functions, so we follow them.
# ---------------------------------------------------------------------------------------------------------------------

_QUANTIFIERS = ("at least", "around", "at most")


def _quantified(count, quantifier, n, around_tolerance):
    if quantifier == "at least":
        return count >= n
    if quantifier == "at most":
        return count <= n
    return abs(count - n) <= around_tolerance


def _tulu_paragraph_count(text, *, N):
    cleaned = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = cleaned.split("* * *")
    return all(p.strip() for p in paragraphs) and len(paragraphs) == N


def _tulu_sentences(text, *, N, quantifier):
    count = len(re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?|!)\s", text))
    return _quantified(count, quantifier, N, 1)


def _tulu_paragraphs(text, *, N, first_word, i):
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and 1 <= i <= N and paragraphs[i - 1].strip().startswith(first_word)


def _tulu_postscript(text, *, postscript_marker):
    at = text.find(postscript_marker)
    return at >= 0 and len(text[at:].strip()) > len(postscript_marker)


def _tulu_two_responses(text):
    if text.count("******") != 1:
        return False
    first, second = text.split("******")
    return first.strip() != second.strip()


TULU_IF_FUNCTIONS = {
    "verify_keywords": lambda t, *, keyword_list: all(k.lower() in t.lower() for k in keyword_list),
    "verify_keyword_frequency": lambda t, *, word, N: re.findall(r"\b\w+\b", t.lower()).count(word.lower()) == N,
    "validate_forbidden_words": lambda t, *, forbidden_words: not any(w.lower() in t.lower() for w in forbidden_words),
    "verify_letter_frequency": lambda t, *, letter, N: t.count(letter) == N,
    "validate_response_language": lambda t, *, language: detect_language(t) in (language, None),
    "verify_paragraph_count": _tulu_paragraph_count,
    "validate_word_constraint": lambda t, *, N, quantifier: _quantified(
        len(t.split()), quantifier, N, max(round(N * 0.1), 1)
    ),
    "verify_sentence_constraint": _tulu_sentences,
    "validate_paragraphs": _tulu_paragraphs,
    "verify_postscript": _tulu_postscript,
    "validate_placeholders": lambda t, *, N: len(re.findall(r"\[(.*?)\]", t)) >= N,
    "verify_bullet_points": lambda t, *, N: sum(1 for l in t.split("\n") if l.strip().startswith(("*", "-"))) == N,
    "validate_title": lambda t: bool(re.search(r"<<(.*?)>>", t)),
    "validate_choice": lambda t, *, options: any(o in t for o in options),
    "validate_highlighted_sections": lambda t, *, N: len(re.findall(r"\*(.*?)\*", t)) >= N,
    "validate_sections": lambda t, *, N, section_splitter: len(
        re.split(r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?", t, flags=re.IGNORECASE)
    ) - 1 >= N,
    "validate_json_format": lambda t: _json_loads_ok(t),
    "validate_repeat_prompt": lambda t, *, original_prompt: t.startswith(original_prompt),
    "validate_two_responses": _tulu_two_responses,
    "validate_uppercase": lambda t: t == t.upper(),
    "validate_lowercase": lambda t: t == t.lower(),
    "validate_frequency_capital_words": lambda t, *, N, quantifier: _quantified(
        len(re.findall(r"\b[A-Z]+\b", t)), quantifier, N, max(round(N * 0.1), 1)
    ),
    "validate_end": lambda t, *, end_phrase: t.endswith(end_phrase),
    "validate_quotation": lambda t: t.startswith('"') and t.endswith('"'),
    "validate_no_commas": lambda t: "," not in t,
}


def _json_loads_ok(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# Argument name -> (kind, allowed values). Shared by both tables; checked when a ground truth is parsed.
_ARG_KINDS = {
    "keywords": "str_list", "forbidden_words": "str_list", "keyword_list": "str_list", "options": "str_list",
    "frequency": "int", "let_frequency": "int", "capital_frequency": "int", "num_sentences": "int",
    "num_paragraphs": "int", "num_words": "int", "nth_paragraph": "int", "num_placeholders": "int",
    "num_bullets": "int", "num_highlights": "int", "num_sections": "int", "N": "int", "i": "int",
    "relation": _RELATIONS, "let_relation": _RELATIONS, "capital_relation": _RELATIONS, "quantifier": _QUANTIFIERS,
    "language": tuple(IFEVAL_LANGUAGES), "letter": "letter",
}


def _check_args(name, fn, kwargs):
    """Validates kwargs against fn's keyword-only parameters and _ARG_KINDS -> clean kwargs (ints as int)."""
    code = fn.__code__
    wanted = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # IFEval parquet / Tulu data pad with nulls
    unknown = sorted(set(kwargs) - set(wanted))
    missing = sorted(set(wanted) - set(kwargs))
    if unknown or missing:
        raise ValueError(
            f"{name}: arguments {sorted(kwargs)} do not match the expected {list(wanted)}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (f" (missing: {missing})" if missing else "")
        )
    clean = {}
    for key, value in kwargs.items():
        kind = _ARG_KINDS.get(key, "str")
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
                raise ValueError(f"{name}: argument {key} must be a non-negative integer, got {value!r}")
            value = int(value)
        elif kind == "str_list":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name}: argument {key} must be a non-empty list of strings, got {value!r}")
        elif kind == "letter":
            if not isinstance(value, str) or len(value.strip()) != 1:
                raise ValueError(f"{name}: argument {key} must be one letter, got {value!r}")
        elif isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"{name}: argument {key} must be one of {list(kind)}, got {value!r}")
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}: argument {key} must be a non-empty string, got {value!r}")
        clean[key] = value
    return clean


@lru_cache(maxsize=65536)
def _parse_ifeval_text(text):
    try:
        return _parse_ifeval_obj(json.loads(text))
    except json.JSONDecodeError:
        pass
    try:
        obj = ast.literal_eval(text)  # IFEvalG data is a Python literal (None, single quotes)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"ifeval ground truth is neither JSON nor a Python literal: {text[:80]!r}") from e
    return _parse_ifeval_obj(obj)


def parse_ifeval_ground_truth(ground_truth):
    """Any of the three ifeval formats -> tuple of (checker, kwargs) pairs, validated. Raises ValueError."""
    if isinstance(ground_truth, str):
        return _parse_ifeval_text(ground_truth)
    return _parse_ifeval_obj(ground_truth)


def _parse_ifeval_obj(obj):
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]  # IFEvalG wraps the dict in a list
    if isinstance(obj, str):
        return _parse_ifeval_text(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"ifeval ground truth must be a JSON object, got {type(obj).__name__}")
    if "func_name" in obj:
        func_name = obj["func_name"]
        if func_name not in TULU_IF_FUNCTIONS:
            raise ValueError(f"unknown ifeval func_name {func_name!r}; known: {sorted(TULU_IF_FUNCTIONS)}")
        fn = TULU_IF_FUNCTIONS[func_name]
        args = {k: v for k, v in obj.items() if k != "func_name"}
        return ((fn, tuple(_check_args(func_name, fn, args).items())),)
    ids = obj.get("instruction_id_list", obj.get("instruction_id"))
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError("ifeval ground truth needs 'instruction_id_list' (a non-empty list of ids) or 'func_name'")
    kwargs_list = obj.get("kwargs", [{}] * len(ids))
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise ValueError(f"ifeval 'kwargs' must be a list of {len(ids)} dicts, one per instruction id")
    checks = []
    for iid, kwargs in zip(ids, kwargs_list):
        if iid not in IFEVAL_INSTRUCTIONS:
            raise ValueError(f"unknown ifeval instruction id {iid!r}; known: {sorted(IFEVAL_INSTRUCTIONS)}")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{iid}: kwargs must be a dict, got {type(kwargs).__name__}")
        fn = IFEVAL_INSTRUCTIONS[iid]
        checks.append((fn, tuple(_check_args(iid, fn, kwargs).items())))
    return tuple(checks)


def _strip_thinking(response):
    return response.split("</think>")[-1].replace("<answer>", "").replace("</answer>", "").strip()


def verify_ifeval(response, ground_truth, all_or_nothing=False):
    """Fraction of the ground truth's instructions the response follows (1.0/0.0 with all_or_nothing)."""
    checks = parse_ifeval_ground_truth(ground_truth)
    text = _strip_thinking(response)
    if not text:
        return 0.0
    followed = [bool(fn(text, **dict(kwargs))) for fn, kwargs in checks]
    if all_or_nothing:
        return float(all(followed))
    return sum(followed) / len(followed)


# ---------------------------------------------------------------------------------------------------------------------
# string_match
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch and rewards
# ---------------------------------------------------------------------------------------------------------------------

VERIFIERS = {
    "gsm8k": verify_gsm8k,
    "math": verify_math,
    "ifeval": verify_ifeval,
    "string_match": verify_string_match,
}


def _pairs(dataset, ground_truth):
    """(verifier name, ground truth) pairs of a row; see the module docstring for lists."""
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names:
        raise ValueError("dataset is an empty list")
    names = [n.lower() if isinstance(n, str) else n for n in names]
    for n in names:
        if n not in VERIFIERS:
            raise ValueError(f"unknown verifier {n!r}; known: {sorted(VERIFIERS)}")
    if len(names) > 1 and isinstance(ground_truth, list) and len(ground_truth) == len(names):
        return list(zip(names, ground_truth))
    return [(n, ground_truth) for n in names]


def verify(dataset, response, ground_truth, *, ifeval_all_or_nothing=False):
    """Score in [0, 1] of one response. `dataset` names the verifier, or is a list of names: then the score is the
    mean of their scores (ground_truth shared, or a list with one per verifier). Raises ValueError for an unknown
    verifier or a malformed ground truth."""
    scores = []
    for name, gt in _pairs(dataset, ground_truth):
        if name == "ifeval":
            scores.append(verify_ifeval(response, gt, all_or_nothing=ifeval_all_or_nothing))
        else:
            scores.append(VERIFIERS[name](response, gt))
    return sum(scores) / len(scores)


def score_to_reward(score, finished, *, scale=10.0, nonstop_penalty=None):
    """RL reward of a verifier score: score * scale, or nonstop_penalty (the reward itself, e.g. -10.0 or 0.0) for
    an answer cut off by the length limit (finished=False) when a penalty is set."""
    if not finished and nonstop_penalty is not None:
        return float(nonstop_penalty)
    return float(score) * scale


def reward(dataset, response, ground_truth, finished, *, scale=10.0, nonstop_penalty=None, **verify_kwargs):
    """score_to_reward(verify(...)); a cut-off answer with a penalty set is not verified at all."""
    if not finished and nonstop_penalty is not None:
        return float(nonstop_penalty)
    return score_to_reward(verify(dataset, response, ground_truth, **verify_kwargs), finished, scale=scale)


# ---------------------------------------------------------------------------------------------------------------------
# Batch verification in worker processes
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_MAX_CHARS = 100_000  # ~25k tokens; Tulu 3 answers are at most 2048 tokens


def _worker_main(conn):
    """Worker process: receives (math_timeout_s, chunk of [(index, dataset, response, ground_truth,
    all_or_nothing)]), sends back (index, status, score or message) per answer, in order. The parent times each
    answer from the previous reply."""
    global MATH_TIMEOUT_S
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business; it shuts us down
    try:
        verify_math("\\boxed{1}", "1")  # import math-verify and warm sympy before the first timed answer
        verify_math("\\boxed{\\frac{1}{2}}", "0.5")
    except Exception:
        pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        MATH_TIMEOUT_S, chunk = chunk
        for index, dataset, response, ground_truth, all_or_nothing in chunk:
            try:
                score = verify(dataset, response, ground_truth, ifeval_all_or_nothing=all_or_nothing)
                conn.send((index, "ok", score))
            except Exception as e:
                conn.send((index, "error", f"{type(e).__name__}: {e}"[:300]))


class _Pool:
    """A fixed number of worker processes, each fed one chunk at a time over its own pipe. Timing answers one by
    one in the parent lets us kill exactly the worker that hangs and re-queue the rest of its chunk."""

    def __init__(self, workers):
        methods = multiprocessing.get_all_start_methods()
        self.ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self.ctx.get_start_method() == "forkserver":
            # Import once in the fork server, so that a replacement worker starts in milliseconds. This only takes
            # effect if no forkserver is running yet in this process.
            self.ctx.set_forkserver_preload(["__main__", "nanotulu.rewards", "math_verify"])
        self.owner_pid = os.getpid()
        self.procs = [None] * workers
        self.conns = [None] * workers
        self.ready = [False] * workers
        self.start_failures = [0] * workers
        self.restarts = 0
        for w in range(workers):
            self._start(w)
        for w in range(workers):  # wait for all, so that the first batch is spread over every worker
            if self.conns[w].poll(120.0):
                try:
                    self.ready[w] = self.conns[w].recv()[0] == "ready"
                except (EOFError, OSError):
                    pass
        if not any(self.ready):
            self.close(kill=True)
            raise RuntimeError("no reward worker process could start")

    def _start(self, w):
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child_conn,), daemon=True)
        proc.start()
        child_conn.close()
        self.procs[w], self.conns[w], self.ready[w] = proc, parent_conn, False

    def _replace(self, w):
        proc = self.procs[w]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        self.conns[w].close()
        self.restarts += 1
        self._start(w)

    def run(self, tasks, timeout, chunk_size, math_timeout_s, startup_timeout=120.0):
        """tasks: [(index, dataset, response, ground_truth, all_or_nothing)] -> {index: (status, score)}."""
        results = {}
        queue = collections.deque(tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size))
        busy = {}  # worker -> [chunk, position in chunk, time the current answer started]
        started = {w: time.monotonic() for w in range(len(self.procs)) if not self.ready[w]}
        while queue or busy:
            now = time.monotonic()
            for w in range(len(self.procs)):
                if self.ready[w] and w not in busy and not self.procs[w].is_alive():
                    self._replace(w)  # died while idle (killed between calls)
                    started[w] = time.monotonic()
                if queue and self.ready[w] and w not in busy:
                    chunk = queue.popleft()
                    self.conns[w].send((math_timeout_s, chunk))
                    busy[w] = [chunk, 0, time.monotonic()]
            waiting = [self.conns[w] for w in busy] + [self.conns[w] for w in started]
            deadlines = [b[2] + timeout for b in busy.values()] + [t + startup_timeout for t in started.values()]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            for conn in multiprocessing.connection.wait(waiting, timeout=wait_s):
                w = self.conns.index(conn)
                while True:
                    try:
                        if not conn.poll():
                            break
                        msg = conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, OOM killer, os._exit)
                        if w in started:
                            self.start_failures[w] += 1
                            if self.start_failures[w] >= 3:
                                raise RuntimeError("a reward worker process died 3 times while starting") from None
                            self._replace(w)
                            started[w] = time.monotonic()
                            break
                        chunk, pos, _ = busy.pop(w)
                        results[chunk[pos][0]] = ("error", 0.0)
                        if pos + 1 < len(chunk):
                            queue.appendleft(chunk[pos + 1 :])
                        self._replace(w)
                        started[w] = time.monotonic()
                        break
                    if msg[0] == "ready":
                        self.ready[w] = True
                        self.start_failures[w] = 0
                        started.pop(w, None)
                        continue
                    index, status, value = msg
                    results[index] = (status, value) if status == "ok" else (status, 0.0, value)
                    busy[w][1] += 1
                    busy[w][2] = time.monotonic()
                    if busy[w][1] == len(busy[w][0]):
                        del busy[w]
                        break
            now = time.monotonic()
            for w in [w for w, b in busy.items() if now - b[2] > timeout]:
                chunk, pos, _ = busy.pop(w)
                results[chunk[pos][0]] = ("timeout", 0.0)
                if pos + 1 < len(chunk):
                    queue.appendleft(chunk[pos + 1 :])
                self._replace(w)
                started[w] = time.monotonic()
            for w in [w for w, t in started.items() if now - t > startup_timeout]:
                raise RuntimeError(f"a reward worker process did not start within {startup_timeout:.0f} s")
        return results

    def close(self, kill=False):
        if os.getpid() != self.owner_pid:
            return  # a forked child must not touch its parent's workers
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=0 if kill else 2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        for conn in self.conns:
            conn.close()


_POOL = None
_POOL_LOCK = threading.Lock()


def shutdown_pool():
    """Stops the persistent worker pool (also registered to run at exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown_pool)


def _get_pool(workers):
    global _POOL
    if _POOL is not None and _POOL.owner_pid != os.getpid():
        _POOL = None  # inherited through fork: the workers belong to the parent
    if _POOL is not None and len(_POOL.procs) != workers:
        _POOL.close()
        _POOL = None
    if _POOL is None:
        _POOL = _Pool(workers)
    return _POOL


def verify_batch(
    datasets,
    responses,
    ground_truths,
    *,
    workers=min(4, os.cpu_count() or 1),
    timeout=5.0,
    max_chars=DEFAULT_MAX_CHARS,
    ifeval_all_or_nothing=False,
    chunk_size=None,
):
    """Scores of many responses -> (scores: list[float], stats: dict of counts ok / timeout / error / too_long,
    plus workers_restarted and seconds). A response longer than max_chars, or one whose verification raises, hangs
    past `timeout` seconds or kills its worker, scores 0 and is counted; training never stops for it.
    workers=0 verifies in this process (no timeout beyond math-verify's own). Worker processes are started the
    multiprocessing way: the calling program must be a file or module (not stdin) with an `if __name__ ==
    "__main__":` guard."""
    global _POOL
    n = len(responses)
    if not (len(datasets) == len(ground_truths) == n):
        raise ValueError(f"verify_batch: {len(datasets)} datasets, {n} responses, {len(ground_truths)} ground truths")
    t0 = time.perf_counter()
    scores = [0.0] * n
    stats = {"ok": 0, "timeout": 0, "error": 0, "too_long": 0, "workers_restarted": 0}
    tasks = []
    for i in range(n):
        if not isinstance(responses[i], str):
            stats["error"] += 1
        elif len(responses[i]) > max_chars:
            stats["too_long"] += 1
        else:
            tasks.append((i, datasets[i], responses[i], ground_truths[i], ifeval_all_or_nothing))
    messages = []  # why verifications raised: the first is logged
    if workers == 0:
        for i, dataset, response, gt, aon in tasks:
            try:
                scores[i] = verify(dataset, response, gt, ifeval_all_or_nothing=aon)
                stats["ok"] += 1
            except Exception as e:
                stats["error"] += 1
                messages.append(f"{type(e).__name__}: {e}"[:300])
    elif tasks:
        # math-verify's own timeout sits above ours so the pool's kill is what stops a hanging answer.
        math_timeout_s = max(1, math.ceil(timeout)) + 1
        if chunk_size is None:
            chunk_size = max(1, min(64, len(tasks) // (4 * workers)))
        with _POOL_LOCK:
            pool = _get_pool(workers)
            restarts_before = pool.restarts
            try:
                results = pool.run(tasks, timeout, chunk_size, math_timeout_s)
            except BaseException:
                # Interrupted (Ctrl-C) or broken: workers may still hold answers of this batch, whose late replies
                # must never be read as the next batch's. Drop the pool; the next call starts a fresh one.
                pool.close(kill=True)
                _POOL = None
                raise
            stats["workers_restarted"] = pool.restarts - restarts_before
        for i, (status, score, *message) in results.items():
            scores[i] = score
            stats[status] += 1
            messages += message
    if messages:
        _log.warning("%d reward verifications raised (scored 0), first: %s", len(messages), messages[0])
    stats["seconds"] = time.perf_counter() - t0
    return scores, stats


# ---------------------------------------------------------------------------------------------------------------------
# Loading RLVR rows
# ---------------------------------------------------------------------------------------------------------------------


def _validate_ground_truth(name, gt):
    """Raises ValueError when gt cannot be used by verifier `name` (checked once, at load time)."""
    if name == "gsm8k":
        if isinstance(gt, bool) or not isinstance(gt, (str, int, float)) or _parse_number(str(gt)) is None:
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
            for name, gt in _pairs(dataset, ground_truth):
                _validate_ground_truth(name, gt)
        except ValueError as e:
            field = "dataset" if str(e).startswith("unknown verifier") else "ground_truth"
            raise ValueError(f"{where}: field '{field}': {e}") from None
        rows.append({"prompt_messages": prompt, "ground_truth": ground_truth, "dataset": dataset, "source": where})
    return rows


def load_rlvr_mix(spec, seed=0):
    """RLVR rows of a data mix 'file[:amount],...', the syntax SFT and DPO take (data.parse_mix: 0.5 is a fraction of
    the file, 500 a row count, repeating rows above the file's size; no amount: every row), in mix order."""
    import numpy as np

    from nanotulu.data import parse_mix, select_rows

    rows = []
    for k, (path, amount) in enumerate(parse_mix(spec)):
        rows += select_rows(load_rlvr_rows(path), amount, np.random.default_rng([seed, k]))
    return rows

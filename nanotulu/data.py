"""Data path: reading Tulu-format files, mixing sources, tokenizers, chat templates, assistant-only masking,
and the packed, data-parallel, resumable loader (packing itself is in nanotulu/packing.py).

    rows = read_rows("sft.jsonl")                                  # JSONL or Parquet, errors name file:line
    tok = load_tokenizer("byte")                                   # or a HF tokenizer directory
    examples, stats = load_sft_dataset(parse_mix("a.jsonl:1.0,b.jsonl:500"), tok, "tulu", max_len=4096)
    loader = PackedLoader(examples, capacity=4096, rows_per_step=8, rank=r, world_size=w, pad_id=tok.pad_token_id)
    while loader.epoch < n_epochs:
        for rows in loader:      # one optimizer step: rows_per_step packed rows for this rank
            ...                  # each: input_ids, labels, position_ids, cu_seqlens (make_row), example_ids
"""

import datetime
import functools
import hashlib
import json
import os
import re

import jinja2
import jinja2.ext
import numpy as np

from nanotulu.packing import IGNORE_INDEX, make_row, pack, padding_waste, shift_labels  # noqa: F401 (re-exported)


def optional_import(module, extra, what):
    """`module` (an optional dependency), or an ImportError that names the pip extra providing it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module.split('.')[0]}, an optional dependency: "
                          f"pip install 'nanotulu[{extra}]'") from None


def read_rows(path):
    """Reads a JSONL or Parquet file -> list of (line_number, row dict). Line numbers are 1-based (Parquet: row
    index + 1). Raises ValueError naming the file and line for unreadable input."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".parquet"):
        pq = optional_import("pyarrow.parquet", "data", f"{path}: reading Parquet")

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
        rows = [(i + 1, row) for i, row in enumerate(table.to_pylist())]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
                rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path}: empty file (no rows)")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Data mixing: a list of (source, amount). docs/RECIPE.md: an amount with a '.' is a fraction of the source, an int a
# row count; an amount above the source size repeats rows.


def parse_amount(amount):
    """None | int | float | str -> None (all rows), an int row count, or a float fraction. Raises ValueError."""
    if amount is None:
        return None
    if isinstance(amount, str):
        text = amount.strip()
        try:
            amount = float(text) if "." in text else int(text)
        except ValueError:
            raise ValueError(f"amount {text!r} is neither a fraction (with a '.') nor a row count") from None
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ValueError(f"amount must be a number, got {amount!r}")
    if not amount > 0:
        raise ValueError(f"amount must be positive, got {amount!r}")
    return amount


def parse_mix(spec):
    """'a.jsonl:1.0,b.jsonl:500,c.parquet' -> [('a.jsonl', 1.0), ('b.jsonl', 500), ('c.parquet', None)]."""
    sources = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        path, sep, amount = part.rpartition(":")
        if not sep:  # no amount: the whole source
            path, amount = part, None
        if not path:
            raise ValueError(f"mix entry {part!r}: missing path")
        try:
            sources.append((path, parse_amount(amount)))
        except ValueError as e:
            raise ValueError(f"mix entry {part!r}: {e}") from None
    if not sources:
        raise ValueError(f"mix {spec!r} names no source")
    return sources


def select_rows(rows, amount, rng):
    """rows: list from read_rows; amount as parse_amount takes; rng: a numpy Generator -> the chosen rows.
    A fraction f takes round(f * len(rows)) rows, a count k takes k rows; beyond len(rows), every row is repeated
    k // len(rows) times and the remainder is drawn without replacement. Chosen rows keep file order."""
    amount = parse_amount(amount)
    if amount is None:
        return list(rows)
    n = len(rows)
    want = int(round(amount * n)) if isinstance(amount, float) else amount
    extra = sorted(rng.choice(n, size=want % n, replace=False).tolist())
    return list(rows) * (want // n) + [rows[i] for i in extra]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers. Two small classes with the same attributes (no base class): the embedded ByteTokenizer and a
# Hugging Face tokenizer.json read with the `tokenizers` package.


def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, then the specials. Needs no training; used by the embedded default."""

    SPECIALS = ["<|endoftext|>", "<pad>", "<|begin_of_text|>"]  # ids 256, 257, 258

    def __init__(self):
        self.special_to_id = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.id_to_special = {i: s for s, i in self.special_to_id.items()}
        self.eos_token, self.pad_token, self.bos_token = self.SPECIALS
        self.eos_token_id, self.pad_token_id, self.bos_token_id = 256, 257, 258
        self.vocab_size = _round_up(256 + len(self.SPECIALS), 8)  # 264 embedding rows
        self.chat_template = None  # -> the built-in "tulu" template
        self.name = "byte"
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

    def encode(self, text):
        ids = []
        for piece in self._split.split(text):  # odd pieces are special tokens spelled in the text
            if piece in self.special_to_id:
                ids.append(self.special_to_id[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def save(self, directory, template):
        """tokenizer.json / tokenizer_config.json that transformers' AutoTokenizer (and vLLM) load, encoding exactly
        as this class: a byte-level BPE with no merges (each UTF-8 byte one token, id = the byte, spelled in
        GPT-2's byte-to-character map) and the specials as added tokens 256-258. load_tokenizer reads the
        directory back as this class (tokenizer_config.json's "nanotulu_tokenizer": "byte")."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab={c: b for b, c in _byte_chars().items()}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.SPECIALS])
        tok.save(os.path.join(directory, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "nanotulu_tokenizer": "byte",
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.bos_token,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": 2048, "chat_template": jinja_template(template)}
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    def decode(self, ids, skip_special_tokens=False):
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            # ids past the specials (the rows padding vocab_size to a multiple of 8) decode to nothing, as HF
            # tokenizers do with unknown ids: a sampled one must not crash generation.
            if not skip_special_tokens and i in self.id_to_special:
                out.append(self.id_to_special[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def _byte_chars():
    """byte -> the printable character byte-level BPE tokenizers spell it with (GPT-2's map: printable Latin-1
    bytes stand for themselves, the others for 256, 257, ... in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _token_content(value):
    """tokenizer_config.json writes a special token as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json (the `tokenizers` package) + tokenizer_config.json
    (eos/bos/pad tokens, chat_template; or a chat_template.jinja file beside it)."""

    def __init__(self, directory):
        from tokenizers import Tokenizer

        json_path = os.path.join(directory, "tokenizer.json")
        config_path = os.path.join(directory, "tokenizer_config.json")
        for p in (json_path, config_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such file (a tokenizer directory needs tokenizer.json and "
                                        "tokenizer_config.json; a checkpoint of the embedded model written before "
                                        "its exports carried them: --tokenizer byte)")
        try:
            self._tok = Tokenizer.from_file(json_path)
        except Exception as e:
            raise ValueError(f"{json_path}: not a readable tokenizer ({e})") from e
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}:{e.lineno}: malformed JSON ({e.msg})") from e

        def token_id(field, required):
            token = _token_content(config.get(field))
            if token is None:
                if required:
                    raise ValueError(f"{config_path}: field '{field}': missing (the tokenizer needs an EOS token)")
                return None, None
            if not isinstance(token, str):
                raise ValueError(f"{config_path}: field '{field}': expected a string, got {token!r}")
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{config_path}: field '{field}': token {token!r} is not in {json_path}")
            return token, tid

        self.name = directory
        self.eos_token, self.eos_token_id = token_id("eos_token", required=True)
        self.bos_token, self.bos_token_id = token_id("bos_token", required=False)
        # The pad token as the checkpoint declares it (None: none; often the EOS). No token is added: packed rows
        # fill their tails with pad_token_id at positions no loss reads (targets -100) and no attention of a real
        # document sees, so any id serves, and the vocabulary (the embedding shape of the base model, which
        # adapters, merges and draft models rely on) stays. Without a declared pad, the EOS id fills the tails.
        self.pad_token, self.pad_token_id = token_id("pad_token", required=False)
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        # Token ids in use (one past the largest); the embedding grows only when the model has fewer rows.
        self.n_ids = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.vocab_size = _round_up(self.n_ids, 8)

        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: HF uses the one named "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_path}: field 'chat_template': expected a string, got {type(template).__name__}")
        self.chat_template = template
        self.config = config  # tokenizer_config.json as read: save_hf writes it back with what training used

    def save(self, directory, template):
        """Writes tokenizer.json and tokenizer_config.json / special_tokens_map.json as read (the same vocabulary
        and special tokens) with `template` (render_chat's: "tulu" or Jinja text) as chat_template, so
        transformers and vLLM load the tokenizer the model was trained with."""
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        config = dict(self.config)
        special = {"eos_token": self.eos_token}
        for name, token in (("bos_token", self.bos_token), ("pad_token", self.pad_token)):
            if token is not None:
                special[name] = token
        config.update(special)
        config["chat_template"] = jinja_template(template)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2, ensure_ascii=False)

    def encode(self, text):
        # add_special_tokens=False: no BOS/EOS added by a post-processor; special tokens spelled in the text are
        # still matched to their ids (the `tokenizers` package splits added tokens out before the model runs).
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path_or_name):
    """'byte' -> the embedded ByteTokenizer; a directory -> HFTokenizer(directory), or the ByteTokenizer (with the
    chat template trained with) for an embedded model's export."""
    if path_or_name == "byte":
        return ByteTokenizer()
    if os.path.isdir(path_or_name):
        config_path = os.path.join(path_or_name, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                text = f.read()
            if '"nanotulu_tokenizer": "byte"' in text:  # an embedded model's export (ByteTokenizer.save)
                tok = ByteTokenizer()
                tok.chat_template = json.loads(text).get("chat_template")
                return tok
        return HFTokenizer(path_or_name)
    raise FileNotFoundError(f"tokenizer {path_or_name!r}: neither 'byte' nor a directory with tokenizer.json")


# ---------------------------------------------------------------------------------------------------------------
# Chat templates

ROLES = ("system", "user", "assistant")


def validate_messages(messages, field="messages"):
    """Raises ValueError naming the field (e.g. 'messages[2].role') for anything but a non-empty list of
    {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{field}: expected a non-empty list of messages, got {type(messages).__name__}"
                         + (" (empty)" if isinstance(messages, list) else ""))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{field}[{i}]: expected an object with role and content, got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"{field}[{i}].role: missing")
        if m["role"] not in ROLES:
            raise ValueError(f"{field}[{i}].role: unknown role {m['role']!r} (expected system, user or assistant)")
        if "content" not in m:
            raise ValueError(f"{field}[{i}].content: missing")
        if not isinstance(m["content"], str):
            raise ValueError(f"{field}[{i}].content: expected a string, got {type(m['content']).__name__}")


def render_tulu(messages, eos_token, add_generation_prompt=False):
    """The built-in "tulu" template, exactly as docs/RECIPE.md gives it."""
    parts = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            parts.append("<|assistant|>\n" + m["content"] + eos_token)
            if i < len(messages) - 1:
                parts.append("\n")
        else:  # system or user
            parts.append(f"<|{m['role']}|>\n" + m["content"] + "\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _GenerationBlocks(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: how transformers' chat templates mark the assistant text that
    apply_chat_template(..., return_assistant_tokens_mask=True) reports. Rendered as its body: nanotulu's masks
    come from prefix renders (tokenize_sft), and tests/test_templates.py checks them against transformers' masks
    for templates with such blocks."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def _compile_jinja(template):
    # The environment Hugging Face renders chat templates in: sandboxed, trim_blocks + lstrip_blocks, loop
    # controls, a tojson filter that keeps non-ASCII, raise_exception() for templates that reject input.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                         extensions=[loopcontrols, _GenerationBlocks])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(messages, template="tulu", eos_token=None, add_generation_prompt=False, bos_token=""):
    """messages -> the prompt text. template: "tulu" or a Jinja chat template (e.g. tokenizer_config.json's
    chat_template), rendered with the globals HF gives it: messages, bos_token, eos_token, add_generation_prompt,
    raise_exception. A template that fails raises ValueError starting with 'chat template'."""
    if eos_token is None:
        raise ValueError("render_chat needs eos_token")
    if template == "tulu":
        return render_tulu(messages, eos_token, add_generation_prompt)
    try:
        return _compile_jinja(template).render(messages=messages, bos_token=bos_token or "", eos_token=eos_token,
                                               add_generation_prompt=add_generation_prompt)
    except Exception as e:  # raise_exception(), syntax errors, and errors of the template's own code
        raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from e


# The built-in "tulu" template as a Jinja chat template: what an exported checkpoint's tokenizer_config.json holds
# when the run trained with "tulu", so that transformers' apply_chat_template (and vLLM) render exactly what
# render_tulu renders (tests/test_roundtrip.py checks them against each other on multi-turn chats).
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TEMPLATE_HELP = "'tulu' (built-in), 'hf' (the tokenizer's own chat_template) or a path to a Jinja file"
TEMPLATE_HELP_OWN = TEMPLATE_HELP + "; empty: the model's own (its tokenizer's chat_template, else tulu)"


def default_template(tok):
    """The checkpoint's own template: the tokenizer's chat_template (the tulu Jinja of a nanotulu export maps back
    to "tulu"), else "tulu"."""
    if tok.chat_template is None or tok.chat_template == TULU_CHAT_TEMPLATE:
        return "tulu"
    return tok.chat_template


def resolve_template(flag, tok):
    """A --template value -> what render_chat takes: "tulu" or Jinja text. Every command reads the flag here.
    None or "" -> default_template(tok) (the checkpoint's own); "tulu"; "hf" -> the tokenizer's chat_template
    (an error when it has none); a path to an existing file -> its text. Anything else, or a Jinja template that
    does not compile, is a ValueError naming the flag, raised before any work."""
    if flag is None or flag == "":
        return default_template(tok)
    if flag == "tulu":
        return "tulu"
    if flag == "hf":
        if tok.chat_template is None:
            raise ValueError(f"--template hf: the tokenizer {tok.name!r} has no chat_template (use --template tulu "
                             "or a path to a Jinja file)")
        text = tok.chat_template
    elif os.path.isfile(flag):
        with open(flag, encoding="utf-8") as f:
            text = f.read()
    else:
        raise ValueError(f"--template {flag!r}: expected {TEMPLATE_HELP} (no such file)")
    if text == TULU_CHAT_TEMPLATE:
        return "tulu"
    try:
        _compile_jinja(text)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"--template {flag}: the chat template does not compile ({e})") from e
    return text


def describe_template(flag, template, tok):
    """One line saying which chat template a run uses and why (every trainer prints it: a template replaced
    silently changes what the model learns and what its export says)."""
    if flag not in (None, ""):
        return f"template: {'tulu' if template == 'tulu' else 'Jinja'} (--template {flag})"
    if template != "tulu":
        return f"template: the checkpoint's own chat_template ({tok.name}; --template tulu for Tulu 3's)"
    if tok.chat_template is None:
        return f"template: tulu (the tokenizer {tok.name!r} has no chat_template of its own)"
    return "template: tulu (the checkpoint's own)"


def jinja_template(template):
    """What render_chat takes -> the Jinja text to save in tokenizer_config.json."""
    return TULU_CHAT_TEMPLATE if template == "tulu" else template


# ---------------------------------------------------------------------------------------------------------------
# SFT tokenization with assistant-only labels


def _eos_splits_exactly(tok):
    """Whether the tokenizer cuts its text at every spelled EOS token before anything else runs, so that
    encode(a + eos + b) == encode(a + eos) + encode(eos + b)[1:] (an added token matched verbatim: not normalized, no
    lstrip/rstrip). True for ByteTokenizer and the special tokens of usual tokenizer.json files."""
    if not isinstance(tok, HFTokenizer):
        return isinstance(tok, ByteTokenizer)
    added = tok._tok.get_added_tokens_decoder().get(tok.eos_token_id)
    return added is not None and not (added.normalized or added.lstrip or added.rstrip or added.single_word)


def _prefix_counter(tok, text, ids):
    """-> n(b) = len(tok.encode(text[:b])) without encoding the whole prefix again (which made multi-turn masks
    cost O(turns^2) encodes): the tokens up to the last EOS before b are read off `ids` (tok.encode(text): an
    exactly split EOS ends a token run that a later text cannot change), and only the rest is encoded, behind that
    EOS so that what follows it tokenizes as it does in place. None when the tokenizer offers no such split."""
    eos, eos_id = tok.eos_token, tok.eos_token_id
    eos_at = [i for i, t in enumerate(ids) if t == eos_id]  # token index of each EOS, in text order
    if not _eos_splits_exactly(tok) or len(eos_at) != text.count(eos):
        return None

    def n(b):
        e = text.rfind(eos, 0, b)
        if e < 0:
            return len(tok.encode(text[:b]))
        end = e + len(eos)
        k = eos_at[text.count(eos, 0, end) - 1]  # ids[k] is that EOS: k + 1 tokens up to it
        return k + len(tok.encode(text[e:b]))  # encode(eos + rest) starts with the EOS again

    return n


def tokenize_sft(messages, tok, template="tulu", max_len=None, add_bos=False, incremental=True):
    """messages -> {"input_ids": list[int], "labels": list[int]}, labels = input_ids with -100 on every token that
    is not part of an assistant answer (docs/RECIPE.md: for each non-assistant message i, the span from
    len(tokens(render(msgs[:i]))) to len(tokens(render(msgs[:i+1], add_generation_prompt=next is assistant))) is
    masked: headers, system and user turns are masked; answer text + EOS (+ the '\\n' after a non-final answer)
    is trained; with "tulu" the prefix render msgs[:i] is taken as it appears inside the conversation, i.e. with
    that '\\n', while a Jinja template is used as it renders, as HF does).
    add_bos prepends the BOS token text (masked). max_len truncates both lists.
    incremental (with "tulu", whose prefix renders are prefixes of the whole text): prefix token counts from the
    whole encoding plus one encode of the text since the last EOS (_prefix_counter); the same counts, checked
    against incremental=False (every prefix encoded whole) in tests/test_data.py.
    Raises ValueError naming the field for malformed messages or a template that fails."""
    validate_messages(messages)
    template = default_template(tok) if template is None else template
    prefix = tok.bos_token if add_bos and tok.bos_token else ""

    def n_tokens(msgs, gen_prompt=False):
        text = render_chat(msgs, template, tok.eos_token, gen_prompt, tok.bos_token)
        if template == "tulu" and not gen_prompt and msgs[-1]["role"] == "assistant":
            # Within the whole conversation this answer is not the last message, so the template follows its EOS
            # with "\n": count it as part of the answer (docs/RECIPE.md: trained), not of the next message's span.
            text += "\n"
        text = prefix + text
        if counter is not None and full.startswith(text):
            return counter(len(text))
        return len(tok.encode(text))

    full = prefix + render_chat(messages, template, tok.eos_token, False, tok.bos_token)
    input_ids = tok.encode(full)
    counter = _prefix_counter(tok, full, input_ids) if incremental and template == "tulu" else None
    labels = list(input_ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else n_tokens(messages[:i])  # 0 for the first message: BOS and any preamble too
        next_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = n_tokens(messages[: i + 1], next_is_assistant)
        for t in range(start, min(end, len(labels))):
            labels[t] = IGNORE_INDEX
    if max_len is not None:
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return {"input_ids": input_ids, "labels": labels}


def load_sft_dataset(sources, tok, template="tulu", max_len=None, truncate=True, seed=0, add_bos=False, workers=0,
                     cache_dir=""):
    """sources: list of (path, amount), amount None = all rows (see select_rows) -> (examples, stats).
    examples: list of {"input_ids", "labels", "source", "line"}; examples longer than max_len are truncated
    (truncate=True) or dropped; examples with no trained token left are dropped. Everything dropped or truncated
    is counted in stats: rows_read / rows_selected per file, examples, truncated, dropped_too_long,
    dropped_no_trained_token, tokens, trained_tokens (an example truncated and then left with no trained token
    counts in both truncated and dropped_no_trained_token). Errors name file:line: field.
    Each file is tokenized whole, once (tokenize_file: `workers` processes, cached in `cache_dir`); the mix then
    selects rows, so changing an amount or max_len reuses the cache."""
    stats = {"rows_read": {}, "rows_selected": {}, "examples": 0, "truncated": 0, "dropped_too_long": 0,
             "dropped_no_trained_token": 0, "tokens": 0, "trained_tokens": 0}
    examples = []
    fn = functools.partial(_sft_row, tok=tok, template=template, add_bos=add_bos)
    for source_index, (path, amount) in enumerate(sources):
        lines, tokenized = tokenize_file(path, fn, "sft", tok, template, {"add_bos": add_bos}, workers, cache_dir)
        done = dict(zip(lines, tokenized))  # line -> example: repeated rows share one
        try:
            chosen = select_rows([(line, None) for line in lines], amount, np.random.default_rng([seed, source_index]))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        stats["rows_read"][path] = len(lines)
        stats["rows_selected"][path] = len(chosen)
        for line_no, _ in chosen:
            ex = done[line_no]
            ids, labels = ex["input_ids"], ex["labels"]
            if max_len is not None and len(ids) > max_len:
                if not truncate:
                    stats["dropped_too_long"] += 1
                    continue
                ids, labels = ids[:max_len], labels[:max_len]
                stats["truncated"] += 1
            n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
            if n_trained == 0:
                stats["dropped_no_trained_token"] += 1
                continue
            examples.append({"input_ids": ids, "labels": labels, "source": path, "line": line_no})
            stats["tokens"] += len(ids)
            stats["trained_tokens"] += n_trained
    stats["examples"] = len(examples)
    return examples, stats


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing a data file once: worker processes, and a cache on disk shared by runs and ranks

TOKENIZE_CACHE_VERSION = "1"  # bump when what tokenize_sft / tokenize_pair produce changes


def tokenizer_fingerprint(tok):
    """A hash naming what a tokenizer produces: its whole tokenizer.json (added <pad> included) and specials."""
    h = hashlib.sha256()
    if isinstance(tok, HFTokenizer):
        h.update(tok._tok.to_str().encode())
    else:
        h.update(f"{type(tok).__name__}:{tok.name}".encode())
    h.update(json.dumps([tok.eos_token, tok.bos_token, tok.pad_token, tok.vocab_size]).encode())
    return h.hexdigest()


def _tokenize_chunk(fn, chunk):
    """chunk: list of (line, row, where) -> list of (line, result or the ValueError it raised)."""
    out = []
    for line_no, row, where in chunk:
        try:
            out.append((line_no, fn(row, where)))
        except ValueError as e:
            out.append((line_no, e))
    return out


def _read_and_tokenize(path, fn, workers, min_rows_per_worker):
    rows = read_rows(path)
    items = [(line_no, row, f"{path}:{line_no}") for line_no, row in rows]
    from nanotulu.machine import cpu_cores

    # no more processes than CPUs this process may use (logical: tokenizing gains from hyper-threads)
    n_workers = min(workers, cpu_cores(physical=False), len(items) // max(1, min_rows_per_worker))
    if n_workers <= 1:
        done = _tokenize_chunk(fn, items)
    else:
        import multiprocessing

        # spawn, not fork: the parent may hold threads (torch, tokenizers) that a fork would copy mid-lock
        size = -(-len(items) // (n_workers * 8))  # 8 chunks per worker: a slow chunk does not hold the rest up
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        with multiprocessing.get_context("spawn").Pool(n_workers) as pool:
            done = [x for part in pool.starmap(_tokenize_chunk, [(fn, c) for c in chunks]) for x in part]
    for line_no, result in done:
        if isinstance(result, ValueError):
            raise result
    return [line_no for line_no, _ in done], [result for _, result in done]


def tokenize_file(path, fn, kind, tok, template, settings, workers=0, cache_dir="", min_rows_per_worker=2000):
    """Every row of a data file through fn(row, where) -> (line numbers, results), in file order; `where` is
    "file:line" for errors. fn must be picklable (a module-level function or a functools.partial of one).

    Tokenized once: in `workers` spawned processes (when the file has at least min_rows_per_worker rows per
    worker), and with a cache_dir, cached there under a key of the file (absolute path, size, modification time),
    the tokenizer (tokenizer_fingerprint), the template text, `kind` and `settings` (e.g. max length, truncation):
    a second run reads it, a changed file or setting misses it. Under torch.distributed rank 0 tokenizes and
    writes (to a temporary name, then renamed); the other ranks wait for the file and read it, so the cache
    folder must be shared by all ranks (a node-local folder on a multi-node job would never fill: use shared
    storage, or cache_dir "" for every rank to tokenize itself)."""
    import pickle
    import time

    if not cache_dir:
        return _read_and_tokenize(path, fn, workers, min_rows_per_worker)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    st = os.stat(path)
    h = hashlib.sha256()
    for part in (TOKENIZE_CACHE_VERSION, kind, os.path.abspath(path), str(st.st_size), str(st.st_mtime_ns),
                 tokenizer_fingerprint(tok), str(template), json.dumps(settings, sort_keys=True)):
        h.update(part.encode() + b"\0")
    cache_dir = os.path.expanduser(cache_dir)
    cache = os.path.join(cache_dir, f"{kind}_{os.path.basename(path)}_{h.hexdigest()[:24]}.pkl")
    rank = 0
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
    except ImportError:
        pass
    if rank != 0:
        waited = 0
        while not os.path.isfile(cache):  # rank 0 is writing it (a failure there ends the whole job)
            time.sleep(0.5)
            waited += 1
            if waited == 120:
                print(f"rank {rank}: waiting for rank 0 to write {cache} (is {cache_dir} shared by all nodes?)")
    if os.path.isfile(cache):
        with open(cache, "rb") as f:
            return pickle.load(f)
    lines, results = _read_and_tokenize(path, fn, workers, min_rows_per_worker)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump((lines, results), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, cache)
    return lines, results


def _sft_row(row, where, tok, template, add_bos):
    if "messages" not in row:
        raise ValueError(f"{where}: field 'messages': missing (row has {sorted(row)})")
    try:
        return tokenize_sft(row["messages"], tok, template, add_bos=add_bos)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def format_stats(stats):
    """One readable line per fact, for the training log."""
    lines = [f"  {path}: {stats['rows_selected'][path]} rows used of {n}" for path, n in stats["rows_read"].items()]
    lines.append(f"  examples {stats['examples']}, tokens {stats['tokens']}, trained tokens {stats['trained_tokens']}")
    lines.append(f"  truncated {stats['truncated']}, dropped too long {stats['dropped_too_long']}, "
                 f"dropped with no trained token {stats['dropped_no_trained_token']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The packed loader


def sft_length(example):
    return len(example["input_ids"])


def sft_docs(example):
    return [example]


class PackedLoader:
    """Packs examples into rows of `capacity` tokens and yields, per optimizer step, this rank's `rows_per_step`
    rows (dicts from make_row, plus "example_ids": the indices of the examples in the row, in document order).
    Every rank builds the same packing, so every rank must pass the same examples in the same order.

    Each epoch: the examples are shuffled with (seed, epoch), packed best-fit decreasing, and the rows shuffled
    with the same generator (BFD sorts by length, so without it every step would hold the longest documents
    first). Step s of the epoch takes rows [s*G, (s+1)*G) with G = rows_per_step * world_size, and rank r the
    r-th slice of rows_per_step of them, so every rank runs the same number of steps. The rows left over at the
    end of an epoch (fewer than G) are dropped and counted in `stats` (a different few each epoch, as rows are
    reshuffled); len() is the number of steps per epoch, the same in every epoch (BFD's row count depends only
    on the multiset of lengths).

    Iterating runs the rest of the current epoch, then moves `epoch` on; `state_dict()` after any step and
    `load_state_dict()` in a fresh loader over the same examples resume at the next step with exactly the rows
    the uninterrupted run would have seen:
        while loader.epoch < n_epochs:
            for rows in loader: ...

    Other item kinds: `length_fn(example) -> int` (tokens the item takes in a row) and `to_docs(example) -> list
    of {"input_ids", "labels"}` (the documents it puts in the row, lengths summing to length_fn). DPO packs a pair
    as one item: length_fn = len(chosen ids) + len(rejected ids), to_docs = [chosen_doc, rejected_doc], so the
    row's cu_seqlens has two segments per example, chosen then rejected, in "example_ids" order.
    """

    def __init__(self, examples, capacity, rows_per_step, rank=0, world_size=1, seed=0, pad_id=None,
                 length_fn=sft_length, to_docs=sft_docs, backend="auto"):
        if pad_id is None:
            raise ValueError("PackedLoader needs pad_id (the tokenizer's pad_token_id)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
        self.examples, self.capacity, self.rows_per_step = examples, capacity, rows_per_step
        self.rank, self.world_size, self.seed, self.pad_id = rank, world_size, seed, pad_id
        self.to_docs, self.backend = to_docs, backend
        self.lengths = [int(length_fn(ex)) for ex in examples]  # (n_examples,)
        for i, n in enumerate(self.lengths):
            if not 1 <= n <= capacity:
                raise ValueError(f"example {i} takes {n} tokens, outside [1, capacity={capacity}]: truncate or "
                                 "drop it first (load_sft_dataset's max_len)")
        self.epoch, self.step = 0, 0
        self._plan_epoch, self._plan = None, None  # the current epoch's rows, built on first use
        n_rows = len(self._rows_of_epoch(0))
        steps = n_rows // (rows_per_step * world_size)
        if steps == 0:
            raise ValueError(f"{len(examples)} examples pack into {n_rows} rows of {capacity} tokens: fewer than one "
                             f"step of {rows_per_step} rows x {world_size} ranks")
        self.steps_per_epoch = steps
        total_tokens = sum(self.lengths)
        self.stats = {
            "examples": len(examples),
            "rows_per_epoch": n_rows,
            "steps_per_epoch": steps,
            "dropped_rows_per_epoch": n_rows - steps * rows_per_step * world_size,
            "padding_waste": 1.0 - total_tokens / (n_rows * capacity),
        }
        self._count_dropped()

    def __len__(self):
        return self.steps_per_epoch

    def _rows_of_epoch(self, epoch):
        """-> list of rows (lists of example indices) in the order the steps consume them."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.examples))  # (n_examples,)
            bins = pack([self.lengths[i] for i in perm], self.capacity, backend=self.backend)
            row_order = rng.permutation(len(bins))
            self._plan = [[int(perm[j]) for j in bins[r]] for r in row_order]
            self._plan_epoch = epoch
        return self._plan

    def _count_dropped(self):
        """Examples and tokens in this epoch's dropped tail rows, into stats."""
        rows = self._rows_of_epoch(self.epoch)
        tail = rows[self.steps_per_epoch * self.rows_per_step * self.world_size:]
        self.stats["epoch"] = self.epoch
        self.stats["dropped_examples_this_epoch"] = sum(len(r) for r in tail)
        self.stats["dropped_tokens_this_epoch"] = sum(self.lengths[i] for r in tail for i in r)

    def rows_for_step(self, epoch, step):
        """Example indices of this rank's rows at (epoch, step): list of rows_per_step lists."""
        rows = self._rows_of_epoch(epoch)
        first = (step * self.world_size + self.rank) * self.rows_per_step
        return rows[first:first + self.rows_per_step]

    def make_rows(self, row_example_ids):
        out = []
        for ids in row_example_ids:
            docs = [doc for i in ids for doc in self.to_docs(self.examples[i])]
            row = make_row(docs, self.capacity, self.pad_id)
            row["example_ids"] = list(ids)
            out.append(row)
        return out

    def __iter__(self):
        self._count_dropped()
        while self.step < self.steps_per_epoch:
            ids = self.rows_for_step(self.epoch, self.step)
            self.step += 1  # before the yield: a state_dict taken while the caller holds these rows resumes after
            yield self.make_rows(ids)
        self.epoch, self.step = self.epoch + 1, 0

    def _fingerprint(self):
        return hashlib.sha1(np.asarray(self.lengths, dtype=np.int64).tobytes()).hexdigest()

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "capacity": self.capacity,
                "rows_per_step": self.rows_per_step, "world_size": self.world_size,
                "lengths_sha1": self._fingerprint()}

    def load_state_dict(self, state):
        """Checks the loader would replay the same rows (same seed, capacity, rows per step, world size and
        example lengths), then moves to the saved epoch and step."""
        mine = self.state_dict()
        for key in ("seed", "capacity", "rows_per_step", "world_size", "lengths_sha1"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state: {key} was {state[key]!r}, now {mine[key]!r}: a resumed run would "
                                 "not see the rows the saved run would have seen")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"loader state: step {state['step']} outside 0..{self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class CountedLoader:
    """A packed loader whose optimizer step holds exactly `items_per_step` examples over all ranks (DPO: the
    recipe's 128 pairs per step), however long they are; the number of rows per step varies instead.

    Each epoch the examples are shuffled with (seed, epoch); step s takes examples [s*N, (s+1)*N) of that order,
    packs them best-fit decreasing into rows of `capacity`, and deals the rows round-robin to the ranks. Every rank
    gets the same number of rows (ceil(rows / world_size)): a rank short of one gets an all-padding row holding no
    example, so every rank runs the same forwards (collective under FSDP) and the examples of the step are each
    in exactly one row of one rank. The last N - 1 or fewer examples of an epoch are dropped (counted in stats).
    Same interface as PackedLoader (len, iteration per step, epoch, state_dict / load_state_dict)."""

    def __init__(self, examples, items_per_step, capacity, rank=0, world_size=1, seed=0, pad_id=None,
                 length_fn=sft_length, to_docs=sft_docs, backend="auto"):
        if pad_id is None:
            raise ValueError("CountedLoader needs pad_id (the tokenizer's pad_token_id)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if items_per_step < 1:
            raise ValueError(f"items per step must be >= 1, got {items_per_step}")
        self.examples, self.items_per_step, self.capacity = examples, items_per_step, capacity
        self.rank, self.world_size, self.seed, self.pad_id = rank, world_size, seed, pad_id
        self.to_docs, self.backend = to_docs, backend
        self.lengths = [int(length_fn(ex)) for ex in examples]  # (n_examples,)
        for i, n in enumerate(self.lengths):
            if not 1 <= n <= capacity:
                raise ValueError(f"example {i} takes {n} tokens, outside [1, capacity={capacity}]")
        self.steps_per_epoch = len(examples) // items_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(examples)} examples: fewer than one step of {items_per_step}")
        self.stats = {"examples": len(examples), "steps_per_epoch": self.steps_per_epoch,
                      "dropped_examples_per_epoch": len(examples) - self.steps_per_epoch * items_per_step}
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = None, None

    def __len__(self):
        return self.steps_per_epoch

    def rows_for_step(self, epoch, step):
        """Example indices of this rank's rows at (epoch, step): ceil(rows / world_size) lists (some maybe empty)."""
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._order_epoch = epoch
        items = self._order[step * self.items_per_step:(step + 1) * self.items_per_step]
        bins = pack([self.lengths[i] for i in items], self.capacity, backend=self.backend)
        rows = [[int(items[j]) for j in b] for b in bins]
        per_rank = -(-len(rows) // self.world_size)
        mine = rows[self.rank::self.world_size]
        return mine + [[] for _ in range(per_rank - len(mine))]

    def make_rows(self, row_example_ids):
        out = []
        for ids in row_example_ids:
            row = make_row([doc for i in ids for doc in self.to_docs(self.examples[i])], self.capacity, self.pad_id)
            row["example_ids"] = list(ids)
            out.append(row)
        return out

    def __iter__(self):
        while self.step < self.steps_per_epoch:
            ids = self.rows_for_step(self.epoch, self.step)
            self.step += 1  # before the yield, as in PackedLoader
            yield self.make_rows(ids)
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "capacity": self.capacity,
                "items_per_step": self.items_per_step, "world_size": self.world_size,
                "lengths_sha1": hashlib.sha1(np.asarray(self.lengths, dtype=np.int64).tobytes()).hexdigest()}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("seed", "capacity", "items_per_step", "world_size", "lengths_sha1"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state: {key} was {state.get(key)!r}, now {mine[key]!r}: a resumed run "
                                 "would not see the examples the saved run would have seen")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"loader state: step {state['step']} outside 0..{self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def held_out_rows(examples, capacity, rank, world_size, pad_id, length_fn=sft_length, to_docs=sft_docs):
    """Every held-out example exactly once, packed into rows and split over the data-parallel ranks, each rank
    with the same number of rows (a CountedLoader step holding all of them) -> this rank's rows (make_row dicts
    with "example_ids")."""
    loader = CountedLoader(examples, len(examples), capacity, rank=rank, world_size=world_size, pad_id=pad_id,
                           length_fn=length_fn, to_docs=to_docs)
    return loader.make_rows(loader.rows_for_step(0, 0))


# ---------------------------------------------------------------------------------------------------------------
# Micro-batches: packed rows stacked for one forward


def stack_rows(rows, device, per_position=()):
    """Rows from the loader -> one micro-batch: input_ids/targets/position_ids (B, T), cu_seqlens over the
    flattened B*T tokens, and max_seqlen (int, the longest segment). targets[t] is the label of token t+1 within its
    document (-100 elsewhere).
    per_position: names of (T,) float row entries (e.g. RLVR's "adv", "old_logp") stacked flat to (B*T,)."""
    import torch

    T = rows[0]["input_ids"].numel()
    cu = torch.cat([rows[0]["cu_seqlens"][:1]] + [r["cu_seqlens"][1:] + i * T for i, r in enumerate(rows)])
    batch = {
        "input_ids": torch.stack([r["input_ids"] for r in rows]),
        "targets": torch.stack([shift_labels(r["labels"], r["cu_seqlens"]) for r in rows]),
        "position_ids": torch.stack([r["position_ids"] for r in rows]),
        "cu_seqlens": cu.to(torch.int32),
    }
    for name in per_position:
        batch[name] = torch.stack([r[name] for r in rows]).reshape(-1)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # the longest segment as a python int, read here from the host copy: the varlen kernel needs it and the
    # model's forward then never reads a device tensor back (no sync, no recompile under torch.compile)
    batch["max_seqlen"] = max(int((r["cu_seqlens"][1:] - r["cu_seqlens"][:-1]).max()) for r in rows)
    return batch


def stack_pair_rows(rows, device):
    """stack_rows for rows of preference pairs (each pair = two consecutive documents, chosen then rejected), plus
    doc_segments (P, 2): the cu_seqlens segment of each pair's chosen and rejected document, pair_ids (P,), and
    pair_starts / row_starts: flat token positions (host ints) where the fused loss may cut its chunks."""
    import torch

    batch = stack_rows(rows, device)
    segs, ids, offset, starts = [], [], 0, []
    T = rows[0]["input_ids"].numel()
    for i, r in enumerate(rows):
        n_pairs = len(r["example_ids"])
        starts += [i * T + int(r["cu_seqlens"][2 * j]) for j in range(n_pairs)]
        segs += [[offset + 2 * j, offset + 2 * j + 1] for j in range(n_pairs)]
        ids += r["example_ids"]
        offset += r["cu_seqlens"].numel() - 1  # documents plus the padding tail, if any
        assert 2 * n_pairs <= r["cu_seqlens"].numel() - 1
    batch["doc_segments"] = torch.tensor(segs, dtype=torch.long, device=device).view(-1, 2)
    batch["pair_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
    # host ints: where the fused loss may cut its chunks of tokens (pair starts, row starts), no device sync
    batch["pair_starts"], batch["row_starts"] = starts, [i * T for i in range(len(rows))]
    return batch


def micro_batches(rows, micro_batch_rows, device, stack=stack_rows, **kw):
    """One optimizer step's rows -> list of stacked micro-batches of micro_batch_rows rows each."""
    return [stack(rows[i:i + micro_batch_rows], device, **kw) for i in range(0, len(rows), micro_batch_rows)]

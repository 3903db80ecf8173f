"""Conversations -> token ids: the checkpoint's own chat template, the BOS policy, the gating position.

BOS policies (`bos=`), for a rendered template text:
- "one" (default): exactly one BOS at the start, whatever the template and tokenizer do.
- "template": tokenize the rendered text with no added special tokens (ArmoRM/QRM published usage).
- "tokenizer": let the tokenizer add its special tokens to the rendered text (Skywork v0.1/URM
  published usage; with a template that already has BOS this gives two, as those scripts would).
A tokenizer without a BOS token (Qwen's) gets none under every policy: "one" means "none" there,
never an invented token.

Templates that read the clock: see TEMPLATE_DATE. Process reward models' steps: see rmserve/steps.py.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .steps import StepError, StepFormat

BOS_POLICIES = ("one", "template", "tokenizer")
ROLES = ("system", "user", "assistant")
# ArmoRM/QRM gate on the first token of the last occurrence of this text's tokens:
# the <|eot_id|> that closes the last user turn. Token ids come from the checkpoint's own
# tokenizer; for the Llama 3 tokenizer they are [128009, 128006, 78191, 128007, 271].
GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


# The date a chat template sees as "today" (ISO), unless EngineConfig.template_date says otherwise.
# Templates such as Llama-3.2's render `strftime_now(...)` ("Today Date: ...") into every sample, so
# the same conversation would score differently on different days. transformers' apply_chat_template
# gives templates `strftime_now` as a Jinja global that reads datetime.now() at each render; extra
# keyword arguments reach the template as variables (date_string, say), but transformers 5 replaces
# callables among them by placeholder strings, so a pinned strftime_now cannot be passed in. rmserve
# defines `strftime_now` inside the template instead (`pin_template_clock`), answering from this date.
# Why 26 Jul 2024: it is the date Llama-3.1/3.2/3.3's own templates render when no clock is available
# (`{% set date_string = "26 Jul 2024" %}`), so a Llama template renders the same text with or without
# a clock, and Llama-3.1 reward models (whose template has that default) see the date they always saw.
TEMPLATE_DATE = "2024-07-26"
_CLOCK_CALL = re.compile(r"\bstrftime_now\s*\(")
_CLOCK_LITERAL = re.compile(r"""\bstrftime_now\s*\(\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\)""")


def parse_template_date(value: str) -> datetime.date:
    """'YYYY-MM-DD' -> date; anything else is a ValueError that says what is expected."""
    try:
        return datetime.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"template_date must be a date as YYYY-MM-DD, got {value!r}") from None


def pin_template_clock(template: str, date: str) -> tuple[str, dict]:
    """A chat template that calls strftime_now(FORMAT) -> the same template rendering `date` (at
    00:00:00) for every call, and the variables to render it with; other templates come back as they
    are. Each call's FORMAT must be a string literal (the formats are evaluated here, once)."""
    calls = len(_CLOCK_CALL.findall(template))
    if not calls:
        return template, {}
    formats = [a or b for a, b in _CLOCK_LITERAL.findall(template)]
    if len(formats) != calls:
        raise ValueError("the chat template calls strftime_now with a format that is not a string literal, so "
                         "rmserve cannot pin its date; pass a chat_template that does not read the clock")
    moment = datetime.datetime.combine(parse_template_date(date), datetime.time())
    # A macro named strftime_now shadows transformers' global of that name in this template; the newline
    # after it is removed by the trim_blocks setting transformers renders with, so the text is unchanged.
    macro = "{% macro strftime_now(format) %}{{ rmserve_clock[format] }}{% endmacro %}\n"
    return macro + template, {"rmserve_clock": {f: moment.strftime(f) for f in formats}}


class InputError(ValueError):
    """This sample cannot be scored; the message says why. Other samples are unaffected."""


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    gate: int | None = None           # gating position within the sequence (ArmoRM/QRM)
    steps: tuple[int, ...] = ()       # step-token positions within the sequence (process reward models)

    def __len__(self) -> int:
        return len(self.ids)


def check_call(conversations: Any) -> None:
    """A call's `conversations` must be a sequence of samples. A string, a dict or one bare
    conversation (a list of message dicts) would be read item by item, a character or a message a
    sample, and come back as a result per item: refused with TypeError instead."""
    if isinstance(conversations, (str, bytes, dict)):
        raise TypeError(f"conversations must be a list of samples (each a list of messages or of token ids), "
                        f"got a {type(conversations).__name__}")
    if (isinstance(conversations, (list, tuple)) and conversations
            and all(isinstance(m, dict) and "role" in m for m in conversations)):
        raise TypeError("conversations is one conversation (a list of messages); pass a list of them: "
                        "score([conversation])")


def check_conversation(messages: Any, steps: bool = False) -> list[dict]:
    """Validate an OpenAI-style message list; returns it as plain dicts. steps: a process reward
    model's conversation, whose last (assistant) message may hold a list of steps (rmserve/steps.py
    checks them)."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise InputError("empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"message {i} is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if isinstance(content, (list, tuple)) and i == len(messages) - 1 and role == "assistant":
            if not steps:
                raise InputError("the answer's content is a list (of steps?); only process reward models score "
                                 "steps, this model scores a text")
            out.append({"role": role, "content": list(content)})
            continue
        if not isinstance(content, str):
            raise InputError(f"message {i} has no text 'content'")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise InputError(f"the last message must be the assistant's answer, got role '{out[-1]['role']}'")
    if isinstance(out[-1]["content"], str) and not out[-1]["content"].strip():
        raise InputError("the assistant's answer is empty")
    return out


def content_chars(messages: Sequence[dict]) -> int:
    """Characters in a checked conversation's contents (a list of steps counts its steps')."""
    return sum(len(m["content"]) if isinstance(m["content"], str) else sum(map(len, m["content"]))
               for m in messages)


def find_last(ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    n = len(pattern)
    first = pattern[0]
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == first and tuple(ids[i:i + n]) == tuple(pattern):
            return i
    return None


class Preprocessor:
    """Turns conversations or token ids into Encoded samples for one checkpoint."""

    def __init__(self, tokenizer, *, bos: str = "one", max_length: int, needs_gate: bool,
                 chat_template: str | None = None, vocab_size: int | None = None,
                 length_limit: str | None = None, template_date: str = TEMPLATE_DATE,
                 steps: StepFormat | None = None):
        if bos not in BOS_POLICIES:
            raise ValueError(f"bos policy must be one of {BOS_POLICIES}, got {bos!r}")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; pass chat_template= or pre-tokenized input")
        self.tokenizer = tokenizer
        self.bos = bos
        self.bos_id = tokenizer.bos_token_id   # None: this tokenizer has no BOS (Qwen) and never gets one
        self.template_date = template_date
        self.template, self.template_vars = pin_template_clock(tokenizer.get_chat_template(chat_template),
                                                               template_date)
        self.max_length = max_length
        # what max_length is, for the too-long error
        self.length_limit = length_limit or f"the model's maximum of {max_length}"
        self.vocab_size = vocab_size   # pre-tokenized ids are checked against it (None: unchecked)
        self.needs_gate = needs_gate
        self.chat_template = chat_template
        self.gating_pattern = tuple(tokenizer(GATING_TEXT, add_special_tokens=False)["input_ids"]) if needs_gate else ()
        self.steps = steps   # a process reward model's step token and separator; None: no steps

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, chat_template=self.template, **self.template_vars)

    def _apply_bos(self, ids: list[int]) -> list[int]:
        if self.bos != "one" or self.bos_id is None:
            return ids
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:
            start += 1
        return [self.bos_id] + ids[start:]

    def check_length(self, n: int) -> None:
        if n > self.max_length:
            raise InputError(f"{n} tokens, longer than {self.length_limit}")

    def check_ids(self, ids: Sequence[int]) -> None:
        """Final token ids: at least one, within the length limit and the model's vocabulary."""
        if len(ids) == 0:
            raise InputError("no tokens")
        self.check_length(len(ids))
        if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise InputError(f"token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})")

    def check_encoded(self, e: Encoded) -> None:
        """A sample encoded elsewhere (another engine, a Ray job's tokenizer stage, by hand) held to what
        `finish` guarantees for this engine: its ids, and the gating and step positions its head reads
        inside the sample (out of it, a position would read another sample's row, or past the batch)."""
        self.check_ids(e.ids)
        n = len(e.ids)
        if self.needs_gate and (e.gate is None or not 0 <= e.gate < n):
            raise InputError(f"the sample has no gating position within its {n} tokens (got {e.gate}); encode it "
                             "with this engine")
        if self.steps is not None and (not e.steps or not all(0 <= p < n for p in e.steps)):
            raise InputError(f"the sample's step positions {list(e.steps)} are not within its {n} tokens (a process "
                             "reward model reads at least one); encode it with this engine")

    def finish(self, ids: Sequence[int], num_steps: int | None = None) -> Encoded:
        """Length and gating checks on final token ids; a process reward model's step positions: the
        last `num_steps` step tokens (the answer's, see rmserve/steps.py), or every one when the
        sample came as a text or token ids (num_steps None)."""
        self.check_ids(ids)
        gate = None
        if self.needs_gate:
            gate = find_last(ids, self.gating_pattern)
            if gate is None:
                raise InputError("the gating pattern (<|eot_id|> before the assistant header) is not in the "
                                 "sample: ArmoRM/QRM need a user turn followed by the assistant's answer")
        return Encoded(tuple(ids), gate, self._step_positions(ids, num_steps))

    def _step_positions(self, ids: Sequence[int], num_steps: int | None) -> tuple[int, ...]:
        if self.steps is None:
            return ()
        where = [i for i, t in enumerate(ids) if t == self.steps.token_id]
        if num_steps is None:
            if not where:
                raise InputError(f"no step token {self.steps.token} in the sample: a process reward model scores "
                                 "the steps that token ends")
            return tuple(where)
        if len(where) < num_steps:   # the chat template dropped or changed part of the answer
            raise InputError(f"the rendered sample holds {len(where)} step tokens for the answer's {num_steps} steps")
        return tuple(where[len(where) - num_steps:])

    def encode_many(self, conversations: Sequence[Any]) -> list[Encoded | InputError]:
        """Conversations (message lists) or pre-tokenized samples (lists of ints) -> Encoded or the error."""
        out: list[Encoded | InputError | None] = [None] * len(conversations)
        texts, where, counts = [], [], []
        for i, conv in enumerate(conversations):
            try:
                if isinstance(conv, (list, tuple)) and conv and all(isinstance(t, int) for t in conv):
                    out[i] = self.finish_token_ids(conv)
                    continue
                messages = check_conversation(conv, steps=self.steps is not None)
                count = None
                if self.steps is not None:   # the answer's steps, joined with the step token
                    try:
                        steps, text = self.steps.steps_of(messages[-1]["content"])
                    except StepError as e:
                        raise InputError(str(e)) from None
                    messages[-1]["content"], count = text, len(steps)
                texts.append(self.render(messages))
                where.append(i)
                counts.append(count)
            except InputError as e:
                out[i] = e
            except Exception as e:  # a template that raises on this input, say
                out[i] = InputError(f"could not render the chat template: {type(e).__name__}: {e}")
        for i, enc in zip(where, self.encode_texts(texts, counts)):
            out[i] = enc
        return out  # type: ignore[return-value]

    def finish_token_ids(self, ids: Sequence[int]) -> Encoded:
        """A token-id sample a client tokenized itself -> Encoded (or raises InputError). bos="one"
        holds it to exactly one BOS as it does texts (added when missing, never doubled); the other
        policies take the ids as given. Every path that takes token ids (Engine.score, the offline job,
        the server's routes) comes here, so the same ids get the same score on each."""
        return self.finish(self._apply_bos(list(ids)) if ids else [])

    def encode_token_ids(self, samples: Sequence[Sequence[int]]) -> list[Encoded | InputError]:
        """Token-id samples -> Encoded or the error (see finish_token_ids)."""
        out: list[Encoded | InputError] = []
        for ids in samples:
            try:
                out.append(self.finish_token_ids(ids))
            except InputError as e:
                out.append(e)
        return out

    def encode_texts(self, texts: Sequence[str], num_steps: Sequence[int | None] | None = None
                     ) -> list[Encoded | InputError]:
        """Texts already rendered with the chat template -> Encoded or the error, under the BOS policy.

        Special-token strings in the text (a leading "<|begin_of_text|>", say) become their tokens.
        num_steps: per text, its answer's step count (process reward models; see `finish`)."""
        out: list[Encoded | InputError | None] = [_unicode_error(t) for t in texts]
        good = [i for i, e in enumerate(out) if e is None]
        if not good:
            return out  # type: ignore[return-value]
        encoded = self.tokenizer([texts[i] for i in good], add_special_tokens=self.bos == "tokenizer")["input_ids"]
        for i, ids in zip(good, encoded):
            try:
                out[i] = self.finish(self._apply_bos(ids), None if num_steps is None else num_steps[i])
            except InputError as e:
                out[i] = e
        return out  # type: ignore[return-value]


def _unicode_error(text: str) -> InputError | None:
    """A text the tokenizer cannot take: a lone UTF-16 surrogate (JSON's "\\ud800" without its
    pair) is not a Unicode character, and the tokenizer would fail the whole batch on it."""
    if not isinstance(text, str):
        return InputError(f"expected a text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return InputError(f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                          f"{e.start} (a UTF-16 escape without its pair)")
    return None

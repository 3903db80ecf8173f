"""Row shapes: one raw input row -> the conversations to score, or the reason it cannot be scored.

| shape             | columns (names settable)                 | samples scored                          |
|-------------------|------------------------------------------|-----------------------------------------|
| `messages`        | `messages`: a message list               | the list                                |
| `prompt_response` | `prompt`, `response`                     | prompt (a string: one user turn; or a message list) + the response as the assistant turn |
| `pair`            | `chosen`, `rejected` (message lists; or strings with `prompt`) | both sides                   |
| `multi`           | `prompt`, `responses` (a list of strings) | prompt + each response (best-of-N in one row) |

For a process reward model an answer may be a list of step strings (rmserve/steps.py): the
`response` column (`--response-field steps` for a `steps` column), each of `responses`, `chosen` /
`rejected`, or the assistant message's content in a message list.

`group_field` (with `messages` or `prompt_response`) names a prompt-id column: rows sharing it
form a best-of-N group and get their rank within it. The id is the `id_field` column when the
first row has it (then every row must), else the row number; an `id_field` other than the
default `id` that the first row lacks is refused.

Every row also carries its `group`: the key of the prompt its samples share (a pair's or multi
row's row number, or the group column; None for a lone sample), which the engine's shared-prefix
scoring uses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

SHAPES = ("auto", "messages", "prompt_response", "pair", "multi")


@dataclass(frozen=True)
class ShapeConfig:
    shape: str = "auto"
    id_field: str = "id"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    responses_field: str = "responses"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    group_field: str | None = None        # best-of-N across rows: the prompt-id column
    keep: tuple[str, ...] = ()            # input columns copied to the output as they are
    ids_from_column: bool | None = None   # resolved from the first row

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.group_field and self.shape in ("pair", "multi"):
            raise ValueError("--group-field groups rows that hold one answer each (messages or "
                             "prompt_response shapes); pair and multi rows are their own groups")

    @property
    def ranked(self) -> bool:
        return self.shape == "multi" or self.group_field is not None

    def sides(self) -> tuple[str, ...]:
        """Output-column prefixes of a row's samples (pair: chosen_, rejected_)."""
        return ("chosen", "rejected") if self.shape == "pair" else ("",)


@dataclass
class Row:
    index: int                  # row number in the input
    id: Any
    samples: list               # conversations (message lists) to score
    group: Any = None           # the key of the prompt these samples share (None: none known)
    keep: dict = field(default_factory=dict)


@dataclass
class RowError:
    index: int
    id: Any
    error: str


class _Bad(ValueError):
    """This row cannot be scored; the message says why."""


def parse_raw(raw: Any) -> dict:
    """A raw row (jsonl bytes/str or a dict) -> dict, or _Bad with the reason."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    text = raw.rstrip()   # the line end: an error at the end of the row would be "line 2, column 1"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        where = "" if e.msg.endswith(" at") else " at"
        cut = (f" (the row ends at column {len(text)}: is the line cut off?)"
               if e.pos >= len(text) or e.msg.startswith("Unterminated string") else "")
        raise _Bad(f"malformed JSON: {e.msg}{where} column {e.colno}{cut}") from None
    if not isinstance(row, dict):
        raise _Bad(f"a row must be a JSON object, got {type(row).__name__}")
    if "\\ud" in text.lower():   # an escaped UTF-16 half: alone, no output file can hold it, no tokenizer take it
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Bad(f"not valid Unicode: a lone UTF-16 surrogate ({e.object[e.start]!r} without its pair)") from None
    return row


def resolve(config: ShapeConfig, first: dict) -> ShapeConfig:
    """Fill `shape` (when auto) and the id mode from the first well-formed row."""
    shape = config.shape
    if shape == "auto":
        keys = set(first)
        if {config.chosen_field, config.rejected_field} <= keys:
            shape = "pair"
        elif config.messages_field in keys:
            shape = "messages"
        elif {config.prompt_field, config.responses_field} <= keys:
            shape = "multi"
        elif {config.prompt_field, config.response_field} <= keys:
            shape = "prompt_response"
        else:
            raise ValueError(f"cannot tell the row shape from the first row's columns {sorted(keys)}; "
                             "pass --shape and the column names")
    if first and config.id_field != ShapeConfig.id_field and config.id_field not in first:
        # an id column asked for by name and absent (a typo): row numbers would pass for its ids
        raise ValueError(f"--id-field '{config.id_field}' is not a column of the first row (its columns: "
                         f"{sorted(first)})")
    return replace(config, shape=shape, ids_from_column=config.id_field in first)


def _require(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        raise _Bad(f"missing field '{name}'")
    return row[name]


def _conversation(row: dict, cfg: ShapeConfig, answer: Any, what: str) -> Any:
    """A side given as a message list is taken as it is (the engine checks it); a string, or a list of
    step strings (process reward models), is the assistant's answer to the prompt column."""
    if isinstance(answer, (list, tuple)) and not (answer and all(isinstance(a, str) for a in answer)):
        return list(answer)
    if not isinstance(answer, (str, list, tuple)):
        raise _Bad(f"field '{what}' must be a string, a message list or a list of steps, got {type(answer).__name__}")
    prompt = _require(row, cfg.prompt_field)
    if isinstance(prompt, str):
        context = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        context = list(prompt)
    else:
        raise _Bad(f"field '{cfg.prompt_field}' must be a string or a message list")
    return context + [{"role": "assistant", "content": answer}]


def make_row(cfg: ShapeConfig, index: int, raw: Any) -> Row | RowError:
    """cfg must be resolved (see `resolve`)."""
    rid: Any = None if cfg.ids_from_column else index   # None: the row's id could not be read
    try:
        row = parse_raw(raw)
        if cfg.ids_from_column:
            value = _require(row, cfg.id_field)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise _Bad(f"id field '{cfg.id_field}' must be an integer or a string, got {value!r}")
            rid = value
        if cfg.shape == "messages":
            samples = [_require(row, cfg.messages_field)]
        elif cfg.shape == "prompt_response":
            samples = [_conversation(row, cfg, _require(row, cfg.response_field), cfg.response_field)]
        elif cfg.shape == "pair":
            samples = [_conversation(row, cfg, _require(row, cfg.chosen_field), cfg.chosen_field),
                       _conversation(row, cfg, _require(row, cfg.rejected_field), cfg.rejected_field)]
        else:
            responses = _require(row, cfg.responses_field)
            if not isinstance(responses, (list, tuple)) or not responses:
                raise _Bad(f"field '{cfg.responses_field}' must be a non-empty list of responses")
            samples = [_conversation(row, cfg, r, f"{cfg.responses_field}[{i}]") for i, r in enumerate(responses)]
        group = index if cfg.shape in ("pair", "multi") else None   # None: no known shared prompt
        if cfg.group_field:
            group = _require(row, cfg.group_field)
            if isinstance(group, bool) or not isinstance(group, (int, str)):
                raise _Bad(f"group field '{cfg.group_field}' must be an integer or a string, got {group!r}")
        return Row(index, rid, samples, group, {k: row.get(k) for k in cfg.keep})
    except _Bad as e:
        return RowError(index, rid, str(e))

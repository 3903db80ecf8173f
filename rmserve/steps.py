"""Process reward models (PRMs): an answer as steps in, one reward per step and an aggregated score out.

A PRM (Qwen2.5-Math-PRM) scores every step of a solution: the answer is written as its steps joined
by the checkpoint's step token, with one more step token at the end, and step k's reward is read at
the k-th step token of the answer (config.HeadSpec.step_token; heads/value.py). This module holds the
input side (what an answer may be, how it becomes the text the model reads) and the one table of
aggregation rules (how a sample's step rewards give its `score`). It imports no torch.

The assistant's answer (the last message's `content`) may be:
- a list of step strings: joined the model card's way, `token.join(steps) + token`; a step that is
  blank, not a string, or holds the step token itself is an error for that sample;
- a text, with `step_separator` set (e.g. "\\n\\n", what the card recommends for Qwen2.5-Math-Instruct
  answers): split on it, each piece stripped of surrounding whitespace, empty pieces dropped, then
  joined as above (a piece holding the step token is an error);
- a text already in the card's form (steps joined by the step token, ending with it), when no
  separator is set: scored as it is; only whitespace may follow its last step token.
Pre-tokenized samples and pre-rendered texts (/get_reward) are taken as they are: every step token
in them is a step (the card's own code counts every step token of the input).

Only the answer's step tokens are steps. The card's code reads every step token in the input, so a
step token written in the system or user text would add a step (and shift every reward after it to
the wrong step); rmserve reads the last n step tokens of the sample, n being the answer's step count:
the answer is the last message and none of its steps holds a step token, so those are exactly the
answer's (inputs.Preprocessor.finish).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# score = AGGREGATIONS[rule](step_rewards), on the host in double precision. min (the default): a
# solution is as good as its worst step; last: the final step's reward; product: the probability that
# every step is right, were the steps independent; mean.
AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": min,
    "last": lambda rewards: rewards[-1],
    "product": math.prod,
    "mean": lambda rewards: math.fsum(rewards) / len(rewards),
}
DEFAULT_AGGREGATION = "min"


class StepError(ValueError):
    """This sample's steps cannot be scored; the message says why (inputs.py turns it into an InputError)."""


def aggregate(rule: str, rewards: Sequence[float]) -> float:
    return float(AGGREGATIONS[rule](rewards))


def check_rule(rule: str) -> None:
    if rule not in AGGREGATIONS:
        raise ValueError(f"step_aggregation must be one of {', '.join(AGGREGATIONS)}; got {rule!r}")


def check_separator(separator: str | None) -> None:
    if separator is not None and (not isinstance(separator, str) or not separator):
        raise ValueError(f"step_separator must be a non-empty string or None, got {separator!r}")


def unescape(text: str) -> str:
    """A command-line separator with backslash escapes (\\n, \\t, \\r, \\\\) -> the string it means."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class StepFormat:
    """How one engine's answers become steps: the checkpoint's step token (and its id in the
    tokenizer) and the optional separator that splits text answers."""
    token: str
    token_id: int
    separator: str | None = None

    def steps_of(self, content: Any) -> tuple[list[str], str]:
        """The answer's steps and the text the model reads (steps joined by the token, one at the end)."""
        text = None   # the answer already in the card's form; else joined from its steps below
        if isinstance(content, (list, tuple)):
            steps = list(content)
        elif not isinstance(content, str):
            raise StepError(f"the answer must be a text or a list of step strings, got {type(content).__name__}")
        elif self.separator is not None:
            steps = [piece.strip() for piece in content.split(self.separator)]
            steps = [s for s in steps if s]
        elif self.token in content:
            *steps, tail = content.split(self.token)
            if tail.strip():
                raise StepError(f"the answer's text after its last step token {self.token} is not a step: end the "
                                f"answer with {self.token}, as the model card does, or give its steps as a list")
            text = content
        else:
            raise StepError(f"a process reward model scores steps: give the answer as a list of step strings, join "
                            f"its steps with {self.token} (ending with it), or set step_separator (e.g. '\\n\\n') "
                            "to split text answers")
        if not steps:
            raise StepError("the answer has no steps")
        for k, step in enumerate(steps, 1):
            if not isinstance(step, str):
                raise StepError(f"step {k} is not a string (got {type(step).__name__})")
            if not step.strip():
                raise StepError(f"step {k} is empty")
        for k, step in enumerate(steps, 1):   # after: an empty step is named before a later one's token
            if self.token in step:
                raise StepError(f"step {k} holds the step token {self.token}; steps are joined with it, so it "
                                "cannot be part of a step")
        return steps, text if text is not None else self.token.join(steps) + self.token


def step_format(tokenizer, token: str, separator: str | None) -> StepFormat:
    """The engine's StepFormat: `token`'s id in the checkpoint's tokenizer, where it must be one added
    token (as `<extra_0>` is in Qwen2.5-Math-PRM's), so that every occurrence in a text is that id."""
    token_id = tokenizer.get_added_vocab().get(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no added token {token}, the step token of this process reward model")
    check_separator(separator)
    return StepFormat(token, token_id, separator)

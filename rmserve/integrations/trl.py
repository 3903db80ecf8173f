"""A reward function for TRL's online trainers (GRPOTrainer, RLOOTrainer), backed by rmserve.

    from rmserve.integrations import RewardFunction
    reward = RewardFunction("http://rm-host:8000")            # a running `rmserve serve`
    reward = RewardFunction(rmserve.Engine.from_pretrained("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"))
    trainer = GRPOTrainer(model=..., reward_funcs=reward, ...)          # or reward_funcs=reward.as_async()

The call shape is TRL's (huggingface/trl f2cd57710ae345ea6428ae95363267fcf38a3dc8,
trl/trainer/grpo_trainer.py `_calculate_rewards`, read, not copied): keyword arguments only,
`prompts=`, `completions=`, `completion_ids=` and every other dataset column plus `trainer_state`,
`log_extra`, `log_metric` (and `environments`); a list with one float or None per completion (None
becomes NaN there). A function is run as a coroutine only when `inspect.iscoroutinefunction` says
so, which is False for an object with an async `__call__`: `as_async()` returns a real coroutine
function. Prompts and completions come in two formats:
- conversational: message lists; the sample scored is prompt + completion;
- standard: strings; the prompt is one user turn and the completion the assistant's answer, both
  rendered with the reward model's own chat template (never concatenated as raw text).
A completion that cannot be scored gets None (with a warning giving the reason): an empty answer,
a tool turn, non-text content, longer than the model's maximum, a model failure.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from ..inputs import InputError, check_conversation
from .scorers import make_scorer

logger = logging.getLogger("rmserve.integrations")


def to_conversation(prompt: Any, completion: Any) -> list[dict]:
    """One TRL sample -> the conversation to score; InputError if it is not one."""
    if isinstance(prompt, str) and isinstance(completion, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        messages = [*prompt, *completion]
    else:
        raise InputError(f"the prompt and the completion must both be strings or both message lists, got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")
    return check_conversation(messages)


class RewardFunction:
    """`reward(prompts=..., completions=..., **columns) -> list[float | None]`, thread-safe.

    source: the URL of a running `rmserve serve` or an `Engine` / `SyncEngine` in this process.
    settings: for a URL, RemoteScorer's (api_key, timeout, max_items, retry_s); for an Engine,
    `batching=BatchingConfig(...)`."""

    def __init__(self, source, *, name: str = "rmserve", **settings):
        self.scorer = make_scorer(source, **settings)
        self.__name__ = name   # TRL logs each reward function under its __name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids=None,
                 **columns) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions")
        rewards: list[float | None] = [None] * len(prompts)
        reasons: dict[int, str] = {}
        convs, where = [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                convs.append(to_conversation(p, c))
                where.append(i)
            except InputError as e:
                reasons[i] = str(e)
        for i, scored in zip(where, self.scorer.score(convs) if convs else []):
            if scored.error is None:
                rewards[i] = scored.score
            else:
                reasons[i] = scored.error
        if reasons:
            first = min(reasons)
            logger.warning("rmserve: %d of %d completions could not be scored and get None (completion %d: %s)",
                           len(reasons), len(prompts), first, reasons[first])
        return rewards

    def as_async(self):
        """The same reward function as a coroutine function (TRL runs those concurrently with the other
        async reward functions); the scoring runs on a worker thread."""
        async def reward(prompts, completions, completion_ids=None, **columns):
            return await asyncio.to_thread(self, prompts, completions, completion_ids, **columns)

        reward.__name__ = self.__name__
        return reward

    def close(self) -> None:
        self.scorer.close()

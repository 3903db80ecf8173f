"""Typed request and response bodies of the HTTP server (they make its OpenAPI schema)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class Message(BaseModel):
    """One OpenAI-style chat message. Other keys (name, ...) are ignored. A process reward model's
    answer (the last, assistant message) may be a list of step strings."""
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[str]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversations: list[list[Message]] = Field(
        min_length=1, description="Conversations to score, each ending with the assistant's answer")
    model: str | None = Field(None, description="If given, must name the served model")
    samples: int = Field(0, ge=0, description="URM, QRM: draws per conversation from its score distribution "
                                              "(into `samples` / `score_samples`); 0: none")
    seed: int = Field(0, ge=0, lt=2 ** 64, description="The same seed gives the same draws for the same input")


class ScoreItem(BaseModel):
    """One conversation's outputs; which fields are present depends on the model's family
    (see rmserve/results.py). A conversation that could not be scored has only `index` and `error`."""
    index: int
    score: float | None = None
    error: str | None = None
    num_tokens: int | None = None
    logits: list[float] | None = None
    rewards: list[float] | None = None
    gating: list[float] | None = None
    coefficients: list[float] | None = None
    reward_quantiles: list[float] | None = None
    quantiles: list[list[float]] | None = None
    means: list[float] | None = None
    spreads: list[float] | None = None
    sigmas: list[float] | None = None
    weights: list[float] | None = None
    samples: list[list[float]] | None = None
    score_samples: list[float] | None = None
    step_rewards: list[float] | None = Field(None, description="Process reward models: one reward per step")


class ScoreResponse(BaseModel):
    model: str
    family: str
    names: list[str] = Field(description="Names of the per-objective / per-attribute vectors' entries")
    results: list[ScoreItem]


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward-model request. `prompts` and `labels` (sent by newer OpenRLHF) are
    accepted and unused."""
    model_config = ConfigDict(extra="allow")
    query: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        min_length=1, description="Prompt + response texts, already rendered with the chat template")
    prompts: list[Any] | None = None
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    rewards: list[float | None] = Field(description="One score per query; null where `errors` has the reason")
    scores: list[float | None] = Field(description="The same as rewards (newer OpenRLHF reads this key)")
    errors: list[str | None] | None = Field(None, description="Present when some query could not be scored")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "rmserve"
    family: str
    architecture: str
    dtype: str
    device: str
    max_length: int
    names: list[str]
    template_date: str = Field(description="the date chat templates that read the clock render as today")
    step_token: str | None = Field(None, description="process reward models: the token that ends each step")
    step_aggregation: str | None = Field(None, description="process reward models: how `score` comes from the "
                                                           "step rewards (min, last, product, mean)")
    step_separator: str | None = Field(None, description="process reward models: what splits a text answer into "
                                                         "steps (null: answers come as steps)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "shutting_down"]
    queued_samples: int
    pending_samples: int


class ErrorBody(BaseModel):
    type: str = Field(description="invalid_request, body_too_large, unauthorized, unknown_model, "
                                  "overloaded, shutting_down, internal")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody

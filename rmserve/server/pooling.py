"""The request and response shapes of vLLM's and SGLang's reward-model servers, for RL trainers
that call those (verl's reward loop does):

POST /classify        vLLM: {"model", "input": text | [texts] | [ids] | [[ids]]} or {"model", "messages"}
                      -> {"id", "object": "list", "created", "model", "data": [{"index", "label", "probs",
                      "num_classes"}], "usage"}. `probs` holds the raw outputs with `use_activation: false`
                      (`activation`/`softmax` are the older spellings), else vLLM's default activation.
POST /v1/embeddings   SGLang: {"model", "input"} -> {"object": "list", "data": [{"object": "embedding",
                      "embedding", "index"}], "model", "usage"}; the embedding is the raw output vector.

Shapes mirrored from (read, not copied):
- vLLM 055e47c28003156421365af985d676fc921cb075: vllm/frontend/entrypoints/pooling/classify/protocol.py
  (ClassificationCompletionRequest / ClassificationChatRequest / ClassificationResponse) and
  classify/serving.py (label = id2label[argmax], usage); pooling/base/protocol.py (the input union,
  `use_activation`); config/pooler.py `get_use_activation` (softmax, then activation, then use_activation).
- vLLM 1c713679497631bd9bf8b251c9ac93b6f6680326: vllm/model_executor/layers/pooler/activations.py
  (the default activation: problem_type "regression" -> identity, "multi_label_classification" ->
  sigmoid, otherwise sigmoid for fewer than 2 labels and softmax over 2+).
- SGLang bf5ceddc189267e97f79e644f0b7cc70b9e31d4a: python/sglang/srt/entrypoints/openai/serving_embedding.py
  (EmbeddingResponse); 71bcc5fb94ba3edd43c2e0bdada32095013c2aeb: srt/models/llama_reward.py (a reward
  model's "embedding" is its score vector, no activation).
- The client: verl-project/verl 1dda039b9c6311889a9c9a26040677e1254814f9
  verl/experimental/reward_loop/reward_loop.py `compute_score_disrm` reads data[-1].probs[-1] (vLLM)
  or data[-1].embedding[-1] (SGLang) from one rendered, BOS-stripped text per request.

A text is tokenized with the reward model's tokenizer under the server's --bos policy (bos=one: exactly
one BOS whether or not the text starts with one); token ids are held to the same policy
(Preprocessor.encode_token_ids). These shapes have no per-sample error field, and a client reading
probs[-1] must never get a made-up number: a sample that cannot be scored fails the whole request (422,
naming the input and the reason), as vLLM fails a request with an over-long prompt.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..async_engine import AsyncEngine
from ..inputs import InputError, check_conversation, content_chars
from ..results import ScoreResult
from .app import ERRORS, ClientError, ServerConfig
from .schemas import Message

TokenIds = list[StrictInt]
Inputs = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class ClassifyRequest(BaseModel):
    """vLLM's /classify body, completion form (`input`) or chat form (`messages`)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="If given, must name the served model")
    input: Inputs | None = Field(None, description="A text, texts, token ids or lists of token ids; texts "
                                                   "already rendered with the chat template")
    messages: list[Message] | None = Field(None, description="One conversation, rendered with the model's template")
    use_activation: bool | None = Field(None, description="false: raw outputs; true or absent: vLLM's default "
                                                          "activation (sigmoid for one output)")
    activation: bool | None = Field(None, description="Older vLLM spelling of use_activation")
    softmax: bool | None = Field(None, description="Older vLLM spelling of use_activation")
    add_special_tokens: bool | None = Field(None, description="Accepted and not used: the server's --bos policy "
                                                              "decides the BOS token")
    truncate_prompt_tokens: int | None = Field(None, description="Not supported (rmserve never truncates); "
                                                                 "must be absent or null")
    user: str | None = None
    request_id: str | None = None
    priority: int = 0


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: Usage


class EmbeddingRequest(BaseModel):
    """SGLang's /v1/embeddings body."""
    model_config = ConfigDict(extra="forbid")
    input: Inputs = Field(description="A text, texts, token ids or lists of token ids; texts already rendered "
                                      "with the chat template")
    model: str | None = Field(None, description="If given, must name the served model")
    encoding_format: Literal["float"] = "float"
    dimensions: None = Field(None, description="Not supported; must be absent or null")
    user: str | None = None
    rid: str | None = None
    priority: int | None = None


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float]
    index: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


def use_activation(body: ClassifyRequest) -> bool:
    """vLLM reads softmax, then activation, then use_activation (the first one set); rmserve refuses a
    request whose spellings disagree rather than pick one. Unset: True, the pooler's default."""
    given = {k: v for k, v in (("softmax", body.softmax), ("activation", body.activation),
                               ("use_activation", body.use_activation)) if v is not None}
    if len(set(given.values())) > 1:
        raise ClientError(422, "invalid_request", f"{given} disagree; send only use_activation")
    return next(iter(given.values()), True)


def activate(values: list[float], problem_type: str | None) -> list[float]:
    """vLLM's default classification activation for a config's problem_type and the number of outputs."""
    if problem_type == "regression":
        return list(values)
    if problem_type == "multi_label_classification" or len(values) < 2:
        return [_sigmoid(v) for v in values]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def output_vector(result: ScoreResult) -> list[float]:
    """A sample's classifier outputs: the logits of a multi-label sequence classifier, else [score]."""
    return list(result.logits) if result.logits is not None else [result.score]


def split_inputs(value) -> tuple[list[str], list[list[int]]]:
    """The input union -> (texts, token-id lists); exactly one of them is non-empty."""
    if isinstance(value, str):
        return [value], []
    if not value:
        raise ClientError(422, "invalid_request", "input: must not be empty")
    if isinstance(value[0], str):
        return list(value), []
    if isinstance(value[0], int):
        return [], [list(value)]
    return [], [list(v) for v in value]


def add_routes(app, engine: AsyncEngine, config: ServerConfig, check_served_model, check_count, check_chars,
               check_texts, count_item_errors):
    """Adds /classify and /v1/embeddings to `app` (create_app's model-name, size and text checks and
    its error counter passed in)."""
    spec = engine.engine.spec

    def check_model(name: str | None) -> None:
        if spec.head.step_token:   # per-step outputs: neither shape has a place for them
            raise ClientError(422, "invalid_request", "a process reward model gives one reward per step, which "
                                                      "these shapes cannot carry; use /v1/score (step_rewards and "
                                                      "score) or /get_reward (score)")
        check_served_model(name)

    async def score_inputs(value) -> list[ScoreResult]:
        texts, ids = split_inputs(value)
        check_count(len(texts) + len(ids), "inputs")
        texts = check_texts(texts, "input")
        return await (engine.score_texts(texts) if texts else engine.score_token_ids(ids))

    def vectors(results: list[ScoreResult]) -> list[list[float]]:
        """Each sample's output vector, or a 422 naming the first sample that has none."""
        out = []
        for i, r in enumerate(results):
            if r.error is not None:   # a non-finite output is one too (results.NON_FINITE)
                count_item_errors([r])
                raise ClientError(422, "invalid_request", f"input[{i}] cannot be scored: {r.error}")
            out.append(output_vector(r))
        return out

    def usage(results: list[ScoreResult]) -> Usage:
        n = sum(r.num_tokens for r in results)
        return Usage(prompt_tokens=n, total_tokens=n)

    @app.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """vLLM's classification API (what verl's reward loop calls on a vLLM reward server)."""
        check_model(body.model)
        if (body.input is None) == (body.messages is None):
            raise ClientError(422, "invalid_request", "send exactly one of `input` and `messages`")
        if body.truncate_prompt_tokens is not None:
            raise ClientError(422, "invalid_request", "truncate_prompt_tokens is not supported: rmserve scores "
                                                      "whole samples (a sample over the limit is an error)")
        activated = use_activation(body)
        if body.messages is not None:
            try:
                conv = check_conversation([m.model_dump() for m in body.messages])
            except InputError as e:
                raise ClientError(422, "invalid_request", f"messages: {e}") from None
            check_chars(content_chars(conv), "messages")
            results = await engine.score([conv])
        else:
            results = await score_inputs(body.input)
        data = []
        for i, vec in enumerate(vectors(results)):
            probs = activate(vec, spec.problem_type) if activated else vec
            best = max(range(len(probs)), key=probs.__getitem__)
            label = spec.id2label[best] if best < len(spec.id2label) else f"LABEL_{best}"
            data.append(ClassificationData(index=i, label=label, probs=probs, num_classes=len(probs)))
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()),
                                model=config.model_name, data=data, usage=usage(results))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        """SGLang's embeddings API on a reward model: the raw score vector (what verl reads on SGLang)."""
        check_model(body.model)
        results = await score_inputs(body.input)
        data = [EmbeddingObject(embedding=vec, index=i) for i, vec in enumerate(vectors(results))]
        return EmbeddingResponse(data=data, model=config.model_name, usage=usage(results))

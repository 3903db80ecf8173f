"""The synchronous engine: checkpoint + tokenizer -> scores, in packed batches, in input order."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Sequence

import torch

from . import pipeline
from .config import ModelSpec
from .device_check import check_device
from .forward import ModelForward
from .inputs import TEMPLATE_DATE, Encoded, InputError, Preprocessor, check_call, parse_template_date
from .kernels.dispatch import select_kernels
from .loader import LoadedModel, load_model, resolve
from .model.attention import MAX_BATCH_SEQS, select_attention
from .packing import PackedBatch
from .prefix import Limits, pack_samples
from .results import ResultMaker, ScoreResult
from .sampling import add_samples, check_sampling
from .steps import DEFAULT_AGGREGATION, check_rule, check_separator, step_format

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting, resolved once. `Engine.from_pretrained(model, **fields)` fills it."""
    dtype: str = "auto"                  # auto: bfloat16 on CUDA, float32 on CPU
    device: str | None = None            # None: cuda when available, else cpu
    attention: str = "auto"              # flash_attn | torch_varlen | reference | auto
    max_batch_tokens: int = 16384        # token budget of one packed batch (CUDA: a cap; free memory may lower it)
    max_batch_seqs: int | None = None    # cap on samples per batch
    bos: str = "one"                     # BOS policy, see inputs.py
    max_length: int | None = None        # per-sample cap; None: the model's max_position_embeddings
    chat_template: str | None = None     # override the checkpoint's template
    template_date: str = TEMPLATE_DATE   # "today" for templates that read the clock (YYYY-MM-DD; see inputs.py)
    share_prefix: bool = True            # run a prompt shared by several samples once (rmserve/prefix.py)
    share_min_tokens: int = 16           # least common leading tokens worth sharing
    enforce_eager: bool = False          # CUDA: run every batch eagerly, no CUDA graphs (cuda_graphs.py)
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory the engine may hold; sizes the token budget
    tokenizer_threads: int = 1           # score_stream: threads tokenizing ahead of the device
    lookahead: int = 2048                # score_stream: samples sorted by length together (bounds memory)
    kernels: str = "auto"                # auto: Triton kernels on CUDA, PyTorch refs elsewhere; triton | torch
    quantization: str | None = None      # "fp8": e4m3 linears in the backbone, bf16 elsewhere (model/fp8.py)
    quant_kernels: str = "auto"          # fp8's quantizing ops: auto (csrc on CUDA if built) | csrc | torch
    # process reward models (rmserve/steps.py): the rule making `score` from the step rewards, and the
    # separator that splits a text answer into steps (None: an answer is a list of steps, or already joined)
    step_aggregation: str = DEFAULT_AGGREGATION
    step_separator: str | None = None

    def __post_init__(self):
        """Every choice and range checked here, before a model loads or a Ray job starts its actors
        (the device's presence is checked where it is used: a Ray driver may have no GPU)."""
        from .inputs import BOS_POLICIES
        from .kernels.dispatch import KERNEL_CHOICES
        from .kernels.fp8_quant import FP8_KERNEL_CHOICES
        from .model.attention import BACKENDS
        from .model.fp8 import QUANTIZATIONS

        choices = {"dtype": (*DTYPES, "auto"), "attention": (*BACKENDS, "auto"), "bos": BOS_POLICIES,
                   "kernels": KERNEL_CHOICES, "quantization": (None, *QUANTIZATIONS),
                   "quant_kernels": FP8_KERNEL_CHOICES}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if not (name == "dtype" and isinstance(value, torch.dtype)) and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        positive = {"max_batch_tokens": self.max_batch_tokens, "max_batch_seqs": self.max_batch_seqs,
                    "max_length": self.max_length, "share_min_tokens": self.share_min_tokens,
                    "tokenizer_threads": self.tokenizer_threads, "lookahead": self.lookahead}
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        parse_template_date(self.template_date)
        check_rule(self.step_aggregation)
        check_separator(self.step_separator)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.quantization is None and self.quant_kernels != "auto":
            raise ValueError(f"quant_kernels={self.quant_kernels!r} applies to quantization='fp8' only")
        if self.quantization and resolve_dtype(self.dtype, torch.device("cuda")) != torch.bfloat16:
            raise ValueError(f"quantization={self.quantization!r} runs in bfloat16 (its GEMMs output bf16); "
                             f"use dtype='bfloat16' or 'auto', not {self.dtype!r}")

    def model_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype weights load in: dtype, where 'auto' is bf16 on CUDA or with quantization, else fp32."""
        return resolve_dtype("bfloat16" if self.quantization and self.dtype == "auto" else self.dtype, device)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def length_limit(spec: ModelSpec, config: EngineConfig, memory_tokens: int | None = None) -> tuple[int, str]:
    """The longest sample an engine takes, and what sets it (for the too-long error): the model's
    positions, the user's max_length, or (CUDA) the tokens one forward may hold in the GPU memory
    the engine may use (memory.longest_sample)."""
    limit = min(config.max_length or spec.max_position_embeddings, spec.max_position_embeddings)
    if memory_tokens is not None and memory_tokens < limit:
        return memory_tokens, (f"the {memory_tokens} tokens one forward may hold in GPU memory "
                               f"(gpu_memory_utilization={config.gpu_memory_utilization})")
    return limit, f"the model's maximum of {limit}"


def check_step_settings(spec: ModelSpec, config: EngineConfig) -> None:
    """A step setting given for a model that scores no steps is a mistake, not something to ignore."""
    if not spec.head.step_token and (config.step_separator is not None
                                     or config.step_aggregation != DEFAULT_AGGREGATION):
        raise ValueError(f"step_aggregation and step_separator apply to process reward models only; this is a "
                         f"{spec.family} model")


def make_preprocessor(spec: ModelSpec, tokenizer, config: EngineConfig,
                      memory_tokens: int | None = None) -> Preprocessor:
    """The input side of an engine: its tokenizer, BOS policy, length cap, gating need and (a process
    reward model) step token and separator."""
    from .heads import HEADS

    check_step_settings(spec, config)
    steps = step_format(tokenizer, spec.head.step_token, config.step_separator) if spec.head.step_token else None
    max_length, what = length_limit(spec, config, memory_tokens)
    return Preprocessor(tokenizer, bos=config.bos, max_length=max_length, length_limit=what,
                        needs_gate=HEADS[spec.family].needs_gate, chat_template=config.chat_template,
                        vocab_size=spec.vocab_size, template_date=config.template_date, steps=steps)


class Engine:
    """Scores conversations with one reward model.

    engine = Engine.from_pretrained("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2", dtype="bfloat16")
    results = engine.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
    results[0].score
    """

    def __init__(self, model: LoadedModel, tokenizer, config: EngineConfig = EngineConfig()):
        self.model = model
        self.spec = model.spec
        self.device = next(model.backbone.parameters()).device
        self.dtype = model.backbone.embed_tokens.weight.dtype
        self.config = replace(config, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                              max_length=length_limit(self.spec, config)[0])
        check_step_settings(self.spec, config)
        if model.quantization != config.quantization:
            raise ValueError(f"the loaded model has quantization={model.quantization!r} but the engine asks for "
                             f"{config.quantization!r}; load it with load_model(..., quantization="
                             f"{config.quantization!r})")
        self.attention, attn = select_attention(config.attention, self.device, self.dtype)
        self.ops = select_kernels(config.kernels, self.device)   # before any CUDA graph is captured
        self.quant_ops = None
        if config.quantization:
            from .kernels.fp8_quant import select_fp8_ops
            from .model.fp8 import check_fp8

            check_fp8(self.device, self.dtype)
            self.quant_ops = select_fp8_ops(config.quant_kernels, self.device)
        choice = (self.attention, self.ops.name, self.quant_ops and self.quant_ops.name)
        if model.runs_with not in (None, choice):
            raise ValueError(f"this loaded model already runs attention={model.runs_with[0]}, kernels="
                             f"{model.runs_with[1]}, quant_kernels={model.runs_with[2]} for another Engine, and its "
                             f"layers hold one choice; load it again for attention={choice[0]}, kernels={choice[1]}, "
                             f"quant_kernels={choice[2]}")
        model.runs_with = choice
        model.backbone.attn = attn
        model.backbone.use_kernels(self.ops)
        model.head.use_kernels(self.ops)
        if self.quant_ops is not None:
            from .model.fp8 import use_fp8_ops

            use_fp8_ops(model.backbone, self.quant_ops)
        self.config = replace(self.config, kernels=self.ops.name,
                              quant_kernels=self.quant_ops.name if self.quant_ops else config.quant_kernels)
        self.model_forward = ModelForward(model, self.device)
        memory_tokens = None
        if self.device.type == "cuda":   # the batch budget comes from free memory, then graphs are captured
            from .cuda_graphs import prepare_cuda

            budget, memory_tokens, self.model_forward.graphs = prepare_cuda(
                self.model_forward, self.spec, self.config, self.attention)
            self.config = replace(self.config, max_batch_tokens=budget,
                                  max_length=length_limit(self.spec, config, memory_tokens)[0])
        self.preprocessor = make_preprocessor(self.spec, tokenizer, config, memory_tokens)
        self.results = ResultMaker(self.spec.head.names, self.model_forward.step_outputs,
                                   config.step_aggregation if self.spec.head.step_token else None)

    @classmethod
    def from_pretrained(cls, model: str, **settings: Any) -> "Engine":
        """model: a checkpoint directory, a hub id, or `tiny:<preset>` (random weights, for trying things).
        settings: EngineConfig fields."""
        config = EngineConfig(**settings)
        check_device(config.device, "device=")
        if model.startswith("tiny:"):
            from .tiny import tiny_checkpoint

            path = tiny_checkpoint(model[len("tiny:"):])
        else:
            path = resolve(model)
        dev = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = load_model(path, device=dev, dtype=config.model_dtype(dev), quantization=config.quantization)
        return cls(loaded, load_tokenizer(path), config)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def graphs(self):
        """The CUDA graph runner (cuda_graphs.GraphRunner), or None: every batch runs eagerly."""
        return self.model_forward.graphs

    @graphs.setter
    def graphs(self, runner) -> None:
        self.model_forward.graphs = runner

    def limits(self) -> Limits:
        """How a call's samples are planned into batches, from the current config."""
        cfg = self.config
        max_seqs = min(cfg.max_batch_seqs or MAX_BATCH_SEQS, MAX_BATCH_SEQS)   # attention's launch limit
        return Limits(max_tokens=cfg.max_batch_tokens, max_seqs=max_seqs, share=cfg.share_prefix,
                      min_shared=cfg.share_min_tokens)

    def encode(self, conversations: Sequence[Any]) -> list[Encoded | InputError]:
        return self.preprocessor.encode_many(conversations)

    def score(self, conversations: Sequence[Any], groups: Sequence[Any] | None = None, *,
              samples: int = 0, seed: int = 0) -> list[ScoreResult]:
        """Message lists (or token-id lists) -> one ScoreResult each, in input order.

        A sample that cannot be scored gets a result with `error` set; the others are unaffected.
        groups: optional key per sample (prompt id, pair id; None: on its own). With share_prefix on,
        samples with one key run their common prompt once; with no groups given, samples that
        start with the same tokens are found and grouped automatically.
        samples, seed: URM and QRM only: K draws per sample into `samples` / `score_samples`; the same
        seed gives the same draws for a sample whatever else is in the call (rmserve/sampling.py).

        A process reward model (qwen2_prm) takes the answer as steps: the assistant message's content
        a list of step strings (or a text split on step_separator, or already joined with the step
        token); each result has `step_rewards` (one per step) and `score`, their `step_aggregation`
        (rmserve/steps.py)."""
        check_sampling(self.family, samples, seed)
        check_call(conversations)
        encoded = self.encode(conversations)
        results = self.score_encoded(encoded, groups)
        return add_samples(self, encoded, results, samples, seed) if samples else results

    def score_encoded(self, encoded: Sequence[Encoded | InputError],
                      groups: Sequence[Any] | None = None) -> list[ScoreResult]:
        """Encoded samples (or their input errors) -> results in input order. groups: see `score`.
        Identical samples run once and get equal results. With share_prefix off every sample
        stands alone, and the planner then gives exactly packing.plan_batches' batches
        (tests/test_prefix.py). The batching loop is rmserve/pipeline.py's, shared with score_stream."""
        encoded = [self._fits(e) for e in encoded]
        return pipeline.score_encoded(self.model_forward, encoded, groups, self.limits(), self.results)

    def _fits(self, e: Encoded | InputError) -> Encoded | InputError:
        """Samples encoded elsewhere (a Ray job's tokenizer stage, another engine) are held to this
        engine's length limit too (on a GPU it is what memory allows), and to its vocabulary and the
        gating and step positions its head reads (Preprocessor.check_encoded)."""
        if isinstance(e, Encoded):
            try:
                self.preprocessor.check_encoded(e)
            except InputError as err:
                return err
        return e

    def score_stream(self, conversations: Iterable[Any]) -> Iterator[tuple[int, ScoreResult]]:
        """Score a stream of any length with bounded memory: yields (index, ScoreResult) for every
        input, index being its position in `conversations`, in completion order (not input order).

        Inputs are what `score` takes (message lists or token-id lists). Tokenization runs on
        `tokenizer_threads` worker threads ahead of the device; samples are packed by length within
        a window of `lookahead` samples (scheduler.py); on CUDA, host-to-device copies are
        asynchronous from pinned memory, only the head's outputs come back, and one batch is in
        flight while the host prepares the next (pipeline.py). A sample's result equals what
        `score` gives for it in the same batch; samples that cannot be scored take their place in
        the window too and come back with `error` set once it is planned. With share_prefix on,
        samples of one look-ahead window that start with the same tokens share their prompt, as
        `score` finds them without `groups=`, and identical samples of a window run once.

            for index, result in engine.score_stream(rows):
                out[index] = result
        """
        cfg = self.config
        check_call(conversations)
        return pipeline.score_stream(self.model_forward, self.preprocessor, conversations, self.limits(),
                                     self.results, cfg.lookahead, cfg.tokenizer_threads)

    def make_batch(self, items: Sequence[Encoded]) -> PackedBatch:
        """One plain packed batch of `items` on the engine's device (for benchmarks and tests)."""
        return pack_samples(items, self.model_forward.needs_gate, self.model_forward.needs_steps, device=self.device)

    def forward(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """One packed batch on the engine's device -> the head's outputs (fp32, on the device): a CUDA
        graph's replay when a bucket fits it (cuda_graphs.py), else eager (forward.ModelForward)."""
        return self.model_forward.forward(batch)

    def forward_eager(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return self.model_forward.eager(batch)

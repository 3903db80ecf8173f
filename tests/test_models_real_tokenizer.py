"""The real Qwen3 tokenizer and chat template (../shared/data/qwen3-tokenizer, or the folder named by
RMSERVE_QWEN3_TOKENIZER): no BOS under any policy, the ChatML and think-token ids, and the tiny
checkpoints' "qwen3" template rendering exactly what the real one renders. Skipped where the folder
is absent (a user's clone has no ../shared)."""
import json
import os

import pytest
from transformers import PreTrainedTokenizerFast

from rmserve.inputs import Preprocessor
from rmserve.tiny_templates import TEMPLATES

FOLDER = os.environ.get("RMSERVE_QWEN3_TOKENIZER") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "qwen3-tokenizer")

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FOLDER, "tokenizer.json")),
    reason=f"the real Qwen3 tokenizer is not at {os.path.abspath(FOLDER)} (set RMSERVE_QWEN3_TOKENIZER to its folder)")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>r1</think>A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "\n\n<think>\n\nr2\n\n</think>\n\n\nA2"}],
    [{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "ok"},
     {"role": "system", "content": "late system"}, {"role": "user", "content": "Q"},
     {"role": "assistant", "content": "no think here </think> but a stray close"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    with open(os.path.join(FOLDER, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(FOLDER, "tokenizer.json"), bos_token=cfg["bos_token"],
                                  eos_token=cfg["eos_token"], pad_token=cfg["pad_token"])
    tok.chat_template = cfg["chat_template"]
    return tok


@pytest.mark.parametrize("bos", ["one", "template", "tokenizer"])
def test_no_bos_under_any_policy(tokenizer, bos):
    assert tokenizer.bos_token_id is None
    pre = Preprocessor(tokenizer, bos=bos, max_length=40960, needs_gate=False)
    for conv in CONVERSATIONS:
        ids = pre.encode_many([conv])[0].ids
        assert list(ids) == tokenizer(pre.render(conv), add_special_tokens=False)["input_ids"]
        assert ids[0] == 151644 and 151643 not in ids   # <|im_start|>; never <|endoftext|> (config's bos_token_id)


def test_special_token_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151667, 151668]


def test_tiny_template_renders_as_the_real_one(tokenizer):
    real = Preprocessor(tokenizer, max_length=40960, needs_gate=False)
    tiny = Preprocessor(tokenizer, max_length=40960, needs_gate=False, chat_template=TEMPLATES["qwen3"])
    for conv in CONVERSATIONS:
        assert tiny.render(conv) == real.render(conv)
    assert "<think>\nsimple sum\n</think>\n\n4<|im_end|>" in real.render(CONVERSATIONS[1])

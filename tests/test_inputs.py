"""Chat template rendering, BOS policy, gating position and per-sample input errors."""
import os

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rmserve import Engine
from rmserve.inputs import GATING_TEXT, Encoded, InputError, Preprocessor, check_conversation, find_last

from .helpers import random_conversation

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
RENDERED = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
    "llama3_nobos": "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
}
# BOS count per (template, policy): the trap is the template's BOS plus the tokenizer's.
BOS_COUNT = {("llama3", "one"): 1, ("llama3", "template"): 1, ("llama3", "tokenizer"): 2,
             ("llama3_nobos", "one"): 1, ("llama3_nobos", "template"): 0, ("llama3_nobos", "tokenizer"): 1}


def preprocessor(path, bos="one", needs_gate=True, max_length=10_000):
    return Preprocessor(AutoTokenizer.from_pretrained(path), bos=bos, max_length=max_length, needs_gate=needs_gate)


@pytest.mark.parametrize("template", ["llama3", "llama3_nobos"])
@pytest.mark.parametrize("bos", ["one", "template", "tokenizer"])
def test_bos_policy(tiny_model, template, bos):
    pre = preprocessor(tiny_model("armorm", template=template), bos=bos)
    assert pre.render(CONV) == RENDERED[template]
    enc = pre.encode_many([CONV])[0]
    n_bos = sum(1 for t in enc.ids if t == pre.bos_id)
    assert n_bos == BOS_COUNT[(template, bos)]
    if n_bos:
        assert all(t == pre.bos_id for t in enc.ids[:n_bos])
    # the gate still sits on the <|eot_id|> closing the user turn, whatever the BOS count
    tok = pre.tokenizer
    assert tok.convert_ids_to_tokens(enc.ids[enc.gate]) == "<|eot_id|>"
    assert tok.decode(enc.ids[enc.gate + 1:]) == "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"


def test_gating_position_is_last_user_turn(tiny_model, rng):
    pre = preprocessor(tiny_model("qrm"))
    for _ in range(20):
        conv = random_conversation(rng, max_turns=4)
        enc = pre.encode_many([conv])[0]
        pat = pre.gating_pattern
        assert tuple(enc.ids[enc.gate:enc.gate + len(pat)]) == pat
        assert find_last(enc.ids[enc.gate + 1:], pat) is None   # no later occurrence
        answer = pre.tokenizer.decode(enc.ids[enc.gate + len(pat):])
        assert answer == conv[-1]["content"].strip() + "<|eot_id|>"


def test_pre_tokenized_input(tiny_model):
    path = tiny_model("armorm")
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
    enc = engine.encode([CONV])[0]
    by_ids = engine.score([list(enc.ids)])[0]
    by_conv = engine.score([CONV])[0]
    assert by_ids.ok and by_ids.score == by_conv.score   # same single-sample batch: bitwise equal
    # the BOS policy holds for ids as for texts (and as the server's routes hold it): bos="one" adds a
    # missing BOS and never doubles one; bos="template" takes the ids as given
    bos, body = enc.ids[0], list(enc.ids[1:])
    assert bos == engine.preprocessor.bos_id
    for ids in (body, [bos, bos] + body):
        assert engine.score([ids])[0].score == by_conv.score
    as_given = Preprocessor(engine.preprocessor.tokenizer, bos="template", max_length=10_000, needs_gate=True)
    for ids in (body, [bos, bos] + body):
        assert as_given.encode_many([ids])[0].ids == tuple(ids)
    # ids outside the vocabulary are refused before they reach the model
    vocab = engine.spec.vocab_size
    for ids in ([1, 2, vocab], [-1, 2, 3]):
        res = engine.score([list(enc.ids) + ids])[0]
        assert not res.ok and "outside the model's vocabulary" in res.error
    # token ids without the gating pattern are refused for ArmoRM, not guessed
    bad = engine.score([list(enc.ids[enc.gate + 1:])])[0]
    assert not bad.ok and "gating pattern" in bad.error


BAD = [
    ([], "empty conversation"),
    ("hello", "must be a list"),
    ([{"role": "user", "content": "x"}], "last message must be the assistant"),
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], "role 'bot'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "no text"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "   "}], "answer is empty"),
    (["user: x"], "not an object"),
    ([{"role": "user", "content": "x"}, {"role": "assistant"}], "no text"),
]


@pytest.mark.parametrize("conv,message", BAD)
def test_bad_conversations_are_per_sample_errors(tiny_model, conv, message):
    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu")
    good, bad, good2 = engine.score([CONV, conv, CONV])
    assert good.ok and good2.ok and good.score == pytest.approx(good2.score, rel=1e-5)
    assert not bad.ok and message in bad.error and bad.score is None


def test_missing_gating_pattern_and_too_long(tiny_model):
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", max_length=60)
    only_answer = [{"role": "assistant", "content": "Hello"}]
    long = [{"role": "user", "content": "the cat " * 40}, {"role": "assistant", "content": "ok"}]
    res = engine.score([only_answer, long, CONV])
    assert "gating pattern" in res[0].error
    assert "longer than the model's maximum of 60" in res[1].error
    assert res[2].ok


def test_max_length_defaults_to_model_limit(tiny_model):
    engine = Engine.from_pretrained(tiny_model("bt", max_position_embeddings=50), dtype="float32", device="cpu")
    assert engine.config.max_length == 50
    res = engine.score([[{"role": "user", "content": "the cat " * 30}, {"role": "assistant", "content": "ok"}]])
    assert "maximum of 50" in res[0].error


def test_samples_encoded_elsewhere_meet_the_engines_limit(tiny_model):
    """score_encoded holds pre-encoded samples (a Ray job's tokenizer stage, another engine's
    encode) to this engine's length limit, as encode would."""
    path = tiny_model("bt", max_position_embeddings=200)
    big = Engine.from_pretrained(path, dtype="float32", device="cpu")
    small = Engine.from_pretrained(path, dtype="float32", device="cpu", max_length=40)
    long = [{"role": "user", "content": "the cat " * 20}, {"role": "assistant", "content": "ok"}]
    encoded = big.encode([long, CONV])
    assert isinstance(encoded[0], Encoded) and len(encoded[0]) > 40
    res = small.score_encoded(encoded)
    assert f"{len(encoded[0])} tokens, longer than the model's maximum of 40" == res[0].error
    assert res[1].ok and res[1].score == pytest.approx(big.score([CONV])[0].score, rel=1e-5, abs=1e-6)



def test_samples_encoded_elsewhere_are_checked_like_encode_checks_them(tiny_model):
    """An Encoded this engine's encode could not have made (another engine's: no gating position, a
    larger vocabulary; or made by hand: a gate or a step past the sample, no tokens) is that sample's
    error, not a crash of the whole call nor, where its gate lands in a neighbour's rows, a silent
    wrong score; the other samples are scored as they would be alone."""
    armo = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu")
    good = armo.encode([CONV])[0]
    assert isinstance(good, Encoded) and good.gate is not None
    n, vocab = len(good), armo.spec.vocab_size
    bad = {
        "no gating position": Encoded(good.ids),
        "gate past the end": Encoded(good.ids, n + 5),                        # lands in the next sample
        "vocabulary": Encoded(good.ids[:-1] + (vocab + 3,), good.gate),
        "no tokens": Encoded(()),
    }
    res = armo.score_encoded([*bad.values(), good])
    for (what, _), r in zip(bad.items(), res):
        assert r.error, what
    assert "gating position" in res[0].error and "gating position" in res[1].error
    assert f"outside the model's vocabulary (0..{vocab - 1})" in res[2].error and res[3].error == "no tokens"
    assert res[-1].ok and res[-1].score == pytest.approx(armo.score([CONV])[0].score, rel=1e-5, abs=1e-6)
    prm = Engine.from_pretrained(tiny_model("qwen2_prm"), dtype="float32", device="cpu")
    conv = CONV[:-1] + [{"role": "assistant", "content": ["one", "two"]}]
    steps = prm.encode([conv])[0]
    assert isinstance(steps, Encoded) and len(steps.steps) == 2
    res = prm.score_encoded([Encoded(steps.ids), Encoded(steps.ids, None, (len(steps) + 2,)), steps])
    assert "step" in res[0].error and "step" in res[1].error and res[2].ok

def test_gpu_memory_caps_the_sample_length(tiny_model):
    """On CUDA the longest sample is what one forward may hold beside the graphs
    (memory.longest_sample); the error says so. The limit logic itself runs anywhere."""
    from rmserve.config import load_spec
    from rmserve.engine import EngineConfig, length_limit, make_preprocessor

    path = tiny_model("bt", max_position_embeddings=200)
    spec, cfg = load_spec(path), EngineConfig(gpu_memory_utilization=0.5)
    assert length_limit(spec, cfg) == (200, "the model's maximum of 200")
    assert length_limit(spec, cfg, memory_tokens=1000) == (200, "the model's maximum of 200")
    n, what = length_limit(spec, cfg, memory_tokens=40)
    assert n == 40 and what == "the 40 tokens one forward may hold in GPU memory (gpu_memory_utilization=0.5)"
    pre = make_preprocessor(spec, AutoTokenizer.from_pretrained(path), cfg, memory_tokens=40)
    long = [{"role": "user", "content": "the cat " * 20}, {"role": "assistant", "content": "ok"}]
    bad, good = pre.encode_many([long, CONV])
    assert isinstance(bad, InputError) and str(bad).endswith("longer than " + what)
    assert isinstance(good, Encoded)


def test_check_conversation_returns_plain_messages():
    msgs = check_conversation([{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}])
    assert msgs == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(InputError):
        check_conversation(None)


# The real Llama 3 tokenizer files: RMSERVE_LLAMA3_TOKENIZER, else ../shared beside the clone (not in it).
SHARED_TOKENIZER = os.environ.get("RMSERVE_LLAMA3_TOKENIZER") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "llama3-tokenizer")


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason=f"no Llama 3 tokenizer directory at {os.path.abspath(SHARED_TOKENIZER)}; set "
                           "RMSERVE_LLAMA3_TOKENIZER to one (tokenizer.json, tokenizer_config.json) to run it")
def test_real_llama3_tokenizer_gating_ids_and_bos():
    import json

    with open(os.path.join(SHARED_TOKENIZER, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(SHARED_TOKENIZER, "tokenizer.json"),
                                  bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])
    tok.chat_template = cfg["chat_template"]
    pre = Preprocessor(tok, bos="one", max_length=8192, needs_gate=True)
    assert pre.gating_pattern == (128009, 128006, 78191, 128007, 271)   # the ids ArmoRM's code hard-codes
    enc = pre.encode_many([CONV])[0]
    assert enc.ids[0] == 128000 and enc.ids.count(128000) == 1
    assert tok(GATING_TEXT, add_special_tokens=True)["input_ids"][0] == 128000
    assert Preprocessor(tok, bos="tokenizer", max_length=8192, needs_gate=True).encode_many([CONV])[0].ids[:2] == (128000, 128000)
    assert isinstance(enc, Encoded)


def test_a_call_that_is_not_a_list_of_samples_is_refused(tiny_model):
    """A string, a dict or one bare conversation given as `conversations` was read item by item (a
    character or a message a sample: `score("Hi")` gave two results, each an error): TypeError."""
    import asyncio

    from rmserve.async_engine import AsyncEngine

    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu")
    for bad in ("Hi", b"Hi", CONV[0], CONV):
        with pytest.raises(TypeError, match="conversations"):
            engine.score(bad)
        with pytest.raises(TypeError, match="conversations"):
            engine.score_stream(bad)

    async def call():
        served = AsyncEngine(engine)
        with pytest.raises(TypeError, match=r"score\(\[conversation\]\)"):
            await served.score(CONV)
        out = await served.score([CONV, [{"role": "user", "content": "x"}]])
        await served.close()
        return out

    good, bad = asyncio.run(call())
    assert good.ok and "last message must be the assistant" in bad.error   # a list of samples: one error each

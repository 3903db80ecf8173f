"""Config parsing, family detection and the strict loader's refusals."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rmserve import CheckpointError, ConfigError, Engine
from rmserve.config import load_spec, spec_from_dict
from rmserve.loader import load_model, resolve

from .helpers import FAMILIES


def copy_checkpoint(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def edit_tensors(path: str, fn) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detection_and_head_spec(tiny_model, family):
    spec = load_spec(tiny_model(family))
    assert spec.family == family
    if family in ("armorm", "qrm"):
        assert spec.head.num_objectives == 19 and len(spec.head.names) == 19
        assert spec.head.gating_temperature == (5.0 if family == "qrm" else 10.0)
    if family == "qrm":
        assert spec.head.num_quantiles == 19
    if family == "urm":
        assert spec.head.num_labels == 10 and spec.head.names[0] == "helpfulness"


def test_both_config_styles_give_the_same_spec(tiny_model):
    old = load_spec(tiny_model("bt", llama31=True, config_style="transformers4"))
    new = load_spec(tiny_model("bt", llama31=True, config_style="transformers5"))
    assert old.rope == new.rope and old.rope.llama3_factor == 8.0 and old.rope.theta == 500000.0
    assert old.checkpoint_dtype == new.checkpoint_dtype == "float32"
    plain = load_spec(tiny_model("bt", llama31=False, config_style="transformers5"))
    assert plain.rope.llama3_factor is None


@pytest.mark.parametrize("cfg,message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture 'MistralForCausalLM'"),
    ({"architectures": ["LlamaForCausalLM"]}, "language model, not a reward model"),
    ({"architectures": []}, "exactly one architecture"),
])
def test_config_refusals(cfg, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(cfg)


def test_missing_family_key(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("armorm"), tmp_path / "m")
    edit_config(path, num_objectives=None)
    with pytest.raises(ConfigError, match="no 'num_objectives'"):
        load_spec(path)


def test_unsupported_rope_type(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("bt"), tmp_path / "m")
    edit_config(path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        load_spec(path)


def test_missing_tensor_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("armorm"), tmp_path / "m")
    edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path)


def test_missing_head_tensor_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("armorm"), tmp_path / "m")
    edit_tensors(path, lambda t: t.pop("gating.logit_scale"))
    with pytest.raises(CheckpointError, match=r"gating\.logit_scale"):
        load_model(path)


def test_misshapen_tensor_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("urm"), tmp_path / "m")
    edit_tensors(path, lambda t: t.update({"weights.fc.4.weight": torch.zeros(4, 64)}))
    with pytest.raises(CheckpointError, match=r"'weights\.fc\.4\.weight' has shape \[4, 64\], expected \[5, 64\]"):
        load_model(path)


def test_unexpected_tensor_is_refused(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("bt"), tmp_path / "m")
    edit_tensors(path, lambda t: t.update({"score.bias": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'score\.bias'"):
        load_model(path)


def test_ignored_tensors_are_listed(tiny_model, tmp_path):
    """GRM's lm_head and an old rotary buffer load fine (they are in IGNORED, with reasons)."""
    path = copy_checkpoint(tiny_model("grm"), tmp_path / "m")
    edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    loaded = load_model(path)
    assert not any("lm_head" in n for n, _ in loaded.head.named_parameters())


def test_pickle_only_checkpoint_is_refused(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("bt"), tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    open(os.path.join(path, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_model(path)


def test_missing_shard_is_refused(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model("qrm", shards=2), tmp_path / "m")
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="shards listed in model.safetensors.index.json are missing"):
        load_model(path)


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_spec(str(tmp_path))


def test_not_a_path_nor_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        resolve("not a model")
    with pytest.raises(CheckpointError, match="no checkpoint directory at ./typo"):
        resolve("./typo")   # a path, not a hub id, even though it looks like org/name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not fetch 'someone/not-here'"):
        resolve("someone/not-here")


def test_dtypes_follow_the_precision_table(tiny_model):
    """bf16 engine: backbone bf16, ArmoRM head bf16, QRM head fp32, URM weights MLP fp16."""
    armo = load_model(tiny_model("armorm"), dtype=torch.bfloat16)
    assert armo.backbone.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert armo.head.gating.layers[0].weight.dtype == torch.bfloat16
    qrm = load_model(tiny_model("qrm"), dtype=torch.bfloat16)
    assert qrm.head.regression_layer.weight.dtype == torch.float32
    assert qrm.head.gating.layers[2].running_var.dtype == torch.float32
    urm = load_model(tiny_model("urm"), dtype=torch.bfloat16)
    assert urm.head.score.weight.dtype == torch.bfloat16
    assert urm.head.weights.fc[0].weight.dtype == torch.float16
    fp32 = load_model(tiny_model("urm"), dtype=torch.float32)
    assert fp32.head.weights.fc[0].weight.dtype == torch.float32


def test_fused_projections_hold_the_checkpoint_tensors(tiny_model):
    path = tiny_model("bt")
    loaded = load_model(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    attn = loaded.backbone.layers[1].self_attn
    q, k, v = (tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    mlp = loaded.backbone.layers[1].mlp
    g, u = (tensors[f"model.layers.1.mlp.{n}_proj.weight"] for n in ("gate", "up"))
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([g, u]))


def test_bf16_engine_scores_close_to_fp32(tiny_model):
    """Smoke check of the low-precision path on CPU; the bf16 comparison against transformers
    runs on GPU (tests/gpu)."""
    conv = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how can I help you?"}]
    for family in FAMILIES:
        path = tiny_model(family)
        a = Engine.from_pretrained(path, dtype="float32", device="cpu").score([conv])[0].score
        b = Engine.from_pretrained(path, dtype="bfloat16", device="cpu").score([conv])[0].score
        assert abs(a - b) < 0.05 * max(1.0, abs(a)), (family, a, b)   # bf16: ~3 significant digits

"""The `rmserve` command line itself: --version, help text, default and choices for every flag,
and a start that imports no torch (so `rmserve --help` answers at once); README's Python example."""
import argparse
import os
import re
import subprocess
import sys

import pytest

import rmserve
from rmserve import flags
from rmserve.cli import build_parser, main


def _subcommands(parser=None, prefix="") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand ("score", "eval rewardbench", ...) -> its parser."""
    parser = parser or build_parser()
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_subcommands(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub})
    return out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rmserve {rmserve.__version__}"


@pytest.mark.parametrize("command", list(_subcommands()))
def test_every_flag_has_help_its_default_and_choices(command):
    sub = _subcommands()[command]
    text = sub.format_help()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{command} {name} has no help text"
        unset = action.default is None or action.default is False or action.default == []
        shown = sub.formatter_class(prog="x")._get_help_string(action)
        if action.option_strings and not unset:
            assert "default" in shown, f"{command} {name}: its default {action.default!r} is not shown"
        for choice in action.choices or ():
            assert choice in text, f"{command} {name}: choice {choice!r} not in the help"
    for words in (flags.DTYPES, flags.BOS) + ((flags.ATTENTION, flags.KERNELS) if command != "serve" else ()):
        assert all(w in " ".join(text.split()) for w in words), words   # listed (argparse wraps lines)


def test_flag_choices_are_the_engine_s():
    from rmserve.engine import DTYPES
    from rmserve.inputs import BOS_POLICIES
    from rmserve.kernels.dispatch import KERNEL_CHOICES
    from rmserve.kernels.fp8_quant import FP8_KERNEL_CHOICES
    from rmserve.model.attention import BACKENDS
    from rmserve.model.fp8 import QUANTIZATIONS

    assert set(flags.DTYPES) == {*DTYPES, "auto"}
    assert set(flags.ATTENTION) == {*BACKENDS, "auto"}
    assert flags.KERNELS == KERNEL_CHOICES and flags.BOS == BOS_POLICIES
    assert flags.QUANTIZATION == QUANTIZATIONS and flags.QUANT_KERNELS == FP8_KERNEL_CHOICES


def test_every_engine_flag_reaches_the_engine():
    """The shared engine flags are named after EngineConfig fields, so engine_settings passes each
    one on: a flag whose name matched no field would be parsed and silently dropped."""
    parser = argparse.ArgumentParser()
    for add in (flags.add_engine_flags, flags.add_kernel_flags, flags.add_quantization_flags, flags.add_step_flags):
        add(parser)
    args = parser.parse_args([])
    assert set(engine_settings := flags.engine_settings(args)) == set(vars(args))
    assert engine_settings["max_batch_tokens"] == 16384 and engine_settings["template_date"] == flags.TEMPLATE_DATE


def test_help_imports_no_torch():
    """`rmserve --help` took 3 s when the package imported torch at start; the CLI module and the
    package import it only inside a subcommand, or on first use of rmserve.Engine and the like
    (every other test module's `from rmserve import Engine` checks that side)."""
    code = ("import sys, rmserve.cli\n"
            "from rmserve.cli import build_parser\n"
            "build_parser().format_help()\n"
            "heavy = sorted({'torch', 'transformers', 'fastapi', 'uvicorn', 'triton'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_readme_python_example_runs_as_written_on_this_machine(tmp_path, monkeypatch):
    """README's Python API example, with its hub model replaced by the tiny one it names (no
    download here), runs as written: on a CPU-only machine too (it once passed device="cuda")."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert 'from_pretrained("RLHFlow/ArmoRM-Llama3-8B-v0.1")' in block and "device=" not in block
    monkeypatch.setenv("RMSERVE_CACHE", str(tmp_path))
    namespace: dict = {}
    exec(block.replace("RLHFlow/ArmoRM-Llama3-8B-v0.1", "tiny:armorm"), namespace)
    result = namespace["results"][0]
    assert result.ok and len(result.rewards) == 19


def test_engine_refuses_a_device_this_machine_lacks_in_one_line(tiny_model):
    import torch

    import rmserve

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=re.escape("device='cuda': CUDA is not available on this machine")):
        rmserve.Engine.from_pretrained(tiny_model("bt"), device="cuda")

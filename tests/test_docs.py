"""The examples in docstrings and the README are runnable and right."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    ["ospfn.ops.hif8", "ospfn.ops.hif8_gemm", "ospfn.model.text", "ospfn.model.vae", "ospfn.sched.flow", "ospfn.ops.skiparse", "ospfn.ops.rope", "ospfn.ops.attention", "ospfn.ops.fourier", "ospfn.model.config",
     "ospfn.model.dit", "ospfn.model.checkpoint", "ospfn.nn", "ospfn.data.synthetic", "ospfn.data.video"],
)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


def test_readme_starts_with_two_commands_that_ci_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    cmds = [ln for ln in blocks[0].splitlines() if ln.strip()]
    assert len(cmds) == 2
    assert "pip install torch==2.13.0" in cmds[0] and "--no-build-isolation" in cmds[0]
    assert "pytest" in cmds[1]
    assert text.index("```") < 400, "the two commands must be in the README's first lines"


def test_readme_examples():
    """The >>> examples of README.md (machine-dependent backend listings excluded)."""
    text = re.sub(r"(?m)^```.*$", "", (ROOT / "README.md").read_text())  # a fence ends an example
    parser = doctest.DocTestParser()
    examples = [e for e in parser.get_examples(text) if "backends." not in e.source]
    assert len(examples) >= 4
    test = doctest.DocTest(examples, {}, "README.md", str(ROOT / "README.md"), 0, None)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0

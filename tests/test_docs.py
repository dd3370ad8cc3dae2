"""The examples in docstrings and the README are runnable and right, and every documentation reference resolves."""

import doctest
import importlib
import importlib.util
import io
import os
import pkgutil
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "ospfn.kernels"  # kernels/ installed under this name (setup.py package_dir)
NOT_DOCTESTED = ("ospfn._C", "ospfn.__main__")  # the compiled extension; the CLI entry point


# ----------------------------------------------------------------------------------------------------------
# docstring examples of every module that has some


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (tests/conftest.py has set TRITON_INTERPRET=1 first on a machine without CUDA)
    except Exception:  # noqa: BLE001  (any failure to import means: no Triton here)
        return False
    return True


def _walk(path, prefix: str) -> list[str]:
    def ignore(name):  # a subpackage that fails to import: its modules cannot be doctested (other tests import it)
        pass

    return [m.name for m in pkgutil.walk_packages(path, prefix, onerror=ignore)]


def _doctest_modules() -> list[str]:
    """Every module of the ospfn package (and of ospfn.kernels when triton imports) whose source has a ``>>>``."""
    import ospfn

    names = ["ospfn"] + _walk(ospfn.__path__, "ospfn.")
    if _triton_importable():
        kernels = importlib.import_module(KERNELS)
        names += [KERNELS] + _walk(kernels.__path__, KERNELS + ".")
    out = []
    for name in names:
        if name in NOT_DOCTESTED or any(name.startswith(n + ".") for n in NOT_DOCTESTED):
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        if ">>>" in Path(spec.origin).read_text(encoding="utf-8"):
            out.append(name)
    return sorted(out)


DOCTEST_MODULES = _doctest_modules()


def _run_doctests(module: str) -> tuple[int, int, str]:
    mod = importlib.import_module(module)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(mod, module):
        runner.run(test, out=out.write)
    res = runner.summarize(verbose=False)
    return res.attempted, res.failed, out.getvalue()


_SUBPROCESS = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernel examples use CPU tensors
sys.path.insert(0, {tests!r})
import test_docs
attempted, failed, report = test_docs._run_doctests({module!r})
print(report)
print("RESULT", attempted, failed)
"""


def test_doctest_discovery_finds_the_documented_modules():
    # a few modules known to carry examples, so a broken discovery cannot pass silently with an empty list
    for module in ("ospfn.ops.hif8", "ospfn.ops.skiparse", "ospfn.model.dit", "ospfn.parallel.mesh"):
        assert module in DOCTEST_MODULES
    if _triton_importable():
        assert any(m.startswith(KERNELS + ".") for m in DOCTEST_MODULES)


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
    from ospfn import backends

    if module.startswith(KERNELS) and not backends.interpreting():
        # a CUDA machine: tests/conftest.py leaves the interpreter off, so run the (CPU-tensor) kernel examples
        # in a fresh interpreter process where TRITON_INTERPRET=1 precedes the triton import
        code = _SUBPROCESS.format(tests=str(ROOT / "tests"), module=module)
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        m = re.search(r"^RESULT (\d+) (\d+)$", proc.stdout, flags=re.MULTILINE)
        assert proc.returncode == 0 and m, proc.stdout[-4000:] + proc.stderr[-4000:]
        attempted, failed, report = int(m.group(1)), int(m.group(2)), proc.stdout
    else:
        attempted, failed, report = _run_doctests(module)
    assert attempted > 0, f"{module}: its '>>>' examples are all skipped, none ran"
    assert failed == 0, report


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


# ----------------------------------------------------------------------------------------------------------
# documentation references

PY_DIRS = ("ospfn", "kernels", "recipes", "bench", "tests")
FENCE = re.compile(r"^\s*(```|~~~)")
MD_LINK = re.compile(r"!?\[(?P<text>[^\]\n]*)\]\((?P<target>[^()\s\\]+)(?:\s+\"[^\"\n]*\")?\)")
# docs/<page>.md, optionally with #anchor or followed by , "Heading text"
DOCS_REF = re.compile(r"(?<![\w/.-])docs/(?P<page>[\w.-]+?\.md)(?:#(?P<anchor>[\w-]+)|,\s*\"(?P<title>[^\"\n]+)\")?")
STALE = (re.compile(r"spec-[A-Za-z0-9_-]+\.md"), re.compile(r"\.\./shared"))


def _repo_files() -> list[str]:
    """Files git knows in the work tree (tracked, plus new files that are not ignored)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file but build output
        skip = {".git", ".venv", "build", "dist", "__pycache__", "runs", "out"}
        return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return sorted(f for f in out.splitlines() if (ROOT / f).is_file())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax reduced to its text, lowercase, punctuation dropped (letters,
    digits, '_', '-' and spaces kept), spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _strip_fences(lines: list[str]) -> list[str]:
    """The lines with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], None
    for line in lines:
        m = FENCE.match(line)
        if fenced is None and m:
            fenced = m.group(1)
            out.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            out.append("")
        else:
            out.append(line)
    return out


def anchors_of(path: Path) -> set[str]:
    """Every anchor GitHub generates for a markdown file (ATX and setext headings, duplicates numbered, plus
    explicit ``<a name=...>`` / ``id=...`` anchors)."""
    lines = _strip_fences(path.read_text(encoding="utf-8").splitlines())
    headings = []
    for i, line in enumerate(lines):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if m:
            headings.append(m.group(1))
        elif i > 0 and re.match(r"^ {0,3}(=+|-+)\s*$", line) and lines[i - 1].strip() and not re.match(r"^\s*([-*+|>#]|\d+\.)", lines[i - 1]):
            headings.append(lines[i - 1])
    seen: dict[str, int] = {}
    out = set()
    for h in headings:
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    for line in lines:
        out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return out


def _python_prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and string literal (docstrings included) of a Python file."""
    out = []
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
                out.append((tok.start[0], tok.string))
    return out


def _markdown_prose(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """((line, text) for link checks: outside code fences and code spans; (line, text) for plain references:
    every line)."""
    raw = path.read_text(encoding="utf-8").splitlines()
    unfenced = _strip_fences(raw)
    links = [(i + 1, re.sub(r"`[^`\n]*`", "", line)) for i, line in enumerate(unfenced)]
    return links, [(i + 1, line) for i, line in enumerate(raw)]


def _reference_problems() -> list[str]:
    files = _repo_files()
    md = [f for f in files if f == "README.md" or (f.startswith("docs/") and f.endswith(".md"))]
    py = [f for f in files if f.endswith(".py") and f.split("/", 1)[0] in PY_DIRS]
    anchors: dict[Path, set[str]] = {}

    def check(ref_from: str, line: int, target: Path, anchor, title, shown: str) -> list[str]:
        where = f"{ref_from}:{line}: {shown}"
        if not target.exists():
            return [f"{where}: {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target} does not exist"]
        if (anchor or title) and target.suffix == ".md" and target.is_file():
            if target not in anchors:
                anchors[target] = anchors_of(target)
            want = anchor if anchor else slug(title)
            if want not in anchors[target]:
                return [f"{where}: no heading with anchor #{want} in {target.relative_to(ROOT)} (has: {sorted(anchors[target])})"]
        return []

    problems: list[str] = []
    for rel in md + py:
        path = ROOT / rel
        if rel.endswith(".md"):
            link_lines, ref_lines = _markdown_prose(path)
        else:
            link_lines = ref_lines = _python_prose(path)
        for line, text in link_lines:
            for m in MD_LINK.finditer(text):
                target = m.group("target")
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):  # http:, https:, mailto:, ...
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                problems += check(rel, line, dest, anchor or None, None, m.group(0))
        for line, text in ref_lines:
            for m in DOCS_REF.finditer(text):
                problems += check(rel, line, ROOT / "docs" / m.group("page"), m.group("anchor"), m.group("title"), m.group(0))
    return problems


def test_doc_references_resolve():
    """README.md, docs/*.md and the docstrings/comments of the Python sources: every relative markdown link
    (relative to its file) and every plain ``docs/<page>.md[#anchor]`` reference (relative to the repository
    root) names an existing file, and every anchor (or quoted heading) names a heading of that file.  No file
    points at design notes outside the repository."""
    problems = _reference_problems()
    for rel in _repo_files():
        data = (ROOT / rel).read_bytes()
        if b"\0" in data:
            continue  # binary
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            for rx in STALE:
                for m in rx.finditer(line):
                    problems.append(f"{rel}:{i}: {m.group(0)!r} points outside the repository: use a docs/ page")
    assert not problems, "\n".join(problems)


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {m.group("target").partition("#")[0] for m in MD_LINK.finditer(index)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages and pages <= linked, f"docs/README.md does not link {sorted(pages - linked)}"


@pytest.mark.parametrize(
    "heading,anchor",
    [
        ("Training with HiF8", "training-with-hif8"),
        ("Real 8-bit weights", "real-8-bit-weights"),
        ("The `dual_end` schedule (P = 2)", "the-dual_end-schedule-p--2"),
        ("See [the SSP page](../docs/ssp.md): groups", "see-the-ssp-page-groups"),
    ],
)
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor

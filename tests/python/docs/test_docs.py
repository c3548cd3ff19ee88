"""The documentation runs: every ```python and ```bash block of each page in
docs/ is executed, in order, from a scratch directory that sees the
repository's data/, configs/ and examples/ (so the pages use the same relative
paths a user in the repository would); every ```console block names scripts in
examples/ that a test runs. docs/cpp.md's ```sh blocks (configure, build,
install, torchrun) are what the ctest cpp_package_finetune and
tests/python/train/test_cpp_distributed.py run; that ctest also checks the page quotes
examples/cpp/finetune/finetune.cpp exactly. The pages' links resolve, and the
README links the index.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(page, language):
    return [code for lang, code in BLOCK.findall((DOCS / page).read_text()) if lang == language]


@pytest.fixture()
def scratch(tmp_path):
    for name in ("data", "configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return tmp_path, env


def test_the_pages_are_there():
    assert {"README.md", "python.md", "recipes.md", "distributed.md", "cpp.md"} <= set(PAGES)
    index = (DOCS / "README.md").read_text()
    for page in PAGES:
        if page != "README.md":
            assert f"({page})" in index, f"docs/README.md does not list {page}"
    assert "(docs/README.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (DOCS / page).read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        assert (DOCS / target).exists(), f"{page} links {target}, which does not exist"


# The top-level README is run too: its blocks are what a new user tries first.
RUN_PAGES = [p for p in PAGES if _blocks(p, "python") or _blocks(p, "bash")] + ["../README.md"]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_examples_run(page, scratch):
    cwd, env = scratch
    for i, code in enumerate(_blocks(page, "bash")):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, f"{page} bash block {i + 1}:\n{code}\n{run.stdout[-2000:]}{run.stderr[-4000:]}"
    python = _blocks(page, "python")
    if python:  # the blocks of a page build on each other: one script
        script = cwd / f"{Path(page).name}.py"
        script.write_text("\n".join(python))
        run = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"{page}:\n{run.stdout[-2000:]}{run.stderr[-4000:]}"
        print(f"--- {page}\n{run.stdout}")


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "console")])
def test_console_blocks_name_scripts_a_test_runs(page):
    tests = "".join(p.read_text() for p in (ROOT / "tests/python").rglob("test_*.py"))
    for code in _blocks(page, "console"):
        scripts = re.findall(r"examples/python/([\w.]+\.py)", code)
        assert scripts, f"{page}: a console block must run a script in examples/python/:\n{code}"
        for name in scripts:
            assert (ROOT / "examples/python" / name).is_file(), name
            assert name in tests, f"{page} shows examples/python/{name}, which no test runs"


_OUTSIDE = re.compile(r"(?<![\w/])(?:methods\.md|style\.md)|/work/shared|\.\./shared|shared/(?:design|methods|style|data)"
                      r"|(?<![\w/])(?<!docs/)design\.md(?!\))|design section \d|\bdesign \d|\(design:|design\.md,? \d")
_TEXT = {".cpp", ".h", ".cu", ".cuh", ".py", ".md", ".txt", ".cmake", ".in", ".toml", ".json", ".sh"}


def test_every_reference_stays_in_the_repo():
    """Comments and docs cite the design by its page in the repository
    (docs/design.md, <section name>), never a file a clone does not have."""
    bad = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if not path.is_file() or rel.parts[0] in (".venv", "build", "out", ".git") or "tasks" in rel.parts:
            continue
        if path.suffix not in _TEXT and path.name not in ("Makefile", "CMakeLists.txt", "run", "gpu"):
            continue
        text = path.read_text(errors="replace")
        if rel.parts[0] == "docs":
            text = re.sub(r"\]\(design\.md[^)]*\)", "", text)  # the pages' relative links
            text = re.sub(r"(?<![\w/])design\.md", "docs/design.md", text)
        for n, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line) and rel.as_posix() != "tests/python/docs/test_docs.py":
                bad.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad[:20])


def test_design_references_name_real_sections():
    """Every "docs/design.md, <section>" (and "<page>.md, <section>") citation
    names a heading that the page has, so a reader can find it."""
    pages = {}
    for page in list(DOCS.glob("*.md")) + [ROOT / "bench" / "README.md"]:
        rel = page.relative_to(ROOT).as_posix()
        pages[rel] = [h.strip() for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)]
    cite = re.compile(r"((?:docs/[\w-]+|bench/README)\.md), ([A-Z][\w' -]+)")
    bad = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if not path.is_file() or rel.parts[0] in (".venv", "build", "out", ".git"):
            continue
        if path.suffix not in _TEXT and path.name not in ("Makefile", "CMakeLists.txt"):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for page, section in cite.findall(line):
                headings = pages.get(page)
                if headings is None:
                    bad.append(f"{rel}:{n}: no page {page}")
                elif not any(section.startswith(h) or h.startswith(section.strip()) for h in headings):
                    bad.append(f"{rel}:{n}: {page} has no section {section.strip()!r}")
    assert not bad, "citations of sections that do not exist:\n" + "\n".join(bad[:30])

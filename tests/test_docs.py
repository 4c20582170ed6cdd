"""The documentation works: the site builds, its Python examples run, README stays a landing page.

* ``mkdocs build --strict`` succeeds: a broken page link, a missing anchor or image, or an API reference
  (``::: vit.x``) that does not resolve fails the build (``mkdocs.yml`` turns those checks into warnings, and
  ``--strict`` turns warnings into errors).
* Every ```` ```python ```` block of ``docs/*.md`` and ``README.md`` runs: a page's blocks in order in one namespace
  (a later block may use what an earlier one defined or wrote), in a fresh temporary working directory, offline
  (``HF_HUB_OFFLINE=1``). The examples use tiny models (width 32-64, depth 2, 16-48 px) so all pages together run
  in well under a minute.

  **Marker convention.** A block that cannot run here -- it needs the network or files only the reader has -- is
  marked by an HTML comment on the line right before its fence (it does not show on the rendered page)::

      <!-- no-run: needs network (downloads CIFAR-10) -->
      ```python
      ...
      ```

  The comment must start with ``no-run: needs`` and say what is needed; a marker that is not right before a
  ```` ```python ```` fence fails ``test_no_run_markers_sit_on_python_blocks``. Other fences (``bash``, ``yaml``,
  ``text``) are never run.
* README.md is under 150 lines, keeps the two set-up commands CI runs, and its relative links point at files.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
MARKER = re.compile(r"^<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>`{3,})(?P<info>[^`]*)$")

# what CI runs from README, word for word
INSTALL_AND_RUN = "pip install -e . && python train.py"
INSTALL_AND_TEST = 'pip install -e ".[test]" && python -m pytest'
PAGE_SECONDS = 60  # the most one page's examples may take (they take under 10 s on a shared 2-core VM)


def fenced_blocks(path: Path) -> list[dict]:
    """Every fenced code block of a Markdown file: its language, first line number (1-based, the fence's),
    code, and the ``no-run`` reason written right above it (None when it runs)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        ticks, info, indent = match["ticks"], match["info"].strip(), len(match["indent"])
        end = i + 1
        while end < len(lines) and not re.match(rf"^ {{0,3}}{ticks}`*\s*$", lines[end]):
            end += 1
        above = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[i + 1:end])
        blocks.append({"lang": info.split()[0].lower() if info else "", "line": i + 1, "code": code,
                       "no_run": above["reason"] if above else None})
        i = end + 1
    return blocks


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---- (a) the site builds -----------------------------------------------------------------------------------------
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    built = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    # every page of docs/ became a page of the site, and the API reference rendered the objects it names
    for page in (REPO / "docs").rglob("*.md"):
        rel = page.relative_to(REPO / "docs").with_suffix("")
        expected = "index.html" if rel.name == "index" else f"{rel.as_posix()}/index.html"
        assert expected in built, (page, sorted(built))
    reference = "".join(p.read_text(encoding="utf-8") for p in (site / "reference").rglob("index.html"))
    for name in ("vit.create_model", "vit.list_models", "vit.load_pretrained", "vit.save_pretrained",
                 "vit.ViTConfig", "vit.VisionTransformer", "vit.tasks.backbone.Backbone",
                 "vit.tasks.classification.ImageClassifier", "vit.data.ImageDataModule",
                 "vit.deploy.runners.create_runner", "vit.features.extract_features", "vit.features.knn_classify",
                 "vit.features.linear_probe", "vit.features.nearest", "vit.features.probe_backbone"):
        assert f'id="{name}"' in reference, f"the API reference has no entry {name}"


# ---- (b) the examples run ----------------------------------------------------------------------------------------
def test_no_run_markers_sit_on_python_blocks():
    """A marker that is not right above a python fence would silently mark nothing (or the wrong block)."""
    problems = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            marker = MARKER.match(line.strip())
            if marker is None and "no-run" in line:
                problems.append(f"{page_id(page)}:{n + 1}: malformed marker {line.strip()!r}")
            if marker is None:
                continue
            fence = FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
            if fence is None or not fence["info"].strip().lower().startswith("python"):
                problems.append(f"{page_id(page)}:{n + 1}: no ```python fence right after the marker")
            if not marker["reason"].startswith("needs"):
                problems.append(f"{page_id(page)}:{n + 1}: the reason must say what it needs: {line.strip()!r}")
    assert not problems, "\n".join(problems)


RUNNABLE = [p for p in PAGES if any(b["lang"] == "python" and b["no_run"] is None for b in fenced_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "vit_cache"))
    namespace = {"__name__": "__docs__"}
    start = time.perf_counter()
    for block in fenced_blocks(page):
        if block["lang"] != "python" or block["no_run"] is not None:
            continue
        where = f"{page_id(page)}:{block['line']}"
        # padded so that a traceback's line numbers are the Markdown file's
        code = compile("\n" * block["line"] + block["code"], where, "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
        except Exception as error:
            raise AssertionError(f"the example at {where} failed: {type(error).__name__}: {error}") from error
    seconds = time.perf_counter() - start
    assert seconds < PAGE_SECONDS, (f"{page_id(page)}: its examples took {seconds:.0f} s; keep them tiny (all pages "
                                    f"together run in about 15 s on 2 CPU cores)")


# ---- (c) README is a landing page --------------------------------------------------------------------------------
def test_readme_is_a_short_landing_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    bash = "\n".join(b["code"] for b in fenced_blocks(REPO / "README.md") if b["lang"] in ("bash", "sh", "shell"))
    for command in (INSTALL_AND_RUN, INSTALL_AND_TEST):
        assert command in bash.splitlines(), f"README.md lost the command CI runs: {command}"


def test_readme_links_point_at_files():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (REPO / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"README.md links to missing files: {broken}"

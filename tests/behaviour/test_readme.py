"""The README and the docs, run as a new user would: their command blocks in order, in a fresh folder, the snippet
verbatim.

Every ``bash`` block of README.md and of every docs/*.md carries a marker on the line above: ``<!-- readme: run -->``
(run here, in order, each line with the installed ``gssf``) or ``<!-- readme: skip (reason) -->`` (installs, the
test suite itself, synopses with placeholders, servers). A block without a marker fails the test, so no page can
grow a command nobody runs. The README's blocks run first, in a fresh folder. A doc that holds the line
``<!-- readme: runs after README.md, in the same folder -->`` runs its blocks next, in that same folder
(docs/commands.md: its examples use the quickstart's dataset and bundle); every other doc runs its blocks in a
fresh folder of its own. The README's onnxruntime snippet runs verbatim after the blocks. Then ``mlflow ui`` is started
on the folder and what a user sees there is checked through its REST API (:mod:`tests.mlflow_ui`): a classic-ML
experiment, distinct run names, nested stages, logged models (the trained one loaded through the server) and the
registered bundle. ``GSSF_UI_SCREENSHOTS=tests/ui`` refreshes the README's screenshots. Every relative link of
these pages leads to a file of the repository and, with ``#anchor``, to one of its headings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_ui import check_quickstart, load_through_server, mlflow_ui, screenshots

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
BLOCK = re.compile(r"(?:<!-- readme: (run|skip \([^)]*\)) -->\n)?```(bash|python)\n(.*?)```", re.S)
AFTER_README = "<!-- readme: runs after README.md, in the same folder -->"
CONTINUING = [page for page in DOCS if AFTER_README in page.read_text()]

pytestmark = pytest.mark.e2e


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(marker, language, body) of every bash and python block, in order."""
    return [(m.group(1) or "", m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def _runnable(page: Path) -> list[str]:
    """The bodies of a page's ``run`` bash blocks, in order."""
    return [body for marker, language, body in _blocks(page.read_text()) if language == "bash" and marker == "run"]


def _environment() -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return env | {"COLUMNS": "160", "NO_COLOR": "1"}


def _run_blocks(page: Path, folder: Path, env: dict[str, str]) -> int:
    """Run a page's ``run`` blocks in order in ``folder``, each under ``set -euo pipefail``; how many ran."""
    bodies = _runnable(page)
    for body in bodies:
        script = "set -euo pipefail\n" + body
        out = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{_name(page)} block failed:\n{body}\n--- stderr ---\n{out.stderr[-3000:]}"
    return len(bodies)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_command_block_is_run_or_skipped_with_a_reason(page: Path) -> None:
    unmarked = [body.splitlines()[0] for marker, language, body in _blocks(page.read_text()) if language == "bash"
                and not marker]  # fmt: skip
    assert not unmarked, f"{_name(page)} bash blocks without a <!-- readme: run|skip (why) --> marker: {unmarked}"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{_name(page)} links to no file or no heading: {broken}"


def test_readme_commands_run_in_order_on_a_fresh_folder(tmp_path: Path) -> None:
    text = README.read_text()
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    env = _environment()
    ran = _run_blocks(README, tmp_path, env)
    assert ran >= 2
    for page in CONTINUING:  # docs whose examples build on the quickstart: same folder, right after the README
        assert _run_blocks(page, tmp_path, env) >= 1, f"{_name(page)} continues the README but runs no block"
    assert (tmp_path / "hits.json").is_file(), f"no block of {[_name(p) for p in PAGES]} wrote hits.json"
    with mlflow_ui(tmp_path) as url:
        seen = check_quickstart(url)
        shapes = load_through_server(url, seen["train_models"][-1]["model_id"], tmp_path)
        assert shapes["scores"] == [3, 2] and shapes["image_embeddings"][0] == 3, shapes
        if os.environ.get("GSSF_UI_SCREENSHOTS"):
            screenshots(url, seen["experiment_id"], Path(os.environ["GSSF_UI_SCREENSHOTS"]).resolve())
    snippet = text.split("<!-- onnx-snippet:begin -->", 1)[1].split("<!-- onnx-snippet:end -->", 1)[0]
    code = re.search(r"```python\n(.*?)```", snippet, re.S)
    assert code is not None
    check = "\nassert scores.shape == (4, 2) and np.isfinite(scores).all()\n"
    out = subprocess.run([sys.executable, "-c", code.group(1) + check], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    _search_equals_the_graphs_by_hand(tmp_path)


FRESH = [page for page in DOCS if page not in CONTINUING and _runnable(page)]
"""Docs with commands of their own (docs/method.md has none), each run in a fresh folder."""


@pytest.mark.parametrize("page", FRESH, ids=_name)
def test_doc_commands_run_in_order_on_a_fresh_folder(page: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    assert _run_blocks(page, tmp_path, _environment()) >= 1


def _search_equals_the_graphs_by_hand(folder: Path) -> None:
    """The README's ``gssf search --json`` (hits.json) against the bundle's graphs run by hand on ONNX Runtime:
    the same top-10 rows (up to near-ties) and scores within 1e-5 — the issue's "done when"."""
    import json

    import numpy as np
    import onnxruntime as ort

    hits = json.loads((folder / "hits.json").read_text())["queries"][0]
    bundle, data = folder / "exports/quickstart", folder / "data/quickstart"
    words = json.loads((bundle / "vocab.json").read_text())["words"]
    index = {w: i for i, w in enumerate(words)}
    caption = (data / "test_caps.txt").read_text().splitlines()[0]
    ids = [1, *(index.get(t, 3) for t in re.findall(r"[^\W_]+(?:'[^\W_]+)?", caption.lower())), 2]

    def run(name: str, feeds: dict) -> np.ndarray:
        return ort.InferenceSession(str(bundle / f"{name}.onnx")).run(None, feeds)[0]

    text = run("text_encoder", {"tokens": np.array([ids]), "lengths": np.array([len(ids)])})
    images = run("image_encoder", {"features": np.load(data / "test_ims.npy")})
    scores = (run("metric_head", {"embeddings": images}) @ text.T)[:, 0]
    top = np.argsort(-scores, kind="stable")[:10]
    assert hits["query"] == caption
    found = np.array([hit["row"] for hit in hits["results"]])
    assert len(found) == 10
    assert np.allclose([hit["score"] for hit in hits["results"]], scores[top], atol=1e-5)
    assert np.allclose(scores[found], scores[top], atol=1e-5)  # same rows, or rows tied within 1e-5
    assert [hit["id"] for hit in hits["results"]] == [str(row) for row in found]

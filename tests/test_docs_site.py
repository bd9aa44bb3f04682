"""The documentation site builds offline with warnings as errors (a broken link, anchor or API
reference fails), its API reference covers `petlkit.__all__`, its equations are MathML, and the
README stays a short entry page whose links and numbers point at the site's pages."""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import petlkit

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
from tex_to_mathml import render_math  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_api_reference_lists_every_public_name_with_its_docstring(site):
    page = (site / "api.html").read_text()
    text = " ".join(_text(site / "api.html").split())
    for name in petlkit.__all__:
        assert f'id="petlkit.{name}"' in page, f"{name} is missing from the API reference"
        doc = inspect.getdoc(getattr(petlkit, name))
        assert doc, f"petlkit.{name} has no docstring"
        first = " ".join(re.sub(r"`", "", doc.split("\n\n")[0]).split())[:40]
        assert first in text, f"{name}'s docstring is not on the page: {first!r}"


def test_method_pages_render_their_equations_as_mathml(site):
    for page in ("methods/sas.html", "methods/unipelt.html"):
        body = (site / page).read_text()
        assert body.count("<math") >= 3 and "$$" not in body, page


def test_tex_becomes_mathml_outside_code_only():
    text = "a $x_1$ b `$y$`\n\n$$\nW' = W M^\\top\n$$\n\n```\n$z$\n```\n\n    $w$ kept\n"
    out = render_math(text)
    assert out.count("<math") == 2 and 'display="block"' in out
    assert '<span class="math"><math' in out  # inline: never read as a block of HTML
    assert "`$y$`" in out and "\n$z$\n" in out and "    $w$ kept" in out
    assert render_math("costs $5 and $6 each") == "costs $5 and $6 each"  # digits next to $ stay


def test_every_page_is_in_the_navigation(site):
    pages = {p.relative_to(ROOT / "docs").with_suffix(".html")
             for p in (ROOT / "docs").rglob("*.md") if "hooks" not in p.parts}  # fmt: skip
    missing = [str(p) for p in pages if not (site / p).is_file()]
    assert not missing


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 15
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_the_readme_summary_numbers_are_the_results_pages_numbers():
    """Each mean ± std the README's summary tables quote stands on the results page it links."""
    readme = (ROOT / "README.md").read_text()
    summary = readme[readme.index("## Results (here scale)") : readme.index("## Documentation")]
    pages = " ".join(p.read_text() for p in (ROOT / "docs" / "results").glob("*.md"))
    quoted = re.findall(r"\d+\.\d ± \d+\.\d", summary)
    assert len(quoted) >= 50
    assert [q for q in quoted if q not in pages] == []

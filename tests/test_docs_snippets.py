"""Every Python snippet of the README and the documentation runs as written: a changed API breaks
this test, not the reader. Each page runs in a fresh folder, its blocks in order in one namespace
(as a reader pastes them)."""

from __future__ import annotations

import pytest

from tests.docs_snippets import documented_pages, python_blocks, run_page

PAGES = documented_pages()


def test_the_pages_users_read_first_have_snippets_here():
    for page in ("README.md", "docs/getting-started.md", "docs/guides/text-files.md",
                 "docs/guides/images.md", "docs/guides/merging.md", "docs/models.md"):  # fmt: skip
        assert page in PAGES, f"{page} has no Python block (or the collector lost it)"


def test_the_collector_reads_every_block_of_a_page():
    blocks = python_blocks("README.md")
    assert len(blocks) == 2
    assert "build_model" in blocks[0] and "LlamaForCausalLM" in blocks[1]


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_page(page)

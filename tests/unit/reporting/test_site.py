"""``common.reporting.site``: repository paths mapped to site pages, the notebook section that makes a figure (with
nbconvert's anchor), and the link checker finding a planted missing page and a planted missing anchor."""

from __future__ import annotations

from common.reporting import site

FIG = "figures/small/01_massive_activation_origin/fig3c_intermediate_topk.png"


def test_page_of_maps_markdown_notebooks_and_folders() -> None:
    assert site.page_of("README.md") == "index.html" and site.page_of("docs") == "index.html"
    assert site.page_of("docs/GPU.md") == "docs/GPU.html"
    assert site.page_of("notebooks/01_massive_activation_origin.ipynb") == "notebooks/01_massive_activation_origin.html"
    assert site.page_of("claims.yaml") == "claims.yaml"


def test_section_link_names_the_heading_before_the_cell_that_saves_the_figure() -> None:
    """Notebook 01 saves fig3c under its "(b) Intermediate state" heading; the link carries nbconvert's id of that
    heading; a figure no notebook saves has no section."""
    link = site.section_link(FIG)
    assert link.startswith("[01: (b) Intermediate state") and "(<notebooks/" in link
    anchor = link[link.index("#") + 1:-2]  # inside (<...#anchor>)
    assert anchor == "(b)-Intermediate-state:-the-spike-is-confined-to-the-massive-layer-(HoC-Fig.-3c)"
    assert site.section_link("figures/small/01_massive_activation_origin/not_saved.png") is None
    assert site.section_link("figures/small/99_none/fig.png") is None


def test_broken_links_finds_a_missing_page_and_a_missing_anchor(tmp_path) -> None:
    (tmp_path / "a.html").write_text('<h1 id="top">A</h1><a href="b.html#here">b</a><img src="fig.png">')
    (tmp_path / "b.html").write_text('<h2 id="here">B</h2><a href="a.html#top">a</a><a href="https://x.org/y">ext</a>')
    (tmp_path / "fig.png").write_bytes(b"png")
    assert site.broken_links(tmp_path) == []
    (tmp_path / "b.html").write_text('<h2 id="elsewhere">B</h2><a href="c.html">c</a>')
    assert site.broken_links(tmp_path) == ["a.html -> b.html#here", "b.html -> c.html"]

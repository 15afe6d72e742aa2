"""``make site`` (issue 22): a static results site from the executed notebooks, REPORT.md, the README and the
docs, rendered with nbconvert's ``lab`` template (notebooks as they are; a Markdown page as a one-cell notebook),
into ``build/site/``. Links between the repository's files become links between the site's pages (``.ipynb`` and
``.md`` to ``.html``, anchors kept); every other repository file a page links to (figures, claims.yaml, sources)
is copied beside it, so no internal link of the site is broken (``broken_links`` checks).

    python -m common.reporting.site [--out build/site]
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import nbformat

from common import REPO_ROOT
from common.reporting.executed import EXECUTED

SITE = REPO_ROOT / "build" / "site"
MARKDOWN_PAGES = ("README.md", "REPORT.md", "notebooks/README.md", *(f"docs/{p.name}" for p in
                                                                    sorted((REPO_ROOT / "docs").glob("*.md"))))
_LINK = re.compile(r'(href|src)="([^"#:?]*)(#[^"]*)?"')


def page_of(source: str) -> str:
    """The site path of a repository path: README.md is the index (and stands for a linked folder), a notebook with
    an executed copy is that copy's page under notebooks/, any other Markdown file becomes its .html; everything
    else keeps its path (copied as it is)."""
    path = Path(source)
    if source == "README.md" or (REPO_ROOT / source).is_dir():
        return "index.html"
    if path.suffix == ".ipynb" and any(EXECUTED.glob(f"*/{path.name}")):
        return f"notebooks/{path.stem}.html"
    return str(path.with_suffix(".html")) if path.suffix == ".md" else source


def section_link(figure: str) -> str | None:
    """A Markdown link to the notebook section that makes ``figure`` (``figures/<profile>/<notebook>/<name>``): the
    last heading before the cell that saves it, in the executed notebook where one is published (else the
    stripped one), with the anchor nbconvert's HTML gives that heading; None when no notebook saves it."""
    parts = Path(figure).parts
    if len(parts) != 4:
        return None
    profile, notebook, stem = parts[1], parts[2], Path(parts[3]).stem
    source = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    if not source.exists():
        return None
    heading = None
    for cell in nbformat.read(source, as_version=4).cells:
        if cell.cell_type == "markdown":
            heading = next((line for line in reversed(cell.source.splitlines()) if line.startswith("#")), heading)
        elif "save_figure" in cell.source and f'"{stem}"' in cell.source:
            break
    else:
        return None
    if heading is None:
        return None
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    anchor = re.search(r'id="([^"]+)"', markdown2html_mistune(heading)).group(1)
    executed = EXECUTED / profile / f"{notebook}.ipynb"
    target = (executed if executed.exists() else source).relative_to(REPO_ROOT).as_posix()
    text = re.sub(r"[|\[\]`*]", "", heading.lstrip("#")).strip()
    return f"[{notebook[:2]}: {text}](<{target}#{html.unescape(anchor)}>)"  # <...>: the id as nbconvert wrote it


def _exporter():
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab")


def render_notebook(nb: nbformat.NotebookNode, title: str) -> str:
    """A notebook as one self-contained HTML page (outputs and images inline)."""
    body, _ = _exporter().from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


def render_markdown(text: str, title: str) -> str:
    """A Markdown file as a page: a one-cell notebook through the same template."""
    return render_notebook(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)]), title)


def _relink(page: str, source: str, copy: set[str]) -> str:
    """Point ``page``'s relative links (written for ``source``'s place in the repository) at the site's pages;
    collect the repository files it links to that are not pages (to be copied)."""
    here = Path(source).parent
    site_dir = Path(page_of(source)).parent

    def swap(m: re.Match) -> str:
        attr, target, anchor = m.group(1), html.unescape(m.group(2)), m.group(3) or ""
        if not target:
            return m.group(0)
        repo_path = (REPO_ROOT / here / target).resolve()
        if not repo_path.is_relative_to(REPO_ROOT) or not repo_path.exists():
            return m.group(0)  # left for broken_links to report
        rel = repo_path.relative_to(REPO_ROOT).as_posix()
        dest = page_of(rel)
        if dest == rel:
            copy.add(rel)
        link = Path(dest).relative_to(site_dir) if Path(dest).is_relative_to(site_dir) else \
            Path("../" * len(site_dir.parts) + dest)
        return f'{attr}="{html.escape(link.as_posix())}{anchor}"'

    return _LINK.sub(swap, page)


def build(out: Path = SITE) -> list[Path]:
    """Render every executed notebook and Markdown page into ``out`` (emptied first), copy what they link to;
    returns the pages."""
    shutil.rmtree(out, ignore_errors=True)
    copy: set[str] = set()
    pages = []
    sources = [(p.relative_to(REPO_ROOT).as_posix(), nbformat.read(p, as_version=4))
               for p in sorted(EXECUTED.glob("*/*.ipynb"))]
    sources += [(md, (REPO_ROOT / md).read_text()) for md in MARKDOWN_PAGES if (REPO_ROOT / md).exists()]
    for source, content in sources:
        title = Path(source).stem
        rendered = render_notebook(content, title) if source.endswith(".ipynb") else render_markdown(content, title)
        dest = out / (f"notebooks/{Path(source).stem}.html" if source.endswith(".ipynb") else page_of(source))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # an executed notebook's links were written for the stripped copy's place, notebooks/
        dest.write_text(_relink(rendered, "notebooks/x.ipynb" if source.endswith(".ipynb") else source, copy))
        pages.append(dest)
    for rel in sorted(copy):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, out / rel)
    return pages


def broken_links(out: Path = SITE) -> list[str]:
    """Every internal ``href``/``src`` of the site's pages whose file is missing, or whose ``#anchor`` is not an
    id of the page it names: ``"page -> link"``; [] when none."""
    ids: dict[Path, set[str]] = {}
    bad = []
    for page in sorted(out.rglob("*.html")):
        for _, target, anchor in _LINK.findall(page.read_text()):
            target = html.unescape(target)
            dest = (page.parent / target).resolve() if target else page
            if not dest.exists():
                bad.append(f"{page.relative_to(out)} -> {target}")
            elif anchor and dest.suffix == ".html":
                known = ids.setdefault(dest, set(re.findall(r'id="([^"]+)"', dest.read_text())))
                fragment = html.unescape(anchor[1:])  # a browser tries it as it is, then percent-decoded
                if not {fragment, unquote(fragment)} & {html.unescape(i) for i in known}:
                    bad.append(f"{page.relative_to(out)} -> {target}{anchor}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SITE)
    args = parser.parse_args(argv)
    pages = build(args.out)
    bad = broken_links(args.out)
    print(f"site: {len(pages)} pages in {args.out}" + (f"; {len(bad)} broken links:\n  " + "\n  ".join(bad)
                                                       if bad else "; no broken internal link"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

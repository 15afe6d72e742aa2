"""The executed notebooks committed under notebooks/executed/ (issue 22) come from the committed run: each is
stamped with the sha256 of the manifest its run wrote, and that manifest is the committed one."""

from common.reporting import executed
from common.reporting.run import NOTEBOOK_DIR


def test_published_notebooks_match_the_committed_manifests() -> None:
    published = sorted(executed.EXECUTED.glob("*/*.ipynb"))
    assert executed.stale() == []
    assert all((NOTEBOOK_DIR / p.name).exists() for p in published), "an executed copy of no notebook of ours"

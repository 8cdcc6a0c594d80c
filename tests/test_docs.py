"""The README and docs/ link only to files that exist, and name only studies that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) or ![alt](target), anchors dropped


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(page):
    missing = [
        target for target in LINK.findall(page.read_text())
        if "://" not in target and not target.startswith("mailto:") and not (page.parent / target).exists()
    ]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_named_studies_exist():
    from yoloattn.yolo.ablate import STUDIES

    named = {m for page in PAGES for m in re.findall(r"study=([\w-]+)", page.read_text())}
    assert named, "the README names no study"
    assert named <= set(STUDIES), f"unknown studies named in the docs: {sorted(named - set(STUDIES))}"

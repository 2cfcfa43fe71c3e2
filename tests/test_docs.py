"""The README stands alone: no paths outside the repository, and every file it points at exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_and_docs_point_only_inside_the_repository():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "](../" not in text, page
        assert not re.search(r"\]\(https?://", text), page  # the README must read offline


def test_files_the_readme_names_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in set(re.findall(r"`((?:docs|benchmarks|scripts|src)/[\w./-]+\.(?:md|py|sh))`", text)):
        assert (ROOT / name).exists(), name

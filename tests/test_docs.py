"""The documentation: README.md is a short front page whose links resolve, and the docs/ site builds.

`mkdocs build --strict` (mkdocs.yml sets `validation` so that a broken link, a missing anchor or a page
left out of the nav is a warning, and `strict: true` makes any warning fail) checks the links between
docs pages; it does not read README.md, so its links are checked here.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 260

# [text](target) and ![alt](target); the target up to a space (a title) or the closing parenthesis
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(markdown: str) -> list[str]:
    """Every link target that is a path in this repository (no scheme, not a bare #anchor)."""
    without_code = re.sub(r"```.*?```", "", markdown, flags=re.S)
    without_code = re.sub(r"`[^`\n]*`", "", without_code)
    targets = _LINK.findall(without_code)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_docs_site_builds_strictly(tmp_path):
    import importlib.util

    assert importlib.util.find_spec("mkdocs"), "mkdocs is missing: pip install -e '.[test]' (it is in the test extra)"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_relative_link_in_the_readme_points_to_a_file():
    links = _relative_links(README.read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") for link in links), "the README links no docs page"
    missing = [link for link in links if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_links_every_docs_page_but_the_ones_it_leaves_to_the_site():
    linked = {link.split("#", 1)[0] for link in _relative_links(README.read_text(encoding="utf-8"))}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    # a measurement page reached from its topic page (and the site's nav) rather than from the front page
    unlinked = pages - linked - {"docs/vision-demo-frontier.md"}
    assert not unlinked, f"README.md does not link these docs pages: {sorted(unlinked)}"


def test_the_link_finder_sees_links_and_skips_code_and_urls():
    text = (
        '[a](docs/a.md) ![b](docs/img.png "t") [c](https://x.org) [d](#anchor) `[e](docs/e.md)`\n'
        "```\n[f](docs/f.md)\n```\n[g](docs/g.md#part)"
    )
    assert _relative_links(text) == ["docs/a.md", "docs/img.png", "docs/g.md#part"]

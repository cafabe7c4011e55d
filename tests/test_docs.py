"""The docs hold together: every relative link and #anchor in README.md and docs/*.md resolves, every
docs section the code cites by name exists, and the README stays a front door (at most 250 lines)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# a docs section cited by name in code or configs: docs/gpu.md "Driver", design.md "Code layout"
CITATION = re.compile(r'(?:docs/)?\b([a-z]+)\.md "([^"]+)"')
CODE_DIRS = [
    "common",
    "clipdata",
    "dali_pipelines",
    "preprocessing",
    "trainer",
    "launch",
    "tools",
    "benchmarks",
    "tests",
    "configs",
]
CODE_FILES = ["run_dist.sh", "Makefile", "setup.cfg"]


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks (links and headings in code are not links)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def slug(title: str) -> str:
    """GitHub's anchor of a heading: link targets and code marks dropped, lower case, punctuation
    removed, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
    title = re.sub(r"[^\w\- ]", "", title.lower())
    return title.replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m.group(2) for line in prose_lines(path) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    """Every anchor the page defines, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for title in headings(path):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    for number, line in enumerate(prose_lines(path), 1):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            yield number, target


def broken_links(path: Path) -> list[str]:
    broken = []
    for number, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_readme_is_a_front_door_of_at_most_250_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_docs_page_is_named_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert missing == [], f"README.md's 'Read next' names no line for {missing}"


def cited_sections():
    files = [ROOT / f for f in CODE_FILES]
    for d in CODE_DIRS:
        files += sorted((ROOT / d).rglob("*.py")) + sorted((ROOT / d).rglob("*.yaml")) + sorted((ROOT / d).glob("*.sh"))
    files += sorted((ROOT / "launch").glob("*.sbatch")) + sorted((ROOT / "launch").glob("*.pbs"))
    for f in files:
        if f == Path(__file__) or not f.is_file():
            continue
        for number, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for page, section in CITATION.findall(line):
                if (ROOT / "docs" / f"{page}.md").exists():
                    yield f"{f.relative_to(ROOT)}:{number}", page, section


def names_section(page: str, section: str) -> bool:
    """A citation names a heading by its words, with or without a step number ("1. Driver") and
    possibly only its start ("Tolerances" for "Tolerances, and why each is what it is")."""
    for title in headings(ROOT / "docs" / f"{page}.md"):
        title = re.sub(r"^\d+\.\s*", "", title.replace("`", ""))
        if title == section or title.startswith((section + ",", section + ":", section + " (")):
            return True
    return False


def test_every_docs_section_the_code_cites_exists():
    missing = [
        f'{where}: docs/{page}.md "{section}"'
        for where, page, section in cited_sections()
        if not names_section(page, section)
    ]
    assert missing == [], "cited sections missing from docs/: " + "; ".join(missing)


def section_text(page: Path, title: str) -> str:
    """The text of the section headed ``title`` up to the next heading of its level or above."""
    lines, inside, level = [], False, 0
    for line in prose_lines(page):
        m = HEADING.match(line)
        if m and inside and len(m.group(1)) <= level:
            break
        if m and m.group(2) == title:
            inside, level = True, len(m.group(1))
        elif inside:
            lines.append(line)
    return "\n".join(lines)


def test_the_design_layout_names_every_module_and_its_contents_every_section():
    design = ROOT / "docs" / "design.md"
    layout = section_text(design, "Code layout")
    modules = [p for d in CODE_DIRS if d not in ("configs",) for p in sorted((ROOT / d).glob("*.py"))]
    unnamed = [
        f"{p.parent.name}/{p.name}"
        for p in modules
        if p.name != "__init__.py"
        and not p.name.startswith("test_")
        and f"`{p.stem}`" not in layout
        and f"`{p.name}`" not in layout
    ]
    assert unnamed == [], f'docs/design.md "Code layout" names no row for {unnamed}'
    contents = section_text(design, "Design notes")
    level2 = [m.group(2) for line in prose_lines(design) if (m := HEADING.match(line)) and len(m.group(1)) == 2]
    missing = [t for t in level2 if f"(#{slug(t)})" not in contents]
    assert level2 and missing == [], f"docs/design.md's contents list misses {missing}"

"""The documentation holds together: every relative link in README.md, docs/ and the bench indexes resolves to
a file (and heading) that exists, bench/results/README.md links every file under bench/results/, the README
stays short and links every page of docs/, and docs/performance.md's generated block is what its report gives."""
import os
import re

import pytest

from bench import readme
from bench.report import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
RESULTS_INDEX = os.path.join(RESULTS, "README.md")
# A link to a training run's directory stands for these files in it (bench/results/README.md says so).
RUN_FILES = ("train_config.json", "train_log.jsonl", "dev.json")
# Written by `pytest bench/ --bench-size quick` and git-ignored: never committed, so never indexed.
UNINDEXED = (os.path.join(RESULTS, "quick"),)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _pages():
    pages = [os.path.join(REPO, "README.md")]
    pages += sorted(os.path.join(REPO, "docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
    for top in ("results", "probes"):
        for root, _, files in os.walk(os.path.join(REPO, "bench", top)):
            pages += [os.path.join(root, f) for f in files if f == "README.md"]
    return pages


def _prose(text: str) -> str:
    """The text outside code blocks and code spans, where links and headings are."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [t for t in LINK.findall(_prose(f.read())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def _anchors(path: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats."""
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    anchors, seen = set(), {}
    for heading in HEADING.findall(text):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _resolve(page: str, target: str) -> tuple[str, str]:
    where, _, anchor = target.partition("#")
    return (os.path.normpath(os.path.join(os.path.dirname(page), where)) if where else page), anchor


@pytest.mark.parametrize("page", _pages(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, anchor = _resolve(page, target)
        if not os.path.exists(path):
            broken.append(f"{target} (no such file)")
        elif anchor and (not path.endswith(".md") or anchor not in _anchors(path)):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(path, REPO)})")
    assert not broken, f"{os.path.relpath(page, REPO)}: broken links: {broken}"


def test_link_checker_catches_broken_targets_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: with `code`\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [dup](other.md#same-1) [gone](missing.md)\n"
                    "[bad](other.md#nope) [web](https://example.com/x) `[in code](missing.md)`\n"
                    "```\n[fenced](missing.md)\n```\n")
    resolved = [(os.path.relpath(p, tmp_path), a) for p, a in (_resolve(str(page), t) for t in _links(str(page)))]
    assert resolved == [("other.md", "a-heading-with-code"), ("other.md", "same-1"), ("missing.md", ""),
                        ("other.md", "nope")]
    assert _anchors(str(tmp_path / "other.md")) == {"a-heading-with-code", "same", "same-1"}


def test_results_index_links_every_file_under_bench_results():
    covered = set()
    for target in _links(RESULTS_INDEX):
        path, _ = _resolve(RESULTS_INDEX, target)
        covered |= {os.path.join(path, f) for f in RUN_FILES} if os.path.isdir(path) else {path}
    unlisted = []
    for root, dirs, files in os.walk(RESULTS):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in UNINDEXED and d != "__pycache__"]
        unlisted += [os.path.relpath(os.path.join(root, f), RESULTS) for f in files
                     if os.path.join(root, f) not in covered and os.path.join(root, f) != RESULTS_INDEX]
    assert not unlisted, f"bench/results/README.md does not link: {sorted(unlisted)}"


def test_bench_results_holds_no_scripts():
    scripts = [os.path.relpath(os.path.join(root, f), RESULTS) for root, _, files in os.walk(RESULTS)
               for f in files if f.endswith((".py", ".sh", ".patch"))]
    assert not scripts, f"scripts belong in bench/probes/, not bench/results/: {scripts}"


def test_readme_is_short_and_links_every_docs_page():
    path = os.path.join(REPO, "README.md")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; the detail belongs in docs/"
    linked = {_resolve(path, t)[0] for t in _links(path)}
    docs = os.path.join(REPO, "docs")
    pages = {os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_performance_block_is_generated_from_the_report_it_names():
    with open(readme.PAGE, encoding="utf-8") as f:
        text = f.read()
    block = text[text.index(readme.BEGIN) + len(readme.BEGIN) + 1:text.index(readme.END)]
    report_md = re.search(r"Full report: \[[^\]]*\]\(([^)]+)\)", block).group(1)
    report_json = os.path.join(os.path.dirname(os.path.join(os.path.dirname(readme.PAGE), report_md)), "report.json")
    assert block == readme.readme_section(load(report_json), report_json), \
        "docs/performance.md's block is stale: rerun python -m bench.readme on its report.json"

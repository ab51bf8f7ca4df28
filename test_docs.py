"""The documents: README.md, the pages of docs/ and CHANGELOG.md.

A reader finds every page from the README and follows its links: each
relative link must lead to a file, and each ``#anchor`` to a heading of
that file, named as GitHub names it. The README stays a front page, its
commands the ones CI runs, and the changelog's newest release is the version
dispatch says it is. The synthetic documents below show the checks can fail.
"""

from __future__ import annotations

import glob
import os
import re
import unicodedata

import dispatch

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
PAGES = sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))
CHANGELOG = os.path.join(HERE, "CHANGELOG.md")
# A front page is read at one sitting: more belongs in docs/.
MOST_README_LINES = 400

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)
RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", re.M)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def prose(markdown: str) -> str:
    """``markdown`` without its code blocks: a ``#`` there is a shell
    comment, and ``[a](b)`` an example, not a heading or a link."""
    return FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped
    (hyphens and underscores kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a document's headings; a repeated one gets -1, -2..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(markdown)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def dead_links(path: str) -> list[str]:
    """The relative links of the document at ``path`` that lead nowhere:
    to no file, or to an anchor that no heading of the target has."""
    dead = []
    for target in LINK.findall(INLINE_CODE.sub("", prose(read(path)))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not this repository's
            continue
        where, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), where)) if where else path
        if not os.path.exists(linked):
            dead.append(f"{target}: no file {os.path.relpath(linked, HERE)}")
        elif anchor and (not linked.endswith(".md") or anchor not in anchors(read(linked))):
            dead.append(f"{target}: no heading #{anchor} in {os.path.relpath(linked, HERE)}")
    return dead


def test_every_relative_link_of_the_readme_and_docs_leads_somewhere() -> None:
    assert PAGES, "no pages in docs/"
    dead = {os.path.relpath(path, HERE): dead_links(path) for path in [README, *PAGES]}
    assert {path: links for path, links in dead.items() if links} == {}


def test_every_page_of_docs_is_linked_from_the_readme() -> None:
    linked = {os.path.normpath(os.path.join(HERE, target.partition("#")[0])) for target in LINK.findall(read(README))}
    assert [os.path.relpath(page, HERE) for page in PAGES if page not in linked] == []


def test_the_readme_is_a_front_page_that_runs_it_before_setting_it_up() -> None:
    readme = read(README)
    assert len(readme.splitlines()) <= MOST_README_LINES
    headings = HEADING.findall(prose(readme))
    assert headings.index("Run it") < headings.index("Set up and test")


def test_ci_runs_the_readmes_commands_to_set_up_and_test() -> None:
    readme = read(README)
    section = readme[readme.index("## Set up and test") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line.partition("#")[0].strip() for line in block.group(1).splitlines()]
    set_up, run_tests = commands
    ci = read(os.path.join(HERE, ".ci", "run"))
    assert set_up.endswith("pip install -e '.[test]'") and "pip install -e '.[test]'" in ci
    assert run_tests == "python -m pytest" and "python -m pytest" in ci


def test_the_changelogs_newest_release_is_the_version_dispatch_says() -> None:
    releases = RELEASE.findall(read(CHANGELOG))
    assert releases[0][0] == dispatch.__version__
    versions = [tuple(int(part) for part in version.split(".")) for version, _ in releases]
    assert versions == sorted(versions, reverse=True)  # newest first
    assert [date for _, date in releases] == sorted((date for _, date in releases), reverse=True)


# The checks on synthetic documents: they fail where they should.


def test_a_link_to_a_missing_file_or_heading_is_dead(tmp_path: object) -> None:
    folder = str(tmp_path)
    with open(os.path.join(folder, "other.md"), "w", encoding="utf-8") as file:
        file.write("# Other page\n\n## Failover: nobody waits\n\n```sh\n# Not a heading\n```\n")
    page = os.path.join(folder, "page.md")
    with open(page, "w", encoding="utf-8") as file:
        file.write(
            "# Page\n\n## Here, and `there`\n\n"
            "[fine](other.md#failover-nobody-waits) [fine](#here-and-there) [web](https://example.com/x#y)\n"
            "[gone](missing.md) [no heading](other.md#not-a-heading) [no anchor here](#nowhere)\n"
            "`[code](not-a-link.md)`\n\n```\n[also code](not-a-link.md)\n```\n"
        )

    def where(name: str) -> str:
        return os.path.relpath(os.path.join(folder, name), HERE)

    assert dead_links(page) == [
        f"missing.md: no file {where('missing.md')}",
        f"other.md#not-a-heading: no heading #not-a-heading in {where('other.md')}",
        f"#nowhere: no heading #nowhere in {where('page.md')}",
    ]


def test_headings_get_githubs_anchors() -> None:
    assert slug("Failover: nobody waits to learn that a link is dark") == (
        "failover-nobody-waits-to-learn-that-a-link-is-dark"
    )
    assert slug("The `dispatch link` command, 0.3.0") == "the-dispatch-link-command-030"
    assert anchors("# A\n## A\n## A\n") == {"a", "a-1", "a-2"}

"""The README and ``docs/``: every relative link and anchor resolves, the README stays the front door.

The README is short (under ``README_LIMIT`` bytes) and links every document of ``docs/``; every relative link in
it and in ``docs/*.md`` names a file that exists inside the repository, and every ``#anchor`` in such a link
names a heading of the target Markdown file — as GitHub renders it, so anchors are computed with GitHub's own
slug rules (``github_slug``, checked below on headings whose slugs GitHub is known to produce). External links
(``https:``, ``mailto:`` …) are not fetched.

The Markdown reading is deliberately small: fenced code blocks and inline code spans are skipped (a link or a
heading inside them is text), headings are ATX (``## Title``) or setext (``Title`` over ``===`` / ``---``),
links are inline (``[text](target)``, images too), reference definitions (``[label]: target``) and HTML
``href``/``src`` attributes; explicit HTML anchors (``id="…"``, ``name="…"``) count as anchors.
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 12_000  # bytes ("under 12 KB", read strictly)


# ------------------------------------------------------------------------------------------- GitHub's slugs

# github-slugger (the slugger GitHub's heading anchors follow) removes every character of these Unicode general
# categories — other numbers, all punctuation but connectors ("_"), symbols, controls, format characters,
# private use, unassigned code points and separators — except " " (becomes "-"), "-", and characters with the
# Unicode "Alphabetic" property; it keeps letters, marks, decimal and letter numbers and connector punctuation.
_REMOVED_CATEGORIES = frozenset(
    {"No", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp"}
)
# Alphabetic characters in the removed categories (Other_Alphabetic symbols: circled and squared Latin letters).
_ALPHABETIC_SYMBOLS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))


def _kept(char: str) -> bool:
    if char in " -":
        return True
    if unicodedata.category(char) not in _REMOVED_CATEGORIES:
        return True
    return any(low <= ord(char) <= high for low, high in _ALPHABETIC_SYMBOLS)


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading whose rendered text is ``text`` (before de-duplication): lowercased,
    every character removed that is not a letter, mark, decimal or letter number, ``_``, ``-`` or a space, and
    each space turned into ``-`` (not collapsed, not trimmed: ``"a - b"`` gives ``"a---b"``)."""
    return "".join(char for char in text.lower() if _kept(char)).replace(" ", "-")


class Slugger:
    """Unique anchors for the headings of one document, in order: the second ``x`` is ``x-1``, the third
    ``x-2``, and a suffixed slug never collides with one taken before (github-slugger's ``BananaSlug``)."""

    def __init__(self) -> None:
        self.occurrences: dict[str, int] = {}

    def slug(self, text: str) -> str:
        original = result = github_slug(text)
        while result in self.occurrences:
            self.occurrences[original] += 1
            result = f"{original}-{self.occurrences[original]}"
        self.occurrences[result] = 0
        return result


# ------------------------------------------------------------------------------------------ reading Markdown

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
# [text](target "title"): one level of nested brackets in the text, one level of parentheses in the target.
INLINE_LINK = re.compile(
    r"!?\[(?P<text>(?:[^\[\]\\]|\\.|\[(?:[^\[\]\\]|\\.)*\])*)\]"
    r"\(\s*(?P<target><[^<>\n]*>|(?:[^\s()\\]|\\.|\((?:[^\s()\\]|\\.)*\))*)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<[a-z][^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
EMPHASIS = re.compile(r"(?<![\w\\])(\*{1,3}|_{1,3})(?=\S)(.+?)(?<=\S)\1(?![\w])")
HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> list[str]:
    """The document's lines with every fenced code block (fences included) blanked: line numbers are kept."""
    lines = text.splitlines()
    fence: str | None = None
    for index, line in enumerate(lines):
        marker = FENCE.match(line)
        if fence is None:
            if marker:
                fence = marker.group(1)
                lines[index] = ""
        else:
            lines[index] = ""
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
    return lines


def mask_code_spans(text: str) -> str:
    """``text`` with the content of every code span replaced by spaces (newlines and positions kept); a code
    span never crosses a blank line, so each paragraph is masked on its own."""

    def blank(match: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", match.group(0))

    return "".join(CODE_SPAN.sub(blank, part) for part in re.split(r"(\n[ \t]*\n)", text))


def _code_span_content(match: re.Match[str]) -> str:
    content = match.group(2).replace("\n", " ")
    if content.startswith(" ") and content.endswith(" ") and content.strip(" "):
        content = content[1:-1]  # CommonMark strips one space on each side
    return content


def heading_text(source: str) -> str:
    """The rendered text of a heading's Markdown: code spans keep their content, links their text, images and
    HTML tags go, emphasis markers go, backslash escapes and entities are resolved."""
    spans: list[str] = []

    def hold(match: re.Match[str]) -> str:
        spans.append(_code_span_content(match))
        return f"\x00{len(spans) - 1}\x00"

    text = CODE_SPAN.sub(hold, source)

    def link(match: re.Match[str]) -> str:
        return "" if match.group(0).startswith("!") else match.group("text")

    text = INLINE_LINK.sub(link, text)
    text = HTML_TAG.sub("", text)
    previous = None
    while previous != text:
        previous, text = text, EMPHASIS.sub(r"\2", text)
    text = html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text))
    return re.sub(r"\x00(\d+)\x00", lambda held: spans[int(held.group(1))], text).strip()


def _is_list_item(line: str) -> bool:
    return re.match(r"^ {0,3}(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)", line) is not None


def _opens_container(line: str) -> bool:
    """A list item, block quote, table row or HTML block: lines after it (up to a blank line) belong to it."""
    return _is_list_item(line) or re.match(r"^ {0,3}(?:>|\||<)", line) is not None


def headings(text: str) -> list[str]:
    """The rendered text of every heading, in order: ATX, and setext under a paragraph of its own."""
    found: list[str] = []
    paragraph: list[str] = []
    in_container = False
    for line in prose(text):
        atx = ATX.match(line)
        if not line.strip():
            paragraph, in_container = [], False
        elif atx:
            found.append(heading_text(atx.group(2) or ""))
            paragraph, in_container = [], False
        elif in_container:
            continue
        elif SETEXT_UNDERLINE.match(line) and paragraph:
            found.append(heading_text(" ".join(part.strip() for part in paragraph)))
            paragraph = []
        elif _is_list_item(line) or re.match(r"^ {0,3}>", line) or (not paragraph and _opens_container(line)):
            paragraph, in_container = [], True  # a list item or quote may interrupt a paragraph
        else:
            paragraph.append(line)
    return found


def anchors(text: str) -> set[str]:
    """Every fragment that leads somewhere in the rendered document: heading slugs and explicit HTML anchors."""
    slugger = Slugger()
    found = {slugger.slug(heading) for heading in headings(text)}
    found.update(HTML_ANCHOR.findall(mask_code_spans("\n".join(prose(text)))))
    return found


def link_targets(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image in the document's prose, in order."""
    masked = mask_code_spans("\n".join(prose(text)))
    found: list[tuple[int, int, str]] = []
    for match in INLINE_LINK.finditer(masked):
        found.append((match.start(), masked.count("\n", 0, match.start()) + 1, match.group("target").strip("<>")))
    for number, line in enumerate(masked.splitlines(), 1):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((-1, number, definition.group(1).strip("<>")))
        found.extend((-1, number, target) for target in HTML_LINK.findall(line))
    for _, number, target in sorted(found, key=lambda item: (item[1], item[0])):
        yield number, target


# ------------------------------------------------------------------------------------------ checking links


@dataclass(frozen=True)
class BrokenLink:
    source: str
    line: int
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: ({self.target}) {self.reason}"


def broken_links(files: Iterable[Path], root: Path) -> list[BrokenLink]:
    """Every relative link of ``files`` whose file does not exist (or lies outside ``root``), or whose anchor
    is not one of the target Markdown file's anchors."""
    root = root.resolve()
    anchor_cache: dict[Path, set[str]] = {}
    broken: list[BrokenLink] = []
    for file in files:
        source = str(file.resolve().relative_to(root))
        for line, target in link_targets(file.read_text(encoding="utf-8")):
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue
            path_part, _, fragment = target.partition("#")
            path_part = urllib.parse.unquote(path_part.partition("?")[0])
            if not path_part:
                resolved = file.resolve()
            elif path_part.startswith("/"):
                resolved = (root / path_part.lstrip("/")).resolve()
            else:
                resolved = (file.parent / path_part).resolve()
            if not resolved.is_relative_to(root):
                broken.append(BrokenLink(source, line, target, "points outside the repository"))
                continue
            if not resolved.exists():
                broken.append(BrokenLink(source, line, target, "no such file"))
                continue
            if not fragment or resolved.suffix.lower() != ".md":
                continue  # an anchor into a non-Markdown file (e.g. a line "#L10") is GitHub's own
            if resolved not in anchor_cache:
                anchor_cache[resolved] = anchors(resolved.read_text(encoding="utf-8"))
            if urllib.parse.unquote(fragment) not in anchor_cache[resolved]:
                broken.append(BrokenLink(source, line, target, f"no heading with anchor #{fragment}"))
    return broken


def documentation() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# -------------------------------------------------------------------------------- the slug rules themselves


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        # github-slugger's own fixtures
        ("alpha", "alpha"),
        ("bravoCharlieDelta", "bravocharliedelta"),
        ("heading with a - dash", "heading-with-a---dash"),
        ("heading with an _ underscore", "heading-with-an-_-underscore"),
        ("heading with a period.txt", "heading-with-a-periodtxt"),
        (
            "exchange.bind_headers(exchange, routing [, bindCallback])",
            "exchangebind_headersexchange-routing--bindcallback",
        ),
        ("apostrophe’s should be trimmed", "apostrophes-should-be-trimmed"),
        ("I ♥ unicode", "i--unicode"),
        ("en–dash", "endash"),
        ("😄 - an emoji", "---an-emoji"),
        ("😄_😄 unicode emoji", "_-unicode-emoji"),
        (":ok_hand: Single", "ok_hand-single"),
        ("Привет non-latin 你好", "привет-non-latin-你好"),
        ("a\u2028b", "ab"),
        ("a½b", "ab"),  # other numbers go
        ("Ⓐ circled", "ⓐ-circled"),  # a symbol that is alphabetic stays
        # headings of this repository, as GitHub anchors them
        ("Roles and users (least privilege)", "roles-and-users-least-privilege"),
        ("What is logged, what is not", "what-is-logged-what-is-not"),
        ("RabbitMQ: a cluster and a node list", "rabbitmq-a-cluster-and-a-node-list"),
        ("Changing SHARD_COUNT or QUEUE_TYPE", "changing-shard_count-or-queue_type"),
        ("Got a 202?", "got-a-202"),
        ("字段规则 / 返回值", "字段规则--返回值"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_duplicate_headings_are_numbered_without_collisions() -> None:
    slugger = Slugger()
    got = [slugger.slug(text) for text in ["echo", "echo", "echo 1", "echo-1", "echo", "foxtrot-1", "foxtrot"]]
    assert got == ["echo", "echo-1", "echo-1-1", "echo-1-2", "echo-2", "foxtrot-1", "foxtrot"]
    assert slugger.slug("foxtrot") == "foxtrot-2"


def test_heading_text_is_the_rendered_text() -> None:
    document = "\n".join([
        "# Changing `SHARD_COUNT` or `QUEUE_TYPE`",
        "## See [the *API*](docs/api.md) &amp; **more** ##",
        "```",
        "# not a heading",
        "```",
        "Setext title",
        "============",
        "- a list item",
        "---",
        "| a | b |",
        "|---|---|",
        "## snake_case_name and _emphasis_",
        "## Overview",
        "## Overview",
    ])
    assert headings(document) == [
        "Changing SHARD_COUNT or QUEUE_TYPE",
        "See the API & more",
        "Setext title",
        "snake_case_name and emphasis",
        "Overview",
        "Overview",
    ]
    assert anchors(document) == {
        "changing-shard_count-or-queue_type", "see-the-api--more", "setext-title", "snake_case_name-and-emphasis",
        "overview", "overview-1",
    }


def test_the_checker_finds_dead_files_and_dead_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## How it works\n\n[back](../README.md#top-part)\n", encoding="utf-8"
    )
    (tmp_path / "README.md").write_text(
        "\n".join([
            "# Top part",
            "[ok](docs/a.md#how-it-works) [ok](#top-part) [ok](docs/a.md) [web](https://example.com/#x)",
            "[dead file](docs/b.md) [dead anchor](docs/a.md#how-it-work) [dead here](#nowhere)",
            "`[in code](docs/c.md)` [outside](../../etc/passwd)",
            "```",
            "[in a fence](docs/d.md)",
            "```",
        ]),
        encoding="utf-8",
    )
    found = broken_links([tmp_path / "README.md", tmp_path / "docs" / "a.md"], tmp_path)
    assert [(link.line, link.target) for link in found] == [
        (3, "docs/b.md"), (3, "docs/a.md#how-it-work"), (3, "#nowhere"), (4, "../../etc/passwd"),
    ]


# ---------------------------------------------------------------------------------------- this repository


def test_every_relative_link_and_anchor_resolves() -> None:
    files = documentation()
    assert len(files) > 1, "no docs/*.md"
    broken = broken_links(files, ROOT)
    assert not broken, "\n".join(map(str, broken))


def test_readme_is_the_front_door_not_the_manual() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes: move sections into docs/ (limit {README_LIMIT})"


def test_every_document_is_linked_from_the_readme() -> None:
    linked = {
        (README.parent / urllib.parse.unquote(target.partition("#")[0])).resolve()
        for _, target in link_targets(README.read_text(encoding="utf-8"))
        if not SCHEME.match(target) and target.partition("#")[0]
    }
    missing = [path.name for path in sorted(DOCS.glob("*.md")) if path.resolve() not in linked]
    assert not missing, f"docs not linked from README.md: {missing}"

"""Knowledge base ingest: files -> documents -> chunks that remember where they came from.

Readers by suffix: Markdown (sections by heading), text (paragraphs), HTML (headings and blocks, stdlib
parser), PDF (pypdf, one section per page), and FAQ/passage rows in JSON, JSONL or CSV (one document per
row: a question + answer pair, or a text field). A file that cannot be read is reported with the reason
and skipped; the rest go on.

Chunking follows the structure: a chunk never spans two sections; inside a section, sentences are packed
up to a token budget, and the next chunk starts with the last sentences of the previous one (up to the
overlap budget). A sentence longer than the budget is cut into windows of words with the same overlap.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from ..errors import TunewiseError

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".text", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
ROW_SUFFIXES = {".json", ".jsonl", ".csv"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | ROW_SUFFIXES | {".pdf"}


@dataclass
class Section:
    title: str  # heading path ("Guide > Install"), page ("page 3") or row title
    text: str
    start: int  # character offset of the section's text in its source text
    line: int  # 1-based line of the section start in its source; page, row or section number otherwise
    by_line: bool = True  # whether `line` counts text lines (so a chunk's line = line + newlines before it)


@dataclass
class Document:
    source: str  # path as given, plus "#<id>" for a row of a FAQ/passage file
    sections: list[Section]


@dataclass
class Chunk:
    id: str  # "<source>#<position>", stable while the source does not change
    source: str
    position: int  # index of the chunk within its document
    title: str
    text: str
    line: int  # where the chunk starts in its source (line; page for PDF; row for tables)

    @property
    def citation(self) -> str:
        return f"{self.source}:{self.line}" if "#" not in self.source else self.source

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Chunk":
        return cls(**d)


@dataclass
class BadFile:
    path: str
    reason: str


class KBError(TunewiseError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------- readers

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def read_markdown(path: Path, text: str) -> list[Section]:
    """Sections bounded by ATX headings (# ...); the heading path is the section title."""
    sections, stack = [], []
    cur_title, cur_start, cur_line, buf = "", 0, 1, []
    offset = 0
    in_fence = False
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line.rstrip("\n"))
        if m:
            if "".join(buf).strip():
                sections.append(Section(cur_title, "".join(buf), cur_start, cur_line))
            level = len(m.group(1))
            stack = [s for s in stack if s[0] < level] + [(level, m.group(2))]
            cur_title = " > ".join(t for _, t in stack)
            buf, cur_start, cur_line = [], offset + len(line), lineno + 1
        else:
            buf.append(line)
        offset += len(line)
    if "".join(buf).strip():
        sections.append(Section(cur_title, "".join(buf), cur_start, cur_line))
    return sections


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "table", "ul", "ol", "dd", "dt"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.heads: list[tuple[int, str]] = []
        self.in_heading: int | None = None
        self.heading_text: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.in_heading, self.heading_text = int(tag[1]), []
        elif tag in self.BLOCK:
            self.sections[-1][1].append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self.in_heading is not None:
            level, title = self.in_heading, " ".join("".join(self.heading_text).split())
            self.heads = [h for h in self.heads if h[0] < level] + [(level, title)]
            self.sections.append((" > ".join(t for _, t in self.heads), []))
            self.in_heading = None
        elif tag in self.BLOCK:
            self.sections[-1][1].append("\n\n")

    def handle_data(self, data):
        if self.skip:
            return
        if self.in_heading is not None:
            self.heading_text.append(data)
        else:
            self.sections[-1][1].append(data)


def read_html(path: Path, text: str) -> list[Section]:
    p = _HTMLText()
    p.feed(text)
    p.close()
    out = []
    for i, (title, parts) in enumerate(p.sections):
        body = re.sub(r"[ \t]+", " ", "".join(parts))
        body = re.sub(r"\n\s*\n\s*(\n\s*)*", "\n\n", body).strip()
        if body:
            out.append(Section(title, body, 0, i + 1, by_line=False))  # line = section number (HTML has no useful lines)
    return out


def read_pdf(path: Path) -> list[Section]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    return [Section(f"page {i}", t, 0, i, by_line=False) for i, page in enumerate(reader.pages, 1) if (t := page.extract_text() or "").strip()]


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                yield i, row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        for i, row in enumerate(json.loads(text), 1):
            yield i, row
        return
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, e


def read_rows(path: Path, name: str, bad: list[BadFile]) -> list[Document]:
    """One document per row: {question, answer} (an FAQ entry) or {text|context|content}; optional id, title."""
    docs = []
    for i, row in _rows(path):
        where = f"{name}:{i}"
        if isinstance(row, json.JSONDecodeError):
            bad.append(BadFile(where, f"malformed JSON: {row.msg} (column {row.colno})"))
            continue
        if not isinstance(row, dict):
            bad.append(BadFile(where, f"expected an object, got {type(row).__name__}"))
            continue
        q, a = row.get("question"), row.get("answer")
        body = next((row[k] for k in ("text", "context", "content", "passage") if isinstance(row.get(k), str) and row[k].strip()), None)
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            body = f"Q: {q.strip()}\nA: {a.strip()}"
        if body is None:
            bad.append(BadFile(where, "row has no text: expected question+answer or one of text/context/content/passage"))
            continue
        rid = str(row.get("id") or i)
        title = str(row.get("title") or "")
        docs.append(Document(f"{name}#{rid}", [Section(title, body, 0, i, by_line=False)]))
    return docs


def iter_files(paths: list[str | Path]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            yield p


def load_documents(paths: list[str | Path], root: str | Path | None = None) -> tuple[list[Document], list[BadFile]]:
    """Read every file under `paths`; unreadable ones are returned as BadFile with the reason.

    Sources are named relative to `root` (the config's folder) when they lie under it.
    """
    docs: list[Document] = []
    bad: list[BadFile] = []
    for f in iter_files(paths):
        name = str(f)
        if root is not None:
            try:
                name = str(Path(f).resolve().relative_to(Path(root).resolve()))
            except ValueError:
                pass
        suffix = f.suffix.lower()
        try:
            if not f.exists():
                bad.append(BadFile(name, "no such file"))
            elif suffix not in SUFFIXES:
                bad.append(BadFile(name, f"unsupported file type {suffix or '(none)'}; one of {', '.join(sorted(SUFFIXES))}"))
            elif suffix in ROW_SUFFIXES:
                docs += read_rows(f, name, bad)
            elif suffix == ".pdf":
                sections = read_pdf(f)
                if not sections:
                    bad.append(BadFile(name, "no extractable text (scanned PDF?)"))
                else:
                    docs.append(Document(name, sections))
            else:
                text = f.read_bytes().decode("utf-8")
                sections = read_html(f, text) if suffix in HTML_SUFFIXES else read_markdown(f, text)
                if sections:
                    docs.append(Document(name, sections))
                else:
                    bad.append(BadFile(name, "empty"))
        except UnicodeDecodeError as e:
            bad.append(BadFile(name, f"not valid UTF-8 (byte {e.start})"))
        except (json.JSONDecodeError, csv.Error) as e:
            bad.append(BadFile(name, f"malformed {suffix[1:].upper()}: {e}"))
        except Exception as e:  # a broken PDF and the like: reported, the rest goes on
            bad.append(BadFile(name, f"{type(e).__name__}: {e}"))
    return docs, bad


# --------------------------------------------------------------------------------------------- chunking

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n")


def _units(text: str) -> list[tuple[str, int]]:
    """Sentences (and paragraphs) with their character offsets."""
    out, pos = [], 0
    for m in _SENTENCE.finditer(text):
        piece = text[pos : m.start()]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            out.append((piece.strip(), pos + lead))
        pos = m.end()
    piece = text[pos:]
    if piece.strip():
        out.append((piece.strip(), pos + len(piece) - len(piece.lstrip())))
    return out


def chunk_documents(docs: list[Document], count_tokens: Callable[[str], int], max_tokens: int = 256,
                    overlap: int = 32) -> list[Chunk]:
    if max_tokens <= 0 or overlap < 0 or overlap >= max_tokens:
        raise KBError(f"chunking needs 0 <= overlap < max_tokens (got max_tokens={max_tokens}, overlap={overlap})")
    chunks: list[Chunk] = []
    for doc in docs:
        pos = 0
        for sec in doc.sections:
            for text, offset in _chunk_section(sec.text, count_tokens, max_tokens, overlap):
                line = sec.line + sec.text.count("\n", 0, offset) if sec.by_line else sec.line
                chunks.append(Chunk(f"{doc.source}#{pos}", doc.source, pos, sec.title, text, line))
                pos += 1
    return chunks


def _chunk_section(text: str, count: Callable[[str], int], max_tokens: int, overlap: int) -> list[tuple[str, int]]:
    units = []  # (text, offset, tokens), long sentences cut into word windows
    for u, off in _units(text):
        n = count(u)
        if n <= max_tokens:
            units.append((u, off, n))
            continue
        words = list(re.finditer(r"\S+", u))
        per = max(1, int(len(words) * max_tokens / n))  # words per window, from the sentence's token density
        step = max(1, per - max(0, int(len(words) * overlap / n)))
        for a in range(0, len(words), step):
            w = words[a : a + per]
            units.append((u[w[0].start() : w[-1].end()], off + w[0].start(), count(u[w[0].start() : w[-1].end()])))
            if a + per >= len(words):
                break
    out, cur = [], []
    for u in units:
        if cur and sum(x[2] for x in cur) + u[2] > max_tokens:
            out.append(cur)
            carry = []  # the next chunk starts with the previous one's last sentences, within the overlap
            for x in reversed(cur):
                if sum(y[2] for y in carry) + x[2] > overlap:
                    break
                carry.insert(0, x)
            cur = carry if sum(y[2] for y in carry) + u[2] <= max_tokens else []
        cur.append(u)
    if cur:
        out.append(cur)
    # A chunk is the section's own text from its first unit to its last: line breaks and spacing kept.
    return [(text[c[0][1] : c[-1][1] + len(c[-1][0])], c[0][1]) for c in out]

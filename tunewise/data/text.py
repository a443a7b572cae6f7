"""Raw text for continued pre-training (`data.format: text`, `training.objective: pretrain`).

The reader takes a file or a folder of them: `.txt`/`.md` files (one document per file; a file longer than
SECTION_WORDS words is cut at paragraph breaks into sections of about that many words, so one long file can
still be split into training and validation), and JSON lines with a `text` field (one document per line).
A document is a Record whose only message is the text (an assistant turn: every token is trained on), so
cleaning, PII redaction, deduplication, the split and the leakage check work on it as on any record; its
`prompt_key` is the text itself.

`text_blocks` lays the documents end to end, each closed by EOS (and opened by BOS where the tokenizer adds
one), and cuts the stream into blocks of `data.max_length` tokens, the last one shorter: packing with no
padding, the loss on every token (as LLaMA-Factory's and Axolotl's pre-training stages do). Conversations given
to the pretrain objective are rendered by the chat template and trained on in full the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from .readers import FormatError, Item, json_items, reader
from .records import BadRecord, Record
from ..models import render_chat
from .tokenize import TokenStats, Tokenized

SECTION_WORDS = 1000
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def is_text(r: Record) -> bool:
    """A raw document: one message, no prompt."""
    return len(r.messages) == 1 and r.messages[0]["role"] == "assistant"


def _doc(path: Path, where: str, text: str) -> Record:
    return Record([{"role": "assistant", "content": text}], f"{path.name}:{where}")


def _sections(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, section) of a text file: the whole file, or paragraph groups of ~SECTION_WORDS words."""
    if len(text.split()) <= SECTION_WORDS:
        yield 1, text
        return
    line, start, buf, words = 1, 1, [], 0
    for para in re.split(r"(\n\s*\n)", text):
        if not para.strip():
            line += para.count("\n")
            continue
        if not buf:
            start = line
        buf.append(para)
        words += len(para.split())
        line += para.count("\n")
        if words >= SECTION_WORDS:
            yield start, "\n\n".join(buf)
            buf, words = [], 0
    if buf:
        yield start, "\n\n".join(buf)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES)
        if not files:
            raise FormatError(f"{path}: no {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files in this folder")
        return files
    if path.suffix.lower() not in TEXT_SUFFIXES + JSON_SUFFIXES:
        raise FormatError(f"{path}: data.format text reads {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files (or a folder of them)")
    return [path]


@reader("text")
def read_text(path: Path, **_) -> Iterator[Item]:
    """Documents from .txt/.md files and JSON lines with "text" (a file or a folder)."""
    for f in _files(Path(path)):
        if f.suffix.lower() in JSON_SUFFIXES:
            for where, obj in json_items(f):
                if isinstance(obj, BadRecord):
                    yield obj
                elif not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    yield BadRecord(str(f), where, "missing field 'text' (a string)", obj)
                elif not obj["text"].strip():
                    yield BadRecord(str(f), where, "text: empty document", obj)
                else:
                    yield _doc(f, where, obj["text"])
            continue
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # never guess an encoding
            yield BadRecord(str(f), f"byte {e.start}", "not valid UTF-8", raw[:2000].decode("utf-8", "backslashreplace"))
            continue
        if not text.strip():
            yield BadRecord(str(f), "line 1", "empty document", "")
            continue
        for line, section in _sections(text):
            yield _doc(f, f"line {line}", section)


def _ids(tok, r: Record) -> list[int]:
    """A document's tokens, closed by EOS (BOS first where the tokenizer adds one); a conversation as the chat
    template renders it."""
    text = r.messages[0]["content"] if is_text(r) else render_chat(tok, r.messages, tokenize=False)
    ids = tok(text, add_special_tokens=is_text(r))["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    return ids


def text_blocks(tok, records, block: int, stats: TokenStats | None = None) -> tuple[list[Tokenized], TokenStats]:
    """The documents end to end, cut into blocks of `block` tokens (the last one shorter), every token a target.
    A block is named after the document it starts in."""
    stats = stats if stats is not None else TokenStats()
    stream: list[int] = []
    starts: list[tuple[int, str]] = []  # (offset, source) of each document in the stream
    for r in records:
        starts.append((len(stream), r.source))
        stream += _ids(tok, r)
    out, d = [], 0
    for k in range(0, len(stream), block):
        chunk = stream[k : k + block]
        if len(chunk) < 2:  # nothing to predict
            continue
        while d + 1 < len(starts) and starts[d + 1][0] <= k:
            d += 1
        out.append(Tokenized(chunk, list(chunk), starts[d][1] if starts else ""))
        stats.examples += 1
        stats.tokens += len(chunk)
        stats.loss_tokens += len(chunk) - 1
        stats.lengths.append(len(chunk))
    return out, stats

"""PII redaction: detectors with validity checks, replaced by typed placeholders (<EMAIL>, <CARD>...).

Patterns alone over-match (any 16 digits, any AA99 string), so every detector that has a checksum or a
structural rule checks it: payment cards pass Luhn, IBANs pass ISO 13616 mod-97 with the country's
length, US SSNs exclude the never-issued areas, IPv4 octets are <= 255. Presidio can be used instead
(`data.clean.pii_backend: presidio`) where it is installed.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

PII_TYPES = ("EMAIL", "IBAN", "CARD", "SSN", "NINO", "IP", "PHONE")  # order = precedence on overlaps (checksummed first)

# ISO 13616 lengths for the countries that issue IBANs most often (others: 15..34 accepted).
IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18,
    "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26,
}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}[- ](?!00)\d{2}[- ](?!0000)\d{4}\b")
_NINO = re.compile(r"\b(?![DFIQUV])[A-Z](?![DFIQUVO])[A-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_IPV4 = re.compile(r"(?<!\d\.)(?<!\d)(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")  # a sentence's full stop may follow
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")  # candidates; ipaddress decides
# Phone numbers: international (+CC ...), North American (xxx) xxx-xxxx, or grouped national formats.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(0\)[ .-]?)?(?:\(?\d{1,4}\)?[ .-]?){2,5}\d{2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]?\d{4}"
    r"|\d{3}[.-]\d{3}[.-]\d{4}"
    r"|0\d{2,4}[ .-]\d{3,4}[ .-]?\d{3,4})(?![\w])"
)


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if len(s) < 15 or len(s) > 34 or IBAN_LENGTHS.get(s[:2], len(s)) != len(s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_MAYBE = re.compile(r"[0-9@:]")
# Necessary conditions of each detector, without lookarounds so that the regex engine can skip ahead to a
# possible first character: on long prose (a 5 KB answer) the detectors cost ~1.3 ms, the guards ~0.1.
_GUARD = {
    "CARD": re.compile(r"\d(?:[ -]?\d){12}"),
    "IBAN": re.compile(r"[A-Z]{2}\d{2}"),
    "SSN": re.compile(r"\d{3}[- ]\d{2}[- ]\d{4}"),
    "NINO": re.compile(r"[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]"),
    "IPV4": re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d"),
    "PHONE": re.compile(r"\d[\d .()-]{5,}\d"),
}
# One pass for all of them (IBAN and NINO need an upper-case pair before their digits; the rest, a digit run).
_ANY_GUARD = re.compile(r"\d[\d .()-]{5,}\d|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d|[A-Z]{2} ?\d{2}")


@dataclass
class Found:
    type: str
    start: int
    end: int
    text: str


def _ipv6_ok(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


def find_pii(text: str, types: tuple[str, ...] = PII_TYPES) -> list[Found]:
    """Non-overlapping PII spans, earlier detectors in PII_TYPES winning overlaps."""
    if not _MAYBE.search(text):  # every detector needs a digit, an @ or (IPv6) a colon: most text has none
        return []
    if "@" not in text and text.count(":") < 2 and not _ANY_GUARD.search(text):  # prose with a few numbers
        return []
    found: list[Found] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, m: re.Match) -> None:
        a, b = m.span()
        if any(a < y and x < b for x, y in taken):
            return
        found.append(Found(kind, a, b, m.group()))
        taken.append((a, b))

    for kind in types:
        if kind in _GUARD and not _GUARD[kind].search(text):
            continue
        if kind == "EMAIL":
            for m in _EMAIL.finditer(text) if "@" in text else ():
                add(kind, m)
        elif kind == "CARD":
            for m in _CARD.finditer(text):
                digits = re.sub(r"\D", "", m.group())
                if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
                    add(kind, m)
        elif kind == "IBAN":
            for m in _IBAN.finditer(text):
                if iban_ok(m.group()):
                    add(kind, m)
        elif kind == "SSN":
            for m in _SSN.finditer(text):
                add(kind, m)
        elif kind == "NINO":
            for m in _NINO.finditer(text):
                add(kind, m)
        elif kind == "IP":
            for m in _IPV4.finditer(text) if _GUARD["IPV4"].search(text) else ():
                if all(int(o) <= 255 for o in m.group().split(".")):
                    add(kind, m)
            for m in _IPV6.finditer(text) if text.count(":") >= 2 else ():
                if _ipv6_ok(m.group()):
                    add(kind, m)
        elif kind == "PHONE":
            for m in _PHONE.finditer(text):
                if 7 <= len(re.sub(r"\D", "", m.group())) <= 15:
                    add(kind, m)
    return sorted(found, key=lambda f: f.start)


def redact(text: str, types: tuple[str, ...] = PII_TYPES) -> tuple[str, Counter]:
    """Text with every PII span replaced by <TYPE>, and the count of each type found."""
    return _replace(text, find_pii(text, types))


def _replace(text: str, spans: list[Found]) -> tuple[str, Counter]:
    if not spans:
        return text, Counter()
    out, pos = [], 0
    for f in spans:
        out.append(text[pos : f.start])
        out.append(f"<{f.type}>")
        pos = f.end
    out.append(text[pos:])
    return "".join(out), Counter(f.type for f in spans)


_PRESIDIO_TYPES = {"EMAIL_ADDRESS": "EMAIL", "CREDIT_CARD": "CARD", "IBAN_CODE": "IBAN", "US_SSN": "SSN", "UK_NINO": "NINO",
                   "PHONE_NUMBER": "PHONE", "IP_ADDRESS": "IP"}


class PresidioDetector:
    """The same contract as find_pii through Microsoft Presidio (`pip install presidio-analyzer`; data.clean.pii_backend:
    presidio). `model` is a spaCy pipeline name or path for Presidio's NLP engine; None builds a blank English
    pipeline (no download: Presidio's pattern, checksum and phonenumbers recognisers, which cover every type here)."""

    def __init__(self, model: str | None = None):
        from ..config import ConfigError

        try:
            from presidio_analyzer import AnalyzerEngine
            from presidio_analyzer.nlp_engine import NlpEngineProvider
        except ImportError as e:
            raise ConfigError("data.clean.pii_backend: presidio needs presidio-analyzer (pip install 'tunewise[presidio]')") from e
        import logging

        logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # offline: it falls back to its bundled suffix list
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        if model is None:
            import spacy

            from ..models import cache_home

            path = cache_home() / "spacy-blank-en"
            if not (path / "config.cfg").exists():
                spacy.blank("en").to_disk(path)
            model = str(path)
        nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]})
        try:
            engine = nlp.create_engine()
        except OSError as e:  # spaCy: no such installed pipeline or directory
            raise ConfigError(f"data.clean.presidio_model: cannot load spaCy pipeline {model!r} ({e}); "
                               "give an installed pipeline's name or path, or null for the blank English pipeline") from e
        self.engine = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])

    def find(self, text: str, types: tuple[str, ...] = PII_TYPES) -> list[Found]:
        wanted = [k for k, v in _PRESIDIO_TYPES.items() if v in types]
        results = self.engine.analyze(text=text, language="en", entities=wanted)
        # Longest, then most confident, span wins an overlap (Presidio may report a card's digits also as a phone).
        results.sort(key=lambda r: (-(r.end - r.start), -r.score, r.start))
        found: list[Found] = []
        for r in results:
            if any(r.start < f.end and f.start < r.end for f in found):
                continue
            found.append(Found(_PRESIDIO_TYPES[r.entity_type], r.start, r.end, text[r.start : r.end]))
        return sorted(found, key=lambda f: f.start)

    def redact(self, text: str, types: tuple[str, ...] = PII_TYPES) -> tuple[str, Counter]:
        return _replace(text, self.find(text, types))

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
    found: list[Found] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, m: re.Match) -> None:
        a, b = m.span()
        if any(a < y and x < b for x, y in taken):
            return
        found.append(Found(kind, a, b, m.group()))
        taken.append((a, b))

    for kind in types:
        if kind == "EMAIL":
            for m in _EMAIL.finditer(text):
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
            for m in _IPV4.finditer(text):
                if all(int(o) <= 255 for o in m.group().split(".")):
                    add(kind, m)
            for m in _IPV6.finditer(text):
                if _ipv6_ok(m.group()):
                    add(kind, m)
        elif kind == "PHONE":
            for m in _PHONE.finditer(text):
                if 7 <= len(re.sub(r"\D", "", m.group())) <= 15:
                    add(kind, m)
    return sorted(found, key=lambda f: f.start)


def redact(text: str, types: tuple[str, ...] = PII_TYPES) -> tuple[str, Counter]:
    """Text with every PII span replaced by <TYPE>, and the count of each type found."""
    spans = find_pii(text, types)
    if not spans:
        return text, Counter()
    out, pos = [], 0
    for f in spans:
        out.append(text[pos : f.start])
        out.append(f"<{f.type}>")
        pos = f.end
    out.append(text[pos:])
    return "".join(out), Counter(f.type for f in spans)


def presidio_redact(text: str, types: tuple[str, ...] = PII_TYPES) -> tuple[str, Counter]:  # pragma: no cover - optional
    """The same contract through Microsoft Presidio (pip install presidio-analyzer presidio-anonymizer)."""
    from presidio_analyzer import AnalyzerEngine

    mapping = {"EMAIL_ADDRESS": "EMAIL", "CREDIT_CARD": "CARD", "IBAN_CODE": "IBAN", "US_SSN": "SSN", "UK_NINO": "NINO",
               "PHONE_NUMBER": "PHONE", "IP_ADDRESS": "IP"}
    global _PRESIDIO
    try:
        _PRESIDIO
    except NameError:
        _PRESIDIO = AnalyzerEngine()
    results = [r for r in _PRESIDIO.analyze(text=text, language="en") if mapping.get(r.entity_type) in types]
    results.sort(key=lambda r: r.start)
    out, pos, counts = [], 0, Counter()
    for r in results:
        if r.start < pos:
            continue
        out += [text[pos : r.start], f"<{mapping[r.entity_type]}>"]
        pos = r.end
        counts[mapping[r.entity_type]] += 1
    out.append(text[pos:])
    return "".join(out), counts

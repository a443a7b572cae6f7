"""PII redaction on a planted set: 600 sentences with PII of every type in several formats, and 200
PII-free sentences full of look-alikes (order numbers, amounts, dates, versions, invalid card numbers).
Recall and precision are printed and must be >= 99% and >= 95%."""

import random
import string

from tunewise.data.pii import PII_TYPES, find_pii, iban_ok, luhn_ok, redact


def _luhn_complete(prefix: str, length: int, rng) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for d in string.digits:
        if luhn_ok(body + d):
            return body + d
    raise AssertionError


def _iban(country: str, length: int, rng) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(length - 4))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    return f"{country}{check:02d}{bban}"


def _value(kind: str, rng) -> str:
    if kind == "EMAIL":
        user = rng.choice(["john.smith", "a_b", "maria+bank", "x", "li.wei-88"])
        return f"{user}{rng.randint(0, 99)}@{rng.choice(['example.com', 'mail.co.uk', 'bank-x.de', 'uni.edu'])}"
    if kind == "CARD":
        prefix, length = rng.choice([("4", 16), ("51", 16), ("37", 15), ("6011", 16), ("4", 13)])
        n = _luhn_complete(prefix, length, rng)
        sep = rng.choice(["", " ", "-"])
        return sep.join(n[i : i + 4] for i in range(0, len(n), 4)) if sep else n
    if kind == "IBAN":
        country, length = rng.choice([("DE", 22), ("GB", 22), ("FR", 27), ("NL", 18), ("ES", 24)])
        if country in ("GB", "NL"):
            bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(rng.choice(string.digits) for _ in range(length - 8))
            check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
            s = f"{country}{check:02d}{bban}"
        else:
            s = _iban(country, length, rng)
        assert iban_ok(s)
        return " ".join(s[i : i + 4] for i in range(0, len(s), 4)) if rng.random() < 0.5 else s
    if kind == "SSN":
        return f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    if kind == "NINO":
        return f"{rng.choice('ABCEGHJKLMNPRSTWXYZ')}{rng.choice('ABCEGHJKLMNPRSTWXYZ')}{rng.randint(0, 999999):06d}{rng.choice('ABCD')}"
    if kind == "PHONE":
        return rng.choice([
            f"+44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
            f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
            f"({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
            f"{rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
            f"+49 30 {rng.randint(100000, 9999999)}",
            f"020 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
            f"+33 6 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
        ])
    if kind == "IP":
        if rng.random() < 0.7:
            return ".".join(str(rng.randint(0, 255)) for _ in range(4))
        return rng.choice(["2001:db8::8a2e:370:7334", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1"])
    raise KeyError(kind)


TEMPLATES = [
    "Please contact me at {v} about my refund.",
    "My details: {v}.",
    "I sent it from {v} yesterday but nothing arrived",
    "{v} is the one on file, can you check?",
    "Hi, it's about the transfer (ref {v}), thanks!",
    "Is {v} correct?",
]

NEGATIVES = [
    "Order 12345678 was charged £1,250.00 on 2024-05-17 at 10:30.",
    "I paid 49.99 EUR for the card, version 2.4.1 of the app.",
    "The card ending 1234 was declined 3 times since 12/03/2024.",
    "Transaction 4111111111111112 is not mine.",  # fails Luhn: not a card
    "My account is 12345678 with sort code 12-34-56.",
    "Tracking number 1Z999AA10123456784, weight 2.5 kg.",
    "I was charged 3 times: 15.00, 15.00 and 15.00.",
    "Reference AB12CD34 and PIN hint 0000 are on the letter.",
    "It happened between 9 and 5 on 21.10.2023.",
    "The exchange rate was 1.1734 and the fee 0.5%.",
]


def planted(seed=0, n=600):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kinds = [PII_TYPES[i % len(PII_TYPES)]] + ([rng.choice(PII_TYPES)] if rng.random() < 0.3 else [])
        values = [(k, _value(k, rng)) for k in kinds]
        text = " ".join(rng.choice(TEMPLATES).format(v=v) for _, v in values)
        items.append((text, values))
    return items


def test_luhn_and_iban_checks():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    assert not iban_ok("DE89370400440532013000" + "0")  # wrong length for DE


def test_redaction_recall_and_precision_on_a_planted_set():
    items = planted()
    planted_n = detected_planted = 0
    false_pos = 0
    wrong_type = 0
    for text, values in items:
        found = find_pii(text)
        for kind, v in values:
            planted_n += 1
            a = text.index(v)
            hit = [f for f in found if f.start <= a and f.end >= a + len(v)]
            if hit:
                detected_planted += 1
                wrong_type += hit[0].type != kind
        for f in found:
            if not any(text.index(v) <= f.start and f.end <= text.index(v) + len(v) for _, v in values):
                false_pos += 1
    neg_found = [f for s in NEGATIVES * 20 for f in find_pii(s)]
    total_found = detected_planted + false_pos + len(neg_found)
    recall = detected_planted / planted_n
    precision = (detected_planted - wrong_type) / total_found
    print(f"\nPII planted: {planted_n} values in {len(items)} texts + {len(NEGATIVES) * 20} PII-free texts; "
          f"recall {recall:.4f}, precision {precision:.4f} (false positives {false_pos + len(neg_found)}, wrong type {wrong_type})")
    assert len(items) >= 500
    assert recall >= 0.99 and precision >= 0.95


def test_redact_replaces_with_placeholders_and_counts():
    text, counts = redact("Mail john@example.com or call +44 20 7946 0958; card 4111 1111 1111 1111.")
    assert text == "Mail <EMAIL> or call <PHONE>; card <CARD>."
    assert counts == {"EMAIL": 1, "PHONE": 1, "CARD": 1}
    assert redact("I paid 49.99 EUR on 2024-05-17.")[0] == "I paid 49.99 EUR on 2024-05-17."


def _score(find, items, negatives):
    planted_n = detected = wrong = false_pos = 0
    per_type: dict = {}
    for text, values in items:
        found = find(text)
        for kind, v in values:
            planted_n += 1
            a = text.index(v)
            hit = [f for f in found if f.start <= a + len(v) // 2 < f.end]  # covers the value's middle
            ok = per_type.setdefault(kind, [0, 0])
            ok[1] += 1
            if hit:
                detected += 1
                ok[0] += hit[0].type == kind
                wrong += hit[0].type != kind
        for f in found:
            if not any(text.index(v) <= f.start + (f.end - f.start) // 2 < text.index(v) + len(v) for _, v in values):
                false_pos += 1
    false_pos += sum(len(find(s)) for s in negatives)
    return detected / planted_n, (detected - wrong) / max(1, detected + false_pos), {k: round(a / b, 3) for k, a, b in
                                                                                      ((k, *v) for k, v in per_type.items())}


def test_presidio_backend_on_the_same_planted_set(tmp_path, monkeypatch):
    """The optional Presidio backend (blank spaCy pipeline: pattern recognisers, no model download) on the same
    planted set, for comparison; and redaction through the cleaner with data.clean.pii_backend: presidio."""
    import pytest

    pytest.importorskip("presidio_analyzer")
    monkeypatch.setenv("TUNEWISE_HOME", str(tmp_path))
    from tunewise.config import CleanConfig
    from tunewise.data.clean import Cleaner
    from tunewise.data.pii import PresidioDetector
    from tunewise.data.records import Record

    det = PresidioDetector()
    items = planted(n=200)
    recall, precision, per_type = _score(det.find, items, NEGATIVES * 2)
    ours = _score(find_pii, items, NEGATIVES * 2)
    print(f"\nPresidio (blank pipeline) on {len(items)} planted texts: recall {recall:.3f}, precision {precision:.3f}, "
          f"per type {per_type}; tunewise regex: recall {ours[0]:.3f}, precision {ours[1]:.3f}")
    # Measured: recall 0.810, precision 1.000. Presidio misses 13-digit cards grouped 4-4-4-1, IBANs split in groups of
    # four for some countries, and NINOs written without spaces; the rest it finds.
    assert precision >= 0.95 and recall >= 0.75
    assert min(per_type[k] for k in ("EMAIL", "SSN", "IP", "PHONE")) >= 0.95
    cleaner = Cleaner(CleanConfig(pii_backend="presidio"))
    r = Record([{"role": "user", "content": "mail me at jo@example.com, card 4111 1111 1111 1111"},
                {"role": "assistant", "content": "done"}], "x.jsonl:line 1")
    out = cleaner.transform([r])[0]
    assert out.messages[0]["content"] == "mail me at <EMAIL>, card <CARD>"
    assert cleaner.pii_found == {"EMAIL": 1, "CARD": 1}

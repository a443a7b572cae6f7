"""Split determinism, stratification, leakage, and the prepare stage accounting for every record."""

import json
import random

import yaml

from tunewise.config import load_config
from tunewise.data.prepare import prepare_data
from tunewise.data.records import Record
from tunewise.data.split import find_leaks, split_records


def recs(n_labels=5, per=40, dup_every=10):
    out = []
    for lab in range(n_labels):
        for i in range(per):
            text = f"query {lab}-{i // 2 if i % dup_every == 0 else i}"  # a few exact duplicates
            out.append(Record([{"role": "user", "content": text}, {"role": "assistant", "content": f"L{lab}"}], f"f:line {lab * per + i}", label=f"L{lab}"))
    return out


def ids(split):
    return {k: [r.source for r in v] for k, v in split.items()}


def test_split_is_deterministic_and_order_independent():
    rs = recs()
    a = split_records(rs, 0.1, 0.2, seed=3)
    shuffled = rs[:]
    random.Random(0).shuffle(shuffled)
    b = split_records(shuffled, 0.1, 0.2, seed=3)
    assert ids(a) == ids(b)
    c = split_records(rs, 0.1, 0.2, seed=4)
    assert ids(a) != ids(c)
    assert sum(len(v) for v in a.values()) == len(rs)


def test_split_is_stratified_and_duplicates_stay_together():
    rs = recs(n_labels=4, per=50)
    s = split_records(rs, 0.2, 0.2, seed=1)
    for name, share in (("validation", 0.2), ("test", 0.2)):
        counts = {lab: sum(r.label == lab for r in s[name]) for lab in ("L0", "L1", "L2", "L3")}
        assert all(abs(c - 50 * share) <= 2 for c in counts.values()), counts
    assert find_leaks(s) == []


def test_leaks_found_across_given_splits():
    a = recs(1, 5)
    b = [Record([{"role": "user", "content": "  QUERY 0-1 "}, {"role": "assistant", "content": "x"}], "test.csv:line 2")]
    leaks = find_leaks({"train": a, "test": b})
    assert len(leaks) == 1 and leaks[0]["splits"]["test"] == ["test.csv:line 2"]


def test_prepare_accounts_for_every_record(tmp_path):
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i % 3}"}], "label": f"a{i % 3}"} for i in range(30)]
    lines = [json.dumps(g) for g in good] + ["{not json", json.dumps({"messages": []})]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    (tmp_path / "test.jsonl").write_text(json.dumps(good[0]) + "\n")  # leaks from train
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"output_dir": "out", "data": {"format": "openai", "train": "train.jsonl", "test": "test.jsonl", "split": {"validation": 0.2}}}))
    cfg = load_config(tmp_path / "t.yaml")
    p = prepare_data(cfg)
    s = p.summary
    assert s["read"] == {"valid": 31, "kept": 31, "quarantined": 2}
    assert sum(o["records"] for o in s["outputs"].values()) == 31
    assert s["outputs"]["test"]["records"] == 1 and s["outputs"]["validation"]["records"] == 6
    q = [json.loads(x) for x in (p.dir / "quarantine.jsonl").read_text().splitlines()]
    assert [(x["where"], x["reason"][:14]) for x in q] == [("line 31", "malformed JSON"), ("line 32", "messages: expe")]
    assert s["leaks"]["count"] == 1
    assert len(s["inputs"]["train"]["sha256"]) == 64


def test_sample_is_seeded_and_spreads_over_a_sorted_file():
    from tunewise.data.split import sample_records

    rs = recs(n_labels=10, per=30)  # sorted by label, like BANKING77's files
    s = sample_records(rs, 50)
    assert s == sample_records(list(reversed(rs)), 50) and len(s) == 50
    assert len({r.label for r in s}) == 10  # the first 50 would hold 2 labels
    assert sample_records(rs, None) == rs and sample_records(rs, 1000) == rs

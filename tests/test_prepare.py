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


def _messy_file(path, n=400, seed=0):
    """Records with exact and near duplicates spread far apart, PII, a bad line: cross-chunk work for prepare."""
    rng = random.Random(seed)
    base = [f"my card number {i} has not arrived after {i % 7 + 2} weeks, what should i do about order {i * 37}" for i in range(60)]
    lines = []
    for i in range(n):
        text = rng.choice(base)
        r = rng.random()
        if r < 0.3:
            text = text.replace("what", "so what", 1)  # a near duplicate of another draw
        elif r < 0.6:
            text = f"{text} (ticket {i})"
        if i % 9 == 0:
            text += f" mail me at user{i}@example.com"
        lab = f"L{hash(text.split(' has')[0]) % 5}"
        lines.append(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": lab}], "label": lab}))
    lines.insert(123, "{broken")
    path.write_text("\n".join(lines) + "\n")


def test_streaming_in_small_chunks_gives_the_same_result(tmp_path):
    """prepare streams chunk_size records at a time; dedup, near-dedup, leaks, scores and --select work across
    chunks, so 7 records at a time gives byte-identical splits, the same quarantine and the same summary as
    everything in one chunk. Nothing is left in the work directory."""
    _messy_file(tmp_path / "train.jsonl")
    (tmp_path / "test.jsonl").write_text("".join(line + "\n" for line in (tmp_path / "train.jsonl").read_text().splitlines()[300:320] if "broken" not in line))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"output_dir": "out", "data": {
        "format": "openai", "train": "train.jsonl", "test": "test.jsonl", "split": {"validation": 0.1},
        "clean": {"near_dup_threshold": 0.8, "drop_leaks": True, "select": 60}}}))
    cfg = load_config(tmp_path / "t.yaml")
    outs = {}
    for chunk in (7, 100_000):
        p = prepare_data(cfg, tmp_path / f"c{chunk}", chunk_size=chunk)
        files = {f: (p.dir / f).read_bytes() for f in ("train.jsonl", "validation.jsonl", "test.jsonl")}
        quarantine = sorted((p.dir / "quarantine.jsonl").read_text().splitlines())
        summary = {k: v for k, v in p.summary.items() if k not in ("report",)}
        outs[chunk] = (files, quarantine, summary)
        assert sorted(x.name for x in p.dir.iterdir()) == ["quarantine.jsonl", "report.html", "summary.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    small, big = outs[7], outs[100_000]
    assert small[0] == big[0] and small[1] == big[1]
    assert {k: v for k, v in small[2].items() if k != "quarantine_examples"} == {k: v for k, v in big[2].items() if k != "quarantine_examples"}
    s = big[2]
    steps = {k: v["dropped"] for k, v in s["cleaning"]["steps"].items()}
    assert steps["dedup"] > 10 and steps["near_dedup"] > 10 and s["leaks"]["dropped"] > 0  # the file exercises every step
    assert s["outputs"]["train"]["records"] == 60 and s["quality"]["selected"]["kept"] == 60
    assert s["read"]["valid"] == 420 and s["read"]["quarantined"] + sum(o["records"] for o in s["outputs"].values()) == 421  # + the broken line


def test_label_agreement_spilled_to_disk_equals_in_memory(tmp_path):
    import numpy as np

    from tunewise.data.clean import _label_agreement
    from tunewise.data.minhash import NearDupIndex, batch_shingle_hashes

    rng = random.Random(1)
    texts = [f"where is my card number {rng.randrange(30)} please {rng.choice(['help', 'now', 'today'])}" for _ in range(300)]
    flat, off = batch_shingle_hashes(texts)
    sigs = NearDupIndex(0.6, 128).signatures(flat, off)
    labels = np.array([rng.randrange(3) for _ in texts])
    rows = np.arange(len(texts))[::-1].copy()  # rows need not be in order
    mem = _label_agreement(labels[rows], sigs, rows, 0.6)
    disk = _label_agreement(labels[rows], sigs, rows, 0.6, work_dir=tmp_path, pairs_per_part=50)  # many partitions
    assert np.array_equal(mem, disk) and (mem < 1).any() and not list(tmp_path.iterdir())


def _resume_project(tmp_path, **clean):
    _messy_file(tmp_path / "train.jsonl")
    (tmp_path / "test.jsonl").write_text("".join(line + "\n" for line in (tmp_path / "train.jsonl").read_text().splitlines()[300:320] if "broken" not in line))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"output_dir": "out", "data": {
        "format": "openai", "train": "train.jsonl", "test": "test.jsonl", "split": {"validation": 0.1},
        "clean": {"near_dup_threshold": 0.8, "drop_leaks": True, "select": 60, **clean}}}))
    return load_config(tmp_path / "t.yaml")


def _outputs(d):
    summary = json.loads((d / "summary.json").read_text())
    summary.pop("report")
    return {f: (d / f).read_bytes() for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "quarantine.jsonl")}, summary


def test_interrupted_prepare_resumes_to_the_same_outputs(tmp_path, monkeypatch):
    """Ctrl-C between chunks, a kill in the middle of a chunk (its records already filtered into quarantine, hashed,
    half spooled, all of it flushed to disk past the checkpoint) and an interrupt after reading: each time
    resume=True reads only what the checkpoint does not hold and gives byte-identical splits, quarantine and
    summary to an uninterrupted run; the work directory is gone afterwards."""
    from tunewise.data import dedup
    from tunewise.data.clean import Cleaner
    from tunewise.data.prepare import checkpointed_records

    cfg = _resume_project(tmp_path)
    ref = _outputs(prepare_data(cfg, tmp_path / "ref", chunk_size=7).dir)
    assert ref[1]["read"]["valid"] == 420 and ref[1]["cleaning"]["steps"]["near_dedup"]["dropped"] > 10

    transformed = []
    real_transform, real_add = Cleaner.transform, dedup.Spool.add
    monkeypatch.setattr(Cleaner, "transform", lambda self, rs: (transformed.append(len(rs)), real_transform(self, rs))[1])

    def stop_in_chunk(n):
        calls = []

        def add(self, records):
            calls.append(1)
            if len(calls) == n:
                real_add(self, records[: len(records) // 2])
                raise KeyboardInterrupt
            real_add(self, records)
        return add

    def stop_at(stage, after=0):
        def progress(s, n):
            if s == stage and n >= after:
                raise KeyboardInterrupt
        return progress

    cases = {"between chunks": (None, stop_at("reading and cleaning", 140)), "inside a chunk": (stop_in_chunk(31), None),
             "after reading": (None, stop_at("scoring"))}
    for name, (add, progress) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        if add:
            monkeypatch.setattr(dedup.Spool, "add", add)
        try:
            prepare_data(cfg, out, chunk_size=7, progress=progress)
            raise AssertionError("not interrupted")
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(dedup.Spool, "add", real_add)
        held = checkpointed_records(out)
        assert held and (out / ".work").is_dir() and not (out / "train.jsonl").exists(), name
        transformed.clear()
        stages = []
        prepare_data(cfg, out, chunk_size=7, resume=True, progress=lambda s, n: stages.append((s, n)))
        assert stages[0] == ("resuming", held), name
        assert sum(transformed) == 420 - held, (name, held, sum(transformed))  # only what the checkpoint lacked was read again
        assert _outputs(out) == ref, name
        assert not (out / ".work").exists()

    # A checkpoint of other inputs or another config is not used: it starts over.
    out = tmp_path / "changed"
    try:
        prepare_data(cfg, out, chunk_size=7, progress=stop_at("reading and cleaning", 140))
    except KeyboardInterrupt:
        pass
    cfg2 = _resume_project(tmp_path, near_dup_threshold=0.9)
    stages = []
    prepare_data(cfg2, out, chunk_size=7, resume=True, progress=lambda s, n: stages.append(s))
    assert "resuming" not in stages and _outputs(out) == _outputs(prepare_data(cfg2, tmp_path / "ref2", chunk_size=7).dir)


def test_a_damaged_checkpoint_is_not_used(tmp_path):
    """A checkpoint whose files are missing or shorter than it recorded is not resumed from: prepare starts over
    (the CLI says so) and still gives the uninterrupted run's outputs."""
    cfg = _resume_project(tmp_path)
    ref = _outputs(prepare_data(cfg, tmp_path / "ref", chunk_size=7).dir)

    def stop(stage, n):
        if stage == "reading and cleaning" and n >= 140:
            raise KeyboardInterrupt

    for damage in ("chunk", "spool"):
        out = tmp_path / damage
        try:
            prepare_data(cfg, out, chunk_size=7, progress=stop)
        except KeyboardInterrupt:
            pass
        work = out / ".work"
        if damage == "chunk":
            next(work.glob("chunk-*.npz")).unlink()
        else:
            with open(work / "records.jsonl", "r+b") as f:
                f.truncate(10)
        stages = []
        prepare_data(cfg, out, chunk_size=7, resume=True, progress=lambda s, n: stages.append(s))
        assert "resuming" not in stages and _outputs(out) == ref, damage


def _small_project(tmp_path):
    """40 chat records and a config that reads them; the config's path."""
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i % 3}"}]} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(g) for g in good))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"output_dir": "out", "data": {"format": "openai", "train": "train.jsonl"}}))
    return tmp_path / "t.yaml"


def test_processes_asking_for_the_same_data_at_once_prepare_it_once(tmp_path, monkeypatch):
    """`tunewise tune --workers 2` on a fresh project: both workers ask for the prepared data at once. One prepares
    (under the lock), the other waits and reads it; without the lock both wrote the same work files (an mmap of a
    half-written signature file failed)."""
    import threading
    import time

    import tunewise.data.prepare as prep
    from tunewise.data.prepare import ensure_prepared

    cfg = load_config(_small_project(tmp_path))
    real, running, calls = prep.prepare_data, [], []

    def slow(*a, **k):  # holds the preparation open long enough for the other thread to arrive
        running.append(1)
        calls.append(len(running))
        time.sleep(0.5)
        try:
            return real(*a, **k)
        finally:
            running.pop()

    monkeypatch.setattr(prep, "prepare_data", slow)
    start = threading.Barrier(2)
    got = []

    def ask():
        start.wait()
        got.append(ensure_prepared(cfg).summary["outputs"]["train"]["sha256"])

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and len(got) == 2 and got[0] == got[1]


def test_data_prepare_from_the_cli_waits_for_a_preparation_under_way(tmp_path, monkeypatch):
    """`tunewise data prepare` takes the lock `ensure_prepared` takes: run by hand while training prepares the same
    project, it waits instead of writing the same folder at once."""
    import threading

    from typer.testing import CliRunner

    import tunewise.data.prepare as prep
    import tunewise.models as models
    from tunewise.cli import app
    from tunewise.data.prepared import prepare_lock

    data_dir = load_config(_small_project(tmp_path)).run_dir / "data"
    ready, held, entered = threading.Event(), [True], []
    real_tok, real_prep = models.load_tokenizer, prep.prepare_data

    def tok(*a, **k):  # the CLI loads the tokenizer just before it asks for the lock
        out = real_tok(*a, **k)
        ready.set()
        return out

    def prepare(*a, **k):
        entered.append(held[0])
        return real_prep(*a, **k)

    monkeypatch.setattr(models, "load_tokenizer", tok)
    monkeypatch.setattr(prep, "prepare_data", prepare)
    result = []
    cli = threading.Thread(target=lambda: result.append(CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "t.yaml")])))
    with prepare_lock(data_dir):
        cli.start()
        assert ready.wait(60)
        cli.join(1.0)  # time enough to start preparing if nothing stopped it
        held[0] = False
    cli.join(60)
    assert result and result[0].exit_code == 0, result[0].output if result else "no result"
    assert entered == [False] and (data_dir / "summary.json").exists()

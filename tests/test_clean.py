"""The cleaning pipeline in `tunewise data prepare`: a file with planted problems, every record accounted for."""

import json

import yaml

from tunewise.data.clean import copies_prompt, normalize_text, repetition
from tunewise.data.records import Record


def rec(user, answer, label=None, src="x.jsonl:1"):
    return Record(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}], source=src, label=label)


def test_normalize_repetition_and_copy_signals():
    assert normalize_text("  Cafe\u0301\u200b  au\t\tlait \r\n\n\n\nnext  ") == "Caf\u00e9 au lait\n\nnext"
    assert repetition("the card the card the card the card the card") > 0.5
    assert repetition("My card has not arrived after two weeks, what should I do?") == 0.0
    assert copies_prompt(rec("Where is my new card that I ordered?", "Where is my new card that I ordered?"))
    assert not copies_prompt(rec("Where is my new card that I ordered?", "card_arrival"))


PLANTED = [
    # 0-4: fine, distinct
    ("Where is my new card? I ordered it two weeks ago.", "card_arrival"),
    ("How do I top up with a bank transfer?", "top_up_by_bank_transfer_charge"),
    ("Why was my card payment declined at the shop?", "declined_card_payment"),
    ("Can I change my PIN at any cash machine?", "change_pin"),
    ("What exchange rate do you use for euros?", "exchange_rate"),
    # 5: exact duplicate of 0
    ("Where is my new card? I ordered it two weeks ago.", "card_arrival"),
    # 6: near-duplicate of 1 (one word different), 7: near-duplicate of 2 with another label
    ("How do I top up with a bank transfer ?", "top_up_by_bank_transfer_charge"),
    ("Why was my card payment declined at the shops?", "card_payment_not_recognised"),
    # 8-10: PII of several types
    ("My email is jane.doe@example.com, please update it.", "edit_personal_details"),
    ("Card 4111 1111 1111 1111 was charged twice, call me on +44 20 7946 0958.", "transaction_charged_twice"),
    ("Send it to IBAN GB82 WEST 1234 5698 7654 32 from 192.168.0.12.", "transfer_into_account"),
    # 11: answer copies the prompt, 12: repetitive answer, 13: empty answer (quarantined by validation)
    ("Please tell me how the exchange rate is calculated today", "Please tell me how the exchange rate is calculated today"),
    ("Why is my balance wrong?", "balance balance balance balance balance balance balance balance"),
    ("Is there a fee?", ""),
    # 14: weird whitespace and a zero-width space: kept, normalised
    ("  Is  there\u200b a   monthly fee?  ", "card_payment_fee_charged"),
]


def test_prepare_cleans_a_planted_file_and_accounts_for_every_record(tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    lines = [json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "label": a or None}) for u, a in PLANTED]
    lines.insert(3, "{not json")  # a broken line
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"project": "p", "output_dir": "runs", "data": {"format": "openai", "train": "train.jsonl",
                                                          "split": {"validation": 0.0, "test": 0.0},
                                                          "clean": {"near_dup_threshold": 0.8}}}
    (tmp_path / "tunewise.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "tunewise.yaml")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "p" / "data"
    kept = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(kept) + len(quarantined) == len(PLANTED) + 1  # every input line accounted for
    reasons = " | ".join(q["reason"] for q in quarantined)
    assert "exact duplicate of train.jsonl:line 1" in reasons
    assert reasons.count("near-duplicate of") == 2 and "label 'card_payment_not_recognised' vs 'declined_card_payment'" in reasons
    assert "copies the prompt" in reasons and "repetitive answer" in reasons and "malformed JSON" in reasons
    texts = [r["messages"][0]["content"] for r in kept]
    assert "My email is <EMAIL>, please update it." in texts
    assert "Card <CARD> was charged twice, call me on <PHONE>." in texts
    assert "Send it to IBAN <IBAN> from <IP>." in texts
    assert "Is there a monthly fee?" in texts
    c = summary["cleaning"]
    assert c["pii_found"] == {"EMAIL": 1, "CARD": 1, "PHONE": 1, "IBAN": 1, "IP": 1}
    assert c["steps"]["dedup"]["dropped"] == 1 and c["steps"]["near_dedup"]["dropped"] == 2
    assert c["steps"]["normalize"]["changed"] >= 1 and c["steps"]["pii"]["changed"] == 3
    assert any(cl["label_conflict"] for cl in c["near_duplicate_clusters"])
    assert "cleaning" in res.output.lower()
    page = (out / "report.html").read_text()
    for section in ("Counts at every step", "PII redacted, by type", "Token lengths", "Labels", "Near-duplicate clusters", "Quarantine",
                    "exact duplicate of train.jsonl:line 1", "quality score"):
        assert section in page, section
    assert str(out / "report.html") == summary["report"] and "data report:" in res.output


def test_leaks_exact_and_near_are_reported_and_dropped_on_request(tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    train = [("Where is my new card? I ordered it two weeks ago.", "card_arrival"), ("How do I top up with a bank transfer?", "top_up"),
             ("Why was my card payment declined at the shop?", "declined"), ("Can I change my PIN at any cash machine?", "change_pin")]
    test = [("Where is my new card? I ordered it two weeks ago.", "card_arrival"),   # exact leak
            ("Why was my card payment declined at the shops?", "declined")]         # near leak
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})
                                                          for u, a in rows) + "\n")
    cfg = {"project": "p", "output_dir": "runs", "data": {"format": "openai", "train": "train.jsonl", "test": "test.jsonl",
                                                          "split": {"validation": 0.0}, "clean": {"near_dup_threshold": 0.8}}}
    (tmp_path / "tunewise.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", str(tmp_path / "tunewise.yaml")])
    s = json.loads((tmp_path / "runs" / "p" / "data" / "summary.json").read_text())
    assert res.exit_code == 0 and s["leaks"]["count"] == 1 and s["leaks"]["near_duplicates"] == 1
    assert s["outputs"]["train"]["records"] == 4
    res = runner.invoke(app, ["data", "prepare", str(tmp_path / "tunewise.yaml"), "--drop-leaks"])
    s = json.loads((tmp_path / "runs" / "p" / "data" / "summary.json").read_text())
    assert res.exit_code == 0 and s["leaks"]["dropped"] == 2 and s["outputs"]["train"]["records"] == 2
    assert s["outputs"]["test"]["records"] == 2  # evaluation files are never thinned
    q = [json.loads(x)["reason"] for x in (tmp_path / "runs" / "p" / "data" / "quarantine.jsonl").read_text().splitlines()]
    assert any("near-duplicate (Jaccard" in r and "test.jsonl:line 2" in r for r in q) and any("same prompt" in r for r in q)


def test_quality_score_and_select(tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app
    from tunewise.data.clean import quality_scores

    base = [("I still have not received my new card", "card_arrival"), ("I still have not received my new card, help", "card_arrival"),
            ("I still have not received my new card yet", "card_arrival"), ("How do I reset my PIN number?", "change_pin"),
            ("Can you tell me the exchange rate for dollars?", "exchange_rate")]
    rows = base + [("I still have not received my new card!", "exchange_rate"),  # its look-alikes disagree
                   ("What is a top up?", "top up top up top up top up top up top up top up top up")]  # repetitive
    recs = [rec(u, a, label=a if " " not in a else "top_up", src=f"t.jsonl:line {i + 1}") for i, (u, a) in enumerate(rows)]
    scores = quality_scores(recs)
    worst = sorted(range(len(recs)), key=lambda i: scores[i]["score"])[:2]
    assert set(worst) == {5, 6}, scores
    assert scores[5]["label"] < 0.5 and scores[6]["repetition"] < 0.5 and scores[0]["label"] > 0.5
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
                                                                "label": r.label}) for (u, a), r in zip(rows, recs)) + "\n")
    cfg = {"project": "p", "output_dir": "runs", "data": {"format": "openai", "train": "train.jsonl", "split": {"validation": 0.0, "test": 0.0},
                                                          "clean": {"near_dedup": False, "max_repetition": 1.0, "drop_copies": False,
                                                                    "select_by_label": False}}}
    (tmp_path / "tunewise.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "tunewise.yaml"), "--select", "5"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "p" / "data"
    kept = [json.loads(x)["messages"][0]["content"] for x in (out / "train.jsonl").read_text().splitlines()]
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(kept) == 5 and {x["where"] for x in q} == {"line 6", "line 7"} and all("not selected" in x["reason"] for x in q)
    assert "--select kept 5" in res.output


def test_select_by_label_keeps_each_labels_share():
    """A global top N can lose whole labels (bench/selection.py: 61 of 77); by label, each keeps one and its share
    of the rest (largest remainder), its own best records."""
    import numpy as np

    from tunewise.data.clean import select_best

    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    scores = np.array([1.0, 0.9, 0.95, 0.2, 0.99, 0.98, 0.5, 0.6, 0.4, 0.1])
    top = select_best(scores, 5)
    assert np.flatnonzero(top).tolist() == [0, 1, 2, 4, 5] and set(labels[top]) == {0}  # the global top 5 is all label 0
    fair = select_best(scores, 5, labels)
    # one each, then the other 2 in proportion to 5 / 2 / 0 records beyond that: 1.43 / 0.57 / 0 -> 1 + 1 + 0
    assert fair.sum() == 5 and [int((labels[fair] == k).sum()) for k in (0, 1, 2)] == [2, 2, 1]
    assert np.flatnonzero(fair).tolist() == [0, 4, 6, 7, 9]  # the best of each label
    few = select_best(scores, 2, labels)  # fewer places than labels: by share (6 / 3 / 1 of 10 -> 1.2 / 0.6 / 0.2)
    assert np.flatnonzero(few).tolist() == [0, 7]
    ties = select_best(np.ones(4), 2, np.array([1, 0, 1, 0]))
    assert np.flatnonzero(ties).tolist() == [0, 1]  # ties: earlier first within a label


def test_perplexity_signal_marks_garbled_answers_with_the_real_model(tmp_path, monkeypatch):
    """data.clean.perplexity: the bundled SmolLM2 scores each answer; the garbled one gets the lowest signal."""
    from tunewise.config import load_config
    from tunewise.data.prepare import prepare_data

    fluent = [("What is the capital of France?", "The capital of France is Paris."),
              ("How many days are in a week?", "There are seven days in a week."),
              ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
              ("What do bees make?", "Bees make honey from the nectar of flowers."),
              ("Which planet do we live on?", "We live on the planet Earth."),
              ("What is water made of?", "Water is made of hydrogen and oxygen.")]
    garbled = ("What is the capital of Italy?", "Qx zvrp tlok wuuq brrn gfx plim snorq vatt.")
    rows = fluent + [garbled]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}) + "\n"
                                                  for u, a in rows))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"output_dir": "out", "data": {"format": "openai", "train": "train.jsonl",
                                                     "split": {"validation": 0.0, "test": 0.0}, "clean": {"perplexity": True}}}))
    p = prepare_data(load_config(tmp_path / "t.yaml"))
    lowest = p.summary["quality"]["lowest"]
    by_ppl = sorted(lowest, key=lambda x: x["perplexity"])
    print("\nperplexity signal:", [(x["source"].split(":")[-1], x["perplexity"], x["score"]) for x in by_ppl])
    assert by_ppl[0]["source"] == "train.jsonl:line 7" and by_ppl[0]["perplexity"] < 0.5, lowest
    assert all(x["perplexity"] > 0.5 for x in by_ppl[1:]), lowest
    assert lowest[0]["source"] == "train.jsonl:line 7"  # and it is the lowest overall score

    # The scores are cached by record: preparing again does not load the model and gives the same scores;
    # a new record is the only one scored.
    import tunewise.models

    real_load = tunewise.models.load_model

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every record is in the cache")

    monkeypatch.setattr(tunewise.models, "load_model", no_model)
    again = prepare_data(load_config(tmp_path / "t.yaml"))
    assert again.summary["quality"]["lowest"] == lowest

    from tunewise.data.perplexity import NLLCache, cache_path

    cfg = load_config(tmp_path / "t.yaml")
    path = cache_path(p.dir / ".perplexity-cache", cfg.model.name, cfg.data.max_length, cfg.model.dtype)
    assert len(NLLCache(path).known) == 7
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "What is ice?"}, {"role": "assistant", "content": "Ice is frozen water."}]}) + "\n")
    loads = []
    monkeypatch.setattr(tunewise.models, "load_model", lambda *a, **k: (loads.append(1), real_load(*a, **k))[1])
    third = prepare_data(load_config(tmp_path / "t.yaml"))
    assert loads == [1] and len(NLLCache(path).known) == 8 and third.summary["outputs"]["train"]["records"] == 8

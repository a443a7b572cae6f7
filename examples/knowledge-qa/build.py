"""Build this example from SQuAD v1.1 dev (CC BY-SA 4.0): the passages become the knowledge base, the
questions become train/test chat JSONL, split by article so that test articles are unseen in training.

    python examples/knowledge-qa/build.py ../shared/data/squad_dev/squad_v1.1_dev_from_explorer.json

Writes kb/passages.jsonl (one row per passage: id, title, text), kb/train-articles.jsonl (the passages of the
training articles only: the corpus of continued pre-training, pretrain.yaml), data/train.jsonl and data/test.jsonl
(OpenAI chat format plus `answers` (every gold answer), `gold_sources` (the passage id) and `article`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_ARTICLES = 10  # of 48


def main(src: str) -> None:
    squad = json.loads(Path(src).read_text(encoding="utf-8"))
    articles = [a["title"] for a in squad["data"]]
    test = set(random.Random(2016).sample(articles, TEST_ARTICLES))
    passages, rows = [], {"train": [], "test": []}
    for art in squad["data"]:
        for j, para in enumerate(art["paragraphs"]):
            pid = f"{art['title']}-{j}"
            passages.append({"id": pid, "title": art["title"].replace("_", " "), "text": para["context"]})
            for qa in para["qas"]:
                answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"]))
                rows["test" if art["title"] in test else "train"].append({
                    "messages": [{"role": "user", "content": qa["question"].strip()}, {"role": "assistant", "content": answers[0]}],
                    "answers": answers, "gold_sources": [pid], "article": art["title"], "id": qa["id"]})
    (HERE / "kb").mkdir(exist_ok=True)
    (HERE / "data").mkdir(exist_ok=True)
    write(HERE / "kb" / "passages.jsonl", passages)
    write(HERE / "kb" / "train-articles.jsonl", [p for p in passages if p["id"].rsplit("-", 1)[0] not in test])
    for split, items in rows.items():
        write(HERE / "data" / f"{split}.jsonl", items)
    print(f"{len(passages)} passages; train {len(rows['train'])} questions ({len(articles) - len(test)} articles), "
          f"test {len(rows['test'])} questions ({len(test)} articles: {', '.join(sorted(test))})")


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""Build data/train.jsonl, the tool-calling example's training file, from the two public sets it combines.

    python examples/tool-calling/build_train.py GLAIVE_EN_DEMO.json RLLA_SFT.json API_BANK_LV3.json

GLAIVE_EN_DEMO.json: LLaMA-Factory's data/glaive_toolcall_en_demo.json (ShareGPT with function_call and observation turns);
RLLA_SFT.json: ToolRL's dataset/rlla_4k_raw/rlla_sft.json (converted as `tunewise data convert --from toolrl` does);
API_BANK_LV3.json: API-Bank's training-data/lv3-train.json, whose questions only are used (below).
Both become OpenAI chat JSONL with tools and tool_calls. The glaive conversation that nearly duplicates BFCL's
simple_python_149 ("What's the current stock price of Apple?") is left out. Provenance and licences: data/SOURCE.txt.

Then IRRELEVANT conversations where no tool fits are added (the irrelevance augmentation Hammer trains with): an
API-Bank question (a request for a tool, none of them in the training set otherwise), given the tools of a glaive or
ToolRL conversation that share no word of five letters or more with it, answered in text without a call.
"""

import json
import random
import re
import sys
from pathlib import Path

from tunewise.data.convert import ConvertError, from_api_bank, from_toolrl
from tunewise.data.tools import ToolError, normalize_sharegpt

LEFT_OUT = "What's the current stock price of Apple?"
IRRELEVANT = 150
# API-Bank questions that paraphrase BFCL questions (irrelevance_215: "How long will it take to travel from San Francisco
# to Los Angeles by car?", simple_python_37): drawn among the 150, then left out, so the other 149 stay as drawn.
LEFT_OUT_QUESTIONS = {"Calculate the travel time from San Francisco to Los Angeles by car."}
WORD = re.compile(r"[a-z]{5,}")
TIME = re.compile(r"\s*TIME:.*$", re.S)


def glaive(path: Path) -> list[dict]:
    out = []
    for i, rec in enumerate(json.loads(path.read_text())):
        if any(t.get("value", "").strip() == LEFT_OUT for t in rec["conversations"]):
            continue
        turns = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} if t["from"] in ("human", "gpt")
                 else t for t in rec["conversations"]]
        try:
            msgs, tools = normalize_sharegpt(turns, rec.get("tools"))
        except ToolError as e:  # a call its own schema refuses: left out, and said
            print(f"glaive record {i}: left out: {e}")
            continue
        for m in msgs:
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
            m.pop("name", None)
        out.append({"tools": tools, "messages": msgs})
    return out


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower().replace("_", " ")))


def irrelevant(questions: list[str], rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n conversations whose question no given tool fits, answered without a call (seeded)."""
    rng, out = random.Random(seed), []
    for question in rng.sample(questions, len(questions)):
        for other in rng.sample(rows, 20):
            tools = other["tools"]
            told = " ".join(f"{t['function']['name']} {t['function'].get('description', '')}" for t in tools)
            if tools and not _words(question) & _words(told):
                listed = ", ".join(t["function"]["name"] for t in tools)
                answer = f"None of the functions I have can do that: I can only use {listed}."
                out.append({"tools": tools, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
                break
        if len(out) == n:
            break
    return out


def api_bank_questions(path: Path) -> list[str]:
    """API-Bank's distinct questions, without the TIME stamp it appends."""
    seen = {}
    for rec in json.loads(path.read_text()):
        try:
            msgs = from_api_bank(rec)["messages"]
        except ConvertError:  # the 10 records `data convert` also refuses
            continue
        q = TIME.sub("", next(m["content"] for m in msgs if m["role"] == "user")).strip()
        if len(q) > 15:
            seen.setdefault(q.lower(), q)
    return list(seen.values())


if __name__ == "__main__":
    rows = glaive(Path(sys.argv[1])) + [from_toolrl(r) for r in json.loads(Path(sys.argv[2]).read_text())]
    rows += [r for r in irrelevant(api_bank_questions(Path(sys.argv[3])), rows, IRRELEVANT)
             if r["messages"][0]["content"] not in LEFT_OUT_QUESTIONS]
    dst = Path(__file__).parent / "data" / "train.jsonl"
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} conversations -> {dst}")

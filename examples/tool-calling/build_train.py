"""Build data/train.jsonl, the tool-calling example's training file, from the two public sets it combines.

    python examples/tool-calling/build_train.py GLAIVE_EN_DEMO.json RLLA_SFT.json

GLAIVE_EN_DEMO.json: LLaMA-Factory's data/glaive_toolcall_en_demo.json (ShareGPT with function_call and observation turns);
RLLA_SFT.json: ToolRL's dataset/rlla_4k_raw/rlla_sft.json (converted as `tunewise data convert --from toolrl` does).
Both become OpenAI chat JSONL with tools and tool_calls. The glaive conversation that nearly duplicates BFCL's
simple_python_149 ("What's the current stock price of Apple?") is left out. Provenance and licences: data/SOURCE.txt.

Then MASKED conversations where no tool fits are added, as Hammer augments its data (function masking): the first
question of a conversation that calls tools, asked again with the tools it called taken out of its list and the
others left (near misses, as BFCL's irrelevance questions have), answered in text without a call.
"""

import json
import random
import sys
from pathlib import Path

from tunewise.data.convert import from_toolrl
from tunewise.data.tools import ToolError, normalize_sharegpt

LEFT_OUT = "What's the current stock price of Apple?"
MASKED = 150


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


def masked(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n conversations whose first question is asked again without the tools its answer called (the other tools of its
    list stay, as near misses), answered without a call: Hammer's function masking (seeded)."""
    asks = []
    for r in rows:
        msgs = r["messages"]
        i = next(k for k, m in enumerate(msgs) if m["role"] == "user")
        if i + 1 < len(msgs) and msgs[i + 1].get("tool_calls"):
            called = {c["function"]["name"] for c in msgs[i + 1]["tool_calls"]}
            rest = [t for t in r["tools"] if t["function"]["name"] not in called]
            if rest:
                asks.append((msgs[i]["content"], rest))
    out = []
    for question, tools in random.Random(seed).sample(asks, min(n, len(asks))):
        answer = f"None of the functions I have can do that: I can only use {', '.join(t['function']['name'] for t in tools)}."
        out.append({"tools": tools, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


if __name__ == "__main__":
    rows = glaive(Path(sys.argv[1])) + [from_toolrl(r) for r in json.loads(Path(sys.argv[2]).read_text())]
    rows += masked(rows, MASKED)
    dst = Path(__file__).parent / "data" / "train.jsonl"
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} conversations -> {dst}")

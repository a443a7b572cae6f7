"""Build data/train.jsonl, the tool-calling example's training file, from the two public sets it combines.

    python examples/tool-calling/build_train.py GLAIVE_EN_DEMO.json RLLA_SFT.json

GLAIVE_EN_DEMO.json: LLaMA-Factory's data/glaive_toolcall_en_demo.json (ShareGPT with function_call and observation turns);
RLLA_SFT.json: ToolRL's dataset/rlla_4k_raw/rlla_sft.json (converted as `tunewise data convert --from toolrl` does).
Both become OpenAI chat JSONL with tools and tool_calls. The glaive conversation that nearly duplicates BFCL's
simple_python_149 ("What's the current stock price of Apple?") is left out. Provenance and licences: data/SOURCE.txt.
"""

import json
import sys
from pathlib import Path

from tunewise.data.convert import from_toolrl
from tunewise.data.tools import ToolError, normalize_sharegpt

LEFT_OUT = "What's the current stock price of Apple?"


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


if __name__ == "__main__":
    rows = glaive(Path(sys.argv[1])) + [from_toolrl(r) for r in json.loads(Path(sys.argv[2]).read_text())]
    dst = Path(__file__).parent / "data" / "train.jsonl"
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} conversations -> {dst}")

"""Assistant-only masks, reasoning and the end-of-turn check on the chat templates model families really ship
(tests/fixtures/templates, with their sources and licences in SOURCE.md).

Each template is put on the bundled SmolLM2 tokenizer with its family's special tokens added, so the mask is derived
from the real template text; what is trained is checked by decoding the masked tokens, against expectations written
out by hand from each template (three assistant turns, with and without a system turn)."""

import copy
import json
from pathlib import Path

import pytest

from tunewise.data.reasoning import apply as apply_reasoning
from tunewise.data.reasoning import strip_reasoning
from tunewise.data.tokenize import TemplateError, check_end_of_turn, tokenize_sequences

from .test_tokenize import trained_spans as trained

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

# family -> (fixture, special tokens to add, bos, eos, the end-of-turn marker each answer is trained with)
FAMILIES = {
    "qwen2.5": ("qwen2.5.jinja", ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "qwen3": ("qwen3.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", "<|im_end|>"),
    "llama-3.2": ("llama-3.2.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                  "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma-2": ("gemma-2.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "gemma-3": ("gemma-3.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "phi-3.5": ("phi-3.5.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>", "<|end|>"),
    "mistral-nemo": ("mistral-nemo.jinja", ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
}
SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Rates?"}, {"role": "assistant", "content": "Two percent."},
         {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
ANSWERS = ["Hello.", "Two percent.", "You are welcome."]


def family_tokenizer(smol_tokenizer, family):
    fixture, specials, bos, eos, _ = FAMILIES[family]
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = (TEMPLATES / fixture).read_text()
    if bos:
        tok.bos_token = bos
    tok.eos_token = eos
    return tok


def masks(tok, conv) -> list[list[str]]:
    """Per training sequence of the conversation, the trained spans."""
    return [trained(tok, ids, labels) for ids, labels in tokenize_sequences(tok, [conv])[0]]


@pytest.mark.parametrize("family", ["qwen2.5", "llama-3.2", "gemma-3", "phi-3.5"])
@pytest.mark.parametrize("system", [True, False])
def test_each_answer_and_its_end_of_turn_is_trained_once_in_one_sequence(smol_tokenizer, family, system):
    """Templates that render every turn as it was written: one sequence, the three answers with their marker."""
    tok = family_tokenizer(smol_tokenizer, family)
    marker = FAMILIES[family][4]
    assert masks(tok, [SYSTEM] * system + TURNS) == [[a + marker for a in ANSWERS]]


def test_mistral_puts_the_system_turn_in_the_last_user_turn_so_each_answer_trains_in_its_own_render(smol_tokenizer):
    """Mistral's template writes the system prompt into the last user turn only: the context of the first two answers
    changes once later turns follow, so each is trained in the render that ends with it (as the model sees it)."""
    tok = family_tokenizer(smol_tokenizer, "mistral-nemo")
    assert masks(tok, TURNS) == [[a + "</s>" for a in ANSWERS]]  # no system turn: one sequence
    seqs = tokenize_sequences(tok, [[SYSTEM] + TURNS])[0]
    assert [trained(tok, *s) for s in seqs] == [["Hello.</s>"], ["Two percent.</s>"], ["You are welcome.</s>"]]
    first = tok.decode(seqs[0][0])
    assert first == "<s>[INST]Be brief.\n\nHi[/INST]Hello.</s>"  # hand-checked: the system turn where the template puts it


def test_gemma_2_refuses_a_system_turn_with_the_template_s_reason(smol_tokenizer):
    tok = family_tokenizer(smol_tokenizer, "gemma-2")
    assert masks(tok, TURNS) == [[a + "<end_of_turn>" for a in ANSWERS]]
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_sequences(tok, [[SYSTEM] + TURNS], ["train.jsonl:line 3"])


def test_qwen3_rewrites_earlier_answers_and_each_is_trained_as_it_was_written(smol_tokenizer):
    """Qwen3 renders the last answer after the last user turn with a think block and earlier answers without: a
    multi-turn conversation prepares (never a TemplateError), each answer in the render that ends with it."""
    tok = family_tokenizer(smol_tokenizer, "qwen3")
    seqs = tokenize_sequences(tok, [[SYSTEM] + TURNS])[0]
    assert [trained(tok, *s) for s in seqs] == [["Hello.<|im_end|>"], ["Two percent.<|im_end|>"], ["You are welcome.<|im_end|>"]]
    # hand-checked: the first answer's sequence, with the empty think block the template writes before a last answer
    assert tok.decode(seqs[0][0]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                      "<|im_start|>assistant\n<think>\n\n</think>\n\nHello.<|im_end|>")  # up to the marker
    assert "<think>" not in tok.decode(seqs[2][0]).split("Rates?")[1].split("Thanks")[0]  # the history as Qwen3 shows it


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_qwen3_reasoning_keep_trains_the_thinking_and_drop_removes_it(smol_tokenizer, mode):
    tok = family_tokenizer(smol_tokenizer, "qwen3")
    conv = [SYSTEM] + [dict(m) for m in TURNS]
    conv[2]["reasoning_content"] = "They greet me."  # OpenAI-style field
    conv[4]["content"] = "<think>\nA rate question.\n</think>\n\nTwo percent."  # inline
    conv = apply_reasoning(conv, mode)
    got = masks(tok, conv)
    if mode == "keep":
        assert got == [["<think>\nThey greet me.\n</think>\n\nHello.<|im_end|>"], ["<think>\nA rate question.\n</think>\n\nTwo percent.<|im_end|>"],
                       ["You are welcome.<|im_end|>"]]
    else:
        assert got == [["Hello.<|im_end|>"], ["Two percent.<|im_end|>"], ["You are welcome.<|im_end|>"]]
        assert all("They greet me" not in m["content"] and "rate question" not in m["content"] for m in conv)
    assert strip_reasoning(conv[4]["content"]) == "Two percent."  # what evaluation scores


def test_enable_thinking_false_puts_the_empty_think_block_in_the_prompt_and_it_is_context(smol_tokenizer):
    from tunewise.models import CHAT_KWARGS, render_chat

    tok = family_tokenizer(smol_tokenizer, "qwen3")
    tok.init_kwargs[CHAT_KWARGS] = {"enable_thinking": False}
    prompt = render_chat(tok, TURNS[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    seqs = tokenize_sequences(tok, [TURNS])[0]
    assert [trained(tok, *s) for s in seqs] == [["Hello.<|im_end|>"], ["Two percent.<|im_end|>"], ["You are welcome.<|im_end|>"]]
    assert tok.decode(seqs[0][0]) == prompt + "Hello.<|im_end|>"  # the first answer trained right after that prompt


def test_the_template_arguments_reach_the_engine_and_are_saved_with_the_tokenizer(tiny_model, tmp_path):
    """data.template_kwargs given to Engine.load reach its tokenizer; saved with it (as training saves it beside the
    model), they load back with it, so what loads the trained model renders as training did."""
    from tunewise.engine import Engine
    from tunewise.models import CHAT_KWARGS, load_tokenizer

    eng = Engine.load(str(tiny_model), chat_kwargs={"enable_thinking": False})
    assert eng.tok.init_kwargs[CHAT_KWARGS] == {"enable_thinking": False}
    eng.tok.save_pretrained(tmp_path / "adapter")  # an adapter's directory: a tokenizer, no config.json
    assert load_tokenizer(str(tmp_path / "adapter")).init_kwargs[CHAT_KWARGS] == {"enable_thinking": False}
    assert CHAT_KWARGS not in Engine.load(str(tiny_model)).tok.init_kwargs  # none given, none added


def test_enable_thinking_false_with_reasoning_kept_is_a_config_error():
    from tunewise.config import DataConfig

    with pytest.raises(ValueError, match="set reasoning: drop"):
        DataConfig(format="openai", train="x.jsonl", reasoning="keep", enable_thinking=False)
    assert DataConfig(format="openai", train="x.jsonl", reasoning="drop", enable_thinking=False).template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_end_of_turn_check_on_each_real_template(smol_tokenizer, family):
    """The marker each template ends an answer with is trained; the check passes when generation stops on it and
    fails, naming both, when it stops only on an EOS that differs (Gemma's <end_of_turn> against <eos>)."""
    tok = family_tokenizer(smol_tokenizer, family)
    marker = FAMILIES[family][4]
    eot = tok.convert_tokens_to_ids(marker)
    assert check_end_of_turn(tok, [eot]) == [eot]
    if marker != tok.eos_token:
        with pytest.raises(TemplateError, match=r"ends an assistant turn with .*" + marker.replace("|", r"\|").replace("[", r"\[")):
            check_end_of_turn(tok, [tok.eos_token_id])


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_data_prepare_on_a_qwen3_template_with_reasoning(tiny_project, tiny_model, tmp_path, mode):
    """As a user runs it: multi-turn chat JSONL with reasoning (reasoning_content and inline <think>) on a model whose
    template is Qwen3's prepares under both settings; keep trains the reasoning, drop leaves it out of the data."""
    import json
    import shutil

    import yaml
    from typer.testing import CliRunner

    from tunewise.cli import app

    model = tmp_path / "qwen3-like"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text((TEMPLATES / "qwen3.jinja").read_text())
    rows = [json.dumps({"messages": [TURNS[0], {**TURNS[1], "reasoning_content": ["not", "text"]}]})]  # line 1: set aside
    for k in range(40):
        conv = [dict(m) for m in TURNS]
        conv[0]["content"] = f"Hi {k}"
        conv[1]["reasoning_content"] = f"Greeting number {k}."
        conv[3]["content"] = f"<think>\nRates, case {k}.\n</think>\n\nTwo percent."
        rows.append(json.dumps({"messages": conv}))
    (tmp_path / "chat.jsonl").write_text("\n".join(rows) + "\n")
    path = tiny_project()
    raw = yaml.safe_load(path.read_text())
    raw["model"]["name"] = str(model)
    raw["data"] = {"format": "openai", "train": "chat.jsonl", "reasoning": mode, "max_length": 256, "split": {"validation": 0.1, "test": 0.1, "seed": 1}}
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["data", "prepare", str(path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "tiny" / "data"
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    answers = [m["content"] for r in train for m in r["messages"] if m["role"] == "assistant"]
    assert len(train) == 32 and len(answers) == 96  # every good record kept
    bad = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(b["file"], b["where"], b["reason"]) for b in bad] == [
        ("chat.jsonl", "line 1", "messages[1].reasoning_content: expected a string, got list")]
    thought = sum("<think>" in a for a in answers)
    assert thought == (64 if mode == "keep" else 0)
    stats = json.loads((out / "summary.json").read_text())["tokens"]["train"]
    assert stats["examples"] == 32 * 3  # each answer in the render that ends with it (Qwen3 rewrites earlier answers)
    from tunewise.models import load_tokenizer

    tok = load_tokenizer(str(model))
    answers_only = sum(len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for a in ANSWERS)
    if mode == "drop":  # exactly the answers and their end-of-turn tokens
        assert stats["loss_tokens"] == 32 * answers_only
    else:  # and the reasoning of the first two
        assert stats["loss_tokens"] > 32 * (answers_only + 8)


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CONV = [{"role": "user", "content": "Weather in Paris and Oslo?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                 {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
             {"role": "tool", "tool_call_id": "a", "content": "{\"temp\": 21}"},
             {"role": "tool", "tool_call_id": "b", "content": "{\"temp\": 3}"},
             {"role": "assistant", "content": "Paris 21, Oslo 3."}]
CALLS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("system", [True, False])
def test_templates_that_render_tools_themselves_get_them_structured_and_train_the_calls(smol_tokenizer, family, system):
    """Qwen's templates render tools and <tool_call> calls themselves: a tool-use record (read into tunewise's text form)
    renders through them as structured tools and tool_calls, the tools in the template's own words, exactly as a runtime
    sending the same OpenAI request to the template renders it; the calls and the answer are trained with their
    end-of-turn marker, the tool results are not."""
    from tunewise.data.tools import native_tools, normalize_openai, render_text
    from tunewise.models import render_chat

    tok = family_tokenizer(smol_tokenizer, family)
    assert native_tools(tok.chat_template)
    raw = [SYSTEM] * system + TOOL_CONV
    msgs, tools = normalize_openai({"messages": raw, "tools": [TOOL]})
    text_form = render_text(msgs, tools)
    ours = render_chat(tok, text_form, tokenize=False)
    # a runtime sends the request with each call's arguments parsed and a call's null content as "" (vLLM does both:
    # HF templates expect an object there, and Qwen3's reads the content of every assistant turn)
    sent = [{**m, "content": m["content"] or "", "tool_calls": [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}} for c in m["tool_calls"]]}
            if m.get("tool_calls") else m for m in raw]
    theirs = tok.apply_chat_template(sent, tools=[TOOL], tokenize=False)
    assert ours == theirs and "<tools>" in ours and "# Tools" in ours
    assert "You may call one or more functions to assist with the user query.\n\nYou are provided with function signatures" in ours  # Qwen's words
    if family == "qwen2.5":
        assert masks(tok, text_form) == [[CALLS + "<|im_end|>", "Paris 21, Oslo 3.<|im_end|>"]]
    else:  # Qwen3 writes an empty think block before the last turn only: the calls train as written, in their own sequence
        assert masks(tok, text_form) == [[CALLS + "<|im_end|>"], ["Paris 21, Oslo 3.<|im_end|>"]]


def test_other_templates_keep_the_text_form(smol_tokenizer):
    """Llama 3.2 takes tools= but writes calls in its own JSON: tool use stays in tunewise's text form there."""
    from tunewise.data.tools import native_tools, normalize_openai, render_text
    from tunewise.models import render_chat

    tok = family_tokenizer(smol_tokenizer, "llama-3.2")
    assert not native_tools(tok.chat_template)
    msgs, tools = normalize_openai({"messages": TOOL_CONV, "tools": [TOOL]})
    text_form = render_text(msgs, tools)
    assert render_chat(tok, text_form, tokenize=False) == tok.apply_chat_template(text_form, tokenize=False)
    assert masks(tok, text_form) == [[CALLS + "<|eot_id|>", "Paris 21, Oslo 3.<|eot_id|>"]]

"""The loss mask checked against the real SmolLM2 chat template: exactly the assistant text plus end-of-turn."""

import pytest

from tunewise.data.records import Record
from tunewise.data.tokenize import IGNORE, batch_order, collate, tokenize_messages, tokenize_records, truncate


def trained_spans(tok, ids, labels):
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


CONVS = [
    [{"role": "user", "content": "I lost my card"}, {"role": "assistant", "content": "lost_or_stolen_card"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Rates?"}, {"role": "assistant", "content": "Line one.\n\n- item  two "}],
    [{"role": "user", "content": "Unicode ✓ café"}, {"role": "assistant", "content": " leading space and émoji 🙂"}],
]


@pytest.mark.parametrize("conv", CONVS)
def test_mask_is_exactly_assistant_text_plus_end_of_turn(smol_tokenizer, conv):
    tok = smol_tokenizer
    ids, labels = tokenize_messages(tok, conv)
    # Same ids as the template's own tokenisation: the mask sits on what the model really sees.
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    expected = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
    assert trained_spans(tok, ids, labels) == expected


def test_weight_zero_turn_is_not_trained(smol_tokenizer):
    conv = [dict(m) for m in CONVS[1]]
    conv[2]["weight"] = 0
    ids, labels = tokenize_messages(smol_tokenizer, conv)
    assert trained_spans(smol_tokenizer, ids, labels) == ["Line one.\n\n- item  two <|im_end|>"]


def test_truncation_keeps_answer_and_reports(smol_tokenizer):
    long_user = "word " * 300
    r = Record([{"role": "user", "content": long_user}, {"role": "assistant", "content": "short answer"}], "f:1")
    too_long = Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": "long " * 300}], "f:2")
    ok = Record(CONVS[0], "f:3")
    out, stats = tokenize_records(smol_tokenizer, [r, too_long, ok], max_length=64)
    assert stats.truncated == 1 and stats.dropped_too_long == 1 and stats.examples == 2
    assert stats.dropped[0]["source"] == "f:2" and "max_length=64" in stats.dropped[0]["reason"]
    assert len(out[0].input_ids) == 64
    assert trained_spans(smol_tokenizer, out[0].input_ids, out[0].labels) == ["short answer<|im_end|>"]


def test_truncate_unit():
    ids = list(range(10))
    labels = [IGNORE] * 6 + [6, 7, 8, IGNORE]
    assert truncate(ids, labels, 5) == (ids[5:], labels[5:])
    assert truncate(ids, labels, 3) is None
    assert truncate(ids, labels, 20) == (ids, labels)


def test_length_grouping_reduces_padding_and_is_deterministic():
    import random

    lengths = [random.Random(i).randint(5, 200) for i in range(800)]
    grouped = batch_order(lengths, 8, seed=1, group_by_length=True)
    plain = batch_order(lengths, 8, seed=1, group_by_length=False)
    assert grouped == batch_order(lengths, 8, seed=1, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(800))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5


def test_collate_right_pads():
    from tunewise.data.tokenize import Tokenized

    b = collate([Tokenized([1, 2, 3], [IGNORE, 2, 3]), Tokenized([4], [4])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


GEMMA_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # its turns end with a token that is not EOS
NO_END = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # nothing closes a turn


def test_the_end_of_turn_token_is_trained_and_is_what_generation_stops_on(smol_tokenizer):
    import copy

    from tunewise.data.tokenize import TemplateError, check_end_of_turn

    assert smol_tokenizer.convert_ids_to_tokens(check_end_of_turn(smol_tokenizer, [2])) == ["<|im_end|>"]  # the bundled model
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = GEMMA_LIKE
    with pytest.raises(TemplateError, match=r"ends an assistant turn with \['<\|endoftext\|>'\].*stops on \['<\|im_end\|>'\]"):
        check_end_of_turn(tok, [2])
    assert check_end_of_turn(tok, [2, 0]) == [0]  # with it among the stop tokens, it passes
    tok.chat_template = NO_END
    with pytest.raises(TemplateError, match="writes no end-of-turn token"):
        check_end_of_turn(tok, [2])


def test_data_prepare_refuses_a_template_whose_end_of_turn_is_not_a_stop_token(tiny_project, tiny_model, tmp_path):
    """Before any work: the tiny model with a template whose turns end in <|endoftext|> while generation stops on
    <|im_end|> (the Gemma case) stops `tunewise data prepare` with the reason, and nothing is written."""
    import shutil

    import yaml
    from typer.testing import CliRunner

    from tunewise.cli import app

    model = tmp_path / "gemma-like"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(GEMMA_LIKE)
    path = tiny_project()
    raw = yaml.safe_load(path.read_text())
    raw["model"]["name"] = str(model)
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["data", "prepare", str(path)])
    assert res.exit_code == 2 and "<|endoftext|>" in res.output and "generation_config.json" in res.output, res.output
    assert not (tmp_path / "runs" / "tiny" / "data" / "train.jsonl").exists()

"""The judge's prompts under the real chat templates of the users' models; the turing question in both orders."""

from __future__ import annotations

import json

import pytest

from expertchat.config.judging import JudgingConfig, TuringConfig
from expertchat.judging.prompts import JudgePrompts
from tests.conftest import DATA


@pytest.mark.parametrize("name", ["llama3_8b_instruct", "mixtral_8x7b_instruct"])
def test_judge_prompts_render_with_the_real_chat_templates(smol_tokenizer, name):
    """The judge's prompt survives each real template (Llama 3 trims message contents; Mixtral has no system
    role): context and answer appear once each, in order, and the instruction follows them."""
    import copy

    path = DATA / "chat_templates" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = json.loads(path.read_text())["chat_template"]
    prompts = JudgePrompts(tok, JudgingConfig())
    context, answer = "What drives a Plinian eruption?", "Gas exsolution in silicic magma."
    ids, start = prompts.prefix(prompts.context_ids(context), prompts.answer_ids(answer))
    text = tok.decode(ids + prompts.rating_suffixes[("knowledge", 0)])
    assert text.count(context) == 1 and text.count(answer) == 1
    assert text.index(context) < text.index(answer) < text.index("knowledge") < text.rindex("Rating: [[")
    assert tok.decode(ids[start:start + len(prompts.answer_ids(answer))]) == answer


@pytest.mark.parametrize("prefix", ["Answer:", "Answer: "])
def test_the_turing_question_comes_in_both_letter_orders_with_its_letters(smol_tokenizer, prefix):
    """Order 0 names a human expert first (letter A), order 1 an AI first; the reply is forced to start with the
    prefix less its trailing space (the letter's token carries it), and A and B are read with and without a space."""
    prompts = JudgePrompts(smol_tokenizer, JudgingConfig(turing=TuringConfig(prefix=prefix)))
    first, second = (smol_tokenizer.decode(ids) for ids in prompts.turing_suffixes)
    assert first.startswith("Was this response written by a human expert or by an AI? Answer A for a human expert")
    assert second.startswith("Was this response written by an AI or by a human expert? Answer A for an AI")
    assert first.endswith("assistant\nAnswer:") and second.endswith("assistant\nAnswer:")
    spell = {smol_tokenizer.decode([t]) for ids in prompts.turing_choices for t in ids}
    assert spell == {" A", "A", " B", "B"} and [len(ids) for ids in prompts.turing_choices] == [2, 2]

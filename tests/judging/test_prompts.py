"""The judge's prompts under the real chat templates of the users' models."""

from __future__ import annotations

import json

import pytest

from expertchat.config.schema import JudgingConfig
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

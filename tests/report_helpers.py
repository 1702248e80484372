"""Run folders for the report's tests, written in the exact formats the stages write (``runs/store.py``, contract A's
evaluation files, contract B's status file), with made-up numbers; and a reader of W&B's offline ``.wandb`` log."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import yaml

CATEGORIES = ("knowledge", "human_expert_likeness")
ROLES = ("actor", "judge")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _marker(root: Path, name: str, summary: dict[str, Any]) -> None:
    (root / "stages").mkdir(parents=True, exist_ok=True)
    (root / "stages" / name).write_text(json.dumps(summary), encoding="utf-8")


def make_run(root: Path, rounds: int = 2, dialogues: int = 3, turns: int = 4, steps: int = 3,
             evaluation: bool = True, overrides: list[str] | None = None, stop_after: tuple[int, str] | None = None,
             status: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A run folder of ``rounds`` rounds; ``stop_after=(r, stage)``: a job that crashed after that stage (no later
    records or markers); ``status``: a contract B ``status.json`` to write."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    overrides = overrides if overrides is not None else ["+experiment=smoke", f"rounds={rounds}"]
    config = {"mode": "run", "rounds": rounds, "seed": 0, "actor": {"name": "smollm2_135m"},
              "judge": {"name": "smollm2_135m"}, "topics": {"n": dialogues}, "dialogue": {"turns": turns},
              "reward": {"zeta": 0.4}, "training": {"steps": steps, "learning_rate": 5e-5, "beta": 0.1},
              "judging": {"mode": "expected", "rubric": {c: {"signal": "rubric", "weight": 1.0} for c in CATEGORIES}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (root / ".hydra").mkdir(exist_ok=True)
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    (root / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"reward": "default", "experiment": "smoke", "hydra/env": "default"}}}}))
    t_rows, r_rows, m_rows = [], [], []
    for r in range(rounds):
        for stage in ("dialogue", "rating", "training"):
            if stage == "dialogue":
                new = _dialogue(rng, r, dialogues, turns)
                t_rows += new
                summary = {"dialogues": dialogues, "turns": len(new), "tok_per_s": 12.5}
            elif stage == "rating":
                r_rows += _ratings(rng, [t for t in t_rows if t["round"] == r])
                summary = {"models": {}}
            else:
                m_rows += _train(rng, r, steps)
                summary = {"roles": {role: {"steps": steps, "seconds_per_step": 4.2} for role in ROLES}}
            _marker(root, f"round_{r}.{stage}.json", {"round": r, "stage": stage, **summary})
            if stop_after == (r, stage):
                break
        else:
            continue
        break
    _jsonl(root / "turns.jsonl", t_rows)
    _jsonl(root / "ratings.jsonl", r_rows)
    _jsonl(root / "train_metrics.jsonl", m_rows)
    if evaluation and stop_after is None:
        write_evaluation(root, rng, ["base", *range(rounds)])
    if status is not None:
        (root / "status.json").write_text(json.dumps(status), encoding="utf-8")
    return root


def _dialogue(rng: random.Random, r: int, n: int, turns: int) -> list[dict[str, Any]]:
    words = "the model explains why dark matter halos shape galaxy rotation curves and what remains unknown".split()
    out = []
    for d in range(n):
        for t in range(turns):
            k = rng.randint(5, 16)
            out.append({"dialogue_id": f"r{r}-d{d:03d}", "round": r, "turn": t, "role": ROLES[t % 2],
                        "model": "smollm2_135m", "topic": "Dark matter halos and rotation curves",
                        "text": " ".join(rng.choice(words) for _ in range(k)), "prompt_tokens": 100,
                        "new_tokens": k + 2 * r, "finished": rng.random() < 0.5})
    return out


def _ratings(rng: random.Random, turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in turns:
        cats = {c: {"score": round(rng.uniform(2, 8), 3), "signal": "rubric", "status": "ok"} for c in CATEGORIES}
        score = sum(c["score"] for c in cats.values()) / len(cats)
        sim = round(rng.uniform(0, 1), 3)
        out.append({"round": t["round"], "rater": ROLES[1 - ROLES.index(t["role"])], "ratee": t["role"],
                    "dialogue_id": t["dialogue_id"], "turn": t["turn"], "topic": t["topic"], "status": "ok",
                    "score": score, "categories": cats, "wim": "a worked example", "similarity": sim,
                    "rating": (score - 5) / 5, "reward": round(0.6 * (score - 5) / 5 + 0.4 * sim, 4)})
    return out


def _train(rng: random.Random, r: int, steps: int) -> list[dict[str, Any]]:
    out = []
    for role in ROLES:
        for s in range(1, steps + 1):
            out.append({"round": r, "role": role, "step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.01 * s,
                        "objective/kl": 0.002 * s, "objective/scores": rng.uniform(-0.2, 0.3), "pairs/kept": 1.0})
        out.append({"round": r, "role": role, "step": steps, "final": True, "train_runtime": 10.0})
    return out


def write_evaluation(root: Path, rng: random.Random, points: list[Any], prompts: int = 6) -> None:
    """``eval.jsonl`` and ``stages/{base,round_<r>}.evaluation.json`` in contract A's shapes."""
    rows = []
    for p in points:
        summary = {"round": p, "judge": "smollm2_135m", "prompts": prompts, "samples": 1, "models": {}}
        for role in ROLES:
            shift = 0.0 if p == "base" else 0.05 * (p + 1)
            rewards = [round(rng.gauss(0.1 + shift, 0.1), 4) for _ in range(prompts)]
            for i, rew in enumerate(rewards):
                scores = {c: round(rng.uniform(3, 7), 3) for c in CATEGORIES}
                rows.append({"round": p, "role": role, "model": "smollm2_135m", "prompt_id": i, "prompt": f"q{i}",
                             "sample": 0, "answer": f"answer {i} of {role}", "tokens": rng.randint(20, 40),
                             "cut": False, "copied_fraction": 0.05, "distinct_1": 0.8, "distinct_2": 0.95,
                             "scores": scores, "score": sum(scores.values()) / 2, "rating": 0.0, "wim": "more detail",
                             "similarity": round(rng.uniform(0.2, 0.8), 3), "reward": rew})
            mean = sum(rewards) / len(rewards)
            summary["models"][role] = {
                "n": prompts, "reward_mean": mean, "reward_ci": [mean - 0.05, mean + 0.05],
                "scores": {c: {"mean": 5.0, "ci": [4.5, 5.5]} for c in CATEGORIES},
                "delta_vs_base": None if p == "base" else {"mean": shift, "ci": [shift - 0.04, shift + 0.04]},
                "win": 0 if p == "base" else 4, "tie": 0 if p == "base" else 1, "loss": 0 if p == "base" else 1,
                "win_rate": None if p == "base" else 0.67, "tokens_mean": 30.0,
                "length_ratio": None if p == "base" else 1.1, "distinct_1": 0.8, "distinct_2": 0.95,
                "distinct_2_ratio": None if p == "base" else 0.98, "cut_fraction": 0.0, "copied_fraction": 0.05}
        _marker(root, f"{'base' if p == 'base' else f'round_{p}'}.evaluation.json", summary)
    _jsonl(root / "eval.jsonl", rows)


def make_sweep(root: Path, task: list[str], jobs: dict[int, dict[str, Any] | None]) -> Path:
    """A multirun folder: ``multirun.yaml`` with ``task`` overrides; ``jobs``: job number -> ``make_run`` keyword
    arguments (``None``: the job's folder is missing)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}, "rounds": 1}))
    from expertchat.runs.reader import sweep_overrides

    expected = sweep_overrides(task)[1]
    for num, kwargs in jobs.items():
        if kwargs is not None:
            make_run(root / str(num), **{"rounds": 1, "overrides": expected[num % len(expected)], **kwargs})
    return root


# --------------------------------------------------------------------------- W&B's offline log, read back


def wandb_records(path: Path) -> list[Any]:
    """Every ``Record`` of a ``.wandb`` file: a LevelDB-style log (a 7-byte file header: ``:W&B``, magic 0xBEE1,
    version; then 32 KiB blocks of chunks, each with a 7-byte little-endian header: CRC32 of type + payload, length
    (2 bytes), type: 1 full, 2 first, 3 middle, 4 last), whose payloads are protobuf ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, block, records, pending = 7, 32 * 1024, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk checksum at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records

"""The rating stage: one record per rated turn, with every component of its reward, and the summary."""

from __future__ import annotations

import json
import math

from expertchat.config.schema import DialogueConfig, JudgingConfig, RewardConfig
from expertchat.runs.store import RunStore
from expertchat.stages import rating
from expertchat.stages.dialogue import Dialogue
from tests.conftest import two_tiny_models


class FakeEmbedder:
    def fits(self, texts):
        return [True for _ in texts]

    def similarity(self, a, b):
        return [0.5 for _ in a]


def test_rating_stage_writes_one_record_per_turn(smol_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("expertchat.stages.rating.load_embedder", lambda cfg: FakeEmbedder())
    tok = smol_tokenizer
    models = two_tiny_models(tok)
    dialogues = []
    for i, topic in enumerate(["tides", "compilers"]):
        d = Dialogue(f"r0-d00{i}", topic)
        for t, text in enumerate(["The moon pulls the ocean.", "Why two bulges?", "", "Inertia, mostly."]):
            d.turns.append({"dialogue_id": d.id, "turn": t, "role": "actor" if t % 2 == 0 else "judge",
                            "model": "tiny_a" if t % 2 == 0 else "tiny_j", "text": text, "topic": topic})
        dialogues.append(d)
    store = RunStore(tmp_path)
    cfg = JudgingConfig(wim_max_new_tokens=4, batch_size=3)
    summary = rating.run_rating(models, dialogues, DialogueConfig(), cfg, RewardConfig(), store, progress=False)
    rows = [json.loads(line) for line in (tmp_path / rating.RATINGS_FILE).read_text().splitlines()]
    assert len(rows) == 8 and {(r["rater"], r["ratee"]) for r in rows} == {("judge", "actor"), ("actor", "judge")}
    keys = {"round", "dialogue_id", "turn", "rater", "ratee", "rater_model", "ratee_model", "categories", "score",
            "wim", "wim_status", "similarity", "similarity_status", "rating", "reward", "mode", "status", "pmi"}
    assert all(keys <= set(r) for r in rows)
    assert all(-1 <= r["reward"] <= 1 and math.isfinite(r["reward"]) for r in rows)
    empty = [r for r in rows if r["turn"] == 2]
    assert len(empty) == 2 and all(r["status"] == "empty_answer" and r["similarity"] == 0.0 for r in empty)
    first = next(r for r in rows if r["turn"] == 0)
    assert first["rater_model"] == "tiny_j" and set(first["categories"]) == set(cfg.active())
    s = summary["models"]["actor"]
    assert s["rated"] == 4 and s["empty_answers"] == 2 and s["rater"] == "judge" and s["score_mean"] is not None
    judging = summary["timing"]["judging"]  # the timing split: each rater's seconds per 1,000 ratings
    assert {role: c["ratings"] for role, c in judging.items()} == {"judge": 4, "actor": 4}
    assert all(abs(c["s_per_1k_ratings"] - 250 * c["seconds"]) <= 0.2 for c in judging.values())  # ms-rounded s

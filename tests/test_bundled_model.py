"""The model shipped in assets/: it loads, replies to a chat message, and agrees with transformers."""
from __future__ import annotations

import json

import pytest
import torch

from engine.generate import generate
from engine.pretrained import BUNDLED_MODEL, load_pretrained
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig


@pytest.fixture(scope="module")
def bundled():
    assert (BUNDLED_MODEL / "config.json").is_file(), "the bundled model is missing from assets/"
    return load_pretrained(BUNDLED_MODEL, device="cpu")


def test_files_and_size():
    names = {p.name for p in BUNDLED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "MODEL_CARD.md"} <= names
    assert sum(p.stat().st_size for p in BUNDLED_MODEL.iterdir()) <= 40 * 2**20
    cfg = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] >= 2
    assert cfg["n_routed_experts"] >= 8 and cfg["num_experts_per_tok"] == 2 and cfg["n_shared_experts"] >= 1
    assert 1 < cfg["n_group"] and cfg["topk_group"] < cfg["n_group"]


def test_replies_to_a_chat_message(bundled):
    ids = bundled.encode_prompt(chat=[{"role": "user", "content": "What does `json.dumps` do?"}])
    r = generate(bundled.model, ids, SamplingParams(max_tokens=48), tokenizer=bundled.tokenizer,
                 eos_ids=bundled.eos_ids)
    assert r.token_ids and r.text.strip()
    spec = generate(bundled.model, ids, SamplingParams(max_tokens=48), tokenizer=bundled.tokenizer,
                    eos_ids=bundled.eos_ids, speculative=SpeculativeConfig(k="auto"))
    assert spec.token_ids == r.token_ids and spec.stats["draft_tokens_accepted"] > 0
    assert len(bundled.model.mtp) >= 2


def test_transformers_greedy_ids_equal_the_engine(bundled):
    from transformers import AutoModelForCausalLM

    ids = bundled.encode_prompt(prompt="def read_lines(path):\n")
    ref_model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        ref = ref_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=4095)[0, len(ids):].tolist()
    ours = generate(bundled.model, ids, SamplingParams(max_tokens=32)).token_ids
    assert ours == ref


def test_card_is_rendered_from_its_figures_with_a_routing_section_when_tuned():
    """MODEL_CARD.md is what export.model_card writes from figures.json; a tuned model's figures add the
    routing section (scripts/ship_tuned.py) with its settings and before/after changes."""
    from engine.train.export import model_card

    info = json.loads((BUNDLED_MODEL / "figures.json").read_text())
    card = model_card(info)
    assert card == (BUNDLED_MODEL / "MODEL_CARD.md").read_text()
    assert "Routing tuned" not in model_card({k: v for k, v in info.items() if k != "routing"})
    settings = {"steps": 300, "heal_steps": 150, "heal_union": 1.0, "heal_balance": 4.0, "distill_steps": 150}
    info["routing"] = {"settings": settings, "minutes": 31.0, "test_files": 64,
                       "before": {"perplexity": 96.70, "union": 4.831, "batch_load": 1.526},
                       "after": {"perplexity": 96.11, "union": 3.962, "batch_load": 1.290}}
    tuned = model_card(info)
    assert "## Routing tuned for speculation" in tuned and "--heal-union 1.0" in tuned
    assert "| expert union per 4-token window | 4.831 | 3.962 | -18.0% |" in tuned
    assert "| batch-wise max/mean load | 1.526 | 1.290 | -15.5% |" in tuned


def test_bundled_model_ends_its_chat_replies(bundled):
    """Greedy replies to the card's 20 questions end with the end-of-turn token, as the card records (13 of
    20; the model as first built: 11). Healing on documents alone once left a candidate at 0 of 20, every
    reply running to the token limit."""
    from engine.train.export import chat_endings

    recorded = json.loads((BUNDLED_MODEL / "figures.json").read_text())["figures"]["chat_endings"]
    measured = chat_endings(bundled)
    assert measured["ended"] >= 8, measured
    assert abs(measured["ended"] - recorded["ended"]) <= 2, (measured, recorded)

"""A model folder → everything generation needs: network, tokenizer (if any), end-of-sequence ids."""
from __future__ import annotations

import atexit
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.model.checkpoint import ProgressFn, load_model
from engine.model.config import ModelConfig
from engine.model.transformer import Transformer
from engine.paths import BUNDLED_MODEL  # noqa: F401  (re-exported for callers)
from engine.tokenizer import Tokenizer


@dataclass
class Pretrained:
    path: Path
    model: Transformer
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def encode_prompt(self, prompt: str | None = None, chat: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer.json; pass token ids instead")
        if chat is not None:
            return self.tokenizer.encode_chat(chat)
        return self.tokenizer.encode(prompt or "")


def eos_ids_of(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    ids = list(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))


atexit.register(gc.unfreeze)  # what load_pretrained froze is collectable again at exit (extensions report leaks)


def load_pretrained(model_dir: str | Path, device: str | None = None, dtype=None,
                    progress: ProgressFn | None = None, quant=None) -> Pretrained:
    """quant: an engine.quant.QuantSpec to quantize the weights while loading, or None."""
    model_dir = Path(model_dir)
    model = load_model(model_dir, device=device, dtype=dtype, progress=progress, quant=quant)
    tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    # The model's tens of thousands of Python objects live as long as it does: out of the collector's
    # sight, the collections that decoding's small allocations trigger stop walking them (they took ~5%
    # of a decode step on the bundled model).
    gc.collect()
    gc.freeze()
    return Pretrained(model_dir, model, tokenizer, eos_ids_of(model_dir, model.cfg, tokenizer))

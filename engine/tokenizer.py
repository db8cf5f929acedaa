"""tokenizer.json through `tokenizers`, and the chat template rendered in a sandboxed Jinja environment."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from engine.model.errors import ModelLoadError


class ChatTemplateError(ValueError):
    pass


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message):
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, chat_template: str | None):
        self.tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(config.get("add_bos_token", False))
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._compiled = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(str(path), None, "no tokenizer.json in the model folder")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(str(path), None, f"unreadable tokenizer ({e})") from e
        config = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ModelLoadError(str(cfg_path), None, f"unreadable tokenizer config ({e})") from e
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = model_dir / "chat_template.jinja"  # where transformers 5 saves it
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        # Only tokens flagged special are dropped: reasoning markers such as <think> stay in the text.
        return self.tok.decode(ids, skip_special_tokens=True)

    def decode_stream(self) -> DecodeStream:
        """Incremental decoder: yields text only once a multi-token UTF-8 character is complete."""
        return DecodeStream(skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """The prompt text. With continue_final_message the text ends with the last message's content,
        without the end-of-turn the template writes after it (transformers' argument of that name)."""
        if continue_final_message:
            text = self._render(messages, False)
            final = messages[-1]["content"]
            for needle in (final, final.strip()):
                at = text.rfind(needle) if needle else -1
                if at >= 0:
                    return text[:at + len(needle)]
            raise ChatTemplateError("the chat template does not write the final message as given; it cannot be continued")
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use a plain prompt")
        try:
            if self._compiled is None:
                self._compiled = self._env.from_string(self.chat_template)
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                **{k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)
                   and k not in ("bos_token", "eos_token")})
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except (OverflowError, RecursionError, MemoryError, ValueError, TypeError, KeyError, IndexError) as e:
            # A template is untrusted code in the sandbox: its runtime failures (a range the sandbox caps,
            # runaway recursion) are the template's fault, reported as such.
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e

    def encode_chat(self, messages: list[dict], continue_final_message: bool = False) -> list[int]:
        """The rendered template carries its own bos/special tokens, so none are added on top."""
        return self.encode(self.render_chat(messages, continue_final_message=continue_final_message),
                           add_special_tokens=False)

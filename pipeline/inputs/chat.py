"""Conversations rendered with the tokenizer's own chat template, and which of their tokens are
trained: the assistant's.

    tokens, masks = ChatTemplate(Path("tok/")).encode(conversations, "data.source: chat.jsonl", 0)

The template is data.tokenizer's (tokenizer_config.json `chat_template`, or chat_template.jinja),
applied by transformers' `apply_chat_template`, so a conversation becomes exactly the tokens the
model's own chat format makes. The mask (1 = the token is trained):

- a template with `{% generation %}` markers: transformers' assistant mask
  (`return_assistant_tokens_mask=True`), 1 for every token that overlaps a marked span;
- a template without: for each assistant message i, the tokens between the longest common token
  prefix of the whole conversation with the conversation up to message i plus the generation prompt
  (`add_generation_prompt=True`) and that with the conversation up to and including message i. So
  the assistant's content and whatever the template closes its turn with (an end-of-turn token) are
  trained; the role header the generation prompt writes is not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import file_digest

GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


# The files beside tokenizer.json that a rendered conversation depends on (template, special tokens).
TEMPLATE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                  "chat_template.json")


def template_identity(tokenizer: str | None, source: str, key: str) -> dict[str, str]:
    """sha256 of each of TEMPLATE_FILES that data.tokenizer has; refuses chat data without a tokenizer
    directory."""
    directory = Path(tokenizer) if tokenizer is not None else None
    if directory is None or not directory.is_dir():
        raise DataError(f"data.tokenizer: {key} ({source}) holds chat messages, which are rendered with a "
                        "tokenizer's chat template; set data.tokenizer to a directory with tokenizer.json and "
                        "a tokenizer_config.json that has a chat_template")
    return {name: file_digest(directory / name) for name in TEMPLATE_FILES if (directory / name).is_file()}


class ChatTemplate:
    """data.tokenizer loaded by transformers' AutoTokenizer, with its chat template."""

    def __init__(self, directory: Path) -> None:
        try:
            import jinja2  # noqa: F401  transformers renders templates with it but does not require it
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError("data.source: chat messages are rendered by transformers' chat templates; install "
                            "it with pip install 'logitcache[chat]'") from None
        try:
            self.hf = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as e:
            raise DataError(f"data.tokenizer: transformers cannot load {directory} ({_first_line(e)}); save it "
                            "with tokenizer.save_pretrained") from None
        try:
            template = self.hf.get_chat_template()
        except ValueError:
            raise DataError(f"data.tokenizer: {directory} has no chat_template; set tokenizer.chat_template and "
                            "save it with save_pretrained (a {% generation %} block around the assistant's "
                            "turns marks what is trained)") from None
        self.marked = bool(GENERATION.search(template))

    def encode(self, conversations: Sequence[list[dict[str, str]]], where: str,
               first: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Token ids (int64) and masks (uint8, 1 where trained) of each conversation. `where` and
        `first` (the index of conversations[0] in the source) name a conversation the template
        refuses."""
        try:
            if self.marked:
                out = self._apply(conversations, return_assistant_tokens_mask=True)
                return ([np.asarray(ids, dtype=np.int64) for ids in out["input_ids"]],
                        [np.asarray(m, dtype=np.uint8) for m in out["assistant_masks"]])
            ids = [np.asarray(x, dtype=np.int64) for x in self._apply(conversations)["input_ids"]]
            return ids, [self._prefix_mask(c, x) for c, x in zip(conversations, ids)]
        except DataError:
            raise
        except Exception as e:  # jinja2 and templates' raise_exception() raise many types
            if len(conversations) > 1:  # find the conversation, to name it
                for i, c in enumerate(conversations):
                    self.encode([c], where, first + i)
            raise DataError(f"{where}: conversation {first + 1}: the chat template of data.tokenizer fails on it "
                            f"({_first_line(e)}); fix the conversation or the template") from None

    def _apply(self, conversations: Sequence[list[dict[str, str]]], **kw: Any) -> Any:
        return self.hf.apply_chat_template(list(conversations), tokenize=True, return_dict=True, **kw)

    def _prefix_mask(self, conversation: list[dict[str, str]], ids: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(ids), dtype=np.uint8)
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            # a template cannot render an empty conversation: a leading assistant turn starts at 0
            start = _common_prefix(ids, self._apply([conversation[:i]], add_generation_prompt=True)["input_ids"][0]) \
                if i else 0
            end = _common_prefix(ids, self._apply([conversation[:i + 1]])["input_ids"][0])
            mask[start:end] = 1
        return mask


def _common_prefix(a: np.ndarray, b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if len(differ) else n


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

"""Make the chat example: conversations about the Python standard library and a tokenizer with a
chat template, both generated here (nothing is downloaded).

    python examples/chat/make.py [OUT]        # OUT defaults to examples/chat

writes OUT/chat.jsonl, one conversation a line ({"messages": [{role, content}, ...]}): a user asks
what a standard-library function or class does and the assistant answers with its docstring's
first paragraph (Python Software Foundation License), half of them with a system message and a
quarter with a follow-up turn; and OUT/tokenizer/, a byte-level BPE of 2,048 tokens trained on
those messages (tokenizer.json) and a tokenizer_config.json declaring <|endoftext|> as its
eos_token, with a ChatML template whose {% generation %} block marks the assistant's turns.
configs/chat.yaml runs the pipeline on it; tests/test_chat.py checks that this script makes the
committed files byte for byte. The docstrings are those of the interpreter that runs the script:
the committed files were made with Python 3.11.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

from pipeline.inputs.text import DOC_MODULES, train_tokenizer

# ChatML; the assistant's content and its closing <|im_end|> are what a student is trained on.
TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

SYSTEM = "You answer questions about the Python standard library in a few sentences."

MAX_CHARS = 400  # an answer is cut at the last sentence end (else word) before this many characters


def _answer(doc: str) -> str:
    first = " ".join(doc.split("\n\n")[0].split())
    if len(first) <= MAX_CHARS:
        return first
    cut = first[:MAX_CHARS]
    end = cut.rfind(". ")
    return cut[:end + 1] if end > 0 else cut[:cut.rfind(" ")] + " ..."


def _topics() -> list[tuple[str, str, list[str]]]:
    """(qualified name, first paragraph, further paragraphs) of the public functions and classes of
    DOC_MODULES that have a docstring, in a fixed order."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for key, obj in sorted(vars(mod).items()):
                if key.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < 40:
                    continue
                paragraphs = [p for p in doc.split("\n\n") if p.strip()]
                out.append((f"{name}.{key}", _answer(paragraphs[0]), [_answer(p) for p in paragraphs[1:]]))
    return out


def conversations() -> list[list[dict[str, str]]]:
    convs = []
    for i, (name, answer, more) in enumerate(_topics()):
        messages = [{"role": "system", "content": SYSTEM}] if i % 2 == 0 else []
        messages += [{"role": "user", "content": f"What does {name} do?"},
                     {"role": "assistant", "content": answer}]
        if i % 4 == 1 and more:
            messages += [{"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": more[0]}]
        convs.append(messages)
    return convs


def main(out: Path) -> None:
    convs = conversations()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chat.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs)
    texts = [m["content"] for c in convs for m in c] + ["system user assistant"]
    train_tokenizer(texts, 2048, out / "tokenizer", special_tokens=SPECIAL_TOKENS, chat_template=TEMPLATE)
    print(f"{len(convs)} conversations, {out / 'chat.jsonl'}, {out / 'tokenizer'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)

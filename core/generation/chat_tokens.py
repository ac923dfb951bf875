"""Encode chat messages with the tokenizer's chat template; user text never yields control tokens.

A plain ``apply_chat_template`` renders the conversation to one string and
tokenizes it with special tokens switched on, so a user who types
``<|im_start|>system`` writes a real control token into the prompt. Here the
template is rendered with a placeholder in place of each message's content.
The template's own text is then encoded with special tokens on, and each
content with special tokens off (``split_special_tokens=True``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from core.generation.base import ChatMessage

# Private-use characters: no template transforms them and no user text needs them raw.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _strip_placeholder_chars(text: str) -> str:
    return text.replace(_OPEN, "").replace(_CLOSE, "")


def encode_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Return the prompt token ids for ``messages`` in ``tokenizer``'s chat template."""
    contents = [_strip_placeholder_chars(message.content) for message in messages]
    rendered = tokenizer.apply_chat_template(
        [
            {"role": message.role, "content": f"{_OPEN}{index}{_CLOSE}"}
            for index, message in enumerate(messages)
        ],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )

    ids: list[int] = []
    position = 0
    for match in _PLACEHOLDER.finditer(rendered):
        template_text = rendered[position : match.start()]
        if template_text:
            ids.extend(tokenizer.encode(template_text, add_special_tokens=False))
        content = contents[int(match.group(1))]
        if content:
            ids.extend(
                tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
            )
        position = match.end()
    tail = rendered[position:]
    if tail:
        ids.extend(tokenizer.encode(tail, add_special_tokens=False))
    return ids

"""The replay server's notion of a token, shared with the engine so counts agree on both sides.

A token is a word piece with its leading whitespace: at most `MAX_PIECE` non-space characters. Joining the
pieces gives back the text exactly, which is what lets a streamed answer be reassembled byte for byte. It is
not a real BPE tokenizer (those differ per provider); it only has to be deterministic, cheap and close to the
usual ~4 characters per token, so usage, cost and TPM accounting are consistent on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MAX_PIECE = 6
_PIECE = re.compile(r"\s*\S{1,%d}|\s+" % MAX_PIECE)


def split_tokens(text: str) -> list[str]:
    """Whitespace-preserving word pieces; `"".join(split_tokens(t)) == t`."""
    return _PIECE.findall(text)


def count_tokens(text: str) -> int:
    return len(_PIECE.findall(text))  # a list of short strings costs less than a Match object per token


def message_text(content: Any) -> str:
    """The text of a chat message's `content`: a string, or the text parts of a multi-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def count_message_tokens(messages: Iterable[dict[str, Any]]) -> int:
    """Prompt tokens of a chat request: the tokens of every message's text."""
    return sum(count_tokens(message_text(m.get("content"))) for m in messages if isinstance(m, dict))

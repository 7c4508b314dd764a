"""What a judge reads as an answer: its text, then its tool calls as JSON.

One rendering for an answer logged by the gateway and one replayed from a candidate, so a candidate making the
incumbent's tool call reads as the same answer.
"""

from __future__ import annotations

import orjson


def with_tool_calls(text: str | None, calls: list[tuple[str, str]]) -> str | None:
    """`text` with the (name, arguments) of each tool call appended as a JSON list; `text` alone without calls."""
    if not calls:
        return text
    rendered = orjson.dumps([{"name": name, "arguments": arguments} for name, arguments in calls]).decode()
    return f"{text}\n{rendered}" if text else rendered

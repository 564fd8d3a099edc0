"""What gets classified: the text of an OpenAI request body, bounded in size.

Completions → the prompt; chat → by default the last user message (the current question;
earlier turns may be about something else), or the whole conversation, or system + last user.
Long inputs keep their head and tail (instructions tend to sit at either end of pasted text);
truncation applies to classification only, never to what is sent to the engine.
"""

from __future__ import annotations

from typing import Any, Literal

InputMode = Literal["last_user", "conversation", "system_last_user"]
INPUT_MODES: tuple[InputMode, ...] = ("last_user", "conversation", "system_last_user")


def message_text(message: Any) -> str:
    """A chat message's text: string content, or the text parts of a content list."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return "\n".join(parts)
    return ""


def chat_text(messages: Any, mode: InputMode) -> str:
    if not isinstance(messages, list):
        return ""
    msgs = [m for m in messages if isinstance(m, dict)]
    users = [m for m in msgs if m.get("role") == "user"]
    last_user = message_text(users[-1]) if users else ""
    if mode == "last_user":
        return last_user
    if mode == "system_last_user":
        system = [message_text(m) for m in msgs if m.get("role") in ("system", "developer")]
        return "\n".join([*system, last_user]).strip()
    return "\n".join(message_text(m) for m in msgs).strip()


def prompt_text(prompt: Any) -> str:
    """A completions prompt: a string, or the strings of a batch (token-id prompts: none)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return ""


def truncate(text: str, max_chars: int) -> str:
    """At most `max_chars`: the first and last halves of a longer text."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    return text[:head] + "\n" + text[len(text) - (max_chars - head - 1) :]


def request_text(kind: str, body: dict[str, Any], mode: InputMode, max_chars: int) -> str:
    """The text to classify for a `chat` or `completions` request body."""
    if kind == "chat":
        raw = chat_text(body.get("messages"), mode)
    else:
        raw = prompt_text(body.get("prompt"))
    return truncate(raw.strip(), max_chars)

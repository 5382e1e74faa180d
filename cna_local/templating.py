"""Turn prompts into token ids the way the model sees them in chat: user turn + generation prompt.

The activation at the last prompt token is then the model's state right before
it starts its answer, which is where refusal is decided.
"""

from __future__ import annotations

from typing import Sequence

from .errors import CnaLocalError


class ChatTemplateError(CnaLocalError):
    """The tokenizer cannot format prompts as a chat."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids per prompt: through the chat template with a generation prompt, or raw when chat_template=False."""
    if chat_template and not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "this model's tokenizer has no chat template, so prompts cannot be formatted as a user turn. "
            "Fix: use an instruct/chat model, or pass --no-chat-template to feed the raw prompt text."
        )
    encoded = []
    for prompt in prompts:
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            # The template already holds any BOS; adding special tokens again would double it.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ChatTemplateError(f"prompt {prompt!r} encodes to no tokens. Fix: remove empty prompts from the set.")
        encoded.append(list(ids))
    return encoded

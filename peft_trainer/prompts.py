"""The one prompt renderer: how a conversation or a single prompt becomes the text a model reads, the same in
training, behaviour scoring and the Space. A tokenizer's own chat template when it has one, else
:data:`FALLBACK_CHAT_TEMPLATE` (so a base without a template is trained, scored and served alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase

# For tokenizers without a chat template; an assistant turn is "<content><eos>", which the loss covers.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


def template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The template to render with: None for the tokenizer's own, else :data:`FALLBACK_CHAT_TEMPLATE`."""
    return None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE


def adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether rendered text is tokenized with the tokenizer's special tokens (BOS): own templates write their own
    special tokens; the fallback template writes none."""
    return template_of(tokenizer) is not None


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> str:
    """The conversation as text; with ``add_generation_prompt`` it ends where the assistant's answer begins."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template_of(tokenizer)
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """One user turn and the generation prompt: what training puts before a ``completion`` of ``prompt``."""
    return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any) -> BatchEncoding:
    """One conversation, tokenized to end where the assistant's next answer begins (``kwargs`` as below)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer), **kwargs)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], **kwargs: Any) -> BatchEncoding:
    """Tokenized :func:`render_prompt` texts (``kwargs``: e.g. ``return_tensors="pt", padding=True``)."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=adds_special_tokens(tokenizer), **kwargs)

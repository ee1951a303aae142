"""Chat templates: the model's own Jinja template from its GGUF, rendered sandboxed.

Templates render in `app.sandbox` (jinja2's ImmutableSandboxedEnvironment, plus caps
on size, render time and output), so a hostile template in a downloaded GGUF can
neither reach Python internals nor hang or exhaust the machine. When a GGUF has no
template, or its template fails to render, a named fallback format (ChatML) is used
and `warning` says so, for the user to see: silently guessing a format is how models
end up babbling.
"""
from __future__ import annotations

from dataclasses import dataclass

FALLBACK_FORMAT = "chatml"


@dataclass
class ChatTemplate:
    """Renders a list of ``{"role", "content"}`` messages to the prompt text.

    >>> t = ChatTemplate.from_metadata(llm.metadata, bos="<s>", eos="</s>")   # doctest: +SKIP
    >>> t.render([{"role": "user", "content": "hi"}])                         # doctest: +SKIP
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    source: str  # "gguf" or the fallback format's name
    warning: str | None
    _render: object  # (messages, tools) -> prompt text
    native_tools: bool = False  # the template renders a `tools` list (the model was trained with tool markup)
    tool_role: bool = False  # the template renders role "tool" messages (results in the model's own format)

    @classmethod
    def from_metadata(cls, metadata: dict, bos: str, eos: str) -> "ChatTemplate":
        from .sandbox import GuardedTemplate

        text = metadata.get("tokenizer.chat_template")
        if not text:
            return cls.fallback("the model file has no chat template")
        try:
            template = GuardedTemplate(text)

            def render(messages, tools=None):
                return template.render(messages=messages, tools=tools, bos_token=bos, eos_token=eos,
                                       add_generation_prompt=True)

            render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        except Exception as exc:  # any template error: syntax, sandbox violation, caps, raise_exception()
            return cls.fallback(f"the model's chat template failed to render ({type(exc).__name__}: {exc})")
        native, tool_role = _tool_support(render)
        return cls("gguf", None, render, native, tool_role)

    @classmethod
    def fallback(cls, why: str) -> "ChatTemplate":
        from llama_cpp import llama_chat_format

        def render(messages, tools=None):
            return llama_chat_format.format_chatml(messages=messages).prompt

        return cls(FALLBACK_FORMAT, f"{why}; using the {FALLBACK_FORMAT} format instead", render)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text for `messages`, ending where the assistant's reply begins.

        `tools` (OpenAI-style function specs) reach the template only when it renders them."""
        return self._render(messages, tools if tools and self.native_tools else None)


_PROBE_TOOL = {"type": "function", "function": {"name": "crofter_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def _tool_support(render) -> tuple[bool, bool]:
    """Whether a template renders tool definitions, and tool-role messages, found by rendering
    (templates spell tool support in many ways; what they output is what counts)."""
    user = [{"role": "user", "content": "u"}]
    try:
        native = "crofter_probe_tool" in render(user, [_PROBE_TOOL])
    except Exception:
        native = False
    try:
        with_result = user + [{"role": "assistant", "content": "a"},
                              {"role": "tool", "name": "crofter_probe_tool", "content": "crofter_probe_result"}]
        tool_role = "crofter_probe_result" in render(with_result)
    except Exception:
        tool_role = False
    return native, tool_role

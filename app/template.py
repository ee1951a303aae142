"""Chat templates: the model's own Jinja template from its GGUF, rendered sandboxed.

llama-cpp-python's `Jinja2ChatFormatter` renders in jinja2's
ImmutableSandboxedEnvironment, so a hostile template in a downloaded GGUF cannot
reach Python internals. When a GGUF has no template, or its template fails to
render, a named fallback format (ChatML) is used and `warning` says so, for the
user to see: silently guessing a format is how models end up babbling.
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
    _formatter: object
    native_tools: bool = False  # the template renders a `tools` list (the model was trained with tool markup)
    tool_role: bool = False  # the template renders role "tool" messages (results in the model's own format)

    @classmethod
    def from_metadata(cls, metadata: dict, bos: str, eos: str) -> "ChatTemplate":
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        text = metadata.get("tokenizer.chat_template")
        if not text:
            return cls.fallback("the model file has no chat template")
        try:
            formatter = Jinja2ChatFormatter(template=text, eos_token=eos, bos_token=bos, add_generation_prompt=True)
            formatter(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        except Exception as exc:  # any template error: syntax, sandbox violation, raise_exception()
            return cls.fallback(f"the model's chat template failed to render ({type(exc).__name__}: {exc})")
        native, tool_role = _tool_support(formatter)
        return cls("gguf", None, formatter, native, tool_role)

    @classmethod
    def fallback(cls, why: str) -> "ChatTemplate":
        from llama_cpp import llama_chat_format

        return cls(FALLBACK_FORMAT, f"{why}; using the {FALLBACK_FORMAT} format instead", llama_chat_format.format_chatml)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text for `messages`, ending where the assistant's reply begins.

        `tools` (OpenAI-style function specs) reach the template only when it renders them."""
        if tools and self.native_tools:
            return self._formatter(messages=messages, tools=tools).prompt
        return self._formatter(messages=messages).prompt


_PROBE_TOOL = {"type": "function", "function": {"name": "crofter_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def _tool_support(formatter) -> tuple[bool, bool]:
    """Whether a template renders tool definitions, and tool-role messages, found by rendering
    (templates spell tool support in many ways; what they output is what counts)."""
    user = [{"role": "user", "content": "u"}]
    try:
        native = "crofter_probe_tool" in formatter(messages=user, tools=[_PROBE_TOOL]).prompt
    except Exception:
        native = False
    try:
        with_result = user + [{"role": "assistant", "content": "a"},
                              {"role": "tool", "name": "crofter_probe_tool", "content": "crofter_probe_result"}]
        tool_role = "crofter_probe_result" in formatter(messages=with_result).prompt
    except Exception:
        tool_role = False
    return native, tool_role

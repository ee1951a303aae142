"""Tools through the model's own chat template when its GGUF template renders them."""
from __future__ import annotations

import json

from app.engine import Event, Result, Sampling
from app.session import ChatSession
from app.template import ChatTemplate
from app.tools.calling import ToolLoop
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry

# A ChatML template with tool support in the style tool-trained models ship: definitions in the
# system turn inside <tools>, results as "tool" turns. Same special tokens as the bundled model.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{%- endif %}"
    "You may call these functions:\n<tools>\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] != 'system' %}"
    "{%- if m['role'] == 'tool' %}<|im_start|>tool\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_tool_support_is_detected_by_rendering(engine):
    native = ChatTemplate.from_metadata({"tokenizer.chat_template": TOOL_TEMPLATE}, bos="", eos="<|im_end|>")
    assert native.native_tools and native.tool_role
    plain = engine.template  # the bundled SmolLM2 template: no tools
    assert not plain.native_tools
    spec = [{"type": "function", "function": {"name": "calculator", "description": "d", "parameters": {}}}]
    msgs = [{"role": "user", "content": "hi"}]
    assert '"name": "calculator"' in native.render(msgs, spec)
    assert plain.render(msgs, spec) == plain.render(msgs)  # tools never leak into a template that lacks them


def test_native_template_carries_tools_and_results(engine):
    saved = engine.template
    engine.template = ChatTemplate.from_metadata({"tokenizer.chat_template": TOOL_TEMPLATE}, bos="", eos="<|im_end|>")
    try:
        reg = ToolRegistry.discover(ToolContext())
        session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=48))
        loop = ToolLoop(session, reg, Policy(), approve=lambda *a: True, max_calls=2)
        assert loop.native and loop.tool_role
        prompt = engine.template.render(loop.scaffold(session.messages + [{"role": "user", "content": "q"}]), loop.specs)
        assert "<tools>" in prompt and '"name": "calculator"' in prompt
        assert "- calculator(" not in prompt  # not listed twice: the template shows them
        # The model's choices are its own; script them so the result path is exercised every time.
        steps = iter([{"tool": "calculator", "arguments": {"expression": "17 * 23"}}, {"tool": "none", "answer": "391"}])
        def generate(prompt_tokens, sampling, cancel=None):
            raw = json.dumps(next(steps))
            yield Event(done=Result(raw, "stop", len(prompt_tokens), 1, 0, 0.0, 0.0, 0.0))

        loop.generate = generate
        turn = loop.run("What is 17 * 23? Use the calculator.")
        assert [c.result for c in turn.calls] == ["391"] and turn.answer == "391"
        results = [m for m in turn.messages if m["role"] == "tool"]
        assert results == [{"role": "tool", "name": "calculator", "content": "ok: 391"}]
        rendered = engine.template.render(turn.messages, loop.specs)
        assert "<|im_start|>tool\n<tool_response>\nok: 391\n</tool_response>" in rendered
        # And with the real model deciding: whatever it does parses as the constrained JSON.
        session2 = ChatSession(engine, Sampling(temperature=0.0, max_tokens=48))
        turn2 = ToolLoop(session2, reg, Policy(), approve=lambda *a: True, max_calls=2).run("What is 17 * 23?")
        assert all(c.name in reg.tools for c in turn2.calls)
    finally:
        engine.template = saved

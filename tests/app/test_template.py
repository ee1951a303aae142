"""BI4: hostile chat templates are sandboxed, capped in time, size and output, and fall back with a warning."""
from __future__ import annotations

import time

import pytest

from app.sandbox import MAX_TEMPLATE_BYTES, GuardedTemplate, TemplateTimeout
from app.template import ChatTemplate
from models.gguf_check import check_gguf

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]


def load(template: str) -> tuple[ChatTemplate, float]:
    t0 = time.perf_counter()
    t = ChatTemplate.from_metadata({"tokenizer.chat_template": template}, bos="<s>", eos="</s>")
    return t, time.perf_counter() - t0


def test_real_template_renders_as_llama_cpp_python_renders_it(bundled_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = check_gguf(bundled_path).metadata["tokenizer.chat_template"]
    ours = ChatTemplate.from_metadata({"tokenizer.chat_template": source}, bos="<|im_start|>", eos="<|im_end|>")
    theirs = Jinja2ChatFormatter(source, eos_token="<|im_end|>", bos_token="<|im_start|>", add_generation_prompt=True)
    assert ours.source == "gguf" and ours.warning is None
    for n in range(1, len(MESSAGES) + 1):
        assert ours.render(MESSAGES[:n]) == theirs(messages=MESSAGES[:n]).prompt


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ 'a'.format.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch CANARY').read() }}",
    "{{ joiner.__init__.__globals__.__builtins__['open']('CANARY', 'w') }}",
    "{{ ('%s' % messages).__class__.__mro__ }}{{ self.__init__.__globals__ }}",
    "{% set x = namespace().__init__.__globals__ %}{{ x }}",
])
def test_template_injection_is_refused_and_no_canary_appears(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "CANARY"
    t, _ = load(payload.replace("CANARY", str(canary)))
    assert not canary.exists()
    if t.source == "gguf":  # the sandbox answered the lookup with an empty Undefined: nothing leaked
        assert t.render(MESSAGES[1:2]) == ""
    else:
        assert t.source == "chatml" and "failed to render" in t.warning
        assert "<|im_start|>user\nhi<|im_end|>" in t.render(MESSAGES[1:2])  # the fallback works


@pytest.mark.parametrize("bomb", [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% for a in [1,2,3,4,5,6,7,8,9,10] * 100 %}{% for b in range(100000) %}{% for c in range(100) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
])
def test_endless_loops_are_stopped_at_the_render_deadline(bomb):
    t, took = load(bomb)
    assert t.source == "chatml" and "TemplateTimeout" in t.warning
    assert took < 10.0, took  # the 2 s deadline, plus a loaded CI machine's slack


@pytest.mark.parametrize("bomb", [
    "{{ 'x' * 10000000000 }}",
    "{{ ['x'] * 10000000000 }}",
    "{{ 'x'|center(10000000000) }}",
    "{{ 'x'|indent(10000000000) }}",
    "{{ '%010000000000d' % 1 }}",
    "{{ '%010000000000d'|format(1) }}",
    "{{ 2 ** 100000000 }}",
])
def test_memory_bombs_are_refused(bomb):
    t, took = load(bomb)
    assert t.source == "chatml" and "SecurityError" in t.warning, t.warning
    assert took < 2.0


def test_a_megabyte_template_is_refused_by_size():
    big = "{% for m in messages %}{{ m.content }}{% endfor %}" + "{# padding #}" * (1024 * 1024 // 13)
    assert len(big) > MAX_TEMPLATE_BYTES
    t, took = load(big)
    assert t.source == "chatml" and "KiB cap" in t.warning and took < 1.0


def test_a_render_that_explodes_later_is_an_error_not_a_hang():
    # Instant for one message, cubic in the number of messages: 200 messages, 4e8 steps.
    source = ("{% for a in messages %}{% for b in messages %}{% for c in messages %}{% for d in range(50) %}"
              "{% endfor %}{% endfor %}{% endfor %}{% endfor %}ok")
    t = GuardedTemplate(source)
    assert t.render(messages=MESSAGES[:1]) == "ok"
    t0 = time.perf_counter()
    with pytest.raises(TemplateTimeout):
        t.render(timeout=0.5, messages=MESSAGES * 50)
    assert time.perf_counter() - t0 < 5.0

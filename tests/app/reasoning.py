"""A reasoning model for the tests: the bundled GGUF with an R1-style chat template (the template
opens `<think>` for the model, as DeepSeek-R1's does), and a grammar that makes it write a known
trace and answer on every CPU."""
from __future__ import annotations

import subprocess
import sys

from llama_cpp import LlamaGrammar

from app.engine import Sampling

R1_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
TRACE = "The user wants a colour. Blue is a colour."
# The template opened the trace; the grammar writes it, closes it and answers.
GRAMMAR = f'root ::= "{TRACE}" "\\n</think>\\n\\n" "Answer: blue" [.]'


def build_r1_gguf(bundled_path, path):
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundled_path), str(path),
                    "--chat-template", R1_TEMPLATE, "--force"], check=True, capture_output=True)
    return path


def forced(max_tokens=64) -> Sampling:
    return Sampling(temperature=0.0, max_tokens=max_tokens, grammar=LlamaGrammar.from_string(GRAMMAR, verbose=False))

"""Tool calling with the bundled model: constrained decoding vs instructions alone.

For 30 prompts that need a tool, the first model step is classified:
valid call (parses, names a real tool, arguments pass the schema), right tool
(the one the prompt needs), and the whole loop's final answer is checked against
the expected text. The same prompts run with and without the grammar.

    python bench/bench_tools.py [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jsonschema

from app.engine import Engine, LoadOptions, Sampling
from app.session import ChatSession
from app.tools.calling import ToolLoop
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry
from models.bundled import bundled_gguf
from models.registry import ModelEntry

ARITH = [("What is 17 * 23?", "391"), ("Compute 1234 + 5678.", "6912"), ("What is 2 to the power of 16?", "65536"),
         ("What is 144 divided by 12?", "12"), ("Calculate 99 * 99.", "9801"), ("What is the square root of 1764?", "42"),
         ("What is 15% of 240?", "36"), ("Add 3.5 and 4.25.", "7.75"), ("What is 1000 - 357?", "643"),
         ("Multiply 12 by 12 by 12.", "1728"), ("What is 7 factorial, computed as 7*6*5*4*3*2*1?", "5040"),
         ("How much is 45 * 11?", "495")]
TIME = [("What is the current date?", None), ("What time is it now?", None), ("What year is it?", None),
        ("What is the time in Tokyo right now?", None), ("Tell me today's date in UTC.", None),
        ("What day of the month is it today?", None)]
FILES = [("List the files in the folder.", "notes.txt"), ("What files do I have?", "notes.txt"),
         ("Read notes.txt and tell me what it says.", "milk"), ("Open the file notes.txt.", "milk"),
         ("What is in todo.txt?", "dentist"), ("Show me the contents of todo.txt.", "dentist"),
         ("Which files are in my folder?", "todo.txt"), ("Read the file called notes.txt.", "milk"),
         ("What does todo.txt contain?", "dentist"), ("List my documents.", "notes.txt"),
         ("Print notes.txt.", "milk"), ("Is there a file named todo.txt? List the folder.", "todo.txt")]
CASES = [(p, "calculator", a) for p, a in ARITH] + [(p, "current_time", a) for p, a in TIME] + \
        [(p, "list_dir" if "ist" in p or "hich" in p or "What files" in p else "read_file", a) for p, a in FILES]


def run(engine, reg, constrained: bool, max_tokens: int) -> dict:
    valid = right = correct = 0
    t0 = time.perf_counter()
    for prompt, want_tool, want_text in CASES:
        session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=max_tokens))
        loop = ToolLoop(session, reg, Policy(), approve=lambda t, a, tainted: True, max_calls=2, constrained=constrained)
        obj, _raw, _finish = loop.decide(session.messages + [{"role": "user", "content": prompt}])
        if obj and "tool" in obj and obj["tool"] in reg.tools:
            try:
                jsonschema.validate(obj.get("arguments"), reg.tools[obj["tool"]].parameters)
                valid += 1
                right += obj["tool"] == want_tool
            except jsonschema.ValidationError:
                pass
        turn = ToolLoop(ChatSession(engine, Sampling(temperature=0.0, max_tokens=max_tokens)), reg, Policy(),
                        approve=lambda t, a, tainted: True, max_calls=2, constrained=constrained).run(prompt)
        ran_right = any(c.name == want_tool and c.status == "ok" for c in turn.calls)
        correct += ran_right and (want_text is None or want_text.lower() in turn.answer.lower())
    n = len(CASES)
    return {"valid_call_rate": valid / n, "right_tool_rate": right / n, "correct_answer_rate": correct / n,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    (root / "notes.txt").write_text("Buy milk and bread.")
    (root / "todo.txt").write_text("Call the dentist on Monday.")
    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    engine = Engine.load(ModelEntry("bench", str(bundled_gguf()), "gguf"), LoadOptions(n_ctx=2048))
    print(f"{len(CASES)} prompts, tools: {', '.join(reg.tools)}")
    for constrained in (True, False):
        print(("constrained  " if constrained else "instructions ") + json.dumps(run(engine, reg, constrained, args.max_tokens)))
    engine.close()


if __name__ == "__main__":
    main()

"""Plain llama-cpp-python as the anchor that crofter's generations are compared with."""
from __future__ import annotations


def raw_greedy(llm, prompt_tokens: list[int], max_tokens: int, repeat_penalty: float = 1.1, **sampling) -> str:
    """Greedy text of `prompt_tokens` through llama-cpp-python's own completion API,
    with crofter's default sampling settings unless given, from an empty KV cache."""
    llm.reset()
    params = dict(top_k=40, top_p=0.95, min_p=0.05) | sampling
    out = llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=0.0,
                                repeat_penalty=repeat_penalty, **params)
    return out["choices"][0]["text"]

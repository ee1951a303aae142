"""What `crofter eval` hands to finetune.evaluate as callables: the chat's own turn
(for prompt suites), a yes/no judge constrained by a grammar, and collection search
(for retrieval suites). finetune imports nothing of app; app passes these in."""
from __future__ import annotations

import sys

JUDGE_GRAMMAR = 'root ::= "yes" | "no"'
JUDGE_SYSTEM = "You grade answers strictly. Reply with one word: yes or no."


def load_engine(entry, settings, lora=None):
    from ..chat import default_loader

    return default_loader(entry, settings, lora)


def suite_answer(engine, settings, store_for, allow_tools: list[str], yes: bool):
    """answer(item) -> str: one fresh chat per prompt, through the same turn as `crofter ask`
    (documents grounded with citations, tools through the tool loop and its policy)."""
    from ..engine import Sampling
    from ..session import ChatSession
    from ..turn import finish

    def answer(item) -> str:
        system = settings.system_prompt if item.system is None else item.system
        session = ChatSession(engine, Sampling.from_settings(settings), system=system or "")
        uses, search = {}, None
        if item.collections:
            from .. import documents

            search = documents.collection_search(store_for(), settings, list(item.collections))
        if item.tools:
            uses["tools"] = _suite_tools(settings, search, allow_tools, yes)
        elif search is not None:
            from .. import documents

            uses["ground"] = documents.grounder(search, settings.rag_top_k)
        return finish(session.send(item.prompt, **uses)).answer

    return answer


def _suite_tools(settings, search, allow_tools: list[str], yes: bool):
    from ..tools.policy import Policy
    from ..tools.registry import ToolRegistry
    from ..turn import TurnTools

    def approve(tool, arguments, tainted: bool) -> bool:
        if not yes:  # a suite runs unattended: what is not allowed is refused, never asked
            print(f"crofter: denied {tool.name}: not allowed (use --allow-tool {tool.name} or --yes)", file=sys.stderr)
        return yes

    return TurnTools(ToolRegistry.for_settings(settings, search), Policy({name: "allow" for name in allow_tools}), approve)


def grammar_judge(engine):
    """judge(question, prompt, answer) -> bool: the judge model says yes or no, nothing else."""
    from llama_cpp import LlamaGrammar

    from ..engine import Sampling

    grammar = LlamaGrammar.from_string(JUDGE_GRAMMAR, verbose=False)

    def judge(question: str, prompt: str, answer: str) -> bool:
        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": f"The prompt was:\n{prompt}\n\nThe answer was:\n{answer}\n\n"
                                                f"{question} Reply yes or no."}]
        s = Sampling(temperature=0.0, max_tokens=2, seed=0, grammar=grammar)
        return engine.complete(engine.tokenize_chat(messages), s).text.strip().lower() == "yes"

    return judge


def retrieval_search(store, settings, collection: str):
    """search(question, mode, k) -> [(sources, passage)] over one collection (sources: every file
    the passage is in)."""
    from .. import documents

    retriever = documents.retriever(store, settings, collection)

    def search(question: str, mode: str, k: int):
        return [(h.sources(), h.text) for h in retriever.search(collection, question, k=k, mode=mode)]

    return search

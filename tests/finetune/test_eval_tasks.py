"""lm-evaluation-harness tasks, offline: crofter's llama.cpp adapter against lm-eval's own
`hf` model on the same weights, and task files that are wrong in the ways users get them wrong."""
from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.evaluate.rows import EvalError
from finetune.evaluate.llama_scorer import GGUFScorer
from finetune.evaluate.tasks import load_task_file, local_tasks, run_tasks

from .conftest import MC_ITEMS, MC_TASK


@pytest.fixture(scope="module")
def crofter_lm(smol_f32):
    from finetune.evaluate.llama_lm import CrofterLM

    lm = CrofterLM(GGUFScorer(smol_f32, n_ctx=512, kv_f32=True))
    yield lm
    lm.scorer.close()


def test_the_f32_gguf_and_the_hf_folder_pick_the_same_answers(crofter_lm, hf_model, mc_tasks, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    monkeypatch.chdir(tmp_path)  # relative data files resolve against the task file, not the cwd
    ours = run_tasks(crofter_lm, ["crofter_mc"], "f32", [mc_tasks], bootstrap_iters=100)
    theirs = run_tasks(HFLM(pretrained=str(hf_model), device="cpu", dtype="float32", batch_size=4),
                       ["crofter_mc"], "hf", [mc_tasks], bootstrap_iters=100)
    assert len(ours.picks["crofter_mc"]) == len(MC_ITEMS)
    assert ours.picks == theirs.picks
    a = {r.metric: r for r in ours.rows}
    b = {r.metric: r for r in theirs.rows}
    assert a["acc"].value == b["acc"].value and a["acc"].n == len(MC_ITEMS)
    assert a["acc"].stderr == pytest.approx(b["acc"].stderr) and a["acc"].stderr > 0


def test_endings_side_by_side_score_what_each_scores_alone(smol_f32):
    """predict_items decodes one item's endings as sequences 1..N sharing the context's cells;
    each must get what a fresh evaluation of context + ending gets."""
    fresh = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True, reuse_prefix=False)
    batched = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True)
    try:
        ctx = fresh.tokenize("Question: Which animal barks?\nAnswer:")
        endings = [fresh.tokenize(e) for e in (" dog", " a small brown cat", " fish", " the bird in the tree", " dog")]
        (together,) = batched.predict_items([(ctx, endings)])
        for e, rows in zip(endings, together):
            np.testing.assert_allclose(rows, fresh.predict(ctx + e, len(ctx)), atol=2e-4)
        assert batched.decoded == len(ctx) + sum(len(e) - 1 for e in endings)
    finally:
        fresh.close()
        batched.close()


def test_several_items_in_one_decode_score_what_each_scores_alone(smol_f32):
    """predict_items packs items (a shared few-shot prefix in sequence 0, each context's tail
    once for all its endings, each ending a sequence of its own) into one decode; every row
    must equal a fresh evaluation of context + ending."""
    fresh = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True, reuse_prefix=False)
    packed = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True)
    try:
        shot = fresh.tokenize("Q: What is ice? A: frozen water.\n")
        items = [(shot + fresh.tokenize(f"Q: {q} A:"), [fresh.tokenize(e) for e in ends])
                 for q, ends in (("Which animal barks?", (" a dog", " the cat that sat on the mat", " fish")),
                                 ("What do bees make?", (" honey", " wax and honey", " x")),
                                 ("Where is the sea?", (" far from the hills",)))]
        items.append((fresh.tokenize("Another story entirely:"), [fresh.tokenize(" it rained")] * 2))
        got = packed.predict_items(items)
        for (ctx, ends), rows in zip(items, got):
            assert len(rows) == len(ends)
            for e, r in zip(ends, rows):
                np.testing.assert_allclose(r, fresh.predict(ctx + e, len(ctx)), atol=2e-4)
        # No shared prefix across all four contexts: one decode, every context token once.
        assert packed.decodes == 1
        assert packed.decoded == sum(len(c) + sum(len(e) - 1 for e in ends) for c, ends in items)
        before = packed.decodes
        again = packed.predict_items(items[:3])  # the few-shot prefix goes to sequence 0 once
        assert packed.decodes - before == 2
        for a, b in zip(again, got):
            for x, y in zip(a, b):
                np.testing.assert_allclose(x, y, atol=2e-4)
    finally:
        fresh.close()
        packed.close()


def test_a_context_smaller_than_the_sequence_count_scores_and_packs(smol_f32):
    """llama.cpp aborts a decode when a context has more sequences than batch rows; a 16-token
    context (what `crofter eval --ctx 16` opens) keeps to 16 and still packs what fits."""
    s = GGUFScorer(smol_f32, n_ctx=16, kv_f32=True)
    fresh = GGUFScorer(smol_f32, n_ctx=16, kv_f32=True, reuse_prefix=False)
    try:
        assert s.n_seq == 16
        toks = s.tokenize("one two three four five six seven eight nine ten eleven twelve thirteen fourteen")[:17]
        assert s.predict(toks, 1).shape == (len(toks) - 1, s.n_vocab)
        ctx, ends = s.tokenize("Bees make"), [s.tokenize(e) for e in (" honey", " wax", " noise", " a hive")]
        for e, rows in zip(ends, s.predict_items([(ctx, ends)])[0]):
            np.testing.assert_allclose(rows, fresh.predict(ctx + e, len(ctx)), atol=2e-4)
    finally:
        s.close()
        fresh.close()


def test_an_ending_longer_than_a_batch_is_scored_on_its_own(smol_f32):
    from tests.finetune.test_eval_scores import TEXT

    s = GGUFScorer(smol_f32, n_ctx=1024, kv_f32=True)  # n_batch 512
    try:
        ctx = s.tokenize("The story of the mill:")
        long_end = s.tokenize(" " + TEXT + " " + TEXT + " " + TEXT)[:600]
        assert len(long_end) == 600
        ((short, long_rows),) = s.predict_items([(ctx, [s.tokenize(" It burned."), long_end])])
        assert long_rows.shape == (600, s.n_vocab) and short.shape[0] == len(s.tokenize(" It burned."))
        s.forget()
        np.testing.assert_allclose(long_rows, s.predict(ctx + long_end, len(ctx)), atol=2e-4)
    finally:
        s.close()


def test_the_endings_of_one_item_share_one_context_evaluation(crofter_lm, mc_tasks):
    before = crofter_lm.scorer.decoded
    run_tasks(crofter_lm, ["crofter_mc"], "f32", [mc_tasks], limit=4, bootstrap_iters=0)
    evaluated = crofter_lm.scorer.decoded - before
    contexts = sum(len(crofter_lm.tok_encode(f"Question: {q}\nAnswer:")) for q, _, _ in MC_ITEMS[:4])
    assert evaluated < contexts * 2  # four endings each would cost four contexts


def test_rolling_loglikelihood_matches_the_hf_model(crofter_lm, hf_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    text = "The miller weighed each sack and ground it between the stones."
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ours = crofter_lm.loglikelihood_rolling(req)[0]
    theirs = HFLM(pretrained=str(hf_model), device="cpu", dtype="float32", batch_size=1).loglikelihood_rolling(req)[0]
    assert ours < 0 and ours == pytest.approx(theirs, abs=1e-2)


def test_generate_until_is_greedy_llama_cpp_on_the_same_prompt(crofter_lm, smol_f32):
    """Compared like with like on this machine: plain llama-cpp-python, greedy, same stop."""
    from llama_cpp import Llama
    from lm_eval.api.instance import Instance

    prompt = "Question: What do bees make?\nAnswer:"
    req = [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 12}), 0)]
    ours = crofter_lm.generate_until(req)[0]
    llm = Llama(model_path=str(smol_f32), n_ctx=512, type_k=0, type_v=0, verbose=False)
    try:
        anchor = llm.create_completion(prompt, max_tokens=12, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                       stop=["\n"])["choices"][0]["text"]
    finally:
        llm.close()
    assert ours == anchor


def _task_dir(tmp_path, yaml_text: str, rows: str | None = None):
    d = tmp_path / "tasks"
    d.mkdir(parents=True)
    (d / "t.yaml").write_text(yaml_text)
    if rows is not None:
        (d / "crofter_mc.jsonl").write_text(rows)
    return d


GOOD_ROWS = "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_ITEMS)


@pytest.mark.parametrize("yaml_text, rows, message", [
    (MC_TASK.replace("output_type: multiple_choice", "output_type: multiple_choise"), GOOD_ROWS,
     r"t\.yaml:7: output_type 'multiple_choise'"),
    (MC_TASK, None, r"t\.yaml:4: data file crofter_mc\.jsonl not found"),
    (MC_TASK, GOOD_ROWS + '{"question": "broken\n', r"crofter_mc\.jsonl:9: not a JSON object"),
    (MC_TASK.replace("doc_to_text: \"Question", "doc_to_text: [\"Question"), GOOD_ROWS, r"t\.yaml:\d+: not valid YAML"),
    (MC_TASK.replace("task: crofter_mc", "name: crofter_mc"), GOOD_ROWS, r"t\.yaml:1: a task file needs a `task:`"),
    (MC_TASK.replace("test_split: test\n", ""), GOOD_ROWS, r"t\.yaml:1: name the split"),
    (MC_TASK, GOOD_ROWS + '["a", "list"]\n', r"crofter_mc\.jsonl:9: not a JSON object \(a list\)"),
    (MC_TASK.replace("{{question}}", "{{query}}"), GOOD_ROWS,
     r"t\.yaml:8: doc_to_text: 'query' is undefined; the first row of .*crofter_mc\.jsonl has answer, choices, question"),
    (MC_TASK.replace('"{{answer}}"', '"{{answer}"'), GOOD_ROWS, r"t\.yaml:10: doc_to_target: not a valid template"),
    (MC_TASK, "\n", r"crofter_mc\.jsonl:1: no rows in the test split"),
    (MC_TASK.replace('"{{answer}}"', '"{{answer + \'x\'}}"'), GOOD_ROWS,
     r"t\.yaml:10: doc_to_target: fails on the first row of .*crofter_mc\.jsonl \(TypeError"),
    (MC_TASK.replace('doc_to_choice: "{{choices}}"', 'doc_to_choice: "{{question}}"'), GOOD_ROWS,
     r"t\.yaml:9: doc_to_choice: fails on the first row .*not a list of choices"),
    (MC_TASK.replace("metric: acc_norm", "metric: acc_normal"), GOOD_ROWS, r"t\.yaml:15: metric 'acc_normal': choose"),
    (MC_TASK.replace("aggregation: mean", "aggregation: avg", 1), GOOD_ROWS, r"t\.yaml:12: aggregation 'avg': choose"),
])
def test_bad_task_files_are_named_with_the_line(tmp_path, yaml_text, rows, message):
    d = _task_dir(tmp_path, yaml_text, rows)
    with pytest.raises(EvalError, match=message):
        local_tasks([d])


def test_what_lm_eval_cannot_run_in_a_task_file_names_the_file(crofter_lm, tmp_path):
    filters = "filter_list:\n  - name: x\n    filter:\n      - function: no_such_filter\n"
    d = _task_dir(tmp_path, MC_TASK + filters, GOOD_ROWS)
    with pytest.raises(EvalError, match=r"t\.yaml: lm-eval could not run the task \(KeyError: .*no_such_filter"):
        run_tasks(crofter_lm, ["crofter_mc"], "f32", [d], limit=2)


def test_a_registry_task_that_is_not_there_is_refused_by_name(crofter_lm, mc_tasks):
    with pytest.raises(EvalError, match="unknown task 'no_such_task_anywhere'"):
        run_tasks(crofter_lm, ["no_such_task_anywhere"], "f32", [mc_tasks])


def test_relative_data_files_become_absolute_next_to_the_task(mc_tasks):
    cfg = load_task_file(mc_tasks / "crofter_mc.yaml")
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(mc_tasks / "crofter_mc.jsonl")


def test_a_registry_task_whose_data_set_is_not_cached_is_refused_offline(crofter_lm, mc_tasks):
    """arc_easy is in lm-eval's registry; its data set is not in this test's empty HF cache,
    and nothing may be downloaded at run time."""
    with pytest.raises(EvalError, match="not in the local Hugging Face cache"):
        run_tasks(crofter_lm, ["arc_easy"], "f32", [mc_tasks], limit=2)


def test_the_hf_model_reports_each_request_to_the_bar_and_scores_as_lm_eval(crofter_lm, hf_model, mc_tasks):
    """crofter's bar on lm-eval's hf model: every request counted, the picks unchanged."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from finetune.evaluate.hf_lm import hf_lm

    ticks = []
    lm = hf_lm(hf_model, batch_size=4, on_progress=lambda *t: ticks.append(t))
    ours = run_tasks(lm, ["crofter_mc"], "hf", [mc_tasks], limit=4, bootstrap_iters=0)
    plain = run_tasks(HFLM(pretrained=str(hf_model), device="cpu", dtype="float32", batch_size=4),
                      ["crofter_mc"], "hf", [mc_tasks], limit=4, bootstrap_iters=0)
    assert ours.picks == plain.picks and len(ours.picks["crofter_mc"]) == 4
    n = sum(len(c) for _, c, _ in MC_ITEMS[:4])
    assert ticks == [(i, n, "loglikelihood") for i in range(1, n + 1)]

    ticks.clear()
    texts = ["The miller weighed each sack.", "Between the stones the grain became flour, and the flour bread."]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert lm.loglikelihood_rolling(reqs) == pytest.approx(plain_rolling := HFLM(
        pretrained=str(hf_model), device="cpu", dtype="float32", batch_size=4).loglikelihood_rolling(reqs), abs=1e-4)
    assert all(v < 0 for v in plain_rolling)
    assert ticks == [(1, 2, "loglikelihood_rolling"), (2, 2, "loglikelihood_rolling")]


def test_few_shot_examples_go_into_every_context(crofter_lm, mc_tasks):
    """--num-fewshot on a task with only a test split: lm-eval draws the examples from it."""
    before = crofter_lm.scorer.decoded
    zero = run_tasks(crofter_lm, ["crofter_mc"], "f32", [mc_tasks], limit=4, num_fewshot=0, bootstrap_iters=0)
    zero_cost = crofter_lm.scorer.decoded - before
    before = crofter_lm.scorer.decoded
    three = run_tasks(crofter_lm, ["crofter_mc"], "f32", [mc_tasks], limit=4, num_fewshot=3, bootstrap_iters=0)
    three_cost = crofter_lm.scorer.decoded - before
    assert len(zero.picks["crofter_mc"]) == len(three.picks["crofter_mc"]) == 4
    question = len(crofter_lm.tok_encode(f"Question: {MC_ITEMS[0][0]}\nAnswer:"))
    assert three_cost > zero_cost + 4 * 2 * question  # at least two more questions' worth in each of 4 contexts


def test_rolling_loglikelihood_over_several_windows_matches_the_hf_model(smol_f32, hf_model):
    """A text four times the window: lm-eval's rolling windows, scored by llama.cpp and by torch."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from finetune.evaluate.llama_lm import CrofterLM

    from .test_eval_scores import TEXT

    lm = CrofterLM(GGUFScorer(smol_f32, n_ctx=64, kv_f32=True))
    try:
        assert len(lm.tok_encode(TEXT, add_special_tokens=False)) > 4 * 64
        req = [Instance("loglikelihood_rolling", {}, (TEXT,), 0)]
        ours = lm.loglikelihood_rolling(req)[0]
    finally:
        lm.scorer.close()
    theirs = HFLM(pretrained=str(hf_model), device="cpu", dtype="float32", batch_size=4,
                  max_length=64).loglikelihood_rolling(req)[0]
    assert ours < 0 and ours == pytest.approx(theirs, rel=1e-4)


def test_a_registry_task_runs_offline_from_the_local_cache(crofter_lm, mc_tasks, tmp_path, monkeypatch):
    """arc_easy from lm-eval's registry, its data set (allenai/ai2_arc, ARC-Easy) laid out in the
    HF datasets cache as a download leaves it: scored offline, picking what the same questions
    pick as the project's own task file."""
    import shutil

    import datasets.config
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split in ("train", "validation", "test"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")},
                                            "answerKey": "ABCD"[a]}) + "\n" for i, (q, c, a) in enumerate(MC_ITEMS)))
        files[split] = str(path)
    built = Json(cache_dir=str(tmp_path / "build"), dataset_name="ai2_arc", config_name="ARC-Easy", data_files=files)
    built.download_and_prepare()
    cache = tmp_path / "hf-datasets"
    shutil.copytree(built.cache_dir, cache / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / "0123456789abcdef")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)

    arc = run_tasks(crofter_lm, ["arc_easy"], "f32", [], limit=4, bootstrap_iters=0)
    ours = run_tasks(crofter_lm, ["crofter_mc"], "f32", [mc_tasks], limit=4, bootstrap_iters=0)
    assert len(arc.picks["arc_easy"]) == 4 and arc.picks["arc_easy"] == ours.picks["crofter_mc"]
    acc = {r.metric: r for r in arc.rows}["acc"]
    assert acc.n == 4 and acc.task == "arc_easy"


def test_valid_task_files_lm_eval_reads_pass_the_checks(tmp_path):
    """lm-eval's own template filters render in the check, and templates over fields that
    process_docs makes are left to lm-eval."""
    filtered = MC_TASK.replace("{{question}}", "{{question | regex_replace('\\\\?', '')}}")
    assert "crofter_mc" in local_tasks([_task_dir(tmp_path / "a", filtered, GOOD_ROWS)])
    made = MC_TASK.replace("{{question}}", "{{query}}") + "process_docs: !function utils.process\n"
    d = _task_dir(tmp_path / "b", made, GOOD_ROWS)
    (d / "utils.py").write_text("def process(ds):\n    return ds.map(lambda r: {**r, 'query': r['question']})\n")
    assert "crofter_mc" in local_tasks([d])


def test_rolling_windows_are_counted_across_lm_eval_s_batches(hf_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from finetune.evaluate.hf_lm import hf_lm

    from .test_eval_scores import TEXT

    ticks = []
    lm = hf_lm(hf_model, batch_size=4, max_length=64, on_progress=lambda *t: ticks.append(t))
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([TEXT, "The mill stands by the river."])]
    ours = lm.loglikelihood_rolling(reqs)
    theirs = HFLM(pretrained=str(hf_model), device="cpu", dtype="float32", batch_size=4,
                  max_length=64).loglikelihood_rolling(reqs)
    assert ours == pytest.approx(theirs, rel=1e-5)  # batched as lm-eval batches
    total = ticks[-1][1]
    assert total > 5 and ticks == [(i, total, "loglikelihood_rolling") for i in range(1, total + 1)]

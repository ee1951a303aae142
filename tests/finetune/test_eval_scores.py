"""The scoring side of `crofter eval`: llama.cpp's predictions against torch's on the same
weights, perplexity windows, KV-prefix reuse, and lm-eval tasks through crofter's
adapter and through lm-eval's own `hf` model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from finetune.evaluate.perplexity import perplexity, windows
from finetune.evaluate.rows import EvalError
from finetune.evaluate.llama_scorer import GGUFScorer
from finetune.evaluate.scorer import HFScorer, log_softmax, open_scorer

TEXT = (
    "The mill stood at the bend of the river, where the water ran fast over a shelf of stone. Every morning the "
    "miller opened the sluice, and the great wheel began to turn, slowly at first and then with a steady creak "
    "that could be heard across the fields. Farmers brought their wheat in carts, and the miller weighed each "
    "sack, ground it between the stones, and handed back flour in bags stamped with the sign of the mill. In "
    "winter the river froze at its edges, and the children of the village skated on the pond behind the barn "
    "while their parents argued about the price of grain. The miller kept a ledger of every sack, every coin and "
    "every promise, and when the harvest failed he lent flour to families who could not pay, writing their names "
    "in red ink and never once asking for the debt. Years later, when the railway came and the new steam mills "
    "in the town ground flour faster and cheaper, the old wheel stopped. The ledger was found in a drawer, its "
    "red names faded to brown, and the village held a supper in the empty mill to remember the man who had fed "
    "them through the hungry years. Someone played a fiddle, the children ran between the silent stones, and the "
    "river went on running over its shelf of rock as it always had."
)


@pytest.fixture(scope="module")
def f32(smol_f32):
    s = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def torch_model(hf_model):
    return HFScorer(hf_model)


def test_f32_gguf_per_token_loglikelihoods_equal_torch(f32, torch_model):
    ids = f32.tokenize(TEXT)
    assert ids == torch_model.tokenize(TEXT)  # the same windows on both sides
    toks = ids[:160]
    a = log_softmax(f32.predict(toks, 40))
    b = log_softmax(torch_model.predict(toks, 40))
    target = np.asarray(toks[40:])
    diff = np.abs(a[np.arange(len(target)), target] - b[np.arange(len(target)), target])
    assert diff.max() < 1e-3, f"max per-token difference {diff.max():.2e}"


def test_open_scorer_gives_unquantized_weights_an_f32_cache(smol_f32, bundled_path):
    # F16 keys and values would move a token's log-probability by ~5e-3 against torch.
    exact, quant = open_scorer(smol_f32, n_ctx=64), open_scorer(bundled_path, n_ctx=64)
    try:
        assert exact.ctx.params.type_k == 0 and quant.ctx.params.type_k != 0
    finally:
        exact.close()
        quant.close()


def test_shared_context_is_evaluated_once_and_scores_the_same(smol_f32):
    reuse = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True)
    fresh = GGUFScorer(smol_f32, n_ctx=512, kv_f32=True, reuse_prefix=False)
    try:
        ctx = reuse.tokenize("Question: What do bees make?\nAnswer:")
        endings = [reuse.tokenize(e) for e in (" honey", " milk and bread", " steel", " honey cakes")]
        for e in endings:
            a = log_softmax(reuse.predict(ctx + e, len(ctx)))
            b = log_softmax(fresh.predict(ctx + e, len(ctx)))
            np.testing.assert_allclose(a, b, atol=1e-4)
        assert fresh.decoded == sum(len(ctx) + len(e) - 1 for e in endings)
        # the context once, then only each ending's own tokens (and the shared " honey" of the last)
        assert reuse.decoded < fresh.decoded / 2
    finally:
        reuse.close()
        fresh.close()


def test_perplexity_windows_are_scored_like_llama_perplexity(f32):
    ids = list(range(100, 300))
    ws = windows(ids, 64, bos_id=1)
    assert len(ws) == 3 and all(len(w) == 64 and w[0] == 1 for w in ws)
    assert ws[1][1:] == ids[65:128]  # consecutive, not overlapping; only the BOS replaces a token
    with pytest.raises(EvalError, match="needs at least 64"):
        windows(ids[:50], 64, None)
    res = perplexity(f32, TEXT, n_ctx=64)
    assert res.windows == len(f32.tokenize(TEXT)) // 64
    assert res.tokens == res.windows * (64 - 64 // 2 - 1)


def test_perplexity_equals_a_naive_llama_cpp_python_loop(smol_f32, f32):
    """The anchor: plain llama-cpp-python with logits_all, window by window, on the same file."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(smol_f32), n_ctx=64, logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        ids = llm.tokenize(TEXT.encode(), add_bos=False)
        nll = []
        for start in range(0, len(ids) - 63, 64):
            w = ids[start:start + 64]
            llm.reset()
            llm.eval(w)
            lp = log_softmax(np.asarray(llm.scores[:64]))
            nll += [-lp[j, w[j + 1]] for j in range(32, 63)]
    finally:
        llm.close()
    ours = perplexity(f32, TEXT, n_ctx=64)
    assert ours.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


def test_gguf_and_hf_perplexity_of_the_same_model_agree(f32, torch_model):
    a = perplexity(f32, TEXT, n_ctx=64)
    b = perplexity(torch_model, TEXT, n_ctx=64)
    assert a.tokens == b.tokens and a.tokens > 100
    assert abs(a.ppl - b.ppl) / b.ppl < 0.005, (a.ppl, b.ppl)
    assert a.ppl_stderr > 0


def test_kl_against_the_same_weights_is_zero_and_against_q4_is_not(f32, torch_model, bundled_path):
    same = perplexity(f32, TEXT, n_ctx=64, reference=torch_model)
    assert same.rows("f32", "mill")[1].value < 1e-4
    assert same.same_top == same.tokens
    q4 = open_scorer(bundled_path, n_ctx=64)
    try:
        other = perplexity(q4, TEXT, n_ctx=64, reference=f32)
    finally:
        q4.close()
    rows = {r.metric: r for r in other.rows("q4", "mill")}
    assert rows["kld"].value > 1e-4 and rows["kld"].stderr > 0
    assert 0.5 < rows["same_top"].value <= 1.0


def test_reference_with_another_vocabulary_is_refused(f32):
    class OtherVocab:
        n_ctx, bos_id = 512, None

        def tokenize(self, text):
            return [1, 2, 3]

    with pytest.raises(EvalError, match="tokenize the text differently"):
        perplexity(f32, TEXT, n_ctx=64, reference=OtherVocab())

"""QuantgateLM over the torch engine vs lm-eval's own HF backend on the same unquantized model:
same tokens, same log-likelihoods, same greedy flags, same generations."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from quantgate.engines.base import EngineLimits  # noqa: E402
from quantgate.errors import StageError  # noqa: E402


def _inst(kind: str, args: tuple, i: int) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("align", i, 1))


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.evaluation.lm_eval_adapter import QuantgateLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # Small limits so rolling perplexity needs several windows per document.
    engine = TorchEngine.from_model(model, tok, EngineLimits(max_batch_size=4, max_input_len=64, max_seq_len=96), device="cpu")
    ours = QuantgateLM(engine, batch_size=4, show_progress=False)
    assert ours.max_length == 63
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=ours.max_length, device="cpu")
    assert hf.prefix_token_id == ours.prefix_token_id
    return ours, hf


def _texts() -> list[str]:
    from tests.tiny import corpus_text

    text = corpus_text(40_000)
    return [text[i : i + n] for i, n in ((100, 900), (5000, 300), (9000, 1500), (20000, 40))]


def test_loglikelihood_matches_hflm(pair):
    ours, hf = pair
    texts = _texts()
    cases = [
        ("The for statement is used to", " iterate over the elements"),
        ("The for statement is used to ", "iterate"),  # trailing space moves to the continuation
        ("", "Python is a programming language"),  # empty context: prefix token
        (texts[1][:120], texts[1][120:160]),
        ("x = 1\ny =", " 2"),
        ("A", " B"),
        (texts[3], " and"),
    ]
    reqs = [_inst("loglikelihood", c, i) for i, c in enumerate(cases)]
    a = ours.loglikelihood(reqs)
    b = hf.loglikelihood(reqs, disable_tqdm=True)
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, abs=1e-4)
        assert ga == gb
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) < 1e-4


def test_loglikelihood_rolling_matches_hflm(pair):
    ours, hf = pair
    reqs = [_inst("loglikelihood_rolling", (t,), i) for i, t in enumerate(_texts())]
    a = ours.loglikelihood_rolling(reqs)
    b = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-4)
    # the long documents really were split into several windows
    assert ours.stats["align"].requests > len(reqs)


def test_generate_until_matches_hflm(pair):
    ours, hf = pair
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    prompts = ["The for statement", "Class definitions", "The import system", "An expression statement is"]
    reqs = [_inst("generate_until", (p, dict(gen)), i) for i, p in enumerate(prompts)]
    a = ours.generate_until(reqs)
    b = hf.generate_until(reqs, disable_tqdm=True)
    assert a == b
    assert any(s.strip() for s in a)


def test_too_long_request_fails_with_one_line(pair):
    ours, _ = pair
    long_ctx = " ".join(["word"] * 400)
    with pytest.raises(StageError) as err:
        ours.loglikelihood([_inst("loglikelihood", (long_ctx, " end"), 0)])
    msg = str(err.value)
    assert "\n" not in msg and "never truncates" in msg and "longest" in msg


def test_shared_context_scoring_equals_the_slow_path(pair):
    """Engine.score_choices (context run once; KV-cache reuse for longer choices) gives the same
    log-likelihoods and greedy flags as scoring every (context, choice) pair on its own."""
    from quantgate.evaluation.lm_eval_adapter import QuantgateLM

    engine = pair[0].engine
    assert engine.shares_prefixes
    ours = QuantgateLM(engine, batch_size=4, show_progress=False)
    slow = QuantgateLM(engine, batch_size=4, show_progress=False, share_contexts=False)
    texts = _texts()
    cases = []
    for i, (ctx, conts) in enumerate([
        ("Question: which letter?\nAnswer:", [" A", " B", " C", " D"]),  # one-token choices: one forward
        (texts[1][:80], [" the end of it all", " and", " a long continuation of the text", " x"]),
        (texts[0][:40], [" so it goes on", " then"]),
        ("x", [" y z", " 1 2 3 4 5"]),
        (texts[2][:60], [texts[2][60:90]]),
    ]):
        cases += [_inst("loglikelihood", (ctx, c), i) for c in conts]
    a = ours.loglikelihood(cases)
    b = slow.loglikelihood(cases)
    assert len(a) == len(b) == len(cases)
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, abs=1e-4)
        assert ga == gb
    # the shared path sent fewer tokens through the engine
    assert ours.stats["align"].tokens < slow.stats["align"].tokens


@pytest.mark.parametrize("max_gen_toks", [10, 40])
def test_shared_prefix_generation_equals_plain_generation(pair, max_gen_toks):
    """Few-shot prompts sharing their exemplars: the prefix runs once (Engine.generate_shared),
    the generations equal plain batched generation and lm-eval's HF backend. At 40 tokens rows
    stop at different steps, so finished rows leave the batch and its KV cache mid-generation."""
    from quantgate.evaluation.lm_eval_adapter import QuantgateLM, _common_prefix

    engine, hf = pair[0].engine, pair[1]
    shot = "The for statement is used to iterate over the elements of a sequence.\n\n"
    ends = ["Class definitions", "The import system", "An expression", "x", "The while statement is used for"]
    gen = {"until": ["\n\n", "."], "max_gen_toks": max_gen_toks, "do_sample": False}
    reqs = [_inst("generate_until", (shot + e, dict(gen)), i) for i, e in enumerate(ends)]
    fast = QuantgateLM(engine, batch_size=4, show_progress=False)
    slow = QuantgateLM(engine, batch_size=4, show_progress=False, share_contexts=False)
    assert len(_common_prefix([fast.encoder.encode_generation_context(shot + e) for e in ends])) >= 16
    a, b = fast.generate_until(reqs), slow.generate_until(reqs)
    assert a == b
    if max_gen_toks == 10:  # lm-eval's HF backend cuts contexts to max_length - max_gen_toks (63 - 40 is too short)
        assert a == hf.generate_until(reqs, disable_tqdm=True)
    assert any(s.strip() for s in a)
    assert fast.stats["align"].tokens < slow.stats["align"].tokens



def test_encoding_memo_reuses_ids_across_tokenizer_objects_and_keeps_them_apart(tmp_path, tiny_model_dir, monkeypatch):
    """A second TokenEncoder over an identical tokenizer (the candidate's export) gets the same
    ids without calling the tokenizer; a tokenizer with another vocabulary does not share them."""
    from transformers import AutoTokenizer

    from quantgate.evaluation.lm_eval_adapter import ENCODING_MEMO, TokenEncoder
    from tests.tiny import build_tokenizer

    ENCODING_MEMO.clear()
    texts = [t[:200] for t in _texts()] + ["<|endoftext|>" + _texts()[0][:50]]
    pairs = [(t[:-7], t[-7:]) for t in texts]
    first = TokenEncoder(AutoTokenizer.from_pretrained(tiny_model_dir)).encode_pairs(pairs)
    assert ENCODING_MEMO.tokens > 0

    tok2 = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = []
    original = type(tok2).__call__
    monkeypatch.setattr(type(tok2), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    assert TokenEncoder(tok2).encode_pairs(pairs) == first
    assert calls == []

    other = build_tokenizer(tmp_path / "other", vocab_size=300)
    assert ENCODING_MEMO.tokenizer_key(other) != ENCODING_MEMO.tokenizer_key(tok2)
    got = TokenEncoder(other).encode_pairs(pairs[:-1])
    assert calls  # encoded, not looked up
    monkeypatch.setattr(ENCODING_MEMO, "tokenizer_key", lambda tok: None)  # no memo: encoded afresh
    assert got == TokenEncoder(other).encode_pairs(pairs[:-1])
    assert got != first[:-1]
    ENCODING_MEMO.clear()

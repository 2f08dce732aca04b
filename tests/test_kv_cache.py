"""The reserved KV cache (quantgate/engines/kv_cache.py) gives what DynamicCache gives, without
re-copying the cache per decode step."""

import pytest
import torch

from quantgate.engines import kv_cache
from quantgate.engines.kv_cache import reserved_cache, supports_reserved_cache


def _random_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa", **overrides)
    return LlamaForCausalLM(cfg).eval()


def _decode(model, cache, steps: int = 6):
    """A left-padded batch (rows of 9, 5, 1 real tokens), then greedy decode steps with the mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out, x, m = [], ids, mask
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=x, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits)
            x = logits.argmax(-1, keepdim=True)
            pos = pos[:, -1:] + 1
            m = torch.cat([m, torch.ones_like(x)], dim=1)
    return torch.stack(out)


@pytest.mark.parametrize("capacity", [9 + 5, 4])  # exactly the prompt + 5 decode steps; too small (grows once)
def test_reserved_cache_equals_dynamic_cache(capacity):
    from transformers import DynamicCache

    model = _random_llama()
    ref = _decode(model, DynamicCache(config=model.config))
    cache = reserved_cache(model, capacity)
    got = _decode(model, cache)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert cache.get_seq_length() == 9 + 5
    layer = cache.layers[0]
    assert layer.keys.shape == (3, 2, 14, 8) and layer.keys.data_ptr() == layer._k.data_ptr()  # a view of the buffer


def test_decode_steps_write_in_place():
    """The buffer is allocated once: decode steps write their slot, nothing is re-copied."""
    model = _random_llama()
    cache = reserved_cache(model, 20)
    ptrs = []
    ids = torch.randint(1, 97, (2, 5))
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(4):
            ptrs.append([layer._k.data_ptr() for layer in cache.layers])
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert all(p == ptrs[0] for p in ptrs) and cache.get_seq_length() == 9


def test_selecting_rows_keeps_their_cache():
    from transformers import DynamicCache

    model = _random_llama()
    ids = torch.randint(1, 97, (4, 6))
    ref, res = DynamicCache(config=model.config), reserved_cache(model, 10)
    with torch.inference_mode():
        for cache in (ref, res):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache.reorder_cache(torch.tensor([3, 1]))
        a = model(input_ids=ids[[3, 1], :1], past_key_values=ref, use_cache=True).logits
        b = model(input_ids=ids[[3, 1], :1], past_key_values=res, use_cache=True).logits
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert res.layers[0]._k.shape[2] == 10  # the reserve survives the selection


def test_only_plain_full_attention_models_get_it():
    assert supports_reserved_cache(_random_llama())
    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16))
    assert not supports_reserved_cache(sliding)


@pytest.mark.parametrize("path", ["shared_prefix", "hf_generate", "score_choices"])
def test_engine_results_are_unchanged_by_the_reserved_cache(tiny_model_dir, monkeypatch, path):
    """Generation (quantgate's decode loop, dropping finished rows in bulk, and transformers'
    generate) and multiple-choice scoring equal the DynamicCache path token for token."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from quantgate.engines.base import ChoiceRequest, EngineLimits
    from quantgate.engines.torch_engine import TorchEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prefix = tok("def add(a, b):\n    return a + b\n\n").input_ids
    texts = ["def mul(a, b):", "for i in range(10):\n", "x", "import os", "class A:", "while True:", "# a comment",
             "print(1)", "y = [", "if x:", "return", "def f():\n    ", "a = 1\nb = 2", "try:", "with open(p) as f:", "z"]
    suffixes = [tok(s).input_ids for s in texts]
    results = []
    drops = []  # batch sizes after each drop of finished rows from a reserved cache
    select = kv_cache.ReservedLayer.batch_select_indices

    def spy(layer, indices):
        drops.append(len(indices))
        return select(layer, indices)

    monkeypatch.setattr(kv_cache.ReservedLayer, "batch_select_indices", spy)
    for reserved in (False, True):
        monkeypatch.setattr(kv_cache, "supports_reserved_cache", lambda model, r=reserved: r)
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
        engine = TorchEngine.from_model(model, tok, EngineLimits(max_batch_size=16), device="cpu")
        if path == "shared_prefix":  # quantgate's own decode loop (torch_prefix.generate_shared)
            out = engine.generate_shared(prefix, suffixes, 24, stop=("\n",))
            results.append([(g.token_ids, g.text, g.finish_reason) for g in out])
        elif path == "hf_generate":
            out = engine.generate([prefix + s for s in suffixes], 24, stop=("\n\n",))
            results.append([(g.token_ids, g.text, g.finish_reason) for g in out])
        else:
            reqs = [ChoiceRequest(prefix + s, [tok(" a = 1").input_ids, tok(" return x + y").input_ids]) for s in suffixes]
            out = engine.score_choices(reqs)
            results.append([[(round(sum(r.logprobs), 4), r.greedy) for r in rs] for rs in out])
    assert results[0] == results[1]
    if path == "shared_prefix":  # rows stopped at different steps, and finished rows left the batch in bulk
        assert len({len(r[0]) for r in results[1]}) >= 2 and drops and all(n < 16 for n in drops)

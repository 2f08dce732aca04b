"""Grouped decode attention (quantgate/engines/attention.py) computes what transformers' sdpa does."""

import pytest
import torch

from quantgate.engines.attention import NAME, use_grouped_decode_attention


def _random_gqa_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_grouped_decode_attention_equals_sdpa_on_padded_decode_steps(monkeypatch):
    from transformers import DynamicCache

    # Record SDPA's query shapes: the grouped path puts the 4 query heads of each of the 2 KV
    # heads in the query-length slot, (n, 2, 4, d); transformers' sdpa calls it with (n, 8, q, d).
    shapes: list[tuple[int, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        shapes.append(tuple(q.shape))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    ref, new = _random_gqa_llama(), _random_gqa_llama()
    assert use_grouped_decode_attention(new) and new.config._attn_implementation == NAME
    # left-padded batch: rows of 9, 5 and 1 real tokens, then 6 greedy decode steps with the mask
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    outs = []
    for model in (ref, new):
        cache, m, x, steps = DynamicCache(config=model.config), mask.clone(), ids, []
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            for _ in range(6):
                logits = model(input_ids=x, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
                steps.append(logits)
                x = logits.argmax(-1, keepdim=True)
                pos = pos[:, -1:] + 1
                m = torch.cat([m, torch.ones_like(x)], dim=1)
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert sum(sh[1:3] == (2, 4) for sh in shapes) == 5 * 2  # 5 decode steps x 2 layers took the grouped path


def test_models_without_grouped_heads_keep_sdpa():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    assert not use_grouped_decode_attention(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_engine_generation_is_unchanged_by_grouped_decode_attention(tiny_model_dir, shared_prefix):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prefix = tok("def add(a, b):\n    return a + b\n\n").input_ids
    suffixes = [tok(s).input_ids for s in ("def mul(a, b):", "for i in range(10):\n", "x")]
    gens = []
    for grouped in (False, True):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
        engine = TorchEngine.from_model(model, tok, EngineLimits(max_batch_size=3), device="cpu")
        if grouped:
            assert use_grouped_decode_attention(engine.model)
        if shared_prefix:  # quantgate's own decode loop (torch_prefix.generate_shared)
            out = engine.generate_shared(prefix, suffixes, 24, stop=("\n\n",))
        else:  # transformers' generate
            out = engine.generate([prefix + s for s in suffixes], 24, stop=("\n\n",))
        gens.append([(g.token_ids, g.text) for g in out])
    assert gens[0] == gens[1]

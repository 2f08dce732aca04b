"""Fixed-shape decode (quantgate/engines/decode_graph.py): the same tokens as the shrinking eager
loop, every row kept to the end; on CUDA, graph replays give exactly the eager fixed-shape tokens."""

import pytest
import torch

from quantgate.engines import kv_cache

TEXTS = ["def mul(a, b):", "for i in range(10):\n", "x", "import os", "class A:", "while True:", "# a comment",
         "print(1)", "y = [", "if x:", "return", "def f():\n    ", "a = 1\nb = 2", "try:", "with open(p) as f:", "z"]


def _generations(model_dir, modes, device="cpu", dtype=torch.float32, grouped=True):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from quantgate.engines.attention import use_grouped_decode_attention
    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    prefix = tok("def add(a, b):\n    return a + b\n\n").input_ids
    suffixes = [tok(s).input_ids for s in TEXTS]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    if grouped:  # as TorchEngine.load does; else transformers' sdpa gets the fixed-shape mask
        assert use_grouped_decode_attention(model)
    engine = TorchEngine.from_model(model, tok, EngineLimits(max_batch_size=8), device=device)
    out, stats = {}, {}
    for mode in modes:
        engine.decode_mode = mode
        engine._one_time.clear()
        gens = engine.generate_shared(prefix, suffixes, 24, stop=("\n",))
        out[mode] = [(g.token_ids, g.text, g.finish_reason) for g in gens]
        stats[mode] = dict(engine.one_time_costs())
    return out, stats


@pytest.mark.parametrize("grouped", [True, False])
def test_fixed_shapes_give_the_shrinking_loops_tokens(tiny_model_dir, monkeypatch, grouped):
    """Rows stop at different steps (stop string, EOS, length): the fixed-shape decode keeps them in
    the batch and masks nothing wrongly: token ids, texts and finish reasons all equal."""
    drops = []
    select = kv_cache.ReservedLayer.batch_select_indices

    def spy(layer, indices):
        drops.append(len(indices))
        return select(layer, indices)

    monkeypatch.setattr(kv_cache.ReservedLayer, "batch_select_indices", spy)
    out, stats = _generations(tiny_model_dir, ["shrinking"], grouped=grouped)
    shrink_drops, drops[:] = list(drops), []
    out2, stats2 = _generations(tiny_model_dir, ["fixed"], grouped=grouped)
    assert out2["fixed"] == out["shrinking"]
    assert len({len(t) for t, _, _ in out["shrinking"]}) >= 2 and shrink_drops  # the shrinking loop did drop rows
    assert not drops  # the fixed one never did
    assert stats2["fixed"]["decode_batches"] == 2 and stats2["fixed"]["decode_eager_steps"] > 0
    assert stats2["fixed"]["decode_graph_replays"] == 0 and "decode_batches" not in stats["shrinking"]


def test_freezing_zeroes_the_unwritten_slots_and_capacity_must_be_aligned():
    """A fixed-shape step reads every slot and masks the unwritten ones; NaN bits there would still
    poison the softmax (q.k + -inf is NaN), so freezing zeroes them: a poisoned tail changes nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantgate.engines.decode_graph import ALIGN, FixedShapeDecoder, aligned

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")).eval()
    ids = torch.randint(1, 97, (2, 5))
    nexts = []
    with torch.inference_mode():  # as generate_shared runs
        for poison in (False, True, None):
            capacity = aligned(9) if poison is not None else 9
            cache = kv_cache.reserved_cache(model, capacity)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            layer = cache.layers[0]
            assert layer._k.shape[2] == capacity
            if poison:
                for lay in cache.layers:
                    lay._k[:, :, 5:] = float("nan")
                    lay._v[:, :, 5:] = float("nan")
            if poison is None:
                with pytest.raises(ValueError, match="aligned capacity"):
                    FixedShapeDecoder(model, cache, torch.ones_like(ids), torch.full((2,), 5), graph=False)
                continue
            assert capacity % ALIGN == 0
            dec = FixedShapeDecoder(model, cache, torch.ones_like(ids), torch.full((2,), 5), graph=False)
            assert torch.count_nonzero(layer._k[:, :, 5:]) == 0 and torch.count_nonzero(layer._v[:, :, 5:]) == 0
            nexts.append([dec.step(torch.tensor([3, 4])).tolist() for _ in range(3)])
            assert int(dec._slot) == 8 and layer.keys.shape[2] == 5  # the views of the eager path untouched
    assert nexts[0] == nexts[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_fixed_shape_steps(tiny_model_dir):
    """Same kernels, same buffers: replays give the eager fixed-shape tokens exactly; against the
    shrinking loop (other shapes, maybe other rounding) the tokens are recorded, mostly equal."""
    out, stats = _generations(tiny_model_dir, ["fixed", "graph", "shrinking"], device="cuda", dtype=torch.bfloat16)
    assert out["graph"] == out["fixed"]
    g = stats["graph"]
    assert g["decode_graph_replays"] > 0 and g["decode_graph_capture_s"] > 0
    same = sum(a == b for a, b in zip(out["graph"], out["shrinking"], strict=True))
    assert same >= len(TEXTS) * 3 // 4, f"{same}/{len(TEXTS)} rows equal the shrinking loop's"

"""Fixed-shape decode (quantgate/engines/decode_graph.py): the same tokens as the shrinking eager
loop, every row kept to the end; on CUDA, graph replays give exactly the eager fixed-shape tokens."""

import pytest
import torch

from quantgate.engines import kv_cache

TEXTS = ["def mul(a, b):", "for i in range(10):\n", "x", "import os", "class A:", "while True:", "# a comment",
         "print(1)", "y = [", "if x:", "return", "def f():\n    ", "a = 1\nb = 2", "try:", "with open(p) as f:", "z"]


# 16 rows at max_batch_size 8: shared_decode_rows puts 12 in a batch (> 8: the KV token budget
# of 8 x 96 tokens holds 12 rows of 64 reserved slots), so there are two batches, of 12 and 4.
LIMITS = {"max_batch_size": 8, "max_input_len": 64, "max_seq_len": 96}


def _generations(model_dir, modes, device="cpu", dtype=torch.float32, grouped=True, **kwargs):
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
    engine = TorchEngine.from_model(model, tok, EngineLimits(**LIMITS), device=device)
    out, stats = {}, {}
    for mode in modes:
        engine.decode_mode = mode
        engine._one_time.clear()
        if kwargs:
            from quantgate.engines.torch_prefix import generate_shared

            gens = generate_shared(engine, prefix, suffixes, 24, stop=("\n",), **kwargs)
        else:
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
    assert stats2["fixed"]["decode_batches"] == 2 and stats2["fixed"]["decode_eager_steps"] > 0  # 12 + 4 rows
    assert stats2["fixed"]["decode_graph_replays"] == 0 and "decode_batches" not in stats["shrinking"]


def test_shared_decode_rows_fill_one_full_batchs_kv_tokens():
    from quantgate.engines.torch_prefix import shared_decode_rows

    # GSM8K-CoT-like: 800-token prefix, suffixes up to 160, 256 new -> 1216 slots a row
    assert shared_decode_rows(64, 2304, 800, [160, 90, 60] * 500, 256) == 64 * 2304 // 1216 == 121
    assert shared_decode_rows(64, 2304, 800, [160] * 100, 256) == 100  # never more rows than prompts
    assert shared_decode_rows(64, 2304, 2000, [200] * 500, 2048) == 64  # never fewer than max_batch_size
    assert shared_decode_rows(8, 96, 10, [], 24) == 8
    from quantgate.engines.decode_graph import aligned

    for mbs, seq, prefix, n, suffix, new in ((64, 2304, 800, 1319, 160, 256), (8, 96, 10, 16, 12, 24), (4, 512, 37, 90, 21, 5)):
        rows = shared_decode_rows(mbs, seq, prefix, [suffix] * n, new)
        per_row = aligned(prefix + suffix + new)
        assert rows <= n and (rows == mbs or rows * per_row <= mbs * seq)  # within the memory plan's KV tokens
        assert rows == n or rows == mbs or (rows + 1) * per_row > mbs * seq  # and no row more would fit


def test_overlapped_steps_give_the_same_tokens_and_discard_at_most_one_step_a_batch(tiny_model_dir, monkeypatch):
    """Step t+1 queued before step t's tokens are read (overlap) changes no token, text or finish
    reason; it computes at most one step per batch more, whose tokens nobody reads."""
    from quantgate.engines import decode_graph, torch_prefix

    events = []
    step, read = decode_graph.FixedShapeDecoder.step, torch_prefix._StepTokens.read

    def spy_step(dec, tok):
        events.append("step")
        return step(dec, tok)

    def spy_read(reader):
        events.append("read")
        return read(reader)

    monkeypatch.setattr(decode_graph.FixedShapeDecoder, "step", spy_step)
    monkeypatch.setattr(torch_prefix._StepTokens, "read", spy_read)
    out_a, _ = _generations(tiny_model_dir, ["fixed"], overlap=False)
    plain, events[:] = list(events), []
    out_b, stats = _generations(tiny_model_dir, ["fixed"], overlap=True)
    assert out_b == out_a
    assert plain[:2] == ["read", "step"] and events[:2] == ["step", "read"]  # the next step queued first
    assert plain.count("read") == events.count("read")
    assert plain.count("step") <= events.count("step") <= plain.count("step") + stats["fixed"]["decode_batches"]
    _, stats_c = _generations(tiny_model_dir, ["fixed"], rows_per_batch=5)  # rows as asked: 5 + 5 + 5 + 1
    assert stats_c["fixed"]["decode_batches"] == 4


@pytest.mark.parametrize("mode", ["fixed", "shrinking"])
def test_rows_per_batch_change_no_token_in_float32(tiny_model_dir, mode):
    """Each row's generation is its own whatever batch it lands in (fp32 on the CPU: no rounding
    differences between batch shapes), so a wrong row-to-output mapping would show here."""
    outs = [_generations(tiny_model_dir, [mode], rows_per_batch=r)[0][mode] for r in (3, 7, 16)]
    assert outs[0] == outs[1] == outs[2]


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
    serial, _ = _generations(tiny_model_dir, ["graph"], device="cuda", dtype=torch.bfloat16, overlap=False)
    assert serial["graph"] == out["graph"]  # queuing step t+1 before reading step t changes no token
    g = stats["graph"]
    assert g["decode_graph_replays"] > 0 and g["decode_graph_capture_s"] > 0
    same = sum(a == b for a, b in zip(out["graph"], out["shrinking"], strict=True))
    assert same >= len(TEXTS) * 3 // 4, f"{same}/{len(TEXTS)} rows equal the shrinking loop's"

"""Shared-context scoring for the torch backend (issue 11): `Engine.score_choices` without
re-running a multiple-choice item's context once per choice.

- pass 1: the contexts of a batch of items, right-padded, through the decoder with a KV cache;
  the last context position gives every continuation's first-token log-prob. When all
  continuations are one token (MMLU's " A".." D") that is the whole item: one forward.
- pass 2 (continuations longer than one token, e.g. HellaSwag endings): each continuation's
  tokens but the last run on a copy of its item's cache, with explicit positions and the
  context's padding masked, so each continuation sees exactly its own context.

The numbers equal scoring `context + continuation` in one forward up to float rounding
(tests/test_standard_tasks.py checks per-item accuracy and log-likelihoods within 1e-4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from quantgate.engines.base import (
    ChoiceRequest,
    EngineLimits,
    Generation,
    ScoreRequest,
    ScoreResult,
    trim_at_stop,
)
from quantgate.engines.decode_graph import aligned
from quantgate.errors import StageError

if TYPE_CHECKING:
    from quantgate.engines.torch_engine import TorchEngine


def supports_shared_prefix(model: Any) -> bool:
    """Plain decoder + output head, no logit post-processing, no sliding-window layers."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(model, "get_decoder", None) is None or model.get_output_embeddings() is None:
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False


def _lp_rows(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1)


def score_segments(head: Callable[[torch.Tensor], torch.Tensor], segments: Sequence[torch.Tensor],
                   targets: Sequence[Sequence[int]], top_k: int = 0) -> list[ScoreResult]:
    """Log-probs and greedy flags of `targets[i]` given hidden states `segments[i]` ([n_i, d]).
    One vocab projection for all segments: the head's weight (vocab x d, 113 MB for SmolLM2 in
    fp32) is read once per batch instead of once per continuation, which on CPU cost more than
    the continuations' own decoder layers."""
    hidden = torch.cat(list(segments), dim=0)
    lp = _lp_rows(head, hidden)
    flat = torch.tensor([t for ts in targets for t in ts], device=lp.device)
    tok_lp = lp.gather(1, flat[:, None]).squeeze(1).tolist()
    greedy = (lp.argmax(dim=-1) == flat).tolist()
    top = lp.topk(min(top_k, lp.shape[-1]), dim=-1) if top_k else None
    out, at = [], 0
    for ts in targets:
        n = len(ts)
        res = ScoreResult(tok_lp[at : at + n], greedy[at : at + n])
        if top is not None:
            res.top_ids, res.top_logprobs = top.indices[at : at + n].tolist(), top.values[at : at + n].tolist()
        out.append(res)
        at += n
    return out


@torch.inference_mode()
def score_choices_shared(engine: TorchEngine, requests: Sequence[ChoiceRequest]) -> list[list[ScoreResult]]:
    # One multi-token continuation (LAMBADA's last word): nothing to share, so context and
    # continuation run in one forward, without a KV cache to copy.
    alone = [i for i, r in enumerate(requests) if len(r.continuations) == 1 and len(r.continuations[0]) > 1]
    shared = [i for i in range(len(requests)) if i not in set(alone)]
    out: list[list[ScoreResult]] = [[] for _ in requests]
    if alone:
        reqs = [ScoreRequest([*requests[i].context, *requests[i].continuations[0]], len(requests[i].context)) for i in alone]
        for i, r in zip(alone, engine.score(reqs), strict=True):
            out[i] = [r]
    if shared:
        for i, rs in zip(shared, _score_choices_cached(engine, [requests[i] for i in shared]), strict=True):
            out[i] = rs
    return out


def _score_choices_cached(engine: TorchEngine, requests: Sequence[ChoiceRequest]) -> list[list[ScoreResult]]:
    model = engine.model
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    dev = engine.device
    limits = engine.limits
    out: list[list[ScoreResult | None]] = [[None] * len(r.continuations) for r in requests]
    for r in requests:
        if not r.context or any(not c for c in r.continuations):
            raise ValueError("score_choices needs a non-empty context and non-empty continuations")
        longest = len(r.context) + max(len(c) for c in r.continuations)
        if longest > limits.max_seq_len:
            raise StageError("engine", f"sequence of {longest} tokens exceeds engine.max_seq_len={limits.max_seq_len}")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
    bs = limits.max_batch_size
    for b in range(0, len(order), bs):
        idx = order[b : b + bs]
        ctxs = [requests[i].context for i in idx]
        width = max(len(c) for c in ctxs)
        ids = torch.full((len(idx), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, c in enumerate(ctxs):
            ids[row, : len(c)] = torch.tensor(c)
            mask[row, : len(c)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        multi = any(len(c) > 1 for i in idx for c in requests[i].continuations)
        res = decoder(input_ids=ids, attention_mask=mask, use_cache=multi)
        hidden = res.last_hidden_state
        last = torch.tensor([len(c) - 1 for c in ctxs], device=dev)
        lp0 = _lp_rows(head, hidden[torch.arange(len(idx), device=dev), last])  # [B, vocab]
        # every continuation's first token, gathered on the device and read back once per batch
        # (one read per element is a device sync each: ~500 per MMLU batch)
        keys = [(row, j) for row, i in enumerate(idx) for j in range(len(requests[i].continuations))]
        first_tok = [requests[idx[row]].continuations[j][0] for row, j in keys]
        at_rows = torch.tensor([row for row, _ in keys], device=dev)
        lp_first = lp0[at_rows, torch.tensor(first_tok, device=dev)].tolist()
        greedy0 = lp0.argmax(dim=-1).tolist()
        firsts: dict[tuple[int, int], tuple[float, bool]] = {
            (row, j): (lp, greedy0[row] == t) for (row, j), lp, t in zip(keys, lp_first, first_tok, strict=True)}
        # (batch row, choice) of continuations longer than 1 token
        rows = [(row, j) for row, j in keys if len(requests[idx[row]].continuations[j]) > 1]
        rest: dict[tuple[int, int], tuple[list[float], list[bool]]] = {}
        if rows:
            cache = res.past_key_values
            # Rows of similar length share a forward (choices vary a lot: unsorted rows padded
            # to the longest wasted ~40 % of the tokens on the default suite).
            rows.sort(key=lambda rj: -len(requests[idx[rj[0]]].continuations[rj[1]]))
            step = max(bs * 2, 1)
            for s in range(0, len(rows), step):
                chunk = rows[s : s + step]
                conts = [requests[idx[row]].continuations[j] for row, j in chunk]
                m = max(len(c) - 1 for c in conts)
                x = torch.full((len(chunk), m), engine.pad_id, dtype=torch.long)
                xmask = torch.zeros((len(chunk), m), dtype=torch.long)
                pos = torch.zeros((len(chunk), m), dtype=torch.long)
                for k, ((row, _j), c) in enumerate(zip(chunk, conts, strict=True)):
                    x[k, : len(c) - 1] = torch.tensor(c[:-1])
                    xmask[k, : len(c) - 1] = 1
                    pos[k] = len(ctxs[row]) + torch.arange(m)
                sel = torch.tensor([row for row, _ in chunk], device=dev)
                sub = _rows_of(model, cache, sel, width + m, last_use=s + step >= len(rows))
                full_mask = torch.cat([mask.index_select(0, sel), xmask.to(dev)], dim=1)
                h = decoder(input_ids=x.to(dev), attention_mask=full_mask, position_ids=pos.to(dev),
                            past_key_values=sub, use_cache=True).last_hidden_state
                del sub
                scored = score_segments(head, [h[k, : len(c) - 1] for k, c in enumerate(conts)], [c[1:] for c in conts])
                for (row, j), r in zip(chunk, scored, strict=True):
                    rest[(row, j)] = (r.logprobs, r.greedy)
        for row, i in enumerate(idx):
            for j in range(len(requests[i].continuations)):
                lp, g = firsts[(row, j)]
                more_lp, more_g = rest.get((row, j), ([], []))
                out[i][j] = ScoreResult([lp, *more_lp], [g, *more_g])
    return out  # type: ignore[return-value]


def _rows_of(model: Any, cache: Any, rows: torch.Tensor, capacity: int, *, last_use: bool) -> Any:
    """A cache of `cache`'s rows `rows`, to be extended by a forward (a reserved buffer where the
    model allows; else deep copy + reorder, which the last use can skip)."""
    from quantgate.engines.kv_cache import reserved_select, supports_reserved_cache

    if supports_reserved_cache(model):
        return reserved_select(model, cache, rows, capacity)
    sub = cache if last_use else copy.deepcopy(cache)
    sub.reorder_cache(rows)
    return sub


def _prefix_copies(model: Any, prefix_cache: Any, rows: int, capacity: int) -> Any:
    """`rows` copies of a batch-1 prefix cache, with room for `capacity` tokens where the model allows."""
    from quantgate.engines.kv_cache import reserved_copy, supports_reserved_cache

    if supports_reserved_cache(model):
        return reserved_copy(model, prefix_cache, rows, capacity)
    cache = copy.deepcopy(prefix_cache)
    cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=prefix_cache.layers[0].keys.device))
    return cache


def _finish(engine: TorchEngine, new: list[int], stop: Sequence[str]) -> Generation:
    """The same trimming as TorchEngine.generate: EOS first, then the earliest stop string."""
    reason = "length"
    for j, t in enumerate(new):
        if t in engine.eos_token_ids:
            new, reason = new[:j], "eos"
            break
    text = engine.tokenizer.decode(new, skip_special_tokens=True)
    text, stopped = trim_at_stop(text, stop)
    return Generation(new, text, "stop" if stopped else reason)


# How generate_shared groups rows (part of the engine's identity: a batch's shapes may change rounding).
SHARED_DECODE_BATCHING = "token-budget/1"


def shared_decode_rows(max_batch_size: int, max_seq_len: int, prefix_len: int, suffix_lens: Sequence[int], max_new_tokens: int) -> int:
    """Rows per generate_shared batch (EngineLimits.rows_within_batch_tokens at each row's reserved
    KV capacity): GSM8K-CoT's 1,216-slot rows at max_batch_size 64 / max_seq_len 2304 decode 121
    to a step instead of 64 (bench/decode_modes.py measures it)."""
    if not suffix_lens:
        return max_batch_size
    per_row = aligned(prefix_len + max(suffix_lens) + max(max_new_tokens, 1))
    return EngineLimits(max_batch_size, max_seq_len, max_seq_len).rows_within_batch_tokens(len(suffix_lens), per_row)


@torch.inference_mode()
def generate_shared(
    engine: TorchEngine, prefix: list[int], suffixes: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (),
    *, rows_per_batch: int | None = None, overlap: bool = True,
) -> list[Generation]:
    """Greedy generation for prompts `prefix + suffix`: the prefix (e.g. GSM8K-CoT's 8 exemplars)
    runs ONCE; each batch (longest suffix first) continues from a copy of its KV cache. Suffixes
    are left-padded after the prefix (padding masked, positions explicit), so every row sees
    exactly its own prompt; a row stops at EOS or a stop string, the batch when all rows have.
    `rows_per_batch` (None: shared_decode_rows) and `overlap` (see _decode_fixed_shape) are for
    bench/decode_modes.py's comparisons."""
    model = engine.model
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    dev, limits = engine.device, engine.limits
    if not prefix:
        return engine.generate([list(s) for s in suffixes], max_new_tokens, stop=stop)
    for s in suffixes:
        if len(prefix) + len(s) > limits.max_input_len:
            raise StageError("engine", f"prompt of {len(prefix) + len(s)} tokens exceeds engine.max_input_len={limits.max_input_len}")
    mode = decode_mode(engine)
    fixed = mode != "shrinking"
    base = decoder(input_ids=torch.tensor([prefix], device=dev), use_cache=True)
    prefix_cache, p_len = base.past_key_values, len(prefix)
    prefix_last = base.last_hidden_state[0, -1]
    out: list[Generation | None] = [None] * len(suffixes)
    order = sorted(range(len(suffixes)), key=lambda i: -len(suffixes[i]))
    step_rows = rows_per_batch or shared_decode_rows(limits.max_batch_size, limits.max_seq_len, p_len, [len(s) for s in suffixes], max_new_tokens)
    for b in range(0, len(order), step_rows):
        idx = order[b : b + step_rows]
        rows = [list(suffixes[i]) for i in idx]
        n = len(idx)
        width = max(len(r) for r in rows)
        budget = max(min(max_new_tokens, limits.max_seq_len - p_len - width), 1)
        capacity = p_len + width + budget
        cache = _prefix_copies(model, prefix_cache, n, aligned(capacity) if fixed else capacity)
        mask = torch.ones((n, p_len), dtype=torch.long, device=dev)
        lens = torch.tensor([len(r) for r in rows], device=dev)
        if width:
            x = torch.full((n, width), engine.pad_id, dtype=torch.long)
            xm = torch.zeros((n, width), dtype=torch.long)
            pos = torch.zeros((n, width), dtype=torch.long)
            for k, r in enumerate(rows):
                if r:
                    x[k, width - len(r) :] = torch.tensor(r)
                    xm[k, width - len(r) :] = 1
                    pos[k, width - len(r) :] = p_len + torch.arange(len(r))
            mask = torch.cat([mask, xm.to(dev)], dim=1)
            h = decoder(input_ids=x.to(dev), attention_mask=mask, position_ids=pos.to(dev), past_key_values=cache, use_cache=True).last_hidden_state
            last = h[:, -1]
            # a row with an empty suffix continues from the prefix's last position
            empty = lens == 0
            if bool(empty.any()):
                last = torch.where(empty[:, None], prefix_last.expand_as(last), last)
        else:
            last = prefix_last.expand(n, -1)
        next_pos = p_len + lens
        first = head(last).float().argmax(dim=-1)
        if fixed:
            new = _decode_fixed_shape(engine, cache, mask, next_pos, first, budget, stop, graph=mode == "graph", overlap=overlap)
        else:
            new = _decode_shrinking(engine, cache, mask, next_pos, first, budget, stop)
        for k, i in enumerate(idx):
            out[i] = _finish(engine, new[k], stop)
        del cache  # before the next batch reserves its own: two batches' KV would exceed the memory plan
    return out  # type: ignore[return-value]


class _RowTokens:
    """Each row's generated tokens, and which rows are finished: EOS, or a stop string in the text
    of its last 16 tokens (the full text is trimmed by _finish)."""

    def __init__(self, engine: TorchEngine, rows: int, stop: Sequence[str]) -> None:
        self.engine, self.stop = engine, [s for s in stop if s]
        self.eos = set(engine.eos_token_ids)
        self.new: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def add(self, ids: list[int], present: Sequence[int]) -> None:
        """`ids[j]` is the token of row `present[j]`; finished rows ignore theirs."""
        live = [j for j, k in enumerate(present) if not self.done[k]]
        for j in live:
            self.new[present[j]].append(ids[j])
        # One batched decode per step: per-row, per-stop-string decodes were ~40 ms a step at 128 rows.
        tails = self.engine.tokenizer.batch_decode([self.new[present[j]][-16:] for j in live], skip_special_tokens=True) if self.stop else []
        for t, j in enumerate(live):
            if ids[j] in self.eos or (self.stop and any(s in tails[t] for s in self.stop)):
                self.done[present[j]] = True

    @property
    def all_done(self) -> bool:
        return all(self.done)


def decode_mode(engine: TorchEngine) -> str:
    """How generate_shared decodes (EngineSpec.decode): 'graph' (fixed shapes, one CUDA graph per
    batch: engines/decode_graph.py), 'fixed' (the same shapes, eager) or 'shrinking' (eager,
    finished rows leave the batch). Fixed shapes need the reserved KV cache."""
    from quantgate.engines.kv_cache import supports_reserved_cache
    from quantgate.engines.torch_engine import resolved_decode

    if not supports_reserved_cache(engine.model):
        return "shrinking"
    return resolved_decode(getattr(engine, "decode_mode", "auto"), engine.device)


class _StepTokens:
    """A step's tokens on their way to the host: the copy is queued behind the step, so the next
    step can be queued before this one is read (CUDA: pinned buffer + event; CPU: a plain read)."""

    def __init__(self, like: torch.Tensor) -> None:
        self.event = torch.cuda.Event() if like.is_cuda else None
        self.host = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)

    def start(self, tok: torch.Tensor) -> None:
        self.host.copy_(tok, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _decode_fixed_shape(engine: TorchEngine, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, tok: torch.Tensor,
                        budget: int, stop: Sequence[str], *, graph: bool, overlap: bool = True) -> list[list[int]]:
    """Greedy tokens per row, every row kept to the end; with `graph`, each step one CUDA graph replay.

    With `overlap`, step t+1 is queued on the GPU before step t's tokens are read and checked for
    EOS and stop strings on the CPU (a batched detokenization each step), so that check runs while
    the GPU decodes. The tokens are the same; when every row has finished, the one step queued
    ahead is discarded. Finished rows compute anyway at fixed shapes, so nothing else changes."""
    from quantgate.engines.decode_graph import FixedShapeDecoder

    rows = _RowTokens(engine, len(tok), stop)
    present = range(len(tok))
    dec = FixedShapeDecoder(engine.model, cache, mask, next_pos, graph=graph)
    reader = _StepTokens(tok)
    try:
        reader.start(tok)  # before the step below: a replay overwrites the graph's output buffer
        for step in range(budget):
            last = step == budget - 1
            if overlap and not last:
                tok = dec.step(tok)
            rows.add(reader.read(), present)
            if rows.all_done or last:
                break
            if not overlap:
                tok = dec.step(tok)
            reader.start(tok)
    finally:
        dec.close()
        engine.note_decode(dec.stats())
    return rows.new


def _decode_shrinking(engine: TorchEngine, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, tok: torch.Tensor,
                      budget: int, stop: Sequence[str]) -> list[list[int]]:
    """Greedy tokens per row, eager steps; finished rows leave the batch and its KV cache."""
    decoder, dev = engine.model.get_decoder(), engine.device
    head = engine.model.get_output_embeddings()
    rows = _RowTokens(engine, len(tok), stop)
    present = list(range(len(tok)))  # batch row -> row
    for step in range(budget):
        rows.add(tok.tolist(), present)
        keep = [j for j in range(len(present)) if not rows.done[present[j]]]
        if not keep or step == budget - 1:
            break
        # Drop finished rows from the batch and its KV cache once they are an eighth of it:
        # GSM8K-CoT rows stop at very different lengths, and each drop copies the cache.
        if len(present) - len(keep) >= max(1, len(present) // 8):
            sel = torch.tensor(keep, device=dev)
            cache.reorder_cache(sel)
            mask, tok, next_pos = mask[sel], tok[sel], next_pos[sel]
            present = [present[j] for j in keep]
        mask = torch.cat([mask, torch.ones((len(present), 1), dtype=torch.long, device=dev)], dim=1)
        h = decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=(next_pos + step)[:, None],
                    past_key_values=cache, use_cache=True).last_hidden_state
        tok = head(h[:, -1]).float().argmax(dim=-1)
    return rows.new

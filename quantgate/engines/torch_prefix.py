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

from quantgate.engines.base import ChoiceRequest, ScoreResult
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


@torch.inference_mode()
def score_choices_shared(engine: TorchEngine, requests: Sequence[ChoiceRequest]) -> list[list[ScoreResult]]:
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
        rows: list[tuple[int, int]] = []  # (batch row, choice) of continuations longer than 1 token
        firsts: dict[tuple[int, int], tuple[float, bool]] = {}
        greedy0 = lp0.argmax(dim=-1)
        for row, i in enumerate(idx):
            for j, cont in enumerate(requests[i].continuations):
                t = cont[0]
                firsts[(row, j)] = (float(lp0[row, t]), bool(int(greedy0[row]) == t))
                if len(cont) > 1:
                    rows.append((row, j))
        rest: dict[tuple[int, int], tuple[list[float], list[bool]]] = {}
        if rows:
            cache = res.past_key_values
            step = max(bs * 4, 1)
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
                sub = copy.deepcopy(cache) if s + step < len(rows) else cache
                sub.reorder_cache(sel)
                full_mask = torch.cat([mask.index_select(0, sel), xmask.to(dev)], dim=1)
                h = decoder(input_ids=x.to(dev), attention_mask=full_mask, position_ids=pos.to(dev),
                            past_key_values=sub, use_cache=True).last_hidden_state
                del sub
                for k, ((row, j), c) in enumerate(zip(chunk, conts, strict=True)):
                    n = len(c) - 1
                    lp = _lp_rows(head, h[k, :n])
                    target = torch.tensor(c[1:], device=lp.device)
                    rest[(row, j)] = (lp.gather(1, target[:, None]).squeeze(1).tolist(), (lp.argmax(dim=-1) == target).tolist())
        for row, i in enumerate(idx):
            for j in range(len(requests[i].continuations)):
                lp, g = firsts[(row, j)]
                more_lp, more_g = rest.get((row, j), ([], []))
                out[i][j] = ScoreResult([lp, *more_lp], [g, *more_g])
    return out  # type: ignore[return-value]

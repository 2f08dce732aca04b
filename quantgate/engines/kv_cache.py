"""A KV cache with room reserved for the tokens still to come.

transformers' DynamicCache appends with `torch.cat`: every decode step re-copies each layer's whole
cache. For the Llama-3.1-8B shape at batch 128 and ~900 cached tokens that is ~15 GB read and
written per step, about a third of a step once attention no longer expands K/V per query head
(engines/attention.py). Here each layer's keys/values are views into a buffer sized for the prompt
plus the generation budget: a step writes its one new slot. Views keep the last dim contiguous,
which is all SDPA's kernels need, and every reader (masks, get_seq_length, attention) sees exactly
the cached length, as with DynamicCache, so the numbers are the same.

Dropping finished rows (`batch_select_indices`) copies the buffer once; callers batch those drops.
`freeze()` switches a layer to fixed shapes for CUDA graphs (engines/decode_graph.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are the first `length` slots of a preallocated buffer."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0
        self._slot: torch.Tensor | None = None  # fixed-shape mode: where update() writes

    def _views(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def _allocate(self, like: torch.Tensor, rows: int, capacity: int) -> None:
        shape = (rows, like.shape[1], capacity, like.shape[3])
        k = torch.empty(shape, dtype=like.dtype, device=like.device)
        v = torch.empty(shape, dtype=like.dtype, device=like.device)
        if self._k is not None and self._len:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]  # type: ignore[index]
        self._k, self._v = k, v

    def freeze(self, slot: torch.Tensor) -> None:
        """Fixed-shape mode (engines/decode_graph.py): from now on update() writes its one token at
        `slot`, a 1-element device tensor the caller advances, and returns the WHOLE buffer, so
        shapes never change; attention must mask the slots past the cached length. Those slots are
        zeroed here: a masked score is q.k + (-inf), which is NaN if the slot holds NaN bits."""
        assert self._k is not None and self._v is not None, "freeze() after the prompt's forward"
        self._k[:, :, self._len :].zero_()
        self._v[:, :, self._len :].zero_()
        self._slot = slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._slot is not None:
            assert self._k is not None and self._v is not None
            self._k.index_copy_(2, self._slot, key_states)
            self._v.index_copy_(2, self._slot, value_states)
            return self._k, self._v
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._len + key_states.shape[-2]
        if self._k is None or end > self._k.shape[2]:  # first write, or past the reserve: grow (once)
            self._allocate(key_states, key_states.shape[0], max(end, self.capacity))
        assert self._k is not None and self._v is not None
        self._k[:, :, self._len : end] = key_states
        self._v[:, :, self._len : end] = value_states
        self._len = end
        self._views()
        return self.keys, self.values

    def fill(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        """Start from a cached prefix (batch 1 or `rows`), broadcast to `rows` rows: one write."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._len = 0  # nothing of an earlier buffer is kept
        self._allocate(keys, rows, max(keys.shape[2], self.capacity))
        assert self._k is not None and self._v is not None
        self._k[:, :, : keys.shape[2]] = keys
        self._v[:, :, : keys.shape[2]] = values
        self._len = keys.shape[2]
        self._views()

    def get_seq_length(self) -> int:
        return self._len

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            idx = indices.to(self._k.device)
            self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)  # type: ignore[union-attr]
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)  # type: ignore[union-attr]
            self._views()

    def crop(self, max_length: int) -> None:
        if max_length <= 0:
            max_length = self._len - abs(max_length)
        if self._k is not None and self._len > max_length:
            self._len = max_length
            self._views()


def _text_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    return cfg.get_text_config(decoder=True) if cfg is not None and hasattr(cfg, "get_text_config") else cfg


def supports_reserved_cache(model: Any) -> bool:
    """Only plain full-attention decoders: sliding-window, linear-attention and other layer kinds
    keep transformers' own cache classes."""
    cfg = _text_config(model)
    if cfg is None or not getattr(cfg, "num_hidden_layers", None):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        return False
    layer_types = getattr(cfg, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


def reserved_cache(model: Any, capacity: int) -> DynamicCache:
    """A DynamicCache for `model` whose layers reserve `capacity` tokens per row."""
    cache = DynamicCache()
    cache.layers = [ReservedLayer(capacity) for _ in range(_text_config(model).num_hidden_layers)]
    cache.layer_class_to_replicate = None
    return cache


def reserved_copy(model: Any, prefix: DynamicCache, rows: int, capacity: int) -> DynamicCache:
    """A reserved cache holding `prefix` (batch 1, or `rows` rows) for `rows` rows."""
    cache = reserved_cache(model, capacity)
    for layer, src in zip(cache.layers, prefix.layers, strict=True):
        layer.fill(src.keys, src.values, rows)  # type: ignore[union-attr]
    return cache


def reserved_select(model: Any, source: DynamicCache, rows: torch.Tensor, capacity: int) -> DynamicCache:
    """A reserved cache with `source`'s rows `rows` and room for `capacity` tokens: the rows are
    gathered, then written into the buffer (was: deep copy of all rows, reorder, and a torch.cat
    when the continuation's forward appends)."""
    cache = reserved_cache(model, capacity)
    for layer, src in zip(cache.layers, source.layers, strict=True):
        idx = rows.to(src.keys.device)  # type: ignore[union-attr]
        layer.fill(src.keys.index_select(0, idx), src.values.index_select(0, idx), len(rows))  # type: ignore[union-attr]
    return cache

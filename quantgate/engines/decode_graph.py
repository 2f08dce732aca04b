"""Greedy decode steps at fixed shapes, replayed as one CUDA graph per batch.

An eager decode step of a Llama-3.1-8B-shaped model launches ~1,500 small kernels from Python, and
every step has a new KV length (a new shape for every kernel that caches per shape). In the gate's
GSM8K-CoT a step took ~60 ms at batch 64 on an H100 against ~8 ms of memory traffic (session 7).

Here a batch's decode runs over fixed buffers: the reserved KV cache at its full capacity, frozen so
a step writes its one slot at a device-side index (engines/kv_cache.py); a (rows, 1, 1, capacity)
boolean mask whose next slot is opened before each step; positions and the input token in device
tensors. Nothing in a step depends on a Python value that changes, so on CUDA the step (decoder,
output head, argmax) is captured once per batch and replayed: one launch per token. Rows that
finish stay in the batch (dropping them would change the shapes); their tokens are ignored.

Attending over the whole capacity with the tail masked is the same math as attending over the
cached length; kernels may round otherwise, so the engine's identity names this decode.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

ALIGN = 16  # mask and KV lengths a multiple of 16: the memory-efficient SDPA kernel wants aligned masks


def aligned(capacity: int) -> int:
    return -(-capacity // ALIGN) * ALIGN


class FixedShapeDecoder:
    """Greedy decode steps for the rows of `cache` (a reserved cache holding each row's prompt,
    `valid` marking its real tokens (rows, cached), row r's next position `positions[r]`).

    `step(tok)` feeds one token per row and returns the next greedy token per row (device tensor).
    With `graph=True` (CUDA) the first step runs eagerly, then is captured and replayed; a capture
    that fails falls back to eager steps at the same fixed shapes (`fallback` says why)."""

    def __init__(self, model: Any, cache: Any, valid: torch.Tensor, positions: torch.Tensor, *, graph: bool) -> None:
        rows, cached = valid.shape
        capacity = cache.layers[0]._k.shape[2]
        if capacity % ALIGN or cached >= capacity:
            raise ValueError(f"fixed-shape decode needs an aligned capacity above the cached {cached} tokens, got {capacity}")
        dev = valid.device
        self.model, self.cache = model, cache
        self._decoder, self._head = model.get_decoder(), model.get_output_embeddings()
        self._mask = torch.zeros((rows, 1, 1, capacity), dtype=torch.bool, device=dev)
        self._mask[:, 0, 0, :cached] = valid.bool()
        self._slot = torch.tensor([cached], dtype=torch.long, device=dev)
        self._pos = positions.to(dev, torch.long).reshape(rows, 1).clone()
        self._tok = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self._next = cached  # the slot the next step writes (host copy, to open the mask)
        self.capacity = capacity
        for layer in cache.layers:
            layer.freeze(self._slot)
        self._want_graph = graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None
        self.fallback: str | None = None
        self.capture_s = 0.0
        self.replays = 0
        self.eager_steps = 0

    def _body(self) -> torch.Tensor:
        h = self._decoder(input_ids=self._tok, attention_mask=self._mask, position_ids=self._pos,
                          past_key_values=self.cache, use_cache=True).last_hidden_state
        return self._head(h[:, -1]).float().argmax(dim=-1)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if self._next >= self.capacity:
            raise RuntimeError(f"fixed-shape decode past its capacity of {self.capacity} tokens")
        self._tok.copy_(tok.reshape(-1, 1))
        self._mask[:, :, :, self._next] = True  # the new token attends to itself
        if self._graph is not None:
            self._graph.replay()
            out = self._out
            self.replays += 1
        elif self._want_graph and self.fallback is None:
            out = self._first_step_then_capture()
            self.eager_steps += 1
        else:
            out = self._body()
            self.eager_steps += 1
        self._next += 1
        self._slot.add_(1)
        self._pos.add_(1)
        assert out is not None
        return out

    def _first_step_then_capture(self) -> torch.Tensor:
        # torch's recipe: warm up on a side stream (lazy handles, compiled kernels), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self._body()
        torch.cuda.current_stream().wait_stream(side)
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end rather than `torch.cuda.graph(...)`, which empties the allocator's cache
        # before every capture (one capture per batch here).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = self._body()
                finally:
                    graph.capture_end()
        except Exception as err:  # a model whose step cannot be captured decodes eagerly
            self.fallback = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            log.warning("decode: CUDA graph capture failed, decoding eagerly at fixed shapes (%s)", self.fallback)
            torch.cuda.synchronize()
            return first
        torch.cuda.current_stream().wait_stream(stream)
        self._graph, self._out = graph, out
        self.capture_s = time.perf_counter() - t0
        return first

    def stats(self) -> dict[str, Any]:
        return {"capture_s": self.capture_s, "replays": self.replays, "eager_steps": self.eager_steps, "fallback": self.fallback}

    def close(self) -> None:
        self._graph = None
        self._out = None

"""SlotStorage: the buffers of one CentroidKVCache layer, its per-row slot counts, and slot moves.

Layout: keys [B, H, capacity, Dk], values [B, H, capacity, Dv], sizes [B, H, capacity] (float32,
tokens each slot stands for; 0 = padding or empty), optional scores and info [B, H, capacity].
Row b holds its live slots left-aligned in [0, lengths[b]); slots past it have size 0 and finite
contents (the attention reads them with weight 0, and 0 * NaN would poison it).

Two ways to append (cache.py decides which):
- `append`: host bookkeeping per call (lengths as Python ints, geometric growth); the attention
  reads the view [:max(lengths)].
- `append_captured` (static buffers, decode steps): writes at the device-side lengths and touches
  no host state but `pending`, so the step traces into one fixed-shape graph (torch.compile,
  CUDA graphs). `absorb_pending` brings the host counters up to date between steps.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ALIGN = 16  # capacity granularity (slots)


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SlotStorage:
    def __init__(self, with_scores: bool, with_info: bool, static: bool = False):
        self._with_scores, self._with_info = with_scores, with_info
        # Static buffers: allocated once for the whole generation, marked as fixed addresses, and
        # every device-side counter is updated in place (captured graphs hold their pointers).
        self.static = static
        self._clear_storage()

    def _clear_storage(self):
        self.keys = self.values = self.sizes = self.scores = self.info = None
        self.is_initialized = False
        self.seen = 0  # token columns seen: the uncompressed length
        # Live slots per row: `_lengths` plus `_appended` (decode steps add to every row, which
        # then costs one integer add instead of a pass over the rows). See the `lengths` property.
        self._lengths: list[int] = []
        self._appended = 0
        self._max_len = 0  # max(lengths), kept up to date in O(1)
        self._uniform = True  # every row holds the same number of slots
        self._lengths_dev: Optional[Tensor] = None  # lengths on the device; None: stale
        self._lengths_static: Optional[Tensor] = None  # static mode: the one device copy, rewritten in place
        self.seen_dev: Optional[Tensor] = None  # static mode: `seen` on the device (positions in a graph)
        self.pending = 0  # tokens appended by captured steps that the host counters do not show yet
        self._row_index = None  # (rows, device index tensor) of the last row group moved

    # ----------------------------------------------------------------------------- lengths
    @property
    def lengths(self) -> list[int]:
        """Live slots per row (a list of ints; assign a new list to change it)."""
        if self._appended:
            self._lengths = [n + self._appended for n in self._lengths]
            self._appended = 0
        return self._lengths

    @lengths.setter
    def lengths(self, value) -> None:
        self._lengths, self._appended = [int(n) for n in value], 0
        self._max_len = max(self._lengths, default=0)
        self._uniform = min(self._lengths, default=0) == self._max_len
        self._lengths_dev = None
        self.lengths_changed()

    def lengths_changed(self) -> None:
        """Hook for the owner: the per-row lengths were rewritten."""

    @property
    def lengths_dev(self) -> Optional[Tensor]:
        """Live slots per row as an int64 tensor on the cache's device."""
        if self._lengths_dev is None and self.is_initialized:
            if self._uniform:  # a fill on the device, no host-to-device copy
                fresh = torch.full((len(self._lengths),), self._max_len, dtype=torch.int64, device=self.device)
            else:
                fresh = torch.tensor(self.lengths, dtype=torch.int64, device=self.device)
            if self._lengths_static is not None:
                fresh = self._lengths_static.copy_(fresh)
            self._lengths_dev = fresh
        return self._lengths_dev

    # ----------------------------------------------------------------------------- buffers
    def initialize(self, key_states: Tensor, value_states: Tensor, capacity: int) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        batch = key_states.shape[0]
        if self.static:
            self._lengths_static = torch.zeros(batch, dtype=torch.int64, device=self.device)
            self.seen_dev = torch.zeros((), dtype=torch.int64, device=self.device)
            self._mark_static(self._lengths_static, self.seen_dev)
        self._allocate(batch, key_states.shape[1], key_states.shape[3], value_states.shape[3], capacity)
        self.is_initialized = True
        self.lengths = [0] * batch

    def _allocate(self, batch, heads, key_dim, value_dim, capacity):
        # Zero-filled, not empty: slots past a row's length are read (with size 0) and must be
        # finite, since 0 * NaN would poison the attention.
        zeros = dict(device=self.device)
        self.keys = torch.zeros(batch, heads, capacity, key_dim, dtype=self.dtype, **zeros)
        self.values = torch.zeros(batch, heads, capacity, value_dim, dtype=self.dtype, **zeros)
        self.sizes = torch.zeros(batch, heads, capacity, dtype=torch.float32, **zeros)
        if self._with_scores:
            self.scores = torch.zeros(batch, heads, capacity, dtype=torch.float32, **zeros)
        if self._with_info:
            # per head: after clustering, heads hold different tokens
            self.info = torch.zeros(batch, heads, capacity, dtype=torch.float32, **zeros)
        self._mark_static(*self._buffers())

    def _mark_static(self, *tensors: Tensor) -> None:
        # Fixed addresses: a captured graph reads and writes them in place, with no copies in.
        if self.static and not torch.compiler.is_compiling():
            for tensor in tensors:
                torch._dynamo.mark_static_address(tensor)

    def _buffers(self) -> list[Tensor]:
        return [b for b in (self.keys, self.values, self.sizes, self.scores, self.info) if b is not None]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _resize(self, capacity: int) -> None:
        old = self._buffers()
        used = self._max_len
        batch, heads = self.keys.shape[:2]
        self._allocate(batch, heads, self.keys.shape[3], self.values.shape[3], capacity)
        for new, prev in zip(self._buffers(), old):
            new[:, :, :used].copy_(prev[:, :, :used])

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(b.numel() * b.element_size() for b in self._buffers())

    # ----------------------------------------------------------------------------- append
    def append(self, key_states: Tensor, value_states: Tensor, headroom: int) -> None:
        """Writes the new tokens at each row's length (growing the buffers if needed)."""
        batch, _, new, _ = key_states.shape
        used = self._max_len
        if used + new > self.capacity:
            self._resize(max(round_up(used + new + headroom), round_up(self.capacity * 5 // 4)))
        if self._uniform:  # every row at the same length: plain slices, O(1) Python
            self.keys[:, :, used:used + new].copy_(key_states)
            self.values[:, :, used:used + new].copy_(value_states)
            self.sizes[:, :, used:used + new].fill_(1.0)
            for buf in (self.scores, self.info):
                if buf is not None:
                    buf[:, :, used:used + new].fill_(0.0)
            if self._lengths_static is None:
                self._lengths_dev = None  # not needed by the attention while rows are alike
            elif self._lengths_dev is not None:  # static: keep the one device copy current
                self._lengths_dev.add_(new)
        else:
            self._write_at_lengths(key_states, value_states)
        self._appended += new
        self._max_len += new
        self.seen += new
        if self.seen_dev is not None:
            self.seen_dev.add_(new)

    def append_captured(self, key_states: Tensor, value_states: Tensor) -> None:
        """Static buffers only: writes at the device-side lengths, in place, and counts the tokens
        in `pending` (absorb_pending applies them to the host counters between steps)."""
        self._write_at_lengths(key_states, value_states)
        self.seen_dev.add_(key_states.shape[2])
        self.pending += key_states.shape[2]

    def _write_at_lengths(self, key_states: Tensor, value_states: Tensor) -> None:
        index = self.new_slot_index(key_states.shape[2])
        # index_put_, not scatter_: torch.compile writes it in place into the static buffers;
        # a scatter_ is functionalised into a copy of the whole buffer on every step.
        self.keys.index_put_(index, key_states)
        self.values.index_put_(index, value_states)
        one = torch.ones((), dtype=torch.float32, device=self.device)
        self.sizes.index_put_(index, one)
        for buf in (self.scores, self.info):
            if buf is not None:
                buf.index_put_(index, torch.zeros_like(one))
        self.lengths_dev.add_(key_states.shape[2])  # in place on the device

    def new_slot_index(self, new: int, back: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(rows [B, 1, 1], heads [1, H, 1], slots [B, 1, new]): advanced indices of the `new`
        slots from `back` slots before each row's device-side length, for [B, H, slots, ...] buffers."""
        batch, heads = self.keys.shape[:2]
        slots = self.lengths_dev[:, None, None] - back + torch.arange(new, device=self.device)
        rows = torch.arange(batch, device=self.device)[:, None, None]
        return rows, torch.arange(heads, device=self.device)[None, :, None], slots

    def absorb_pending(self) -> int:
        """Applies the tokens captured steps appended to the host counters; returns how many."""
        new, self.pending = self.pending, 0
        self._appended += new
        self._max_len += new
        self.seen += new
        return new

    # ------------------------------------------------------------------------------ padding
    def drop_padding(self) -> list[int]:
        """Moves every row's live slots (size > 0) to the front, in order; returns, per row, the
        live slots among the first `ends[row]` (one device-to-host copy)."""
        used = self._max_len
        live = self.sizes[:, 0, :used] > 0  # padding is per row, the same for every head
        order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)
        for buf in self._buffers():
            index = order[:, None, :].expand(buf.shape[0], buf.shape[1], used)
            if buf.dim() == 4:
                index = index[..., None].expand(-1, -1, -1, buf.shape[3])
            buf[:, :, :used] = buf[:, :, :used].gather(2, index)
        counts = live.cumsum(1).cpu()
        self.lengths = counts[:, -1].tolist()  # padding (size 0) now sits past each row's length
        return counts

    # ------------------------------------------------------------------ row-group slot moves
    def _rows(self, rows: list[int]):
        """Index of `rows` into the batch: a slice when all, else a device tensor (one host-to-device
        copy, made once per row group and shared by its read and replace)."""
        if len(rows) == len(self._lengths):
            return slice(None)
        key = tuple(rows)
        cached = self._row_index
        if cached is None or cached[0] != key:
            cached = self._row_index = (key, torch.tensor(rows, device=self.device))
        return cached[1]

    def read(self, rows: list[int], start: int, stop: int, with_info: bool = True):
        """(keys, values, sizes, scores, info) of slots [start, stop) of `rows`."""
        index = self._rows(rows)
        scores = None if self.scores is None else self.scores[index, :, start:stop]
        info = None if self.info is None or not with_info else self.info[index, :, start:stop]
        return (self.keys[index, :, start:stop], self.values[index, :, start:stop],
                self.sizes[index, :, start:stop], scores, info)

    def replace(self, rows: list[int], start: int, stop: int, keys: Tensor, values: Tensor, sizes: Tensor,
                scores: Optional[Tensor], info: Optional[Tensor]) -> int:
        """Slots [start, stop) of `rows` (all of one length) become the given slots; the rest
        moves down, in place. Returns the rows' new length."""
        index = self._rows(rows)
        length = self.lengths[rows[0]]
        count = keys.shape[2]
        end = start + count
        new_length = end + length - stop
        if count > stop - start:
            raise ValueError("CentroidKVCache: a policy returned more slots than it was given")
        pieces = [(self.keys, keys), (self.values, values), (self.sizes, sizes)]
        if self.scores is not None:
            pieces.append((self.scores, scores if scores is not None else torch.zeros_like(sizes)))
        if self.info is not None:
            pieces.append((self.info, info if info is not None else torch.zeros_like(sizes)))
        for buf, data in pieces:
            tail = buf[index, :, stop:length].clone()
            buf[index, :, start:end] = data.to(buf.dtype)
            buf[index, :, end:new_length] = tail
        for buf in (self.sizes, self.scores, self.info):
            if buf is not None:
                buf[index, :, new_length:length] = 0.0
        lengths = self.lengths
        for row in rows:
            lengths[row] = new_length
        self.lengths = lengths  # the device copy is rebuilt when the attention next needs it
        return new_length

    def select_rows(self, index: Tensor) -> list[int]:
        """Keeps (and reorders, repeats) the batch rows `index`; returns it as a list."""
        index = index.to(self.device)
        for name in ("keys", "values", "sizes", "scores", "info"):
            buf = getattr(self, name)
            if buf is not None:
                setattr(self, name, buf.index_select(0, index))
        self._mark_static(*self._buffers())
        picks = index.tolist()
        if self._lengths_static is not None and len(picks) != self._lengths_static.shape[0]:
            self._lengths_static = torch.zeros(len(picks), dtype=torch.int64, device=self.device)
            self._mark_static(self._lengths_static)
        lengths = self.lengths
        self.lengths = [lengths[i] for i in picks]
        return picks

"""CentroidKVCache: a transformers Cache whose layers cluster old tokens online (SPEC.md).

Use it with a model loaded with attn_implementation="centroidkv" (hf_attention.py):

    model.generate(..., cache=centroidkv.CentroidKVCache(ratio=0.75))   # past_key_values= before 5.24

Layout of one layer. Each layer keeps preallocated buffers keys [B, H, capacity, Dk], values
[B, H, capacity, Dv] and sizes [B, H, capacity] (float32, tokens each slot stands for). Row b
holds its live slots left-aligned in [0, lengths[b]):

    [ sink | clustered region | recent window ] [ size-0 slots up to capacity ]
      0     sink               head_end[b]      lengths[b]

- New tokens are written in place at lengths[b] (no torch.cat of the cache per step); the
  attention sees the view [:, :, :max(lengths)] with per-row lengths, so the causal rule
  "query i of Tq sees slots j <= lengths[b] - Tq + i" holds for every row.
- After each forward's attention (hf_attention calls `settle`), the recent window is checked:
  when it is longer than `recent` by at least one policy block, its oldest whole blocks go to the
  policy and the returned slots join the clustered region; the rest of the window moves down.
  Prefill therefore clusters all but the sink, the recent window and a partial block. In budget
  mode, while a row holds more than `budget` slots, the policy shrinks the clustered region by
  one more pass. Rows of equal layout are clustered together; the others one group at a time.
- Left padding: the attention implementation marks padded new tokens with size 0 (they are
  masked and carry no weight); `settle` then drops them, so each row's slots start at its first
  real token and its clustering is the same as if it were alone in the batch. Rows may end up
  with different lengths; slots past a row's length have size 0.
- Positions: `get_seq_length()` is the number of token columns seen (the uncompressed length,
  padding included, as DynamicCache counts), so positions derived from it continue from the
  uncompressed sequence. Keys are stored after rotary embedding, so order inside the cache is
  free.
- Memory: after clustering, a buffer much larger than needed is reallocated to the live size plus
  one block of headroom, so memory is really freed; growth is geometric (amortised in-place
  appends). `memory_bytes()` reports what the buffers hold.
- Decode steps: while every row has the same length (no padding), an update is a slice write of
  the new keys, values and sizes and O(1) Python; settle decides from one integer (tokens left
  before any row has a whole block past its window or exceeds its budget) that there is nothing
  to do. Such steps make no host-device synchronisation; tests/test_decode_path.py checks that.
- Sliding-window layers (Gemma-3's local layers, Mistral/Qwen2 with a window): never clustered;
  they keep their window exact and drop tokens older than the window (in steps of one chunk), as
  transformers' sliding cache does. The attention implementation tells the layer its window.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .arguments import as_float, as_int
from .policies import Policy, Segment, validate_policy

# The layer whose update() ran last in this thread and the key view it returned: the attention
# function receives that very tensor and so finds the layer's sizes without a model change.
_ACTIVE = threading.local()

_ALIGN = 16  # capacity granularity (slots)


def active_layer(keys: Tensor) -> Optional["CentroidKVLayer"]:
    """The CentroidKVLayer that returned `keys` from its last update, if any."""
    layer = getattr(_ACTIVE, "layer", None)
    if layer is not None and getattr(_ACTIVE, "keys", None) is keys:
        return layer
    return None


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class CacheOptions:
    ratio: float
    budget: Optional[int]
    chunk_size: int
    sink: int
    recent: int
    policy: Policy

    @functools.cached_property  # read on every decode step; computed once
    def block(self) -> int:
        return self.policy.block_size(self.ratio, self.chunk_size)

    @property
    def clusters(self) -> bool:
        return self.ratio > 0 or self.budget is not None


class TokenScoreGate:
    """Shared by a cache's layers: open while centroidkv.prefill runs its forward, so that
    policies ranking by token scores wait for them (observe_tokens) instead of clustering."""
    waiting = False


class KVMemory(NamedTuple):
    total: int  # bytes held by all layers' buffers
    per_layer: list  # bytes per layer


class CentroidKVLayer(CacheLayerMixin):
    """One decoder layer's clustered cache (see the module docstring for the layout)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, options: CacheOptions, gate: Optional[TokenScoreGate] = None):
        super().__init__()
        self.options = options
        self.gate = gate if gate is not None else TokenScoreGate()
        self._clear()

    def _clear(self):
        self.is_sliding = False
        self.sliding_window: Optional[int] = None  # set by the attention of a sliding-window layer
        self.keys = self.values = self.sizes = self.scores = self.info = None
        self.is_initialized = False
        self.seen = 0  # token columns seen: the uncompressed length
        # Live slots per row: `_lengths` plus `_appended` (decode steps add to every row, which
        # then costs one integer add instead of a pass over the rows). See the `lengths` property.
        self._lengths: list[int] = []
        self._appended = 0
        self._max_len = 0  # max(lengths), kept up to date in O(1)
        self._uniform = True  # every row holds the same number of slots
        self._lengths_dev: Optional[Tensor] = None  # lengths on the device; None: rebuild on demand
        # Tokens that can still be appended to every row before `settle` has work to do (a block
        # to cluster, a budget to enforce); negative: check every row at the next settle.
        self._quiet = -1
        self.head_end: list[int] = []  # end of [sink | clustered] per row
        self._row_index = None  # (rows, device index tensor) of the last row group moved
        self._fresh = 0  # tokens appended by the last update
        self._dirty = False  # appended but not yet settled
        self._has_padding = False
        self._clustered_any = False  # until then every head has the same sizes (0/1 by padding)
        self._awaiting_info = False  # a multi-token call waits for its token scores to cluster
        self._info_observed = False  # observe_tokens has written token scores

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
        self._quiet = -1

    @property
    def lengths_dev(self) -> Optional[Tensor]:
        """Live slots per row as an int64 tensor on the cache's device."""
        if self._lengths_dev is None and self.is_initialized:
            if self._uniform:  # a fill on the device, no host-to-device copy
                self._lengths_dev = torch.full((len(self._lengths),), self._max_len, dtype=torch.int64,
                                               device=self.device)
            else:
                self._lengths_dev = torch.tensor(self.lengths, dtype=torch.int64, device=self.device)
        return self._lengths_dev

    # ----------------------------------------------------------------------------- buffers
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        batch = key_states.shape[0]
        self._allocate(batch, key_states.shape[1], key_states.shape[3], value_states.shape[3],
                       _round_up(key_states.shape[2] + self.options.block))
        self.is_initialized = True
        self.lengths, self.head_end = [0] * batch, [0] * batch

    def _allocate(self, batch, heads, key_dim, value_dim, capacity):
        # Zero-filled, not empty: slots past a row's length are read (with size 0) and must be
        # finite, since 0 * NaN would poison the attention.
        zeros = dict(device=self.device)
        self.keys = torch.zeros(batch, heads, capacity, key_dim, dtype=self.dtype, **zeros)
        self.values = torch.zeros(batch, heads, capacity, value_dim, dtype=self.dtype, **zeros)
        self.sizes = torch.zeros(batch, heads, capacity, dtype=torch.float32, **zeros)
        if self.options.clusters and self.options.policy.score_window > 0:  # else never read
            self.scores = torch.zeros(batch, heads, capacity, dtype=torch.float32, **zeros)
        if self.options.clusters and self.options.policy.token_scores:
            # per head: after clustering, heads hold different tokens
            self.info = torch.zeros(batch, heads, capacity, dtype=torch.float32, **zeros)

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
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Appends the new tokens in place; returns the key and value views the attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self._dirty:
            # The attention did not settle the previous step: not the "centroidkv" implementation,
            # which alone reads the cluster sizes (another one would silently attend to centroids
            # as if each were one token).
            if self.options.clusters:
                raise RuntimeError("CentroidKVCache: load the model with attn_implementation='centroidkv'; "
                                   "other attention implementations ignore the cluster sizes")
            self.settle()
        batch, _, new, _ = key_states.shape
        if batch != self.keys.shape[0]:
            raise ValueError(f"CentroidKVCache: batch size {batch} differs from the cache's {self.keys.shape[0]}")
        held = (self.keys.shape[1], self.keys.shape[3], self.values.shape[3], self.dtype)
        got = (key_states.shape[1], key_states.shape[3], value_states.shape[3], key_states.dtype)
        if got != held:  # another model, or a dtype change, on a cache that holds tokens
            raise ValueError(f"CentroidKVCache: this layer holds (KV heads, key dim, value dim, dtype) = {held}, "
                             f"got {got}; use one cache per model and dtype (reset() empties it)")
        used = self._max_len
        if used + new > self.capacity:
            self._resize(max(_round_up(used + new + self.options.block), _round_up(self.capacity * 5 // 4)))
        if self._uniform:  # every row at the same length: plain slices, O(1) Python
            self.keys[:, :, used:used + new].copy_(key_states)
            self.values[:, :, used:used + new].copy_(value_states)
            self.sizes[:, :, used:used + new].fill_(1.0)
            for buf in (self.scores, self.info):
                if buf is not None:
                    buf[:, :, used:used + new].fill_(0.0)
            self._lengths_dev = None  # not needed by the attention while rows are alike
        else:
            index = self.lengths_dev[:, None] + torch.arange(new, device=self.device)  # [B, new]
            for buf, data in ((self.keys, key_states), (self.values, value_states)):
                buf.scatter_(2, index[:, None, :, None].expand_as(data), data)
            per_slot = index[:, None, :].expand(batch, self.sizes.shape[1], new)
            self.sizes.scatter_(2, per_slot, 1.0)
            if self.scores is not None:
                self.scores.scatter_(2, per_slot, 0.0)
            if self.info is not None:
                self.info.scatter_(2, per_slot, 0.0)
            self.lengths_dev.add_(new)  # in place on the device
        self._appended += new
        self._max_len += new
        self._quiet -= new
        self.seen += new
        self._fresh, self._dirty = new, True
        view = self._max_len
        keys, values = self.keys[:, :, :view], self.values[:, :, :view]
        _ACTIVE.layer, _ACTIVE.keys = self, keys
        return keys, values

    # ------------------------------------------------ calls from the attention implementation
    def attention_inputs(self) -> tuple[Tensor, Tensor, bool]:
        """(sizes [B, H, L], lengths [B] or None when every row holds all L slots, whether all
        heads' sizes are alike) for the views returned by the last update."""
        lengths = None if self._uniform else self.lengths_dev
        return self.sizes[:, :, :self._max_len], lengths, not self._clustered_any

    def mark_sliding(self, window: int) -> None:
        self.sliding_window, self.is_sliding = int(window), True

    def mark_padding(self, new_token_mask: Tensor, padded: Optional[bool] = None) -> None:
        """new_token_mask [B, fresh]: 0 for padding among the tokens of the last update; padded:
        whether it holds any 0, where the caller knows (else it is read from the mask)."""
        new = self._fresh
        # No dtype conversion: multiplying float sizes by an integer or bool mask promotes to float.
        mask = new_token_mask[:, -new:].to(device=self.device)
        used = self._max_len
        if self._uniform:
            self.sizes[:, :, used - new:used].mul_(mask[:, None, :])
        else:
            index = (self.lengths_dev[:, None] - new + torch.arange(new, device=self.device))
            index = index[:, None, :].expand(-1, self.sizes.shape[1], -1)
            self.sizes.scatter_(2, index, self.sizes.gather(2, index) * mask[:, None, :].float())
        if new > 1:  # padding is dropped in settle; reading the mask is a sync (prefill only)
            self._has_padding = self._has_padding or (not bool(mask.all()) if padded is None else padded)

    def observe(self, scores: Tensor) -> None:
        """Observation-window attention [B, H, L] over the current view, for the policy."""
        if self.scores is None:
            return
        view = self.scores[:, :, :scores.shape[2]]
        if self.options.policy.accumulate_scores:
            view += scores
        else:
            view.copy_(scores)

    def observe_tokens(self, scores: Tensor, real: Optional[Tensor] = None) -> None:
        """Per-token scores [B, T] of the last call's T tokens (real [B, T] bool: False for padding,
        which settle dropped), for policies with token_scores; then clusters what was waiting."""
        if self.info is None or self.sliding_window is not None:
            return
        if scores.shape != (len(self.lengths), self._fresh):
            raise ValueError(f"CentroidKVCache: token scores must be [batch, tokens of the last call] = "
                             f"[{len(self.lengths)}, {self._fresh}], got {list(scores.shape)}")
        if not self._awaiting_info:  # its slots may have moved: scores would land on other tokens
            raise RuntimeError("CentroidKVCache: token scores arrive only for a forward run while "
                               "token_score_gate.waiting is set (centroidkv.prefill does this)")
        scores = scores.to(self.device, torch.float32)
        for row, length in enumerate(self.lengths):
            row_scores = scores[row] if real is None else scores[row][real[row].to(self.device)]
            self.info[row, :, length - row_scores.shape[0]:length] = row_scores
        self._awaiting_info, self._info_observed = False, True
        self._cluster()
        self._release_slack()  # settle ran before this clustering, so it freed nothing

    # ----------------------------------------------------------------------------- settle
    def settle(self) -> None:
        """Drops padding, then clusters (or, for sliding layers, trims) what left the window."""
        if not self._dirty:
            return
        self._dirty = False
        if self._has_padding:
            self._drop_padding()
            self._has_padding = False
        if self.sliding_window is not None:
            # Cheap check first: no row is trimmed unless the longest one is.
            if self._max_len - (self.sliding_window - 1) >= self.options.chunk_size:
                self._trim_to_window()
        elif self.gate.waiting and self.options.policy.token_scores:
            self._awaiting_info = True  # observe_tokens clusters, or else the next step does
        else:
            self._awaiting_info = False
            self._cluster()
        if not self._uniform and self._lengths_dev is None:
            _ = self.lengths_dev  # rebuild on this step, which already did work, not the next one
        self._release_slack()

    def _release_slack(self) -> None:
        """Reallocates buffers much larger than the live slots need, so memory is really freed."""
        target = _round_up(self._max_len + self.options.block + 1)
        if self.capacity > target * 3 // 2:
            self._resize(target)

    def _cluster(self) -> None:
        if self.options.clusters and self._quiet < 0:  # else no row has anything to cluster
            self._cluster_overflow()
            if self.options.budget is not None:
                self._enforce_budget()
            self._quiet = self._quiet_tokens()

    def _quiet_tokens(self) -> int:
        """How many tokens every row can take before `settle` has work again (the clustering and
        budget rules below, solved for the number of appended tokens)."""
        opts = self.options
        quiet = None
        for length, head in zip(self.lengths, self.head_end):
            if length < opts.sink:  # head_end still follows the length into the sink
                return 0
            row = head + opts.recent + opts.block - 1 - length  # a whole block past the window
            if opts.budget is not None and head - opts.sink >= opts.chunk_size:
                row = min(row, max(opts.budget - length, 0))  # over budget with a region to shrink
            quiet = row if quiet is None else min(quiet, row)
        return -1 if quiet is None else quiet

    def _cluster_overflow(self) -> None:
        opts = self.options
        block = opts.block
        groups: dict[tuple[int, int, int], list[int]] = {}
        for row, length in enumerate(self.lengths):
            self.head_end[row] = max(self.head_end[row], min(opts.sink, length))
            blocks = (length - self.head_end[row] - opts.recent) // block
            if blocks > 0:
                groups.setdefault((self.head_end[row], length, blocks), []).append(row)
        for (start, _, blocks), rows in groups.items():
            stop = start + blocks * block
            segment = self._read(rows, start, stop)
            if opts.ratio > 0:
                segment = opts.policy.compress(segment, ratio=opts.ratio, chunk_size=opts.chunk_size)
                self._clustered_any = True
            self._replace(rows, start, stop, segment)
            for row in rows:
                self.head_end[row] = start + segment.length

    def _enforce_budget(self) -> None:
        opts = self.options
        for _ in range(64):  # each pass roughly halves the region; 64 is far more than enough
            groups: dict[tuple[int, int, int], list[int]] = {}
            for row, length in enumerate(self.lengths):
                start = min(opts.sink, length)
                if length > opts.budget and self.head_end[row] - start >= opts.chunk_size:
                    groups.setdefault((start, self.head_end[row], length), []).append(row)
            if not groups:
                return
            progress = False
            for (start, stop, _), rows in groups.items():
                segment = opts.policy.shrink(self._read(rows, start, stop), chunk_size=opts.chunk_size)
                progress |= segment.length < stop - start
                self._clustered_any = True
                self._replace(rows, start, stop, segment)
                for row in rows:
                    self.head_end[row] = start + segment.length
            if not progress:
                return

    def _trim_to_window(self) -> None:
        keep = self.sliding_window - 1  # the next query sees itself and window - 1 earlier tokens
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(self.lengths):
            if length - keep >= self.options.chunk_size:
                groups.setdefault(length, []).append(row)
        for length, rows in groups.items():
            empty = self._read(rows, 0, 0)
            self._replace(rows, 0, length - keep, empty)

    def _drop_padding(self) -> None:
        """Moves every row's live slots (size > 0) to the front, in order."""
        used = self._max_len
        live = self.sizes[:, 0, :used] > 0  # padding is per row, the same for every head
        order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)
        for buf in self._buffers():
            index = order[:, None, :].expand(buf.shape[0], buf.shape[1], used)
            if buf.dim() == 4:
                index = index[..., None].expand(-1, -1, -1, buf.shape[3])
            buf[:, :, :used] = buf[:, :, :used].gather(2, index)
        counts = live.cumsum(1).cpu()  # one device-to-host copy (prefill with padding only)
        self.head_end = [int(counts[row, end - 1]) if end > 0 else 0 for row, end in enumerate(self.head_end)]
        self.lengths = counts[:, -1].tolist()  # padding (size 0) now sits past each row's length

    # ------------------------------------------------------------------ row-group slot moves
    def _rows(self, rows: list[int]):
        """Index of `rows` into the batch: a slice when all, else a device tensor (one host-to-device
        copy, made once per row group and shared by its _read and _replace)."""
        if len(rows) == len(self._lengths):
            return slice(None)
        key = tuple(rows)
        cached = self._row_index
        if cached is None or cached[0] != key:
            cached = self._row_index = (key, torch.tensor(rows, device=self.device))
        return cached[1]

    def _read(self, rows: list[int], start: int, stop: int) -> Segment:
        index = self._rows(rows)
        scores = None if self.scores is None else self.scores[index, :, start:stop]
        # Token scores arrive only through centroidkv.prefill: until then there are none to rank
        # by (None, so the policy does not read an all-zero buffer back to find that out).
        info = None if self.info is None or not self._info_observed else self.info[index, :, start:stop]
        return Segment(self.keys[index, :, start:stop], self.values[index, :, start:stop],
                       self.sizes[index, :, start:stop], scores, info)

    def _replace(self, rows: list[int], start: int, stop: int, segment: Segment) -> None:
        """Slots [start, stop) of `rows` (all of one length) become `segment`; the rest moves."""
        index = self._rows(rows)
        length = self.lengths[rows[0]]
        end = start + segment.length
        new_length = end + length - stop
        if segment.length > stop - start:
            raise ValueError("CentroidKVCache: a policy returned more slots than it was given")
        scores = segment.scores
        if self.scores is not None and scores is None:
            scores = torch.zeros_like(segment.sizes)
        pieces = [(self.keys, segment.keys), (self.values, segment.values), (self.sizes, segment.sizes)]
        if self.scores is not None:
            pieces.append((self.scores, scores))
        if self.info is not None:
            info = segment.info
            pieces.append((self.info, info if info is not None else torch.zeros_like(segment.sizes)))
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

    # --------------------------------------------------------------- transformers' interface
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CentroidKVCache cannot be cropped: clustered tokens cannot be separated again")

    def _select_rows(self, index: Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys, self.values, self.sizes = (b.index_select(0, index) for b in (self.keys, self.values, self.sizes))
        if self.scores is not None:
            self.scores = self.scores.index_select(0, index)
        if self.info is not None:
            self.info = self.info.index_select(0, index)
        picks = index.tolist()
        lengths = self.lengths
        self.lengths = [lengths[i] for i in picks]
        self.head_end = [self.head_end[i] for i in picks]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(len(self.lengths)).repeat_interleave(repeats))


class CentroidKVCache(Cache):
    """A KV cache that clusters old tokens online into size-weighted centroids (SPEC.md).

    Args:
        ratio: fraction of the clustered tokens removed, in [0, 1) (0.75 keeps a quarter; 0 turns
            clustering off). Default 0.75, or 0 when only `budget` is given.
        budget: optional slot budget per layer, row and KV head: while a row holds more, the
            clustered region gets one more pass (r = chunk_size / 2).
        chunk_size: even chunk length c of every clustering pass.
        sink: first tokens of each row kept exact.
        recent: most recent tokens kept exact (the window holds recent .. recent + block - 1).
        policy: a centroidkv.policies.Policy; default ProtectedClustering (the evaluation's
            choice, README); PlainClustering() is the paper's.

    Needs the model loaded with attn_implementation="centroidkv" (import centroidkv first).
    """

    def __init__(self, ratio: Optional[float] = None, *, budget: Optional[int] = None, chunk_size: int = 32,
                 sink: int = 4, recent: int = 64, policy: Optional[Policy] = None):
        owner = "CentroidKVCache"
        if ratio is None:
            ratio = 0.0 if budget is not None else 0.75
        ratio = as_float(owner, "ratio", ratio)
        chunk_size, sink, recent = (as_int(owner, name, value) for name, value in
                                    (("chunk_size", chunk_size), ("sink", sink), ("recent", recent)))
        budget = None if budget is None else as_int(owner, "budget", budget)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"CentroidKVCache: ratio must be in [0, 1), got {ratio!r}")
        if chunk_size < 2 or chunk_size % 2:
            raise ValueError(f"CentroidKVCache: chunk_size must be an even integer >= 2, got {chunk_size!r}")
        for name, value in (("sink", sink), ("recent", recent)):
            if value < 0:
                raise ValueError(f"CentroidKVCache: {name} must be an integer >= 0, got {value!r}")
        if budget is not None and budget < sink + recent + chunk_size:
            raise ValueError(f"CentroidKVCache: budget must be an integer >= sink + recent + chunk_size "
                             f"= {sink + recent + chunk_size}, got {budget!r}")
        super().__init__(layers=[])
        self.options = CacheOptions(ratio, budget, chunk_size, sink, recent, validate_policy(policy))
        self.token_score_gate = TokenScoreGate()

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(CentroidKVLayer(self.options, self.token_score_gate))
        return self.layers[layer_idx].update(key_states, value_states)

    def observe_tokens(self, scores: Tensor, real: Optional[Tensor] = None) -> None:
        """Per-token scores [B, T] (e.g. surprisal) of the last forward call's T tokens, for
        policies with `token_scores`; real [B, T] bool marks non-padding tokens. Layers that
        deferred clustering for these scores cluster now. `centroidkv.prefill` calls this."""
        for layer in self.layers:
            layer.observe_tokens(scores, real)

    def memory_bytes(self) -> KVMemory:
        """Bytes held by every layer's buffers (keys, values, sizes, scores), and their total."""
        per_layer = [layer.memory_bytes() for layer in self.layers]
        return KVMemory(sum(per_layer), per_layer)

    def live_slots(self, layer_idx: int = 0) -> list[int]:
        """Live slots per row of one layer (sink + clustered + recent)."""
        return list(self.layers[layer_idx].lengths) if layer_idx < len(self.layers) else []

    def __repr__(self):
        o = self.options
        return (f"CentroidKVCache(ratio={o.ratio}, budget={o.budget}, chunk_size={o.chunk_size}, "
                f"sink={o.sink}, recent={o.recent}, policy={o.policy!r}, layers={len(self.layers)})")


def cache_argument(model) -> str:
    """Name of the cache keyword of `model`'s forward and generate: `cache` from transformers
    5.24 on, `past_key_values` before (5.24 still accepts it, with a FutureWarning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def dynamic_cache_bytes(cache: Cache) -> KVMemory:
    """Bytes held by a stock transformers cache's key and value tensors (for comparison)."""
    per_layer = []
    for layer in cache.layers:
        held = 0
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, Tensor):
                held += tensor.numel() * tensor.element_size()
        per_layer.append(held)
    return KVMemory(sum(per_layer), per_layer)

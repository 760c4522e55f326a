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
- Captured decode steps (max_cache_len given): the buffers are sized once for that many tokens
  (the slots they cluster into, not one slot per token) and never move while decoding. A decode
  step writes at device-side lengths, returns the whole buffers and reads no host counter, so a
  compiled forward (torch.compile fullgraph, CUDA graphs) replays it unchanged; the attention
  reads the lengths on the device. The host part (counters, clustering the block that left the
  window, moving slots in place) runs between steps: `CentroidKVCache.settle()`, which
  transformers' generate() reaches through the mask creation before each step.
- Sliding-window layers (Gemma-3's local layers, Mistral/Qwen2 with a window): never clustered;
  they keep their window exact and drop tokens older than the window (in steps of one chunk), as
  transformers' sliding cache does. The attention implementation tells the layer its window.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .arguments import as_float, as_int
from .policies import Policy, Segment, validate_policy
from .slot_storage import SlotStorage, round_up

# The layer whose update() ran last in this thread and the key view it returned: the attention
# function receives that very tensor and so finds the layer's sizes without a model change.
_ACTIVE = threading.local()

# Tokens a captured step may append before CentroidKVCache.settle must run (free slots kept).
CAPTURE_HEADROOM = 1
_LOG = logging.getLogger("centroidkv")
_NOTED: set = set()


def note_once(message: str) -> None:
    """Logs a performance note once per process (a slower path was taken, and why)."""
    if message not in _NOTED:
        _NOTED.add(message)
        _LOG.warning(message)


def active_layer(keys: Tensor) -> Optional["CentroidKVLayer"]:
    """The CentroidKVLayer that returned `keys` from its last update, if any."""
    layer = getattr(_ACTIVE, "layer", None)
    if layer is not None and getattr(_ACTIVE, "keys", None) is keys:
        return layer
    return None


@dataclass(frozen=True)
class CacheOptions:
    ratio: float
    budget: Optional[int]
    chunk_size: int
    sink: int
    recent: int
    policy: Policy
    max_cache_len: Optional[int] = None

    @functools.cached_property  # read on every decode step; computed once
    def block(self) -> int:
        return self.policy.block_size(self.ratio, self.chunk_size)

    @property
    def clusters(self) -> bool:
        return self.ratio > 0 or self.budget is not None

    @property
    def captures(self) -> bool:
        """Static buffers for captured decode steps: a token horizon is known, and the policy
        needs no per-step Python (accumulating policies update scores on every step)."""
        return self.max_cache_len is not None and not self.policy.accumulate_scores


class TokenScoreGate:
    """Shared by a cache's layers: open while centroidkv.prefill runs its forward, so that
    policies ranking by token scores wait for them (observe_tokens) instead of clustering."""
    waiting = False


class KVMemory(NamedTuple):
    total: int  # bytes held by all layers' buffers
    per_layer: list  # bytes per layer


class CentroidKVLayer(SlotStorage, CacheLayerMixin):
    """One decoder layer's clustered cache: storage (slot_storage.py) plus the clustering schedule
    (see the module docstring for the layout)."""

    is_croppable = False

    def __init__(self, options: CacheOptions, gate: Optional[TokenScoreGate] = None):
        CacheLayerMixin.__init__(self)
        policy = options.policy
        SlotStorage.__init__(self, with_scores=options.clusters and policy.score_window > 0,
                             with_info=options.clusters and policy.token_scores, static=options.captures)
        self.options = options
        self.gate = gate if gate is not None else TokenScoreGate()
        self._clear()

    @property
    def is_compileable(self) -> bool:
        return self.static

    def _clear(self):
        self._clear_storage()
        self.is_sliding = False
        self.sliding_window: Optional[int] = None  # set by the attention of a sliding-window layer
        # Tokens that can still be appended to every row before `settle` has work to do (a block
        # to cluster, a budget to enforce); negative: check every row at the next settle.
        self._quiet = -1
        self.head_end: list[int] = []  # end of [sink | clustered] per row
        self._fresh = 0  # tokens appended by the last update
        self._dirty = False  # appended but not yet settled
        self._unattended = False  # a captured step the "centroidkv" attention has not read yet
        self._captured = False  # the last update was a captured step (whole buffers returned)
        self._has_padding = False
        self._clustered_any = False  # until then every head has the same sizes (0/1 by padding)
        self._awaiting_info = False  # a multi-token call waits for its token scores to cluster
        self._info_observed = False  # observe_tokens has written token scores

    def lengths_changed(self) -> None:
        self._quiet = -1

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        capacity = key_states.shape[2] + self.options.block
        if self.static:  # once for the generation (the prompt is clustered after it is written)
            capacity = max(capacity, self._slot_bound() + CAPTURE_HEADROOM)
        self.initialize(key_states, value_states, round_up(capacity))
        self.head_end = [0] * key_states.shape[0]

    def _slot_bound(self) -> int:
        """Live slots a row can hold after options.max_cache_len tokens (static buffers' size)."""
        opts = self.options
        tokens = opts.max_cache_len
        if self.sliding_window is not None:  # the window plus at most a chunk before a trim
            return min(tokens, self.sliding_window - 1 + opts.chunk_size)
        if not opts.clusters:
            return tokens
        exact = opts.sink + opts.recent + opts.block  # never clustered
        bound = exact + math.ceil(max(tokens - exact, 0) * (1 - opts.ratio)) + opts.block
        if opts.budget is not None:
            bound = min(bound, max(opts.budget, opts.sink + opts.chunk_size + opts.recent + opts.block) + opts.block)
        return min(bound, tokens)

    # ----------------------------------------------------------------------------- append
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Appends the new tokens in place; returns the key and value views the attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self._dirty or self._unattended:
            # The attention did not settle (or, for a captured step, read) the previous step: not
            # the "centroidkv" implementation, which alone reads the cluster sizes (another one
            # would silently attend to centroids as if each were one token).
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
        captured = self.static and new <= CAPTURE_HEADROOM
        if captured and self.pending + new > CAPTURE_HEADROOM:
            raise RuntimeError("CentroidKVCache: call cache.settle() between captured decode steps "
                               "(generate() does)")
        self._captured = self._unattended = captured
        if captured:
            # A decode step: no host counter is read (they change every step, and a graph would
            # be specialised on them); settle or CentroidKVCache.settle applies it afterwards.
            self.append_captured(key_states, value_states)
            keys, values = self.keys, self.values
        else:
            self.settle()  # captured steps still pending (a no-op otherwise)
            self.append(key_states, value_states, self.options.block)
            self._quiet -= new
            self._fresh, self._dirty = new, True
            keys, values = self.keys[:, :, :self._max_len], self.values[:, :, :self._max_len]
        _ACTIVE.layer, _ACTIVE.keys = self, keys
        return keys, values

    # ------------------------------------------------ calls from the attention implementation
    def attention_inputs(self) -> tuple[Tensor, Optional[Tensor], bool]:
        """(sizes [B, H, L] as attention weighs them (size ** policy.size_bias), lengths [B] or
        None when every row holds all L slots, whether all heads' sizes are alike) for the views
        returned by the last update."""
        self._unattended = False
        bias = self.options.policy.size_bias
        if self._captured:  # whole buffers; slots past each row's length have size 0; heads
            # taken as unalike (always correct) so the first clustering does not change the graph
            return (self.sizes if bias == 1.0 else self.sizes.pow(bias)), self.lengths_dev, False
        lengths = None if self._uniform else self.lengths_dev
        sizes = self.sizes[:, :, :self._max_len]
        if bias != 1.0 and self._clustered_any:  # sizes of 0 and 1 are their own powers
            sizes = sizes.pow(bias)  # attention adds log(size ** bias); merges keep the true sizes
        return sizes, lengths, not self._clustered_any

    def mark_sliding(self, window: int) -> None:
        self.sliding_window, self.is_sliding = int(window), True

    def mark_padding(self, new_token_mask: Tensor, padded: Optional[bool] = None) -> None:
        """new_token_mask [B, new]: 0 for padding among the tokens of the last update; padded:
        whether it holds any 0, where the caller knows (else it is read from the mask)."""
        new = new_token_mask.shape[1]
        # No dtype conversion: multiplying float sizes by an integer or bool mask promotes to float.
        mask = new_token_mask.to(device=self.device)
        if self._captured or not self._uniform:
            index = self.new_slot_index(new, back=new)
            self.sizes.index_put_(index, self.sizes[index] * mask[:, None, :].float())
        else:
            used = self._max_len
            self.sizes[:, :, used - new:used].mul_(mask[:, None, :])
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
        self._fit_capacity()  # settle ran before this clustering, so it freed nothing

    # ----------------------------------------------------------------------------- settle
    def settle(self, between_steps: bool = False) -> None:
        """Applies captured steps, drops padding, then clusters (or, for sliding layers, trims)
        what left the window. Host work: a captured graph skips it; CentroidKVCache.settle runs it
        between steps (between_steps=True)."""
        if torch.compiler.is_compiling():
            return
        captured = self.absorb_pending()
        if captured:
            self._quiet -= captured
            self._fresh, self._dirty = captured, True
            if self.device.type == "cuda" and not between_steps:
                note_once("CentroidKVCache: decode steps run eagerly (the static buffers are ready for "
                          "capture: generate() compiles them when the model is not compiled otherwise)")
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
        self._fit_capacity()
        if (self.static or not self._uniform) and self._lengths_dev is None:
            _ = self.lengths_dev  # rebuild on this step, which already did work, not the next one

    def _fit_capacity(self) -> None:
        """Frees memory the live slots no longer need; static buffers keep their size for the
        whole generation (a captured graph holds their addresses) unless they must grow."""
        if self.static:
            target = round_up(max(self._slot_bound(), self._max_len) + CAPTURE_HEADROOM)
            if self.capacity < self._max_len + CAPTURE_HEADROOM:
                note_once(f"CentroidKVCache: more slots than max_cache_len={self.options.max_cache_len} "
                          "tokens allow; the buffers grow (captured decode steps are compiled again)")
                self._resize(round_up(self._max_len + CAPTURE_HEADROOM + self.options.block))
            elif self.capacity > target * 3 // 2:
                self._resize(target)
            return
        target = round_up(self._max_len + self.options.block + 1)
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
        counts = self.drop_padding()
        self.head_end = [int(counts[row, end - 1]) if end > 0 else 0 for row, end in enumerate(self.head_end)]

    def _read(self, rows: list[int], start: int, stop: int) -> Segment:
        # Token scores arrive only through centroidkv.prefill: until then there are none to rank
        # by (None, so the policy does not read an all-zero buffer back to find that out).
        return Segment(*self.read(rows, start, stop, with_info=self._info_observed))

    def _replace(self, rows: list[int], start: int, stop: int, segment: Segment) -> None:
        self.replace(rows, start, stop, segment.keys, segment.values, segment.sizes, segment.scores, segment.info)

    # --------------------------------------------------------------- transformers' interface
    def get_seq_length(self):
        if torch.compiler.is_compiling() and self.seen_dev is not None:
            return self.seen_dev  # a device scalar: positions derived from it need no graph change
        return self.seen + self.pending

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:  # the attention reads only the new tokens' columns (fixed width)
            return query_length, 0
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CentroidKVCache cannot be cropped: clustered tokens cannot be separated again")

    def _select_rows(self, index: Tensor) -> None:
        if self.is_initialized:
            self.settle(between_steps=True)
            picks = self.select_rows(index)
            self.head_end = [self.head_end[i] for i in picks]
            if self.static:
                _ = self.lengths_dev

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
        max_cache_len: tokens (prompt + new) the cache will see, as for transformers'
            StaticCache. Given, the buffers are sized once (for the slots that many tokens
            cluster into) and decode steps can be captured: generate() compiles them on a GPU.
            More tokens still work; the buffers then grow and the captured step is rebuilt.

    Needs the model loaded with attn_implementation="centroidkv" (import centroidkv first).
    """

    def __init__(self, ratio: Optional[float] = None, *, budget: Optional[int] = None, chunk_size: int = 32,
                 sink: int = 4, recent: int = 64, policy: Optional[Policy] = None,
                 max_cache_len: Optional[int] = None):
        owner = "CentroidKVCache"
        if ratio is None:
            ratio = 0.0 if budget is not None else 0.75
        ratio = as_float(owner, "ratio", ratio)
        chunk_size, sink, recent = (as_int(owner, name, value) for name, value in
                                    (("chunk_size", chunk_size), ("sink", sink), ("recent", recent)))
        budget = None if budget is None else as_int(owner, "budget", budget)
        max_cache_len = None if max_cache_len is None else as_int(owner, "max_cache_len", max_cache_len)
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
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"CentroidKVCache: max_cache_len must be an integer >= 1, got {max_cache_len!r}")
        super().__init__(layers=[])
        policy = validate_policy(policy)
        self.options = CacheOptions(ratio, budget, chunk_size, sink, recent, policy, max_cache_len)
        self.token_score_gate = TokenScoreGate()
        if max_cache_len is not None and not self.options.captures:
            note_once(f"CentroidKVCache: {type(policy).__name__} updates token scores on every decode step; "
                      "decode steps run eagerly (not captured)")

    @property
    def is_compileable(self) -> bool:
        """Whether decode steps can be captured (transformers' generate() then compiles them on a
        GPU). Known before the first forward, unlike the layers, which are made lazily."""
        return self.options.captures

    def settle(self) -> None:
        """Applies what captured decode steps left to the host: counters, and the clustering (or
        sliding-window trim) of what left the recent window, moving slots in place. Run it
        between compiled decode steps; generate() does so through get_mask_sizes."""
        for layer in self.layers:
            if layer.pending:
                layer.settle(between_steps=True)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # Called by the mask creation before every forward, eagerly even when the forward is
        # compiled (generate() prepares the masks outside the graph): the captured steps'
        # host part runs here.
        if not torch.compiler.is_compiling():
            self.settle()
        return super().get_mask_sizes(query_length, layer_idx)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(CentroidKVLayer(self.options, self.token_score_gate))
        if layer_idx == 0 and key_states.shape[2] == 1 and key_states.is_cuda and not self.options.captures:
            note_once("CentroidKVCache: decode steps run eagerly on the GPU; pass max_cache_len= "
                      "(prompt + new tokens) to capture them (generate() then compiles one step)")
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
        horizon = "" if o.max_cache_len is None else f", max_cache_len={o.max_cache_len}"
        return (f"CentroidKVCache(ratio={o.ratio}, budget={o.budget}, chunk_size={o.chunk_size}, "
                f"sink={o.sink}, recent={o.recent}, policy={o.policy!r}{horizon}, layers={len(self.layers)})")


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

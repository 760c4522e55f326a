"""Shared pieces of the end-to-end benchmarks (bench_decode.py, bench_serving.py, gpu_e2e.py).

- The model: a Llama-3-8B-shaped transformers model with random bf16 weights (or a tiny one for
  the CPU smoke test), built directly on the device.
- Synthetic cache fill: the state a cache holds after a prefill of L tokens, written directly
  (random keys and values of the right length, and the position counter), so a 128k-token
  prefill is not needed for every point. For CentroidKVCache the layout (live slots, sink and
  clustered region, capacity) is the one a real prefill leaves; tests/test_benchmarks_smoke.py
  checks that against a real prefill.
- Timing of decode steps (CUDA events per step, no host sync between steps; wall clock on CPU),
  memory fit checks and deadlines.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import centroidkv  # noqa: F401  (registers attn_implementation="centroidkv")
from centroidkv.cache import CAPTURE_HEADROOM, CentroidKVCache, CentroidKVLayer, cache_argument
from centroidkv.policies import PlainClustering, ProtectedClustering

import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

GB = 1e9
# A wrong attention implementation with a CentroidKVCache would silently time the wrong thing.
warnings.filterwarnings("error", message="CentroidKVCache: load the model")


# --------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype: torch.dtype

    @property
    def elem(self) -> int:
        return torch.finfo(self.dtype).bits // 8


LLAMA3_8B = Shape(layers=32, hidden=4096, q_heads=32, kv_heads=8, head_dim=128,
                  intermediate=14336, vocab=128256, dtype=torch.bfloat16)
TINY = Shape(layers=2, hidden=64, q_heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256,
             dtype=torch.float32)


def pick_device(requested: Optional[str]) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, max_positions: int):
    """Random-weight LlamaForCausalLM of `shape`, created on `device` (no CPU detour)."""
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.q_heads, num_key_value_heads=shape.kv_heads,
                         head_dim=shape.head_dim, max_position_embeddings=max_positions,
                         rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def load_model(name: str, device, max_positions: int):
    """"8b" or "tiny" (random weights, built on the device), or a model of the evaluation harness
    ("smollm2", "gemma3": offline GGUF, float32)."""
    if name in ("8b", "tiny"):
        shape = LLAMA3_8B if name == "8b" else TINY
        return build_model(shape, device, shape.dtype, max_positions)
    from centroidkv.eval.model import load_model as load_offline
    return load_offline(name, device=str(device)).model


def shape_of(model) -> Shape:
    """The Shape of a loaded transformers model (what the cache fills and byte counts need)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size, q_heads=config.num_attention_heads,
                 kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate=config.intermediate_size,
                 vocab=config.vocab_size, dtype=next(model.parameters()).dtype)


def weight_bytes_read_per_step(model) -> int:
    """Bytes of parameters a decode step reads: all of them but the input embedding table, of
    which only one row per sequence is read (unless it is also the output layer's, tied)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


def use_attention(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    assert model.config._attn_implementation == name, model.config._attn_implementation


def forward(model, tokens: torch.Tensor, cache):
    """One forward of tokens [B, T] with the cache; logits of the last position only."""
    return model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})


# ------------------------------------------------------------------------------- caches
def kv_bytes_full(shape: Shape, batch: int, tokens: int) -> int:
    """Keys + values of `tokens` tokens for every layer and row (no sizes, no slack)."""
    return 2 * shape.layers * batch * shape.kv_heads * tokens * shape.head_dim * shape.elem


def kv_bytes_centroidkv(shape: Shape, batch: int, slots: int, policy=None) -> int:
    """Keys, values and float32 sizes (and the policy's float32 score buffers: window scores,
    token scores) of `slots` CentroidKVCache slots for every layer and row."""
    per_slot = 2 * shape.head_dim * shape.elem + 4
    if policy is not None:  # a clustering cache only (the buffers are not allocated at ratio 0)
        per_slot += 4 * (policy.score_window > 0) + 4 * bool(policy.token_scores)
    return shape.layers * batch * shape.kv_heads * slots * per_slot


POLICIES = {"plain": PlainClustering, "default": ProtectedClustering}


def add_policy_argument(parser) -> None:
    parser.add_argument("--policy", choices=sorted(POLICIES), default="plain",
                        help="CentroidKV's clustering policy: plain (default, the paper's "
                             "PlainClustering) or default (CentroidKVCache's default)")


def make_policy(name: str):
    """--policy: "plain" (the paper's PlainClustering) or "default" (CentroidKVCache's default)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]()


def _round_up(n: int, align: int = 16) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Layout:
    """What one CentroidKVCache layer holds per row after a prefill of `seen` tokens."""

    seen: int
    live: int  # slots: sink + clustered + recent (and a partial block)
    head_end: int  # end of [sink | clustered]
    clustered_from: int  # first clustered slot (= sink)
    clustered_tokens: int  # tokens the clustered region stands for
    clustered_slots: int
    capacity: int  # allocated slots


def centroidkv_layout(options, seen: int) -> Layout:
    """The layer state a real prefill of `seen` tokens leaves (CentroidKVLayer.update + settle):
    capacity round_up(seen + block), or with max_cache_len (static buffers) at least the slots
    that many tokens need; the sink and recent window stay exact, whole blocks in between are
    clustered; then the buffers shrink to the target (live + block + 1, or the static bound) if
    they are more than 1.5x that."""
    if options.budget is not None:
        raise ValueError("synthetic fill supports the ratio mode only (no budget)")
    block = options.block
    start, blocks = 0, 0
    if options.clusters:
        start = min(options.sink, seen)
        blocks = max((seen - start - options.recent) // block, 0)
    tokens = blocks * block
    slots = options.policy.slots(tokens, ratio=options.ratio, chunk_size=options.chunk_size) if options.ratio > 0 else tokens
    live = seen - tokens + slots
    if options.captures:
        bound = CentroidKVLayer(options)._slot_bound()
        capacity = _round_up(max(seen + block, bound + CAPTURE_HEADROOM))
        target = _round_up(max(bound, live) + CAPTURE_HEADROOM)
    else:
        capacity = _round_up(seen + block)
        target = _round_up(live + block + 1)
    if capacity > target * 3 // 2:
        capacity = target
    return Layout(seen, live, start + slots, start, tokens, slots, capacity)


def fill_centroidkv(cache: CentroidKVCache, shape: Shape, batch: int, seen: int,
                    device, dtype, capacity: Optional[int] = None) -> Layout:
    """Puts every layer of an empty CentroidKVCache in the state of a prefill of `seen` tokens:
    random keys/values in the live slots, size 1 for exact tokens and the mean cluster size for
    centroids (so every row's sizes sum to `seen`), per-row counters as the layer keeps them
    (device-side ones too, for static buffers). `capacity` (slots) replaces the capacity a
    prefill leaves, e.g. to preallocate a full cache for a whole request as a serving system would."""
    if cache.layers:
        raise ValueError("fill_centroidkv needs an empty cache")
    layout = centroidkv_layout(cache.options, seen)
    if capacity is not None:
        if capacity < layout.live:
            raise ValueError(f"capacity {capacity} < live slots {layout.live}")
        layout = dataclasses.replace(layout, capacity=_round_up(capacity))
    proto = torch.empty(1, 1, 1, shape.head_dim, device=device, dtype=dtype)
    proto = proto.expand(batch, shape.kv_heads, 1, shape.head_dim)
    for _ in range(shape.layers):
        layer = CentroidKVLayer(cache.options)
        layer.initialize(proto, proto, layout.capacity)
        layer.keys[:, :, :layout.live].normal_()
        layer.values[:, :, :layout.live].normal_()
        layer.sizes[:, :, :layout.live] = 1.0
        if layout.clustered_slots:
            stop = layout.clustered_from + layout.clustered_slots
            layer.sizes[:, :, layout.clustered_from:stop] = layout.clustered_tokens / layout.clustered_slots
            layer._clustered_any = cache.options.ratio > 0
        layer.lengths = [layout.live] * batch
        layer.head_end = [layout.head_end] * batch
        layer.seen = seen
        if layer.static:  # as settle leaves them after a prefill: a captured step reads no host counter
            layer.seen_dev.fill_(seen)
            _ = layer.lengths_dev
        cache.layers.append(layer)
    return layout


def fill_dynamic(model, shape: Shape, batch: int, seen: int, device, dtype) -> DynamicCache:
    """A stock DynamicCache holding `seen` random tokens per layer (through its own update)."""
    cache = DynamicCache(config=model.config)
    for layer in range(shape.layers):
        keys = torch.randn(batch, shape.kv_heads, seen, shape.head_dim, device=device, dtype=dtype)
        values = torch.randn_like(keys)
        cache.update(keys, values, layer)
        del keys, values
    return cache


def fill_static(model, shape: Shape, batch: int, seen: int, max_len: int, device, dtype) -> StaticCache:
    """A StaticCache of max_len slots whose first `seen` hold random tokens."""
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    proto = torch.empty(1, 1, 1, shape.head_dim, device=device, dtype=dtype)
    proto = proto.expand(batch, shape.kv_heads, 1, shape.head_dim)
    for layer in cache.layers:
        layer.lazy_initialization(proto, proto)
        layer.keys[:, :, :seen].normal_()
        layer.values[:, :, :seen].normal_()
        layer.cumulative_length.fill_(seen)
    return cache


def cache_bytes(cache) -> int:
    """Bytes held by a cache's buffers (CentroidKVCache: keys, values, sizes; stock: keys, values)."""
    if isinstance(cache, CentroidKVCache):
        return cache.memory_bytes().total
    from centroidkv.cache import dynamic_cache_bytes
    return dynamic_cache_bytes(cache).total


def decode_step(model, cache, batch: int, position: int, device, compiled: bool) -> Callable[[int], None]:
    """step(i): decodes one token per row at `position` + i and settles a CentroidKVCache (its
    host part between captured steps). compiled: torch.compile(fullgraph=True) of one token's
    forward, with CUDA graphs (mode="reduce-overhead") on a GPU."""
    name = cache_argument(model)  # once, not per step (it inspects the forward's signature)

    def one_token(token, positions):
        return model(input_ids=token, position_ids=positions, use_cache=True, logits_to_keep=1,
                     **{name: cache}).logits

    if compiled:
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        one_token = torch.compile(one_token, fullgraph=True, mode=mode, dynamic=False)
    settle = cache.settle if isinstance(cache, CentroidKVCache) else (lambda: None)
    token = torch.randint(model.config.vocab_size, (batch, 1), device=device)
    positions = torch.full((batch, 1), position, device=device)

    def step(i: int) -> None:
        one_token(token, positions + i)
        settle()

    return step


# ------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(device, step: Callable[[int], None], warmup: int, steps: int) -> dict:
    """Times `steps` calls of step(i) after `warmup` calls. On CUDA: an event pair around each
    call and no host sync in between, so each time is the GPU timeline of one step, including
    any time the GPU waits for the host to launch work. Also the host time to issue each step."""
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup):
        step(i)
    sync(device)
    events, host = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(warmup + i)
            end.record()
            events.append((start, end))
        else:
            step(warmup + i)
        host.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    times = [s.elapsed_time(e) for s, e in events] if cuda else host
    return dict(ms_median=statistics.median(times), ms_mean=statistics.fmean(times),
                ms_min=min(times), ms_max=max(times), host_ms_median=statistics.median(host),
                steps=steps, warmup=warmup)


def time_once(device, fn: Callable[[], None]) -> float:
    """Milliseconds of one call (synchronised before and after)."""
    sync(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------------ memory, deadline
def free_bytes(device, override_gb: Optional[float] = None) -> float:
    """Free device memory (after releasing cached blocks); on CPU `override_gb` or unlimited."""
    if override_gb is not None:
        return override_gb * GB
    if torch.device(device).type != "cuda":
        return float("inf")
    release(device)
    free, _ = torch.cuda.mem_get_info(device)
    return float(free)


def release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failed_point(error: BaseException) -> dict:
    """The row of a point that raised: oom or error, and why."""
    return dict(status="oom" if is_oom(error) else "error", reason=f"{type(error).__name__}: {str(error)[:300]}")


class Deadline:
    """Stops new work after `seconds` (None: never)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def passed(self, need: float = 0.0) -> bool:
        return self.left() < need


def log(*parts) -> None:
    print(*parts, flush=True)


def environment(device) -> dict:
    return dict(device=device_name(device), torch=torch.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0],
                centroidkv_loaded_from=getattr(centroidkv, "LOADED_FROM", None), pid=os.getpid())


@dataclass
class Run:
    """What every end-to-end benchmark starts from."""
    args: object
    deadline: Deadline
    device: torch.device
    shape: Shape
    model: object


def fill_defaults(args, defaults: dict):
    """Each argument left at None takes its default from {name: (gpu, tiny)} (tiny with --tiny)."""
    for name, (gpu, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    return args


def start(parser, argv, defaults: dict, model=None, max_positions: Optional[Callable] = None) -> Run:
    """Parses argv, fills each argument left at None from defaults {name: (gpu, tiny)}, picks the
    device and builds the model (unless one is given) for max_positions(args) positions."""
    args = fill_defaults(parser.parse_args(argv), defaults)
    device = pick_device(args.device)
    shape = TINY if args.tiny else LLAMA3_8B
    deadline = Deadline(args.deadline_s)
    if model is None:
        log(f"building the model ({shape}) on {device} ...")
        model = build_model(shape, device, shape.dtype, max_positions(args))
    return Run(args, deadline, device, shape, model)


def write_json(path: Optional[str], payload: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)

"""Captured decode steps: CentroidKVCache(max_cache_len=...) under torch.compile(fullgraph=True).

fullgraph=True turns any graph break into an error, so a compiled run that finishes traced each
decode step (cache update, attention, sizes, device-side lengths) as one graph; the dynamo
counters then show that clustering between steps (CentroidKVCache.settle moving slots in place)
never forced a second graph. Tokens are compared with eager generation, greedy, over 256 steps
with clustering in between, on Llama, Qwen2 and Gemma-3 shapes (left-padded batches).
"""
from __future__ import annotations

import logging

import pytest
import torch

from hf_helpers import VOCAB, tiny_model

import centroidkv.backend as backend  # noqa: E402
import centroidkv.cache as cache_module  # noqa: E402
from centroidkv.cache import CentroidKVCache, cache_argument  # noqa: E402
from centroidkv.policies import PlainClustering, Policy  # noqa: E402

transformers = pytest.importorskip("transformers")
from torch._dynamo.utils import counters  # noqa: E402

BATCH, PROMPT, NEW = 3, 48, 256
OPTIONS = dict(ratio=0.75, chunk_size=8, recent=16)


def _prompt(seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=generator)
    mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    mask[0, :5] = 0  # left padding of different widths
    mask[2, :13] = 0
    return tokens, mask


def _generate(model, cache, compiled, new=NEW):
    tokens, mask = _prompt()
    config = transformers.CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    extra = dict(compile_config=config) if compiled else dict(disable_compile=True)
    with torch.no_grad():
        return model.generate(tokens, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, **{cache_argument(model): cache}, **extra)


def _reset_compiler():
    torch.compiler.reset()
    counters.clear()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_compiled_generate_equals_eager(family):
    model = tiny_model(family)
    eager_cache = CentroidKVCache(**OPTIONS)  # the host-driven path, no static buffers
    eager = _generate(model, eager_cache, compiled=False)
    static_cache = CentroidKVCache(**OPTIONS, max_cache_len=PROMPT + NEW)
    assert static_cache.is_compileable
    _reset_compiler()
    compiled = _generate(model, static_cache, compiled=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1  # clustering between steps: no recompile
    static_cache.settle()  # the last step's host part
    for ours, reference in zip(static_cache.layers, eager_cache.layers):
        assert ours.seen == reference.seen == PROMPT + NEW - 1
        assert ours.lengths == reference.lengths
        assert ours.lengths_dev.tolist() == ours.lengths
        torch.testing.assert_close(ours.sizes.sum(-1), reference.sizes.sum(-1))
    clustered = static_cache.layers[-1]  # a full-attention layer in every family
    assert max(clustered.lengths) < PROMPT + NEW - 60  # blocks were clustered while decoding


@pytest.mark.parametrize("policy", [PlainClustering(), None])  # the paper's, and the default
def test_compiled_steps_with_settle_between(policy):
    """A loop of one's own: torch.compile(fullgraph=True) on one token's forward, settle between
    steps; the buffers never move, so the graph's addresses stay valid."""
    model = tiny_model("llama")
    tokens, mask = _prompt(1)
    name = cache_argument(model)
    outputs = {}
    for compiled in (False, True):
        cache = CentroidKVCache(**OPTIONS, policy=policy, max_cache_len=PROMPT + NEW)
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{name: cache}).logits[:, -1]

            def step(token, position):
                return model(token, position_ids=position, use_cache=True, **{name: cache}).logits[:, -1]

            run = torch.compile(step, fullgraph=True) if compiled else step
            _reset_compiler()
            layer = cache.layers[0]
            addresses = [t.data_ptr() for t in (layer.keys, layer.values, layer.sizes, layer.lengths_dev)]
            picked, position, history = [], positions[:, -1:], []
            for _ in range(96):
                token = logits.argmax(-1, keepdim=True)
                picked.append(token)
                position = position + 1
                logits = run(token, position)
                cache.settle()
                history.append(layer.lengths[0])
            assert [t.data_ptr() for t in (layer.keys, layer.values, layer.sizes, layer.lengths_dev)] == addresses
            assert any(after < before for before, after in zip(history, history[1:]))  # clustered in between
        outputs[compiled] = torch.cat(picked, 1)
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(outputs[True], outputs[False])


def test_first_clustering_between_compiled_steps_keeps_one_graph(monkeypatch):
    """A prompt too short to cluster: the first clustering of the generation (sizes no longer
    alike across heads) happens between compiled steps, and the first trace is also the first
    kernel lookup; neither may change the graph (a recompile on a GPU costs a minute)."""
    model = tiny_model("llama")
    tokens = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    name = cache_argument(model)
    outputs = {}
    for compiled in (False, True):
        cache = CentroidKVCache(**OPTIONS, max_cache_len=8 + 80)
        with torch.no_grad():
            logits = model(tokens, use_cache=True, **{name: cache}).logits[:, -1]
            layer = cache.layers[0]
            assert not layer._clustered_any

            def step(token):
                return model(token, use_cache=True, **{name: cache}).logits[:, -1]

            run = torch.compile(step, fullgraph=True) if compiled else step
            _reset_compiler()
            monkeypatch.setattr(backend, "_HAS_KERNEL", {})  # the lookup happens under the trace
            picked = []
            for _ in range(80):
                picked.append(logits.argmax(-1, keepdim=True))
                logits = run(picked[-1])
                cache.settle()
        assert layer._clustered_any and layer.lengths[0] < 8 + 80 - 20
        outputs[compiled] = torch.cat(picked, 1)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.parametrize("policy", [PlainClustering(), None])
def test_compiled_step_writes_the_buffers_in_place(policy):
    """The compiled step touches one slot per row of each buffer, never all of them: a write
    torch.compile cannot do in place (a scatter_ is functionalised) becomes a copy of the whole
    keys, values and sizes on every step, which at 32k tokens costs more than the attention."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("llama")
    tokens, mask = _prompt(4)
    name = cache_argument(model)
    cache = CentroidKVCache(**OPTIONS, policy=policy, max_cache_len=PROMPT + 997)  # odd capacity
    with torch.no_grad():
        model(tokens, attention_mask=mask, use_cache=True, **{name: cache})
        step = torch.compile(lambda token, mask: model(token, attention_mask=mask, use_cache=True,
                                                       **{name: cache}).logits, fullgraph=True)
        full_mask = torch.cat([mask, torch.ones(BATCH, 1, dtype=mask.dtype)], 1)  # padding marked in the graph
        _, code = run_and_get_code(step, tokens[:, -1:], full_mask)
    code = "\n".join(code)
    layer = cache.layers[0]
    assert "centroidkv.attention" in code
    for buffer in layer._buffers():
        assert buffer.shape[2] == layer.capacity > PROMPT + 200
        assert str(buffer.numel()) not in code, f"a {list(buffer.shape)} buffer is copied whole"


def test_static_buffers_decode_like_the_dynamic_cache_eagerly():
    """Without compiling, the captured path (device-side lengths, whole buffers) gives the same
    cache as the host-driven one, for the default policy and budget mode."""
    model = tiny_model("qwen2")
    for extra in (dict(OPTIONS), dict(budget=64, chunk_size=8, recent=16)):
        dynamic = CentroidKVCache(**extra)
        static = CentroidKVCache(**extra, max_cache_len=PROMPT + 64)
        assert torch.equal(_generate(model, static, False, 64), _generate(model, dynamic, False, 64))
        for ours, reference in zip(static.layers, dynamic.layers):
            assert ours.lengths == reference.lengths
            torch.testing.assert_close(ours.sizes.sum(-1), reference.sizes.sum(-1))


def test_static_buffers_hold_the_slots_not_the_tokens():
    model = tiny_model("llama")
    horizon = 4096
    cache = CentroidKVCache(**OPTIONS, max_cache_len=horizon)
    _generate(model, cache, compiled=False, new=2)
    layer = cache.layers[0]
    per_slot = layer.memory_bytes() / layer.capacity
    full = per_slot * horizon
    assert layer.memory_bytes() < 0.3 * full  # ratio 0.75: about a quarter of the tokens, plus the window


def test_two_captured_steps_without_settle_are_refused():
    cache = CentroidKVCache(**OPTIONS, max_cache_len=200)
    layer_keys = torch.randn(1, 2, 40, 16)
    cache.update(layer_keys, layer_keys, 0)
    layer = cache.layers[0]
    layer.attention_inputs()
    layer.settle()
    token = torch.randn(1, 2, 1, 16)
    keys, _ = cache.update(token, token, 0)
    assert keys.shape[2] == layer.capacity  # whole buffers
    layer.attention_inputs()  # read by the attention, but not settled
    with pytest.raises(RuntimeError, match=r"call cache.settle\(\) between captured decode steps"):
        cache.update(token, token, 0)
    cache.settle()
    cache.update(token, token, 0)
    assert layer.pending == 1 and layer.seen == 41 and cache.get_seq_length() == 42


def test_more_tokens_than_max_cache_len_grow_the_buffers(caplog, monkeypatch):
    monkeypatch.setattr(cache_module, "_NOTED", set())  # notes are logged once per process
    model = tiny_model("llama")
    dynamic = CentroidKVCache(**OPTIONS)
    static = CentroidKVCache(**OPTIONS, max_cache_len=16)  # far too small for the prompt and 200 more
    with caplog.at_level(logging.WARNING, logger="centroidkv"):
        got = _generate(model, static, False, 200)
    assert torch.equal(got, _generate(model, dynamic, False, 200))
    assert static.layers[0].lengths == dynamic.layers[0].lengths
    assert any("more slots than max_cache_len=16" in record.getMessage() for record in caplog.records)


class _Accumulating(Policy):
    score_window = 1
    accumulate_scores = True

    def compress(self, segment, *, ratio, chunk_size):
        return segment


def test_a_policy_needing_per_step_python_is_not_captured(caplog, monkeypatch):
    monkeypatch.setattr(cache_module, "_NOTED", set())
    with caplog.at_level(logging.WARNING, logger="centroidkv"):
        cache = CentroidKVCache(**OPTIONS, policy=_Accumulating(), max_cache_len=512)
        CentroidKVCache(**OPTIONS, policy=_Accumulating(), max_cache_len=512)
    assert not cache.is_compileable
    notes = [r.getMessage() for r in caplog.records if "decode steps run eagerly" in r.getMessage()]
    assert len(notes) == 1 and "updates token scores on every decode step" in notes[0]


@pytest.mark.parametrize("value", [0, -3, 1.5, "64"])
def test_bad_max_cache_len_is_named(value):
    with pytest.raises((ValueError, TypeError), match="max_cache_len"):
        CentroidKVCache(max_cache_len=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_graph_decode_matches_eager(family):
    """mode="reduce-overhead" (CUDA graphs) replays each step; teacher-forced on the eager run's
    tokens, so logits are compared step by step (kernels differ from eager in the last bits)."""
    model = tiny_model(family).cuda()
    tokens, mask = (t.cuda() for t in _prompt(2))
    name = cache_argument(model)
    steps = 160
    runs = {}
    for compiled in (False, True):
        cache = CentroidKVCache(**OPTIONS, max_cache_len=PROMPT + steps + 1)
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{name: cache}).logits[:, -1]

            def step(token, position):
                return model(token, position_ids=position, use_cache=True, **{name: cache}).logits[:, -1]

            run = torch.compile(step, fullgraph=True, mode="reduce-overhead") if compiled else step
            _reset_compiler()
            forced = runs.get(False, (None, None))[1]
            position, out, picked = positions[:, -1:], [], []
            for i in range(steps):
                token = logits.argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
                picked.append(token)
                position = position + 1
                logits = run(token, position).clone()  # a replay overwrites its outputs
                cache.settle()
                out.append(logits)
        runs[compiled] = (torch.stack(out, 1), torch.cat(picked, 1), cache)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0  # replayed as a CUDA graph, not run eagerly
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=2e-3, rtol=2e-3)
    assert runs[True][2].layers[-1].lengths == runs[False][2].layers[-1].lengths
    assert max(runs[True][2].layers[-1].lengths) < PROMPT + steps - 60  # clustered while replaying


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generate_compiles_the_decode_step():
    """On a GPU, generate() with max_cache_len compiles the step by itself (transformers' own
    path for compileable caches: CUDA graphs, no graph break). Tokens equal eager generation up
    to a near tie in eager's logits, where last-bit differences may pick the other token."""
    model = tiny_model("llama").cuda()
    tokens, mask = (t.cuda() for t in _prompt())
    new, runs = 96, {}
    for compiled in (False, True):
        _reset_compiler()
        cache = CentroidKVCache(**OPTIONS, max_cache_len=PROMPT + new)
        with torch.no_grad():
            runs[compiled] = model.generate(
                tokens, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                **({} if compiled else dict(disable_compile=True)), **{cache_argument(model): cache})
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    eager, ours = runs[False].sequences[:, PROMPT:], runs[True].sequences[:, PROMPT:]
    top2 = torch.stack(runs[False].logits, 1).float().topk(2, -1).values
    gap = top2[..., 0] - top2[..., 1]
    for row in range(BATCH):
        differ = (eager[row] != ours[row]).nonzero()
        if len(differ):
            first = int(differ[0, 0])
            assert gap[row, :first + 1].min() < 1e-3, (row, first)
    assert max(cache.layers[-1].lengths) < PROMPT + new - 40  # clustered while replaying

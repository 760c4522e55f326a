"""centroidkv.vllm in a real vLLM engine (CPU, SmolLM2-135M, eager, in-process): off it equals
stock vLLM, on it equals the transformers CentroidKVCache, and the blocks it frees admit more
requests. Needs vLLM (scripts/setup_vllm.sh makes .venv-vllm); CI runs it in a job of its own.

One engine per configuration (engine starts dominate the time): each runs every workload once
and the tests compare what they recorded.
"""
import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: inspectable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import centroidkv  # noqa: E402
from centroidkv.cache import cache_argument  # noqa: E402
from centroidkv.policies import PlainClustering  # noqa: E402
from centroidkv.vllm.model_folder import smollm2_folder  # noqa: E402
from centroidkv.vllm.plan import MergePlan  # noqa: E402
from centroidkv.vllm.running import RunningPeak  # noqa: E402

pytestmark = pytest.mark.slow

BLOCK = 32
POOL = 4 * 26 + 1  # four uncompressed capacity requests (26 blocks each) and the null block
NEW = 40
RATIO = 0.75
SENTENCE = "The quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence. "


def _engine_kwargs(centroidkv_options):
    extra = {} if centroidkv_options is None else {"additional_config": {"centroidkv": centroidkv_options}}
    return dict(max_model_len=2048, enforce_eager=True, dtype="float32", block_size=BLOCK, seed=0,
                enable_prefix_caching=False, num_gpu_blocks_override=POOL, max_num_batched_tokens=4096,
                max_num_seqs=64, **extra)


def _prompts(tokenizer, lengths):
    """Token-id prompts of the given lengths, each a different slice of varied text."""
    words = (SENTENCE * 8 + "Numbers: " + " ".join(str(i * 37 % 1000) for i in range(400))).split()
    text = " ".join(words * 4)
    ids = tokenizer(text).input_ids
    return [ids[7 * i:7 * i + n] for i, n in enumerate(lengths)]


def _run(folder, options):
    """Generates the comparison batch and the capacity workload on one engine; returns what the
    tests check (tokens, logprobs, peak running requests, finished count)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), **_engine_kwargs(options))
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=1)
    batch = _prompts(tokenizer, [300, 701, 1100])
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]

    running = RunningPeak(llm)
    capacity = _prompts(tokenizer, [800] * 16)
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    finished = llm.generate([{"prompt_token_ids": p} for p in capacity], short, use_tqdm=False)
    result = {"batch": batch, "tokens": tokens, "logprobs": logprobs, "peak": running.peak,
              "finished": sum(len(o.outputs[0].token_ids) == 8 for o in finished)}
    del llm
    gc.collect()
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return smollm2_folder(tmp_path_factory.getbasetemp() / "smollm2-vllm")


@pytest.fixture(scope="module")
def runs(folder):
    return {"stock": _run(folder, None), "off": _run(folder, {"ratio": 0.0}),
            "on": _run(folder, {"ratio": RATIO, "recent": 64, "sink": 4, "chunk_size": 32})}


def test_plugin_with_ratio_0_equals_stock_vllm(runs):
    stock, off = runs["stock"], runs["off"]
    assert off["tokens"] == stock["tokens"]
    torch.testing.assert_close(torch.tensor(off["logprobs"]), torch.tensor(stock["logprobs"]), atol=1e-3, rtol=0)
    assert off["peak"] == stock["peak"] == 4  # the same pool admits the same requests


def _assert_same_as_on(on, folder, kwargs):
    """Another engine configuration clusters the comparison batch as the "on" run did."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), **kwargs)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in on["batch"]], greedy, use_tqdm=False)
    del llm
    gc.collect()
    for o, tokens, logprobs in zip(outs, on["tokens"], on["logprobs"]):
        assert list(o.outputs[0].token_ids) == tokens
        got = [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(logprobs), atol=1e-3, rtol=0)


class _GroupedPlain(PlainClustering):
    """The paper's policy, handing over whole vLLM groups: the transformers cache then clusters
    at the same token counts as the plugin, so both hold the same slots at every step."""

    def block_size(self, ratio, chunk_size):
        plan = MergePlan.build(block_size=BLOCK, ratio=ratio, chunk_size=chunk_size)
        return plan.group_blocks * BLOCK


def test_clustering_equals_the_transformers_cache(runs, folder):
    from transformers import AutoModelForCausalLM

    on = runs["on"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="centroidkv").eval()
    model.generation_config.eos_token_id = None
    for prompt, tokens, logprobs in zip(on["batch"], on["tokens"], on["logprobs"]):
        # sink 4 rounds up to the plugin's first whole block: 32 tokens.
        cache = centroidkv.CentroidKVCache(ratio=RATIO, chunk_size=32, sink=BLOCK, recent=64, policy=_GroupedPlain())
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=2, **{cache_argument(model): cache})
        want = out.sequences[0, len(prompt):].tolist()
        want_logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, want)]
        assert tokens == want
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=2e-3, rtol=0)
        assert cache.live_slots(0)[0] < len(prompt)  # it did cluster


def test_clustering_changes_the_long_prompts_output(runs):
    # The comparison above would pass vacuously if nothing were clustered.
    assert runs["on"]["logprobs"][2] != runs["off"]["logprobs"][2]


def test_freed_blocks_admit_more_requests(runs):
    plan = MergePlan.build(block_size=BLOCK, ratio=RATIO, chunk_size=32, sink=4, recent=64)
    full = -(-(800 + 8) // BLOCK)
    held = len(plan.live_blocks(800 + 8))
    assert runs["stock"]["peak"] == (POOL - 1) // full == 4
    assert runs["on"]["finished"] == runs["stock"]["finished"] == 16
    # Once clustered a request holds `held` blocks (sink, kept blocks, the unclustered tail), but
    # its prompt needs `full` first: the plan's bound (pool // held) is approached, not reached.
    assert runs["on"]["peak"] >= max(2 * runs["stock"]["peak"], 0.75 * ((POOL - 1) // held)), (runs["on"]["peak"], held)


@pytest.mark.parametrize("kwargs, match", [
    ({"enable_prefix_caching": True}, "prefix caching"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
     "speculative decoding"),
    ({"kv_offloading_size": 1.0}, "offload"),
    ({"additional_config": {"centroidkv": {"ratio": 0.99, "chunk_size": 4}}}, "whole blocks"),
    ({"additional_config": {"centroidkv": {"ratio": 0.75, "window": 8}}}, "unknown option"),
])
def test_unsupported_engines_are_refused_before_loading_the_model(folder, kwargs, match):
    from vllm.engine.arg_utils import EngineArgs

    base = {**_engine_kwargs({"ratio": RATIO}), **kwargs}
    with pytest.raises(Exception, match=match):
        EngineArgs(model=str(folder), **base).create_engine_config()


def test_an_engine_without_the_switch_is_stock(folder):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(folder), **{**_engine_kwargs(None), "enable_prefix_caching": True}).create_engine_config()
    assert config.cache_config.enable_prefix_caching  # nothing refused, nothing changed


def test_sliding_window_layers_are_refused():
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from centroidkv.vllm import worker
    from centroidkv.vllm.cpu_backend import CentroidKVCPUBackend

    spec = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=512)
    saved = worker._MODEL_CONFIG
    worker._MODEL_CONFIG = SimpleNamespace(additional_config={"centroidkv": {"ratio": RATIO}})
    try:
        with pytest.raises(ValueError, match="full-attention layers only"):
            CentroidKVCPUBackend.customize_spec(spec)
    finally:
        worker._MODEL_CONFIG = saved


def test_tensor_parallel_ranks_cluster_their_own_heads(runs, folder, monkeypatch):
    """SmolLM2's 3 KV heads on 3 ranks, one each: every rank clusters its own head with no
    communication (paged.cluster_groups works per head), and the output equals one rank's."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")  # three ranks on CI's two cores
    kwargs = {**_engine_kwargs({"ratio": RATIO, "recent": 64, "sink": 4, "chunk_size": 32}), "tensor_parallel_size": 3}
    _assert_same_as_on(runs["on"], folder, kwargs)


class _FakeCuda:
    def is_cuda(self):
        return True

    def is_cpu(self):
        return False


@pytest.mark.parametrize("options, backend, match", [
    ({"ratio": RATIO}, None, "experimental_gpu"),
    ({"ratio": RATIO, "experimental_gpu": True}, "TRITON_ATTN", "TRITON_ATTN attention backend"),
    ({"ratio": RATIO, "experimental_gpu": True}, None, None),
])
def test_cuda_engines_need_the_opt_in_and_flash_attention(folder, options, backend, match):
    """The GPU path has not run on a GPU: a CUDA engine must opt in, and clustering runs in the
    FlashAttention backend it replaces, which the check then selects."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from centroidkv.vllm.options import refuse_unsupported

    config = EngineArgs(model=str(folder), **_engine_kwargs(None)).create_engine_config()
    config.additional_config = {"centroidkv": options}
    config.attention_config.backend = None if backend is None else AttentionBackendEnum[backend]
    if match is None:
        refuse_unsupported(config, _FakeCuda())
        assert config.attention_config.backend == AttentionBackendEnum.FLASH_ATTN
        assert AttentionBackendEnum.FLASH_ATTN.get_path().endswith("CentroidKVFlashBackend")
    else:
        with pytest.raises(ValueError, match=match):
            refuse_unsupported(config, _FakeCuda())


def test_compiled_model_equals_eager(runs, folder):
    """vLLM's torch.compile'd model (the default without enforce_eager) calls the clustering
    attention as an opaque op: the same tokens and logprobs as eager."""
    kwargs = {**_engine_kwargs({"ratio": RATIO, "recent": 64, "sink": 4, "chunk_size": 32}), "enforce_eager": False}
    _assert_same_as_on(runs["on"], folder, kwargs)

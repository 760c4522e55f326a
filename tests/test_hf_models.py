"""CentroidKV inside several transformers model families, and on a real small model."""
import os

import pytest
import torch

from hf_helpers import VOCAB, teacher_forced_logits, tiny_model
from centroidkv.cache import cache_argument
from centroidkv.eval import data

import centroidkv

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3"])
def test_family_generates_and_positions_continue(family):
    model = tiny_model(family, seed=11)
    torch.manual_seed(11)
    prompt = torch.randint(1, VOCAB, (2, 160))
    mask = torch.ones_like(prompt)
    mask[1, :40] = 0
    options = dict(ratio=0.75, chunk_size=8, recent=16)
    cache = centroidkv.CentroidKVCache(**options)
    name = cache_argument(model)
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         **{name: cache})
    assert out.shape == (2, 170)
    assert cache.get_seq_length() == 169  # uncompressed, though far fewer slots are held
    full_layer = 1 if family == "gemma3" else 0
    assert max(cache.live_slots(full_layer)) < 100
    for row in range(2):  # padding never changes a row's output
        alone = model.generate(prompt[row:row + 1, mask[row].bool()], max_new_tokens=10, do_sample=False,
                               pad_token_id=0, **{name: centroidkv.CentroidKVCache(**options)})
        assert torch.equal(alone[0, -10:], out[row, -10:])
    # Without position_ids the next position is the uncompressed length.
    with torch.no_grad():
        one = centroidkv.CentroidKVCache(**options)
        model(prompt[:1], use_cache=True, **{name: one})
        implicit = model(torch.tensor([[3]]), use_cache=True, **{name: one}).logits
        two = centroidkv.CentroidKVCache(**options)
        model(prompt[:1], use_cache=True, **{name: two})
        explicit = model(torch.tensor([[3]]), position_ids=torch.tensor([[160]]), use_cache=True,
                         **{name: two}).logits
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)


def test_gemma3_sliding_layers_keep_their_window():
    """ratio 0: Gemma-3 with sliding layers (window 24) matches the stock SDPA model and cache;
    the sliding layer holds no more than the window plus one chunk."""
    ours, stock = tiny_model("gemma3", seed=12), tiny_model("gemma3", attn="sdpa", seed=12)
    torch.manual_seed(12)
    prompt, continuation = torch.randint(1, VOCAB, (1, 100)), torch.randint(1, VOCAB, (1, 30))
    cache = centroidkv.CentroidKVCache(ratio=0.0, chunk_size=8)
    got = teacher_forced_logits(ours, cache, prompt, continuation)
    want = teacher_forced_logits(stock, transformers.DynamicCache(config=stock.config), prompt, continuation)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32 kernel rounding only
    assert cache.layers[0].is_sliding and max(cache.live_slots(0)) < 24 + 8
    assert cache.live_slots(1) == [130]


def _smollm2():
    try:
        folder, gguf = data.smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                              attn_implementation="centroidkv")
    return tokenizer, model.eval()


@pytest.mark.slow  # loading the GGUF and 2 x 1024-token prefills take minutes on 2 CPU cores
def test_smollm2_prose_kl_at_075():
    """Next-token KL(full || CentroidKV 0.75) on a teacher-forced prose continuation."""

    tokenizer, model = _smollm2()
    ids = tokenizer("\n\n".join(data.essay_texts()), return_tensors="pt")["input_ids"][:, 5000:5000 + 1024 + 64]
    prompt, continuation = ids[:, :1024], ids[:, 1024:]
    full = teacher_forced_logits(model, centroidkv.CentroidKVCache(ratio=0.0), prompt, continuation)
    cache = centroidkv.CentroidKVCache(ratio=0.75)
    ours = teacher_forced_logits(model, cache, prompt, continuation)
    log_p, log_q = full.log_softmax(-1), ours.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    print(f"SmolLM2-135M, 1024-token prose, ratio 0.75: KL {kl:.4f}, slots {cache.live_slots(0)}")
    assert kl < 0.15
    assert cache.live_slots(0)[0] < 0.45 * (1024 + 64)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("stock_cache", ["dynamic", "static"])
def test_stock_caches_work_with_centroidkv_attention(family, stock_cache):
    # A model loaded with attn_implementation="centroidkv" but given transformers' own cache must
    # give the stock result; a static cache holds slots it has not written yet.
    ours, stock = tiny_model(family, seed=13), tiny_model(family, attn="sdpa", seed=13)
    torch.manual_seed(13)
    prompt = torch.randint(1, VOCAB, (2, 30))
    mask = torch.ones_like(prompt)
    mask[1, :6] = 0

    def generate(model, **extra):
        cache = (transformers.StaticCache(config=model.config, max_cache_len=64) if stock_cache == "static"
                 else transformers.DynamicCache(config=model.config))
        return model.generate(prompt[:1] if not extra else prompt, max_new_tokens=10, do_sample=False,
                              pad_token_id=0, **{cache_argument(model): cache}, **extra)

    assert torch.equal(generate(ours), generate(stock))
    assert torch.equal(generate(ours, attention_mask=mask), generate(stock, attention_mask=mask))

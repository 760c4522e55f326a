"""The evaluation harness on Gemma-3: sliding-window attention, its caches, global-only
compression, <bos> handling, and the GGUF assembled from chunk packages.

Fast tests use a tiny random-weight Gemma-3 (window 24, one global layer between two sliding
ones) against the model's own eager attention; the slow one loads Gemma-3-270M itself and is
skipped where its packages are not installed."""
import hashlib

import pytest
import torch

from hf_helpers import VOCAB, tiny_model

from centroidkv.eval import data
from centroidkv.eval import model as M
from centroidkv.eval.methods import make_method
from centroidkv.eval.runner import Budget, _group_sum, _window_scores, compress_cache, prompt_parts
from centroidkv.eval.tasks import Sample

transformers = pytest.importorskip("transformers")

WINDOW = 24  # tiny_model's sliding window


def _tiny_gemma(attn="eager"):
    model = tiny_model("gemma3", attn=attn, seed=3, num_key_value_heads=1,  # MQA, as Gemma-3-270M
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                       num_hidden_layers=3)
    return model


def _harness(model):
    return M.LoadedModel(model, None, M.install_attention(model), "tiny-gemma3")


@torch.no_grad()
def test_sliding_window_matches_eager_beyond_the_window():
    model = _tiny_gemma()
    ids = torch.randint(0, VOCAB, (1, 3 * WINDOW + 5))
    want = model(ids).logits[0]
    got = M.forward(_harness(model), ids[0].tolist(), M.cache_from([], model.config), 0)
    # fp32 and the same operations in the same order as eager: rounding at most
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the prompt is long enough for the window to matter: a full causal mask gives other logits
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    unwindowed = M.forward(_harness(model), ids[0].tolist(), M.cache_from([], model.config), 0)
    assert (unwindowed - want).abs().max() > 1e-2


@torch.no_grad()
def test_sliding_layer_caches_round_trip_through_kv_of_and_cache_from():
    """A prefill then one-token decodes through rebuilt caches give eager's full-prompt logits;
    sliding layers hold only their last window - 1 tokens, as transformers keeps them."""
    model = _tiny_gemma()
    ids = torch.randint(0, VOCAB, (1, 70))
    want = model(ids).logits[0, 50:]
    lm = _harness(model)
    cache = M.cache_from([], model.config)
    M.forward(lm, ids[0, :50].tolist(), cache, 0)
    kv = M.kv_of(cache)
    assert [k.shape[2] for k, _ in kv] == [WINDOW - 1, 50, WINDOW - 1]
    got = []
    for j, token in enumerate(ids[0, 50:].tolist()):
        cache = M.cache_from(kv, model.config)
        got.append(M.forward(lm, [token], cache, 50 + j))
        kv = M.kv_of(cache)
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)


def test_only_global_layers_are_compressed():
    model = _tiny_gemma()
    assert M.compressible_layers(model.config) == [1]
    llama = tiny_model("llama")
    assert M.compressible_layers(llama.config) == list(range(llama.config.num_hidden_layers))
    lm = _harness(model)
    ids = torch.randint(0, VOCAB, (1, 300))[0].tolist()
    cache = M.cache_from([], model.config)
    M.forward(lm, ids, cache, 0, record=True, last_only=True)
    kv = M.kv_of(cache)
    layers = M.compressible_layers(model.config)
    window = {i: _window_scores(lm.state.window_rows[i], 1) for i in layers}
    totals = {i: _group_sum(lm.state.totals[i], 1) for i in layers}
    budget = Budget(sink=4, middle=256, tail=40, kept=64)
    for name in ("paper", "snapkv", "protected90"):
        out, sizes = compress_cache(kv, window, totals, make_method(name), budget, seed=0)
        assert out[0][0] is kv[0][0] and out[2][1] is kv[2][1]  # sliding layers untouched
        assert out[1][0].shape[2] == budget.cache_len == 4 + 64 + 40
        assert set(sizes) <= {1}
        # decoding on top of the mixed cache works and stays finite
        logits = M.forward(lm, [5], M.cache_from(out, model.config), 300, sizes=sizes)
        assert torch.isfinite(logits).all()
    # a region knows its depth among the compressed layers (layer 1 is the first global one)
    depths = []
    recording = make_method("snapkv")
    recording.compress = lambda region: depths.append(region.depth) or type(recording).compress(recording, region)
    compress_cache(kv, window, totals, recording, budget, seed=0)
    assert depths == [0]


@torch.no_grad()
def test_probe_queries_reproduce_the_global_layers_attention_rows():
    """The fitted-centroid methods read these probes; on Gemma-3 they carry its own query scale
    (query_pre_attn_scalar) and one KV head for every query head (MQA)."""
    model = _tiny_gemma()
    lm = _harness(model)
    cache = M.cache_from([], model.config)
    M.forward(lm, torch.randint(0, VOCAB, (1, 50))[0].tolist(), cache, 0, record=True)
    (keys, _) = M.kv_of(cache)[1]
    probes = lm.state.queries[1]                                  # [1, Hq, 50, D]
    logits = probes[0, :, -1] @ keys[0, 0].float().transpose(-1, -2)  # every query head reads the one KV head
    torch.testing.assert_close(torch.softmax(logits, -1), lm.state.window_rows[1][0, :, -1].float(),
                               atol=1e-5, rtol=1e-4)
    # the mass-and-logit fit runs on MQA probes and keeps the exact slots
    region_keys = keys[:, :, :40].float()
    from centroidkv.eval.methods import Region
    region = Region(region_keys, torch.randn(1, 1, 40, keys.shape[-1]), torch.rand(1, 1, 40), torch.rand(1, 1, 40),
                    16, torch.Generator().manual_seed(0), torch.rand(1, 1, 40), None, probes[:, :, 40:])
    k, v, s = make_method("default_fitlogit").compress(region)
    assert k.shape == (1, 1, 16, keys.shape[-1]) and torch.isfinite(k).all() and torch.isfinite(v).all()
    assert (s > 0).all()


class _BosTokenizer:
    """Stand-in tokenizer that, like Gemma's, puts <bos> (id 2) first unless told not to."""
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text.replace("<bos>", "\x02")]
        return {"input_ids": ([2] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<bos>[user]" + messages[0]["content"] + "[model]"


def test_prompt_starts_with_one_bos():
    tok = _BosTokenizer()
    sample = Sample("passkey", 16, 0, "ctx", "q?", "A:", ["1"])
    ctx, question = prompt_parts(tok, sample)
    assert ctx == [2] + [ord(c) for c in "ctx"] and 2 not in question
    with pytest.raises(ValueError, match="chat template"):
        prompt_parts(tok, sample, chat=True)
    tok.chat_template = "set"
    ctx, _ = prompt_parts(tok, sample, chat=True)
    assert ctx[:2] == [2, ord("[")] and ctx.count(2) == 1  # the template's <bos>, not a second one


def _fake_chunk_packages(tmp_path, monkeypatch, payload: bytes, digest: str):
    name = "model.gguf"
    meta = tmp_path / data.GEMMA3_PACKAGE / "data"
    meta.mkdir(parents=True)
    (meta / "SHA256SUMS").write_text(f"{digest}  {name}\n")
    cut = [0, 3, 3, 10, len(payload)]  # uneven parts, one empty
    for i in range(4):
        folder = tmp_path / f"{data.GEMMA3_PACKAGE}_part{i + 1}" / "data"
        folder.mkdir(parents=True)
        (folder / f"{name}.part{i:02d}").write_bytes(payload[cut[i]:cut[i + 1]])
    monkeypatch.setattr(data, "package_dir", lambda pkg: tmp_path / pkg)
    monkeypatch.setenv("CENTROIDKV_CACHE", str(tmp_path / "cache"))
    return name


def test_gguf_is_assembled_once_in_part_order(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 3 + b"tail"
    name = _fake_chunk_packages(tmp_path, monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    folder, file = data.gemma3_gguf()
    assert file == name and (folder / file).read_bytes() == payload
    mtime = (folder / file).stat().st_mtime_ns
    assert data.gemma3_gguf() == (folder, file) and (folder / file).stat().st_mtime_ns == mtime


def test_gguf_with_a_wrong_hash_is_refused_and_not_kept(tmp_path, monkeypatch):
    _fake_chunk_packages(tmp_path, monkeypatch, b"some bytes", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        data.gemma3_gguf()
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow  # loads Gemma-3-270M from its GGUF (about 40 s here) and runs three 600-token prefills
@torch.no_grad()
def test_gemma3_270m_harness_attention_matches_eager():
    """Logits of a 600-token prompt (longer than the 512-token local window) under the harness
    attention vs the model's eager attention."""
    try:
        data.gemma3_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    torch.set_num_threads(1)
    lm = M.load_model("gemma3")
    config = lm.model.config
    assert config.sliding_window == 512 and M.compressible_layers(config) == [5, 11, 17]
    tok = lm.tokenizer
    assert M.stop_token_ids(tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
    text = tok("\n\n".join(data.essay_texts()), add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] + text[3000:3599]
    keep = 100  # compare the last 100 positions (the window is exceeded from position 512 on)
    got = M.forward(lm, ids, M.cache_from([], config), 0)[-keep:]
    lm.model.set_attn_implementation("eager")
    want = lm.model(torch.tensor([ids]), logits_to_keep=keep).logits[0]
    # fp32; eager does the same operations, SDPA differed from eager by 3e-5 on this prompt
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    for layer in lm.model.model.layers:  # sensitivity: without the window the logits move a lot
        layer.self_attn.sliding_window = None
    lm.model.set_attn_implementation(M.ATTENTION_NAME)
    unwindowed = M.forward(lm, ids, M.cache_from([], config), 0)[-keep:]
    assert (unwindowed - want).abs().max() > 1.0

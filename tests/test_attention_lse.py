"""Attention with log-sum-exp (attention_lse.py) against a float64 reference: the fused kernels
and the blocked fallback, with and without a per-key bias, causal blocks, GQA and MQA, and the
exact merge of a clustered prefix with a causal new block."""
import pytest
import torch

from centroidkv import attention_lse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(4, 4), (8, 2), (6, 1)]  # (query heads, KV heads): MHA, GQA, MQA


def reference(q, k, v, scale, causal=False, key_bias=None):
    """float64 softmax attention: (out, lse); zeros / -inf where nothing is visible."""
    group = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    logits = q.double() @ kd.transpose(-1, -2) * scale
    if key_bias is not None:
        logits = logits + key_bias.double().repeat_interleave(group, 1)[:, :, None, :]
    if causal:
        offset = k.shape[2] - q.shape[2]  # query i sees keys <= offset + i
        above = torch.arange(k.shape[2]) > (offset + torch.arange(q.shape[2]))[:, None]
        logits = logits.masked_fill(above.to(q.device), -torch.inf)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return probs @ vd, lse


def inputs(device, dtype, heads, queries, keys, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = heads
    q = torch.randn(2, q_heads, queries, dim, generator=gen)
    k = torch.randn(2, kv_heads, keys, dim, generator=gen)
    v = torch.randn(2, kv_heads, keys, dim, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def sizes_bias(device, kv_heads, keys, seed=1, zeros=True):
    """log(size) of clustered slots (sizes 1..40, about a fifth 0 = masked), [2, Hkv, L]."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 41, (2, kv_heads, keys), generator=gen).float()
    if zeros:
        sizes[torch.rand(sizes.shape, generator=gen) < 0.2] = 0
    return sizes.log().to(device)


def assert_close(got, want_out, want_lse, dtype):
    out, lse = got
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    err = (out.double() - want_out).abs().max().item()
    assert err <= tol * max(1.0, want_out.abs().max().item()), f"output error {err}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double() - want_lse)[finite].abs().max().item() <= 20 * tol


@pytest.fixture(params=["fused", "blocked"])
def path(request, monkeypatch):
    if request.param == "blocked":
        monkeypatch.setattr(attention_lse, "_fused_kernel", lambda q, v: None)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("kind", ["causal", "bias", "plain"])
def test_matches_the_float64_reference(path, device, dtype, heads, kind):
    keys = 67
    q, k, v = inputs(device, dtype, heads, keys if kind == "causal" else 33, keys)
    bias = sizes_bias(device, heads[1], keys) if kind == "bias" else None
    got = attention_lse.attend(q, k, v, 0.125, causal=kind == "causal", key_bias=bias)
    assert_close(got, *reference(q, k, v, 0.125, kind == "causal", bias), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dim", [64, 80, 256])
def test_prefix_and_causal_block_merge_exactly(path, device, dtype, heads, dim):
    # A clustered prefix of 90 slots (log-size bias, some masked) and a new block of 41 tokens.
    prefix, block = 90, 41
    q, k, v = inputs(device, dtype, heads, block, prefix + block, dim=dim, seed=dim)
    bias = sizes_bias(device, heads[1], prefix, seed=dim)
    parts = [attention_lse.attend(q, k[:, :, :prefix], v[:, :, :prefix], 0.1, key_bias=bias),
             attention_lse.attend(q, k[:, :, prefix:], v[:, :, prefix:], 0.1, causal=True)]
    merged = attention_lse.merge(parts)
    full_bias = torch.cat([bias, torch.zeros(2, heads[1], block, device=device)], -1)
    want, _ = reference(q, k, v, 0.1, causal=True, key_bias=full_bias)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert merged.dtype == dtype
    assert (merged.double() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_visible_is_zeros_and_minus_inf(path, device):
    q, k, v = inputs(device, torch.bfloat16, (8, 2), 5, 9)
    bias = torch.full((2, 2, 9), -torch.inf, device=device)
    bias[1, 0, 3] = 0.0  # one visible key for the first group of row 1
    out, lse = attention_lse.attend(q, k, v, 0.125, key_bias=bias)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == -torch.inf).all())
    assert bool(torch.isfinite(lse[1, :4]).all()) and bool((lse[1, 4:] == -torch.inf).all())
    torch.testing.assert_close(out[1, :4], v[1, 0, 3].expand(4, 5, -1))
    # Merging with an empty part changes nothing; two empty parts give zeros.
    other = attention_lse.attend(q, k, v, 0.125)
    nothing = attention_lse.Attended(torch.zeros_like(other.out), torch.full_like(other.lse, -torch.inf))
    merged = attention_lse.merge([other, nothing])
    torch.testing.assert_close(merged, other.out)
    empty = attention_lse.attend(q, k[:, :, :0], v[:, :, :0], 0.125)
    assert torch.equal(attention_lse.merge([empty, empty]), torch.zeros_like(other.out))


def test_blocked_path_bounds_its_slab(monkeypatch):
    # Tiny slabs: many query blocks, the same result.
    q, k, v = inputs("cpu", torch.float32, (8, 2), 50, 50)
    monkeypatch.setattr(attention_lse, "BLOCK_ELEMENTS", 2 * 8 * 50 * 3)
    blocked = attention_lse._attend_blocked(q, k, v, 0.125, True, None)
    assert_close(blocked, *reference(q, k, v, 0.125, True), torch.float32)


def test_causal_needs_a_square_block():
    q, k, v = inputs("cpu", torch.float32, (4, 4), 3, 5)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys, got 3 and 5"):
        attention_lse.attend(q, k, v, 0.125, causal=True)

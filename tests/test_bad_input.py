"""Bad arguments to match, merge and attention raise RuntimeError naming the argument, in the
kernels (CPU and CUDA) and in the fake kernels that torch.compile traces with.

Each table holds whole messages, numbers included, and is the one source of truth for every
backend: a build whose error messages lose their numbers (a static libstdc++, see
python/centroidkv/_libstdcxx.py) fails here, and a message changed on one side fails on all."""
import re

import pytest
import torch

import centroidkv

from clustering_helpers import DEVICES

B, H, L, D = 2, 3, 16, 8
MERGE = "centroidkv.merge: "
ATTENTION = "centroidkv.attention: "
CHUNK = "centroidkv: chunk_size must be an even number >= 2, got "
NUM_MERGE_8 = "centroidkv: num_merge must be in [0, chunk_size / 2] = [0, 4], got "


def raises_exactly(message):
    """pytest.raises for a RuntimeError whose text is exactly `message`."""
    return pytest.raises(RuntimeError, match="^" + re.escape(message) + "$")


def good(device):
    return dict(keys=torch.randn(B, H, L, D, device=device),
                values=torch.randn(B, H, L, D + 2, device=device),
                sizes=torch.ones(B, H, L, device=device), chunk_size=8, num_merge=4, metric=None)


def other_device(device):
    """A device other than `device` for mixed-device inputs: cuda <-> cpu, else meta."""
    if device == "cuda":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "meta"


def merge_bad_cases(device):
    f32 = dict(device=device)
    other = other_device(device)
    here = torch.empty(0, device=device).device  # as C++ prints it: cuda:0, not cuda
    there = torch.empty(0, device=other).device
    keys_shape = f"keys shape [{B}, {H}, {L}, {D}] in [B, H, L]"
    return {
        "keys rank": (dict(keys=torch.randn(H, L, D, **f32)),
                      MERGE + "keys must have 4 dimensions [B, H, L, Dk], got shape [3, 16, 8]"),
        "values rank": (dict(values=torch.randn(B, H, L, **f32)),
                        MERGE + "values must have 4 dimensions [B, H, L, Dv], got shape [2, 3, 16]"),
        "sizes rank": (dict(sizes=torch.ones(B, H, L, 1, **f32)),
                       MERGE + "sizes must have 3 dimensions [B, H, L], got shape [2, 3, 16, 1]"),
        "metric rank": (dict(metric=torch.randn(B, H, L, **f32)),
                        MERGE + "metric must have 4 dimensions [B, H, L, Dm], got shape [2, 3, 16]"),
        "values batch": (dict(values=torch.randn(B + 1, H, L, D, **f32)),
                         MERGE + "values shape [3, 3, 16, 8] does not match " + keys_shape),
        "values heads": (dict(values=torch.randn(B, H + 1, L, D, **f32)),
                         MERGE + "values shape [2, 4, 16, 8] does not match " + keys_shape),
        "values length": (dict(values=torch.randn(B, H, L + 1, D, **f32)),
                          MERGE + "values shape [2, 3, 17, 8] does not match " + keys_shape),
        "sizes batch": (dict(sizes=torch.ones(B + 1, H, L, **f32)),
                        MERGE + "sizes shape [3, 3, 16] does not match " + keys_shape),
        "sizes heads": (dict(sizes=torch.ones(B, H - 1, L, **f32)),
                        MERGE + "sizes shape [2, 2, 16] does not match " + keys_shape),
        "sizes length": (dict(sizes=torch.ones(B, H, L - 1, **f32)),
                         MERGE + "sizes shape [2, 3, 15] does not match " + keys_shape),
        "metric batch": (dict(metric=torch.randn(B - 1, H, L, 4, **f32)),
                         MERGE + "metric shape [1, 3, 16, 4] does not match " + keys_shape),
        "metric heads": (dict(metric=torch.randn(B, H + 2, L, 4, **f32)),
                         MERGE + "metric shape [2, 5, 16, 4] does not match " + keys_shape),
        "metric length": (dict(metric=torch.randn(B, H, L + 3, 4, **f32)),
                          MERGE + "metric shape [2, 3, 19, 4] does not match " + keys_shape),
        "dtype mismatch": (dict(values=torch.randn(B, H, L, D, device=device, dtype=torch.float16)),
                           MERGE + "values dtype Half differs from keys dtype Float"),
        "integer keys": (dict(keys=torch.ones(B, H, L, D, device=device, dtype=torch.int32),
                              values=torch.ones(B, H, L, D, device=device, dtype=torch.int32)),
                         MERGE + "keys must be float32, float16 or bfloat16, got Int"),
        "float64 keys": (dict(keys=torch.randn(B, H, L, D, device=device, dtype=torch.float64),
                              values=torch.randn(B, H, L, D, device=device, dtype=torch.float64)),
                         MERGE + "keys must be float32, float16 or bfloat16, got Double"),
        "integer metric": (dict(metric=torch.ones(B, H, L, 4, device=device, dtype=torch.int64)),
                           MERGE + "metric must be float32, float16 or bfloat16, got Long"),
        "odd chunk": (dict(chunk_size=7, num_merge=2), CHUNK + "7"),
        "chunk 0": (dict(chunk_size=0, num_merge=0), CHUNK + "0"),
        "chunk 1": (dict(chunk_size=1, num_merge=0), CHUNK + "1"),
        "chunk 31": (dict(chunk_size=31, num_merge=4), CHUNK + "31"),
        "negative merge": (dict(num_merge=-1), NUM_MERGE_8 + "-1"),
        "too many merges": (dict(num_merge=5), NUM_MERGE_8 + "5"),
        "too many merges, chunk 32": (dict(chunk_size=32, num_merge=17),
                                      "centroidkv: num_merge must be in [0, chunk_size / 2] = [0, 16], got 17"),
        "negative sizes": (dict(sizes=torch.full((B, H, L), -1.0, **f32)),
                           MERGE + "sizes must be finite and >= 0 (0 marks padding)"),
        "nan sizes": (dict(sizes=torch.full((B, H, L), float("nan"), **f32)),
                      MERGE + "sizes must be finite and >= 0 (0 marks padding)"),
        "inf sizes": (dict(sizes=torch.full((B, H, L), float("inf"), **f32)),
                      MERGE + "sizes must be finite and >= 0 (0 marks padding)"),
        "float16 sizes": (dict(sizes=torch.ones(B, H, L, device=device, dtype=torch.float16)),
                          MERGE + "sizes must be float32, got Half"),
        "int sizes": (dict(sizes=torch.ones(B, H, L, device=device, dtype=torch.int64)),
                      MERGE + "sizes must be float32, got Long"),
        "values device": (dict(values=torch.randn(B, H, L, D, device=other)),
                          MERGE + f"values is on {there} but keys is on {here}"),
        "sizes device": (dict(sizes=torch.ones(B, H, L, device=other)),
                         MERGE + f"sizes is on {there} but keys is on {here}"),
        "metric device": (dict(metric=torch.randn(B, H, L, 4, device=other)),
                          MERGE + f"metric is on {there} but keys is on {here}"),
    }


@pytest.mark.parametrize("case", list(merge_bad_cases("cpu")))
@pytest.mark.parametrize("device", DEVICES)
def test_merge_rejects(device, case):
    change, message = merge_bad_cases(device)[case]
    args = {**good(device), **change}
    with raises_exactly(message):
        torch.ops.centroidkv.merge(args["keys"], args["values"], args["sizes"], args["chunk_size"],
                                   args["num_merge"], args["metric"])


# Cases the fake kernel cannot see (they need the data) or that need a second real device.
DATA_OR_DEVICE_CASES = {"negative sizes", "nan sizes", "inf sizes", "values device", "sizes device", "metric device"}


@pytest.mark.parametrize("case", sorted(set(merge_bad_cases("cpu")) - DATA_OR_DEVICE_CASES))
def test_fake_merge_rejects_like_the_kernels(case):
    # All-meta inputs run the fake kernel, as torch.compile's tracing does.
    change, message = merge_bad_cases("meta")[case]
    args = {**good("meta"), **change}
    with raises_exactly(message):
        torch.ops.centroidkv.merge(args["keys"], args["values"], args["sizes"], args["chunk_size"],
                                   args["num_merge"], args["metric"])


SIZE_VALUE_CASES = {"negative sizes", "nan sizes", "inf sizes"}


@pytest.mark.parametrize("case", sorted(set(merge_bad_cases("cpu")) - SIZE_VALUE_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_internal_unchecked_merge_checks_everything_but_size_values(device, case):
    # _merge_unchecked serves sizes the library produced itself; it skips only the value read.
    change, message = merge_bad_cases(device)[case]
    args = {**good(device), **change}
    with raises_exactly(message):
        torch.ops.centroidkv._merge_unchecked(args["keys"], args["values"], args["sizes"], args["chunk_size"],
                                              args["num_merge"], args["metric"])


@pytest.mark.parametrize("name", ["values", "sizes", "metric"])
def test_one_meta_argument_is_a_device_error_not_an_empty_result(name):
    # Meta wins dispatch over CPU, so these calls reach the fake kernel: it must refuse them.
    args = good("cpu")
    args["metric"] = torch.randn(B, H, L, 4)
    args[name] = args[name].to("meta")
    with raises_exactly(MERGE + f"{name} is on meta but keys is on cpu"):
        torch.ops.centroidkv.merge(args["keys"], args["values"], args["sizes"], 8, 4, args["metric"])


@pytest.mark.parametrize("chunk_size", [L + 2, 2 ** 40])
def test_chunk_longer_than_the_sequence_passes_through(chunk_size):
    # No full chunk: nothing chunk-sized may be allocated, however large chunk_size is.
    args = good("cpu")
    keys, values, sizes = centroidkv.merge(args["keys"], args["values"], args["sizes"], chunk_size, 4)
    assert torch.equal(keys, args["keys"]) and torch.equal(values, args["values"])
    assert torch.equal(sizes, args["sizes"])
    assert torch.equal(centroidkv.match(args["keys"], chunk_size, 4), torch.arange(L).expand(B, H, L))


def test_compress_checks_its_arguments_even_when_no_pass_runs():
    args = good("cpu")
    with pytest.raises(RuntimeError, match="keys must have 4 dimensions"):
        centroidkv.compress(args["keys"][0, 0], args["values"][0, 0], ratio=0.0)
    with pytest.raises(RuntimeError, match="keys must be float32"):
        centroidkv.compress(args["keys"].long(), args["values"].long(), ratio=0.0)
    with pytest.raises(TypeError, match="ratio must be a number"):
        centroidkv.compress(args["keys"], args["values"], ratio="0.5")
    keys, values, sizes = centroidkv.compress(args["keys"], args["values"], ratio=0.0)
    assert torch.equal(keys, args["keys"]) and keys.data_ptr() != args["keys"].data_ptr()
    assert torch.equal(sizes, torch.ones(B, H, L))


MATCH = "centroidkv.match: "
MATCH_BAD = {
    "metric rank": (torch.randn(B, L, D), 8, 4,
                    MATCH + "metric must have 4 dimensions [B, H, L, D], got shape [2, 16, 8]"),
    "integer metric": (torch.ones(B, H, L, D, dtype=torch.int32), 8, 4,
                       MATCH + "metric must be float32, float16 or bfloat16, got Int"),
    "odd chunk": (torch.randn(B, H, L, D), 5, 1, CHUNK + "5"),
    "chunk 0": (torch.randn(B, H, L, D), 0, 0, CHUNK + "0"),
    "negative merge": (torch.randn(B, H, L, D), 8, -2, NUM_MERGE_8 + "-2"),
    "too many merges": (torch.randn(B, H, L, D), 8, 6, NUM_MERGE_8 + "6"),
    "too many merges, chunk 32": (torch.randn(B, H, 70, D), 32, 17,
                                  "centroidkv: num_merge must be in [0, chunk_size / 2] = [0, 16], got 17"),
}


@pytest.mark.parametrize("case", list(MATCH_BAD))
@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_match_rejects(device, case):
    metric, chunk, merges, message = MATCH_BAD[case]
    with raises_exactly(message):
        torch.ops.centroidkv.match(metric.to(device), chunk, merges)


@pytest.mark.parametrize("device", DEVICES)
def test_requires_grad_is_a_clear_error_and_no_grad_works(device):
    args = good(device)
    keys = args["keys"].requires_grad_()
    with raises_exactly("centroidkv::merge is an inference op and has no gradient, but its argument 'keys' "
                        "requires grad; call it under torch.no_grad() or pass detached tensors"):
        centroidkv.merge(keys, args["values"], args["sizes"], 8, 4)
    # match returns an integer map, which has no gradient to get wrong: it simply works.
    assert torch.equal(centroidkv.match(keys, 8, 4), centroidkv.match(keys.detach(), 8, 4))
    with torch.no_grad():
        out_k, _, _ = centroidkv.merge(keys, args["values"], args["sizes"], 8, 4)
        slots = centroidkv.match(keys, 8, 4)
    assert out_k.shape == (B, H, 8, D) and not out_k.requires_grad
    assert slots.shape == (B, H, L)


def attention_inputs(device, length=9):
    """q [2, 8, 1, 64], k and v [2, 2, 9, 64], sizes [2, 2, 9], lengths [9, 3]."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 64, generator=gen).to(device)
    k = torch.randn(2, 2, length, 64, generator=gen).to(device)
    v = torch.randn(2, 2, length, 64, generator=gen).to(device)
    sizes = torch.randint(1, 9, (2, 2, length), generator=gen).float().to(device)
    return q, k, v, sizes, torch.tensor([length, 3], device=device)


ATTENTION_BAD = [
    ("q rank", lambda q, k, v, s, n: (q[0], k, v, s, n),
     "q must have 4 dimensions [B, Hq, Tq, D], got shape [8, 1, 64]"),
    ("k rank", lambda q, k, v, s, n: (q, k[0], v, s, n),
     "k must have 4 dimensions [B, Hkv, L, D], got shape [2, 9, 64]"),
    ("v rank", lambda q, k, v, s, n: (q, k, v[0], s, n),
     "v must have 4 dimensions [B, Hkv, L, Dv], got shape [2, 9, 64]"),
    ("heads", lambda q, k, v, s, n: (q[:, :7], k, v, s, n),
     "query heads (7) must be a multiple of KV heads (2)"),
    ("dtype mismatch", lambda q, k, v, s, n: (q, k.half(), v, s, n),
     "q, k and v must share a dtype, got Float, Half, Float"),
    ("integer q", lambda q, k, v, s, n: (q.long(), k.long(), v.long(), s, n),
     "q must be float32, float16 or bfloat16, got Long"),
    ("k head dim", lambda q, k, v, s, n: (q, k[..., :32], v, s, n), "k head dim 32 differs from q head dim 64"),
    ("v length", lambda q, k, v, s, n: (q, k, v[:, :, :4], s, n),
     "v shape [2, 2, 4, 64] does not match k shape [2, 2, 9, 64] in [B, Hkv, L]"),
    ("batch", lambda q, k, v, s, n: (q[:1], k, v, s, n),
     "batch sizes differ: q [1, 8, 1, 64], k [2, 2, 9, 64], v [2, 2, 9, 64]"),
    ("sizes shape", lambda q, k, v, s, n: (q, k, v, s[:, :, :4], n),
     "sizes shape [2, 2, 4] does not match k shape [2, 2, 9, 64] in [B, H, L]"),
    ("sizes rank", lambda q, k, v, s, n: (q, k, v, s[0], n), "sizes must have 3 dimensions [B, H, L], got shape [2, 9]"),
    ("sizes dtype", lambda q, k, v, s, n: (q, k, v, s.double(), n), "sizes must be float32, got Double"),
    ("lengths shape", lambda q, k, v, s, n: (q, k, v, s, n[:1]), "lengths must have shape [B] = [2], got [1]"),
    ("lengths dtype", lambda q, k, v, s, n: (q, k, v, s, n.float()), "lengths must be int64 or int32, got Float"),
    ("no KV heads", lambda q, k, v, s, n: (q[:, :0], k[:, :0], v[:, :0], s[:, :0], n),
     "k must have at least one KV head, got shape [2, 0, 9, 64]"),
]


@pytest.mark.parametrize("device", DEVICES + ["meta"])  # meta: the fake kernel checks the same
@pytest.mark.parametrize("name,mutate,message", ATTENTION_BAD, ids=[b[0] for b in ATTENTION_BAD])
def test_attention_rejects(device, name, mutate, message):
    q, k, v, sizes, lengths = mutate(*attention_inputs(device))
    with raises_exactly(ATTENTION + message):
        torch.ops.centroidkv.attention(q, k, v, sizes, 0.125, lengths)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_attention_scale_must_be_finite(device, scale):
    q, k, v, sizes, _ = attention_inputs(device)
    with raises_exactly(ATTENTION + f"scale must be a finite number, got {scale}"):
        centroidkv.attention(q, k, v, sizes, scale=scale)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_cpu_attention_rejects_sizes_it_cannot_weigh(bad):
    # Cheap to read on the CPU; the CUDA kernel does not sync to check (README, Semantics).
    q, k, v, sizes, _ = attention_inputs("cpu")
    sizes[1, 0, 4] = bad
    with raises_exactly(ATTENTION + "sizes must be finite and >= 0 (0 marks padding)"):
        centroidkv.attention(q, k, v, sizes)


@pytest.mark.parametrize("bad", [-1, 10])
def test_cpu_attention_rejects_out_of_range_lengths(bad):
    q, k, v, sizes, _ = attention_inputs("cpu")
    with raises_exactly(ATTENTION + f"lengths[1] = {bad} is outside [0, L] = [0, 9]"):
        centroidkv.attention(q, k, v, sizes, lengths=torch.tensor([9, bad]))


@pytest.mark.parametrize("name", ["k", "v", "sizes", "lengths"])
def test_one_meta_attention_argument_is_a_device_error_not_an_empty_result(name):
    # Meta wins dispatch over CPU, so these calls reach the fake kernel: it must refuse them.
    q, k, v, sizes, lengths = attention_inputs("cpu")
    args = dict(k=k, v=v, sizes=sizes, lengths=lengths)
    args[name] = args[name].to("meta")
    with raises_exactly(ATTENTION + f"{name} is on meta but {'k' if name == 'sizes' else 'q'} is on cpu"):
        torch.ops.centroidkv.attention(q, args["k"], args["v"], args["sizes"], 0.125, args["lengths"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_device_mismatch():
    # (a meta tensor would route the call to the fake kernel instead)
    q, k, v, sizes, _ = attention_inputs("cpu")
    with raises_exactly(ATTENTION + "k is on cuda:0 but q is on cpu"):
        torch.ops.centroidkv.attention(q, k.cuda(), v, sizes, 0.125, None)
    with raises_exactly(ATTENTION + "lengths is on cuda:0 but q is on cpu"):
        torch.ops.centroidkv.attention(q, k, v, sizes, 0.125, torch.tensor([9, 9], device="cuda"))

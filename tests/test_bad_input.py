"""Bad arguments to match and merge raise RuntimeError naming the argument, in the kernels and
in the fake kernels that torch.compile traces with."""
import pytest
import torch

import centroidkv

from clustering_helpers import DEVICES

B, H, L, D = 2, 3, 16, 8


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
    return {
        "keys rank": (dict(keys=torch.randn(H, L, D, **f32)), "keys must have 4 dimensions"),
        "values rank": (dict(values=torch.randn(B, H, L, **f32)), "values must have 4 dimensions"),
        "sizes rank": (dict(sizes=torch.ones(B, H, L, 1, **f32)), "sizes must have 3 dimensions"),
        "metric rank": (dict(metric=torch.randn(B, H, L, **f32)), "metric must have 4 dimensions"),
        "values batch": (dict(values=torch.randn(B + 1, H, L, D, **f32)), "values shape"),
        "values heads": (dict(values=torch.randn(B, H + 1, L, D, **f32)), "values shape"),
        "values length": (dict(values=torch.randn(B, H, L + 1, D, **f32)), "values shape"),
        "sizes batch": (dict(sizes=torch.ones(B + 1, H, L, **f32)), "sizes shape"),
        "sizes heads": (dict(sizes=torch.ones(B, H - 1, L, **f32)), "sizes shape"),
        "sizes length": (dict(sizes=torch.ones(B, H, L - 1, **f32)), "sizes shape"),
        "metric batch": (dict(metric=torch.randn(B - 1, H, L, 4, **f32)), "metric shape"),
        "metric heads": (dict(metric=torch.randn(B, H + 2, L, 4, **f32)), "metric shape"),
        "metric length": (dict(metric=torch.randn(B, H, L + 3, 4, **f32)), "metric shape"),
        "dtype mismatch": (dict(values=torch.randn(B, H, L, D, device=device, dtype=torch.float16)),
                           "values dtype .* differs from keys dtype"),
        "integer keys": (dict(keys=torch.ones(B, H, L, D, device=device, dtype=torch.int32),
                              values=torch.ones(B, H, L, D, device=device, dtype=torch.int32)),
                         "keys must be float32, float16 or bfloat16"),
        "float64 keys": (dict(keys=torch.randn(B, H, L, D, device=device, dtype=torch.float64),
                              values=torch.randn(B, H, L, D, device=device, dtype=torch.float64)),
                         "keys must be float32, float16 or bfloat16"),
        "integer metric": (dict(metric=torch.ones(B, H, L, 4, device=device, dtype=torch.int64)),
                           "metric must be float32, float16 or bfloat16"),
        "odd chunk": (dict(chunk_size=7, num_merge=2), "chunk_size must be an even number >= 2"),
        "chunk 0": (dict(chunk_size=0, num_merge=0), "chunk_size must be an even number >= 2"),
        "chunk 1": (dict(chunk_size=1, num_merge=0), "chunk_size must be an even number >= 2"),
        "negative merge": (dict(num_merge=-1), "num_merge must be in"),
        "too many merges": (dict(num_merge=5), "num_merge must be in"),
        "negative sizes": (dict(sizes=torch.full((B, H, L), -1.0, **f32)), "sizes must be finite and >= 0"),
        "nan sizes": (dict(sizes=torch.full((B, H, L), float("nan"), **f32)), "sizes must be finite and >= 0"),
        "inf sizes": (dict(sizes=torch.full((B, H, L), float("inf"), **f32)), "sizes must be finite and >= 0"),
        "float16 sizes": (dict(sizes=torch.ones(B, H, L, device=device, dtype=torch.float16)),
                          "sizes must be float32"),
        "int sizes": (dict(sizes=torch.ones(B, H, L, device=device, dtype=torch.int64)),
                      "sizes must be float32"),
        "values device": (dict(values=torch.randn(B, H, L, D, device=other)),
                          f"values is on {other}"),
        "sizes device": (dict(sizes=torch.ones(B, H, L, device=other)), f"sizes is on {other}"),
        "metric device": (dict(metric=torch.randn(B, H, L, 4, device=other)),
                          f"metric is on {other}"),
    }


@pytest.mark.parametrize("case", list(merge_bad_cases("cpu")))
@pytest.mark.parametrize("device", DEVICES)
def test_merge_rejects(device, case):
    change, message = merge_bad_cases(device)[case]
    args = {**good(device), **change}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.centroidkv.merge(args["keys"], args["values"], args["sizes"], args["chunk_size"],
                                   args["num_merge"], args["metric"])


# Cases the fake kernel cannot see (they need the data) or that need a second real device.
DATA_OR_DEVICE_CASES = {"negative sizes", "nan sizes", "inf sizes", "values device", "sizes device", "metric device"}


@pytest.mark.parametrize("case", sorted(set(merge_bad_cases("cpu")) - DATA_OR_DEVICE_CASES))
def test_fake_merge_rejects_like_the_kernels(case):
    # All-meta inputs run the fake kernel, as torch.compile's tracing does.
    change, message = merge_bad_cases("meta")[case]
    args = {**good("meta"), **change}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.centroidkv.merge(args["keys"], args["values"], args["sizes"], args["chunk_size"],
                                   args["num_merge"], args["metric"])


@pytest.mark.parametrize("name", ["values", "sizes", "metric"])
def test_one_meta_argument_is_a_device_error_not_an_empty_result(name):
    # Meta wins dispatch over CPU, so these calls reach the fake kernel: it must refuse them.
    args = good("cpu")
    args["metric"] = torch.randn(B, H, L, 4)
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=f"{name} is on meta but keys is on cpu"):
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


MATCH_BAD = {
    "metric rank": (torch.randn(B, L, D), 8, 4, "metric must have 4 dimensions"),
    "integer metric": (torch.ones(B, H, L, D, dtype=torch.int32), 8, 4,
                       "metric must be float32, float16 or bfloat16"),
    "odd chunk": (torch.randn(B, H, L, D), 5, 1, "chunk_size must be an even number >= 2"),
    "chunk 0": (torch.randn(B, H, L, D), 0, 0, "chunk_size must be an even number >= 2"),
    "negative merge": (torch.randn(B, H, L, D), 8, -2, "num_merge must be in"),
    "too many merges": (torch.randn(B, H, L, D), 8, 6, "num_merge must be in"),
}


@pytest.mark.parametrize("case", list(MATCH_BAD))
@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_match_rejects(device, case):
    metric, chunk, merges, message = MATCH_BAD[case]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.centroidkv.match(metric.to(device), chunk, merges)


@pytest.mark.parametrize("device", DEVICES)
def test_requires_grad_is_a_clear_error_and_no_grad_works(device):
    args = good(device)
    keys = args["keys"].requires_grad_()
    with pytest.raises(RuntimeError, match="inference op and has no gradient, but its argument 'keys'"):
        centroidkv.merge(keys, args["values"], args["sizes"], 8, 4)
    # match returns an integer map, which has no gradient to get wrong: it simply works.
    assert torch.equal(centroidkv.match(keys, 8, 4), centroidkv.match(keys.detach(), 8, 4))
    with torch.no_grad():
        out_k, _, _ = centroidkv.merge(keys, args["values"], args["sizes"], 8, 4)
        slots = centroidkv.match(keys, 8, 4)
    assert out_k.shape == (B, H, 8, D) and not out_k.requires_grad
    assert slots.shape == (B, H, L)

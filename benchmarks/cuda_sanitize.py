"""Tiny CUDA match, merge and attention runs for compute-sanitizer; every kernel path is taken once.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitize.py

(No caching allocator under memcheck, so an access past an output's end is caught.)
"""
import torch

import centroidkv

def run(name, keys, values, sizes, c, r, metric=None):
    slots = torch.ops.centroidkv.match(keys if metric is None else metric, c, r)
    k, v, s = torch.ops.centroidkv.merge(keys, values, sizes, c, r, metric)
    torch.cuda.synchronize()
    assert slots.shape == keys.shape[:3] and k.shape[2] == s.shape[2]
    print(f"{name}: ok ({tuple(k.shape)})")


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g, device="cuda").to(dtype)
    sizes = lambda *shape: torch.rand(*shape, generator=g, device="cuda") * 2
    # Staged rows, 16-byte vector loads, keys as metric, tail of 5.
    run("bf16 staged", rand(2, 3, 69, 128, dtype=torch.bfloat16), rand(2, 3, 69, 64, dtype=torch.bfloat16),
        sizes(2, 3, 69), 32, 16)
    # Separate metric of another dtype and an odd head dim (element-wise loads), no sizes.
    run("fp32 + fp16 metric", rand(1, 3, 37, 64), rand(1, 3, 37, 33), None, 8, 3,
        rand(1, 3, 37, 33, dtype=torch.float16))
    # Misaligned, strided rows (element-wise staging).
    base = rand(1, 2, 70, 65, dtype=torch.float16)
    run("fp16 misaligned", base[..., 1:], base[..., 1:], None, 8, 4)
    # Chunk too large to stage: rows read from global memory.
    run("fp32 direct", rand(1, 1, 260, 256), rand(1, 1, 260, 256), sizes(1, 1, 260), 256, 128)
    # Fewer tokens than a chunk, and an empty sequence.
    run("short", rand(1, 2, 5, 64), rand(1, 2, 5, 64), None, 8, 4)
    run("empty", rand(1, 2, 0, 64), rand(1, 2, 0, 64), None, 8, 4)
    # Unit sizes with a power-of-two and other totals, zero-size clusters, fp32 D = 1024 (more
    # 16-byte vectors per row than threads per block).
    unit = torch.ones(2, 3, 69, device="cuda")
    unit[..., ::5] = 0
    run("unit and zero sizes", rand(2, 3, 69, 64, dtype=torch.float16), rand(2, 3, 69, 96, dtype=torch.float16),
        unit, 32, 16)
    run("fp32 D1024", rand(1, 2, 20, 1024), rand(1, 2, 20, 1024), None, 8, 4)

    # Large chunks: the members bitmask in global scratch, narrower similarity strips.
    run("fp32 chunk 4096", rand(1, 1, 4100, 16), rand(1, 1, 4100, 8), sizes(1, 1, 4100), 4096, 2048)

    # Attention (the cp.async ring): one split (short cache), several splits + combine (long
    # cache), prefill tiles, per-row lengths and masked slots, a cache shorter than one step, no
    # sizes, and the generic path (D = 80).
    attention_cases(rand, sizes)


def attention_cases(rand, sizes):
    for name, (batch, hq, hkv, tq, length, dim, dtype) in {
        "attn decode bf16": (2, 8, 2, 1, 300, 128, torch.bfloat16),
        "attn split fp16": (1, 8, 2, 1, 20000, 64, torch.float16),
        "attn prefill fp32": (1, 7, 1, 5, 97, 256, torch.float32),
        "attn generic": (1, 4, 2, 2, 50, 80, torch.bfloat16),
        "attn shorter than a step bf16": (2, 8, 2, 1, 9, 128, torch.bfloat16),
        "attn 8-row tile bf16": (2, 16, 2, 1, 700, 128, torch.bfloat16),
        "attn fp32 D=256 split": (1, 4, 1, 1, 5000, 256, torch.float32),
    }.items():
        q = rand(batch, hq, tq, dim, dtype=dtype)
        k, v = rand(batch, hkv, length, dim, dtype=dtype), rand(batch, hkv, length, dim, dtype=dtype)
        slot_sizes = sizes(batch, hkv, length)
        slot_sizes[..., ::3] = 0
        lengths = torch.tensor([length - i for i in range(batch)], device="cuda")
        out = centroidkv.attention(q, k, v, slot_sizes, lengths=lengths)
        torch.cuda.synchronize()
        assert out.shape == (batch, hq, tq, dim) and not out.isnan().any(), name
        print(f"{name}: ok")
    # No sizes (no size copies at all) on a split cache.
    q = rand(1, 8, 1, 128, dtype=torch.bfloat16)
    k, v = rand(1, 2, 3000, 128, dtype=torch.bfloat16), rand(1, 2, 3000, 128, dtype=torch.bfloat16)
    out = centroidkv.attention(q, k, v, None)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    print("attn no sizes: ok")


if __name__ == "__main__":
    main()

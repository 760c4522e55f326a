// CUDA kernels of centroidkv.match and centroidkv.merge (SPEC.md): host side. The kernels are in
// merge_kernels.cuh, the per-chunk matching in chunk_match.cuh.
//
// One thread block per (b, h, chunk), fused: the block stages the chunk's rows of the metric,
// keys and values in shared memory (each byte read from global memory once; with no separate
// metric the keys' copy is the metric), matches on chip (chunk_match.cuh), and writes every
// output row once. The L % c tail is copied by ATen.
//
// Determinism: no floating-point atomics. Each output slot is averaged by the thread that owns
// it (per 16-byte column block), summing its members in token order in fp32 as
// sum(x * s) then / S, with separately rounded multiply and add like the reference's
// scatter_add. Results are bitwise identical from run to run.
//
// When the staged rows do not fit in shared memory (very large chunk * head dim), the same
// code reads rows straight from global memory (staged = false); results are identical.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "../checks.h"
#include "merge_kernels.cuh"

namespace centroidkv {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side.

template <class F>
void dispatch_format(at::ScalarType type, const char* op, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: f(Float32{}); break;
    case at::kHalf: f(Float16{}); break;
    case at::kBFloat16: f(BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", type);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A view with unit stride in the last dimension (copied if it has none).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(3) <= 1 || t.stride(3) == 1) ? t : t.contiguous();
}

RowsArg rows_arg(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  RowsArg arg;
  arg.ptr = static_cast<const char*>(t.data_ptr());
  arg.stride_b = t.stride(0) * elem;
  arg.stride_h = t.stride(1) * elem;
  arg.stride_l = t.stride(2) * elem;
  TORCH_CHECK(t.size(3) <= INT_MAX / 16, "centroidkv: head dim ", t.size(3), " is too large");
  arg.dim = static_cast<int>(t.size(3));
  // A stride only matters if its dimension has more than one index.
  auto ok = [&](int d) { return t.size(d) <= 1 || (t.stride(d) * elem) % 16 == 0; };
  arg.vec16 = aligned16(arg.ptr) && (arg.dim * elem) % 16 == 0 && ok(0) && ok(1) && ok(2);
  return arg;
}

// The fastest layout that fits the device's shared memory: rows staged; else rows read from
// global memory; else (large chunks) the members bitmask in global scratch and narrower
// similarity strips. Every layout gives identical results.
SmemLayout choose_layout(int c, bool merge, const int64_t (&row_bytes)[3], int device,
                         const char* op) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  auto fits = [&](const SmemLayout& m) { return m.bytes >= 0 && m.bytes <= limit; };
  const SmemLayout staged = make_layout(c, merge, row_bytes, true);
  if (fits(staged)) return staged;
  const SmemLayout direct = make_layout(c, merge, row_bytes, false);
  if (fits(direct)) return direct;
  for (int strip = 32; strip >= 1; strip /= 2) {
    const SmemLayout lean = make_layout(c, merge, row_bytes, false, strip, true);
    if (fits(lean)) return lean;
  }
  int largest = 2;  // the largest even chunk size whose leanest layout fits, for the message
  for (int step = 1 << 20; step >= 2; step /= 2) {
    if (fits(make_layout(largest + step, merge, row_bytes, false, 1, true))) largest += step;
  }
  TORCH_CHECK(false, op, ": chunk_size ", c, " needs ",
              make_layout(c, merge, row_bytes, false, 1, true).bytes,
              " bytes of shared memory per block, more than this GPU allows (", limit,
              "); the largest chunk_size it takes is ", largest, " (the CPU kernels take any)");
}

// Runs launch(first_block, blocks_in_launch, members_scratch) over all blocks, in slices small
// enough that a global members scratch (large chunks only) stays within 256 MiB.
template <class Launch>
void launch_in_slices(int64_t blocks, const SmemLayout& layout, const at::Tensor& like, Launch&& launch) {
  if (!layout.members_global) {
    launch(int64_t{0}, blocks, static_cast<uint32_t*>(nullptr));
    return;
  }
  const int64_t per_block = int64_t(layout.members_words) * 4;
  const int64_t slice = std::max<int64_t>(1, std::min<int64_t>(blocks, (int64_t{256} << 20) / per_block));
  at::Tensor scratch = at::empty({slice * per_block}, like.options().dtype(at::kByte));
  for (int64_t first = 0; first < blocks; first += slice) {
    launch(first, std::min(slice, blocks - first), reinterpret_cast<uint32_t*>(scratch.data_ptr()));
  }
}

template <class Kernel>
void allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

ChunkGrid chunk_grid(const at::Tensor& t, int64_t c, int64_t r, const char* op) {
  TORCH_CHECK(c <= INT_MAX / 4, op, ": chunk_size ", c, " is too large");
  ChunkGrid g;
  g.heads = t.size(1);
  g.length = t.size(2);
  g.chunks = g.length / c;
  g.out_length = merged_length(g.length, c, r);
  g.c = static_cast<int>(c);
  g.r = static_cast<int>(r);
  TORCH_CHECK(t.size(0) * g.heads * g.chunks <= INT_MAX, op, ": B * H * (L // chunk_size) = ",
              t.size(0) * g.heads * g.chunks, " chunks exceeds one launch (", INT_MAX, ")");
  return g;
}

at::Tensor match_cuda(const at::Tensor& metric_in, int64_t chunk_size, int64_t num_merge) {
  const char* op = "centroidkv.match";
  check_match_args(metric_in, chunk_size, num_merge);
  TORCH_CHECK(metric_in.is_cuda(), op, ": metric must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const at::Tensor metric = unit_last_stride(metric_in);
  const ChunkGrid g = chunk_grid(metric, chunk_size, num_merge, op);
  const int64_t batch = metric.size(0);
  at::Tensor map = at::empty({batch, g.heads, g.length}, metric.options().dtype(at::kLong));
  const int64_t blocks = batch * g.heads * g.chunks;

  if (blocks > 0) {
    MatchParams p;
    p.metric = rows_arg(metric);
    p.map = map.data_ptr<int64_t>();
    p.grid = g;
    const int64_t row_bytes[3] = {int64_t(p.metric.dim) * metric.element_size(), -1, -1};
    p.layout = choose_layout(g.c, false, row_bytes, metric.get_device(), op);
    dispatch_format(metric.scalar_type(), op, "metric", [&](auto mfmt) {
      auto kernel = match_kernel<decltype(mfmt)>;
      allow_shared_memory(kernel, p.layout.bytes);
      launch_in_slices(blocks, p.layout, metric, [&](int64_t first, int64_t count, uint32_t* scratch) {
        p.slice = LaunchSlice{first, scratch};
        kernel<<<static_cast<unsigned>(count), kThreads, p.layout.bytes,
                 c10::cuda::getCurrentCUDAStream()>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  const int64_t tail = g.length % chunk_size;
  if (tail > 0 && map.numel() > 0) {
    const int64_t first = g.chunks * (chunk_size - num_merge);
    map.narrow(2, g.chunks * chunk_size, tail).copy_(at::arange(first, first + tail, map.options()));
  }
  return map;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cuda_impl(
    const at::Tensor& keys_in, const at::Tensor& values_in,
    const c10::optional<at::Tensor>& sizes_in, int64_t chunk_size, int64_t num_merge,
    const c10::optional<at::Tensor>& metric_in, bool check_sizes) {
  const char* op = "centroidkv.merge";
  check_merge_args(keys_in, values_in, sizes_in, chunk_size, num_merge, metric_in);
  TORCH_CHECK(keys_in.is_cuda(), op, ": keys must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(keys_in.device());
  if (check_sizes && sizes_in.has_value()) check_sizes_values(*sizes_in, op);  // a device sync

  const at::Tensor keys = unit_last_stride(keys_in);
  const at::Tensor values = unit_last_stride(values_in);
  const ChunkGrid g = chunk_grid(keys, chunk_size, num_merge, op);
  const int64_t batch = keys.size(0);
  at::Tensor out_keys = at::empty({batch, g.heads, g.out_length, keys.size(3)}, keys.options());
  at::Tensor out_values = at::empty({batch, g.heads, g.out_length, values.size(3)}, values.options());
  at::Tensor out_sizes = at::empty({batch, g.heads, g.out_length}, keys.options().dtype(at::kFloat));
  const int64_t blocks = batch * g.heads * g.chunks;

  if (blocks > 0) {
    MergeParams p;
    p.keys = rows_arg(keys);
    p.values = rows_arg(values);
    at::Tensor metric;
    p.metric = RowsArg{nullptr, 0, 0, 0, 0, false};
    p.own_metric = metric_in.has_value();
    if (metric_in.has_value()) {
      metric = unit_last_stride(*metric_in);
      p.metric = rows_arg(metric);
    }
    p.sizes = nullptr;
    p.sizes_stride_b = p.sizes_stride_h = p.sizes_stride_l = 0;
    if (sizes_in.has_value()) {
      p.sizes = sizes_in->data_ptr<float>();
      p.sizes_stride_b = sizes_in->stride(0);
      p.sizes_stride_h = sizes_in->stride(1);
      p.sizes_stride_l = sizes_in->stride(2);
    }
    const int64_t kelem = keys.element_size();
    p.out_keys = static_cast<char*>(out_keys.data_ptr());
    p.out_values = static_cast<char*>(out_values.data_ptr());
    p.out_sizes = out_sizes.data_ptr<float>();
    p.out_keys_vec16 = aligned16(p.out_keys) && (p.keys.dim * kelem) % 16 == 0;
    p.out_values_vec16 = aligned16(p.out_values) && (p.values.dim * kelem) % 16 == 0;
    p.grid = g;
    const int64_t row_bytes[3] = {metric.defined() ? p.metric.dim * metric.element_size() : -1,
                                  p.keys.dim * kelem, p.values.dim * kelem};
    p.layout = choose_layout(g.c, true, row_bytes, keys.get_device(), op);

    dispatch_format(keys.scalar_type(), op, "keys", [&](auto kfmt) {
      using KFmt = decltype(kfmt);
      auto launch = [&](auto kernel) {
        allow_shared_memory(kernel, p.layout.bytes);
        launch_in_slices(blocks, p.layout, keys, [&](int64_t first, int64_t count, uint32_t* scratch) {
          p.slice = LaunchSlice{first, scratch};
          kernel<<<static_cast<unsigned>(count), kThreads, p.layout.bytes,
                   c10::cuda::getCurrentCUDAStream()>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      if (!metric.defined()) {
        launch(merge_kernel<KFmt, KFmt>);
      } else {
        dispatch_format(metric.scalar_type(), op, "metric",
                        [&](auto mfmt) { launch(merge_kernel<KFmt, decltype(mfmt)>); });
      }
    });
  }

  const int64_t tail = g.length % chunk_size;
  if (tail > 0 && out_sizes.numel() > 0) {
    const int64_t from = g.chunks * chunk_size, to = g.chunks * (chunk_size - num_merge);
    out_keys.narrow(2, to, tail).copy_(keys.narrow(2, from, tail));
    out_values.narrow(2, to, tail).copy_(values.narrow(2, from, tail));
    if (sizes_in.has_value()) {
      out_sizes.narrow(2, to, tail).copy_(sizes_in->narrow(2, from, tail));
    } else {
      out_sizes.narrow(2, to, tail).fill_(1.0);
    }
  }
  return {out_keys, out_values, out_sizes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cuda(
    const at::Tensor& keys, const at::Tensor& values, const c10::optional<at::Tensor>& sizes,
    int64_t chunk_size, int64_t num_merge, const c10::optional<at::Tensor>& metric) {
  return merge_cuda_impl(keys, values, sizes, chunk_size, num_merge, metric, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_unchecked_cuda(
    const at::Tensor& keys, const at::Tensor& values, const c10::optional<at::Tensor>& sizes,
    int64_t chunk_size, int64_t num_merge, const c10::optional<at::Tensor>& metric) {
  return merge_cuda_impl(keys, values, sizes, chunk_size, num_merge, metric, false);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(centroidkv, CUDA, m) {
  m.impl("match", &cuda::match_cuda);
  m.impl("merge", &cuda::merge_cuda);
  m.impl("_merge_unchecked", &cuda::merge_unchecked_cuda);
}

}  // namespace centroidkv

// CUDA kernels of centroidkv.match and centroidkv.merge (SPEC.md).
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
#include "chunk_match.cuh"

namespace centroidkv {
namespace cuda {
namespace {

// Byte offsets into the block's dynamic shared memory. Built on the host, read by the kernel.
struct SmemLayout {
  int rows_metric = 0, rows_keys = 0, rows_values = 0;  // staged rows (sources, then destinations)
  int sizes = 0;       // float [c]
  int norms = 0;       // float [c]
  int best = 0;        // int [half]
  int score = 0;       // float [half]
  int sim = 0;         // float [half][strip + 1]
  int bits = 0;        // uint32 [words] merged, then [half][words] members
  int slot_token = 0;  // int [c]: token owning each output slot
  int slot_total = 0;  // float [c]: S of each output slot
  int slot_count = 0;  // int [c]: tokens in each output slot
  int strip = 0, words = 0;
  int bytes = 0;
  bool staged = false;
};

struct ChunkGrid {
  int64_t heads, chunks, length, out_length;
  int c, r;
};

__device__ MatchState match_state(unsigned char* smem, const SmemLayout& m) {
  MatchState s;
  s.norms = reinterpret_cast<float*>(smem + m.norms);
  s.best = reinterpret_cast<int*>(smem + m.best);
  s.score = reinterpret_cast<float*>(smem + m.score);
  s.sim = reinterpret_cast<float*>(smem + m.sim);
  s.merged = reinterpret_cast<uint32_t*>(smem + m.bits);
  s.members = s.merged + m.words;
  s.strip = m.strip;
  s.words = m.words;
  return s;
}

// Rows of chunk j of (b, h) in global memory.
__device__ const char* global_chunk(const RowsArg& arg, int64_t b, int64_t h, int64_t first) {
  return arg.ptr + b * arg.stride_b + h * arg.stride_h + first * arg.stride_l;
}

__device__ ChunkRows chunk_rows(const RowsArg& arg, const char* global, unsigned char* smem,
                                int offset, int elem_bytes, int c, bool staged) {
  if (staged) {
    const int pitch = staged_pitch(arg.dim * elem_bytes);
    const char* base = reinterpret_cast<const char*>(smem + offset);
    return {base, base + (c / 2) * pitch, pitch};
  }
  return {global, global + arg.stride_l, 2 * arg.stride_l};
}

// Whether rows can be read 16 bytes at a time from where they live.
__device__ bool rows_vectorized(const RowsArg& arg, int elem_bytes, bool staged) {
  return staged ? (arg.dim * elem_bytes) % 16 == 0 : arg.vec16;
}

// ---------------------------------------------------------------------------------------------
struct MatchParams {
  RowsArg metric;
  int64_t* map;  // contiguous [B, H, L]
  ChunkGrid grid;
  SmemLayout layout;
};

template <class MFmt>
__global__ void __launch_bounds__(kThreads) match_kernel(const MatchParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const ChunkGrid& g = p.grid;
  const int64_t block = blockIdx.x;
  const int64_t j = block % g.chunks, bh = block / g.chunks;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const int c = g.c, elem = int(sizeof(typename MFmt::Bits));
  const bool staged = p.layout.staged;

  const MatchState s = match_state(smem, p.layout);
  clear_match_bits(s, c / 2);
  const char* metric = global_chunk(p.metric, b, h, j * c);
  if (staged) stage_rows<MFmt>(reinterpret_cast<char*>(smem + p.layout.rows_metric), metric, p.metric, c);
  wait_async_copies();
  __syncthreads();

  match_chunk<MFmt>(chunk_rows(p.metric, metric, smem, p.layout.rows_metric, elem, c, staged),
                    p.metric.dim, rows_vectorized(p.metric, elem, staged), c, g.r, s);

  int64_t* map = p.map + bh * g.length + j * c;
  const int64_t first_slot = j * (c - g.r);
  for (int i = threadIdx.x; i < c; i += blockDim.x) map[i] = first_slot + slot_in_chunk(s, i);
}

// ---------------------------------------------------------------------------------------------
struct MergeParams {
  RowsArg keys, values, metric;
  bool own_metric;               // false: match on the keys (metric unused)
  const float* sizes;            // nullptr: all ones
  int64_t sizes_stride_b, sizes_stride_h, sizes_stride_l;  // elements
  char* out_keys;                // contiguous [B, H, out_length, Dk]
  char* out_values;              // contiguous [B, H, out_length, Dv]
  float* out_sizes;              // contiguous [B, H, out_length]
  bool out_keys_vec16, out_values_vec16;
  ChunkGrid grid;
  SmemLayout layout;
};

struct SlotState {
  const int* token;
  const float* total;
  const int* count;
  const float* sizes;  // per token of the chunk
};

// Writes the chunk's kept output rows of one tensor, N elements per task: a slot with one
// token copies it bit-exactly; otherwise the size-weighted mean (plain mean if S == 0).
template <class Fmt, int N>
__device__ void write_slots(const ChunkRows& rows, int dim, char* out, int kept,
                            const MatchState& s, const SlotState& slots) {
  const int elem = int(sizeof(typename Fmt::Bits));
  const int per_row = dim / N;
  for (int t = threadIdx.x; t < kept * per_row; t += blockDim.x) {
    const int slot = t / per_row;
    const int offset = (t % per_row) * N * elem;
    const int token = slots.token[slot];
    char* dst = out + int64_t(slot) * dim * elem + offset;
    const int count = slots.count[slot];
    if (count == 1) {
      copy_bits<Fmt, N>(dst, rows.token(token) + offset);
      continue;
    }
    const float total = slots.total[slot];
    const bool weighted = total > 0.f;
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
    for_each_member(s, token >> 1, [&](int m) {
      float x[N];
      load_floats<Fmt, N>(rows.token(m) + offset, x);
      const float w = slots.sizes[m];
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = __fadd_rn(acc[e], weighted ? __fmul_rn(x[e], w) : x[e]);
    });
    const float divisor = weighted ? fmaxf(total, kMinPositiveTotal) : float(count);
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = __fdiv_rn(acc[e], divisor);
    store_floats<Fmt, N>(dst, acc);
  }
}

template <class Fmt>
__device__ void write_tensor_slots(const ChunkRows& rows, int dim, bool vec, char* out, int kept,
                                   const MatchState& s, const SlotState& slots) {
  if (vec) {
    write_slots<Fmt, kVec16<Fmt>>(rows, dim, out, kept, s, slots);
  } else {
    write_slots<Fmt, 1>(rows, dim, out, kept, s, slots);
  }
}

template <class KFmt, class MFmt>
__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const ChunkGrid& g = p.grid;
  const SmemLayout& m = p.layout;
  const int64_t block = blockIdx.x;
  const int64_t j = block % g.chunks, bh = block / g.chunks;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const int c = g.c, r = g.r, kept = c - r;
  const int kelem = int(sizeof(typename KFmt::Bits)), melem = int(sizeof(typename MFmt::Bits));
  const bool staged = m.staged, own_metric = p.own_metric;

  const MatchState s = match_state(smem, m);
  clear_match_bits(s, c / 2);
  const char* keys = global_chunk(p.keys, b, h, j * c);
  const char* values = global_chunk(p.values, b, h, j * c);
  const char* metric = own_metric ? global_chunk(p.metric, b, h, j * c) : keys;
  if (staged) {
    if (own_metric) stage_rows<MFmt>(reinterpret_cast<char*>(smem + m.rows_metric), metric, p.metric, c);
    stage_rows<KFmt>(reinterpret_cast<char*>(smem + m.rows_keys), keys, p.keys, c);
    stage_rows<KFmt>(reinterpret_cast<char*>(smem + m.rows_values), values, p.values, c);
  }
  float* sizes = reinterpret_cast<float*>(smem + m.sizes);
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    sizes[i] = p.sizes == nullptr
                   ? 1.f
                   : p.sizes[b * p.sizes_stride_b + h * p.sizes_stride_h + (j * c + i) * p.sizes_stride_l];
  }
  wait_async_copies();
  __syncthreads();

  const ChunkRows key_rows = chunk_rows(p.keys, keys, smem, m.rows_keys, kelem, c, staged);
  const ChunkRows value_rows = chunk_rows(p.values, values, smem, m.rows_values, kelem, c, staged);
  if (own_metric) {
    match_chunk<MFmt>(chunk_rows(p.metric, metric, smem, m.rows_metric, melem, c, staged),
                      p.metric.dim, rows_vectorized(p.metric, melem, staged), c, r, s);
  } else {
    // MFmt == KFmt here (the launcher instantiates <K, K> when there is no metric).
    match_chunk<KFmt>(key_rows, p.keys.dim, rows_vectorized(p.keys, kelem, staged), c, r, s);
  }

  // Each surviving token claims its output slot; S and the new size are summed in token order.
  int* slot_token = reinterpret_cast<int*>(smem + m.slot_token);
  float* slot_total = reinterpret_cast<float*>(smem + m.slot_total);
  int* slot_count = reinterpret_cast<int*>(smem + m.slot_count);
  float* out_sizes = p.out_sizes + bh * g.out_length + j * kept;
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    if (!(i & 1) && is_merged(s, i >> 1)) continue;
    const int slot = slot_in_chunk(s, i);
    const int count = (i & 1) ? member_count(s, i >> 1) : 1;
    float total = sizes[i];
    if (count > 1) {
      total = 0.f;
      for_each_member(s, i >> 1, [&](int t) { total = __fadd_rn(total, sizes[t]); });
    }
    slot_token[slot] = i;
    slot_total[slot] = total;
    slot_count[slot] = count;
    out_sizes[slot] = total;
  }
  __syncthreads();

  const SlotState slots{slot_token, slot_total, slot_count, sizes};
  const int64_t first_row = bh * g.out_length + j * kept;
  write_tensor_slots<KFmt>(key_rows, p.keys.dim,
                           p.out_keys_vec16 && rows_vectorized(p.keys, kelem, staged),
                           p.out_keys + first_row * p.keys.dim * kelem, kept, s, slots);
  write_tensor_slots<KFmt>(value_rows, p.values.dim,
                           p.out_values_vec16 && rows_vectorized(p.values, kelem, staged),
                           p.out_values + first_row * p.values.dim * kelem, kept, s, slots);
}

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

int round16(int64_t bytes) { return static_cast<int>((bytes + 15) / 16 * 16); }

// Lays out shared memory; row_bytes lists the staged tensors' row sizes (empty: not staged).
SmemLayout make_layout(int c, bool merge, const int64_t (&row_bytes)[3], bool staged) {
  SmemLayout m;
  const int half = c / 2;
  m.strip = std::min(half, 32);
  m.words = (half + 31) / 32;
  m.staged = staged;
  int64_t end = 0;
  int* row_offsets[3] = {&m.rows_metric, &m.rows_keys, &m.rows_values};
  for (int t = 0; t < 3; ++t) {
    *row_offsets[t] = static_cast<int>(end);
    if (staged && row_bytes[t] >= 0) end += int64_t(c) * staged_pitch(static_cast<int>(row_bytes[t]));
  }
  auto take = [&](int64_t count) {
    const int64_t offset = end;
    end += round16(count * 4);
    return offset;
  };
  m.sizes = static_cast<int>(take(merge ? c : 0));
  m.norms = static_cast<int>(take(c));
  m.best = static_cast<int>(take(half));
  m.score = static_cast<int>(take(half));
  m.sim = static_cast<int>(take(int64_t(half) * (m.strip + 1)));
  m.bits = static_cast<int>(take(int64_t(half + 1) * m.words));
  m.slot_token = static_cast<int>(take(merge ? c : 0));
  m.slot_total = static_cast<int>(take(merge ? c : 0));
  m.slot_count = static_cast<int>(take(merge ? c : 0));
  TORCH_CHECK(end < INT_MAX, "centroidkv: chunk_size ", c, " is too large for the CUDA kernels");
  m.bytes = static_cast<int>(end);
  return m;
}

// Staged layout if it fits the device, else the layout that reads rows from global memory.
SmemLayout choose_layout(int c, bool merge, const int64_t (&row_bytes)[3], int device,
                         const char* op) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const SmemLayout staged = make_layout(c, merge, row_bytes, true);
  if (staged.bytes <= limit) return staged;
  const SmemLayout direct = make_layout(c, merge, row_bytes, false);
  TORCH_CHECK(direct.bytes <= limit, op, ": chunk_size ", c, " needs ", direct.bytes,
              " bytes of shared memory per block for matching, more than this GPU allows (",
              limit, ")");
  return direct;
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
      kernel<<<static_cast<unsigned>(blocks), kThreads, p.layout.bytes,
               c10::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const int64_t tail = g.length % chunk_size;
  if (tail > 0 && map.numel() > 0) {
    const int64_t first = g.chunks * (chunk_size - num_merge);
    map.narrow(2, g.chunks * chunk_size, tail).copy_(at::arange(first, first + tail, map.options()));
  }
  return map;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cuda(
    const at::Tensor& keys_in, const at::Tensor& values_in,
    const c10::optional<at::Tensor>& sizes_in, int64_t chunk_size, int64_t num_merge,
    const c10::optional<at::Tensor>& metric_in) {
  const char* op = "centroidkv.merge";
  check_merge_args(keys_in, values_in, sizes_in, chunk_size, num_merge, metric_in);
  TORCH_CHECK(keys_in.is_cuda(), op, ": keys must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(keys_in.device());
  if (sizes_in.has_value()) check_sizes_values(*sizes_in, op);  // reads the sizes: a device sync

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
        kernel<<<static_cast<unsigned>(blocks), kThreads, p.layout.bytes,
                 c10::cuda::getCurrentCUDAStream()>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(centroidkv, CUDA, m) {
  m.impl("match", &cuda::match_cuda);
  m.impl("merge", &cuda::merge_cuda);
}

}  // namespace centroidkv

// The CUDA kernels of centroidkv.match and centroidkv.merge, and their shared-memory layout
// (host code in merge.cu). One thread block per (b, h, chunk); see merge.cu for the design.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include "chunk_match.cuh"

namespace centroidkv {
namespace cuda {

// Byte offsets into the block's dynamic shared memory. Built on the host, read by the kernel.
struct SmemLayout {
  int rows_metric = 0, rows_keys = 0, rows_values = 0;  // staged rows (sources, then destinations)
  int sizes = 0;       // float [c]
  int norms = 0;       // float [c]
  int best = 0;        // int [half]
  int score = 0;       // float [half]
  int sim = 0;         // float [half][strip + 1]
  int bits = 0;        // uint32 [words] merged, then [half][words] members (unless global)
  int slot_token = 0;  // int [c]: token owning each output slot
  int slot_total = 0;  // float [c]: S of each output slot
  int slot_count = 0;  // int [c]: tokens in each output slot
  int strip = 0, words = 0;
  int bytes = 0;
  bool staged = false;
  // Large chunks: the [half][words] members bitmask (c^2 / 32 bytes) lives in a global scratch
  // buffer, one slice per block of the launch, instead of shared memory.
  bool members_global = false;
  int64_t members_words = 0;  // half * words
};

struct ChunkGrid {
  int64_t heads, chunks, length, out_length;
  int c, r;
};

// The blocks one launch covers: blocks first_block .. first_block + gridDim.x - 1, and the
// members scratch of SmemLayout::members_global (gridDim.x slices; nullptr when unused).
struct LaunchSlice {
  int64_t first_block = 0;
  uint32_t* members_scratch = nullptr;
};

__device__ inline MatchState match_state(unsigned char* smem, const SmemLayout& m,
                                        uint32_t* members_scratch) {
  MatchState s;
  s.norms = reinterpret_cast<float*>(smem + m.norms);
  s.best = reinterpret_cast<int*>(smem + m.best);
  s.score = reinterpret_cast<float*>(smem + m.score);
  s.sim = reinterpret_cast<float*>(smem + m.sim);
  s.merged = reinterpret_cast<uint32_t*>(smem + m.bits);
  s.members = m.members_global ? members_scratch + int64_t(blockIdx.x) * m.members_words
                               : s.merged + m.words;
  s.strip = m.strip;
  s.words = m.words;
  return s;
}

// Rows of chunk j of (b, h) in global memory.
__device__ inline const char* global_chunk(const RowsArg& arg, int64_t b, int64_t h, int64_t first) {
  return arg.ptr + b * arg.stride_b + h * arg.stride_h + first * arg.stride_l;
}

__device__ inline ChunkRows chunk_rows(const RowsArg& arg, const char* global, unsigned char* smem,
                                int offset, int elem_bytes, int c, bool staged) {
  if (staged) {
    const int pitch = staged_pitch(arg.dim * elem_bytes);
    const char* base = reinterpret_cast<const char*>(smem + offset);
    return {base, base + (c / 2) * pitch, pitch};
  }
  return {global, global + arg.stride_l, 2 * arg.stride_l};
}

// Whether rows can be read 16 bytes at a time from where they live.
__device__ inline bool rows_vectorized(const RowsArg& arg, int elem_bytes, bool staged) {
  return staged ? (arg.dim * elem_bytes) % 16 == 0 : arg.vec16;
}

// ---------------------------------------------------------------------------------------------
struct MatchParams {
  RowsArg metric;
  int64_t* map;  // contiguous [B, H, L]
  ChunkGrid grid;
  SmemLayout layout;
  LaunchSlice slice;
};

template <class MFmt>
__global__ void __launch_bounds__(kThreads) match_kernel(const MatchParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const ChunkGrid& g = p.grid;
  const int64_t block = p.slice.first_block + blockIdx.x;
  const int64_t j = block % g.chunks, bh = block / g.chunks;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const int c = g.c, elem = int(sizeof(typename MFmt::Bits));
  const bool staged = p.layout.staged;

  const MatchState s = match_state(smem, p.layout, p.slice.members_scratch);
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
  LaunchSlice slice;
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
  const int64_t block = p.slice.first_block + blockIdx.x;
  const int64_t j = block % g.chunks, bh = block / g.chunks;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const int c = g.c, r = g.r, kept = c - r;
  const int kelem = int(sizeof(typename KFmt::Bits)), melem = int(sizeof(typename MFmt::Bits));
  const bool staged = m.staged, own_metric = p.own_metric;

  const MatchState s = match_state(smem, m, p.slice.members_scratch);
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
// Shared-memory layout, computed on the host.

inline int round16(int64_t bytes) { return static_cast<int>((bytes + 15) / 16 * 16); }

// Lays out shared memory; row_bytes lists the staged tensors' row sizes (-1: not staged).
// strip = destinations per similarity strip (results do not depend on it); members_global puts
// the members bitmask in global scratch.
inline SmemLayout make_layout(int c, bool merge, const int64_t (&row_bytes)[3], bool staged,
                              int strip = 32, bool members_global = false) {
  SmemLayout m;
  const int half = c / 2;
  m.strip = std::max(1, std::min(half, strip));
  m.words = (half + 31) / 32;
  m.staged = staged;
  m.members_global = members_global;
  m.members_words = int64_t(half) * m.words;
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
  m.bits = static_cast<int>(take(int64_t(members_global ? 1 : half + 1) * m.words));
  m.slot_token = static_cast<int>(take(merge ? c : 0));
  m.slot_total = static_cast<int>(take(merge ? c : 0));
  m.slot_count = static_cast<int>(take(merge ? c : 0));
  m.bytes = end < INT_MAX ? static_cast<int>(end) : -1;  // -1: too large for any device
  return m;
}

}  // namespace cuda
}  // namespace centroidkv

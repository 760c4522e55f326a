// CUDA kernel of centroidkv.attention: flash-decoding over a clustered cache.
//
// Split-K design. The keys of each (batch row, KV head) are cut into `num_splits` chunks; one
// thread block owns one (chunk, KV head, tile of query rows), where a tile holds up to 8 of the
// G * Tq query rows (G query heads of the group x Tq positions) that read this KV head. So K and
// V are read once per group for decoding (GQA-native, no repeat of KV heads), and the grid fills
// the GPU even at batch 1 because the chunk count is chosen from L and the SM count.
//
// Inside a block, groups of D / 8 threads (16-bit types) each read whole K/V rows with 16-byte
// loads; a group's lanes own a slice of the head dimension, reduce dot products with warp
// shuffles and run an online softmax in float32 over their keys (no barrier in the key loop).
// The groups are merged through shared memory at the end. With one chunk the block writes the
// output; otherwise it writes (normalised partial output, log-sum-exp) to a float32 workspace and
// a second kernel merges the chunks by log-sum-exp.
//
// The key loop: each thread streams its own 16-byte pieces of K, V (and the sizes) through a
// private ring of `Stages` steps in shared memory with cp.async, so the loads of the next
// Stages - 1 steps are in flight while a step is computed (enough bytes in flight to reach HBM
// bandwidth). A thread reads back only what it copied itself, so the loop needs no barrier;
// cp.async.wait_group alone orders the copies before the reads. (A first version that loaded
// each step directly, with no overlap, was slower and has been removed.)
//
// Logits are kept in base 2: q is pre-multiplied by scale * log2(e) and the bias is log2(size),
// so exp2 replaces exp with the same softmax.
//
// No host synchronisation anywhere (CUDA-graph capturable; workspace from the caching
// allocator). Therefore lengths cannot be range-checked here: a row whose length lies outside
// [0, L] produces NaN output (reads are clamped to the cache), so the error cannot pass silently.
// Head dims: D == Dv in {64, 128, 256} take the kernel; any other shape takes a composite ATen
// path with the same semantics (slower, also sync-free).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../checks.h"

namespace centroidkv {
namespace {

constexpr int kThreads = 128;      // threads of the split kernel
constexpr int kMaxSplits = 1024;   // bound of the combine kernel's shared weights
constexpr int kCombineThreads = 128;
constexpr int kMinChunk = 128;     // keys per block at least, so partials stay a small overhead
constexpr float kLog2e = 1.4426950408889634f;

// 16 bytes of K or V as floats.
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void to_float(const int4& raw, float* out) {
    out[0] = __int_as_float(raw.x);
    out[1] = __int_as_float(raw.y);
    out[2] = __int_as_float(raw.z);
    out[3] = __int_as_float(raw.w);
  }
};

template <>
struct Vec16<c10::BFloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const int4& raw, float* out) {
    const unsigned words[4] = {static_cast<unsigned>(raw.x), static_cast<unsigned>(raw.y),
                               static_cast<unsigned>(raw.z), static_cast<unsigned>(raw.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 is the top half of a float32
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

template <>
struct Vec16<c10::Half> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const int4& raw, float* out) {
    const int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &words[i], sizeof(h));
      const float2 f = __half22float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

// Asynchronous copies into shared memory (sm_80+). src_bytes = 0 copies nothing (zero fill).
__device__ __forceinline__ void copy_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void copy_async_4(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(gmem),
               "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int Pending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const float* sizes;     // nullptr: all ones
  const int64_t* lengths; // nullptr: all L
  void* out;              // contiguous [B, Hq, Tq, D]
  float* partial_out;     // [B * Hq * Tq, splits, D], used when splits > 1
  float* partial_lse;     // [B * Hq * Tq, splits], base-2 log-sum-exp of each chunk
  int64_t q_sb, q_sh, q_st, q_sd;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t s_sb, s_sh, s_sl;
  int kv_heads, q_heads, tq, length, group, splits, chunk;
  float scale_log2;  // scale * log2(e)
};

__device__ __forceinline__ int row_length(const Params& p, int b, bool* valid) {
  const int64_t n = p.lengths ? p.lengths[b] : p.length;
  *valid = n >= 0 && n <= p.length;
  return static_cast<int>(n < 0 ? 0 : (n > p.length ? p.length : n));
}

// One block: keys [split * chunk, (split + 1) * chunk) of KV head (b, h), query rows
// tile * QT .. tile * QT + QT - 1 of the group (row r = g * Tq + t).
// Up to 4 query rows: at most 128 registers, so 4 blocks (16 warps) per SM keep enough loads
// in flight; 8 rows need about 230 registers and run 2 blocks per SM.
template <int QT>
constexpr int min_blocks_per_sm() { return QT <= 4 ? 4 : 2; }

// Shared memory of the pipelined loop: per stage, per key of a group, per 16-byte piece, one
// int4 of K and of V per thread (consecutive threads on consecutive 16 bytes: no bank
// conflicts), then one size per key and thread.
template <typename T, int D, int U, int Stages>
struct Ring {
  static constexpr int kVec = Vec16<T>::kElems;
  static constexpr int kLanes = (D / kVec) < 32 ? (D / kVec) : 32;
  static constexpr int kVecsPerLane = D / (kLanes * kVec);
  static constexpr int kVecs = Stages * U * kVecsPerLane * kThreads;  // int4 per K (or V) ring
  static constexpr int kBytes = 2 * kVecs * 16 + Stages * U * kThreads * 4;
  __device__ static int vec_index(int slot, int u, int n) {
    return ((slot * U + u) * kVecsPerLane + n) * kThreads + threadIdx.x;
  }
  __device__ static int size_index(int slot, int u) { return (slot * U + u) * kThreads + threadIdx.x; }
};

// Floats of the end-of-block merge: max and sum per (group, row), then the accumulators.
template <int D, int QT, int Groups>
constexpr int merge_floats() { return Groups * QT * (D + 2); }

// Stages: steps of the cp.async ring.
template <typename T, int D, int QT, int U, int Stages>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<QT>())
attention_split_kernel(const Params p) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kLanes = (D / kVec) < 32 ? (D / kVec) : 32;  // threads per K/V row
  constexpr int kVecsPerLane = D / (kLanes * kVec);
  constexpr int kElemsPerLane = kVecsPerLane * kVec;
  constexpr int kGroups = kThreads / kLanes;  // rows read side by side
  constexpr int kKeysPerStep = kGroups * U;
  static_assert(D % (kLanes * kVec) == 0, "head dim must be a multiple of 16 bytes per lane");
  static_assert(32 % kLanes == 0, "a row's lanes must sit inside one warp");
  static_assert(Stages >= 2, "a pipeline needs at least two stages");
  using RingT = Ring<T, D, U, Stages>;

  // The merge reuses the ring (after a barrier), so a block needs no static buffer.
  extern __shared__ int4 dynamic_smem[];
  float* merge = reinterpret_cast<float*>(dynamic_smem);
  float* group_max = merge;                      // [kGroups][QT]
  float* group_sum = merge + kGroups * QT;       // [kGroups][QT]
  float* group_acc = merge + 2 * kGroups * QT;   // [kGroups][QT][D]

  const int split = blockIdx.x, tile = blockIdx.y;
  const int b = blockIdx.z / p.kv_heads, h = blockIdx.z % p.kv_heads;
  const int grp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  bool length_ok;
  const int len = row_length(p, b, &length_ok);
  const int rows = p.group * p.tq;
  const int k_begin = split * p.chunk;

  // Per query row: keys < limit are visible (causal over the last Tq keys of the row).
  int limit[QT];
  int tile_limit = 0;
#pragma unroll
  for (int i = 0; i < QT; ++i) {
    const int r = tile * QT + i;
    limit[i] = r < rows ? len - p.tq + (r % p.tq) + 1 : 0;
    tile_limit = max(tile_limit, limit[i]);
  }
  const int k_end = min(min(k_begin + p.chunk, len), tile_limit);

  const char* k_head = static_cast<const char*>(p.k) +
                       (b * p.k_sb + h * p.k_sh + lane * kVec) * (int64_t)sizeof(T);
  const char* v_head = static_cast<const char*>(p.v) +
                       (b * p.v_sb + h * p.v_sh + lane * kVec) * (int64_t)sizeof(T);
  const float* size_head = p.sizes ? p.sizes + b * p.s_sb + h * p.s_sh : nullptr;

  // Copies this thread's pieces of the step starting at key `first` into ring slot `slot`.
  // Keys past k_end are zero-filled (V must hold no NaN for a zero weight); the source address
  // of a zero fill is a valid row anyway.
  auto issue = [&](int slot, int first) {
    if (first >= k_end) return;
    int4* ring_k = dynamic_smem;
    int4* ring_v = dynamic_smem + RingT::kVecs;
    float* ring_s = reinterpret_cast<float*>(dynamic_smem + 2 * RingT::kVecs);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = first + u * kGroups + grp;
      const bool valid = j < k_end;
      const int row = valid ? j : k_begin;
      const char* krow = k_head + row * p.k_sl * (int64_t)sizeof(T);
      const char* vrow = v_head + row * p.v_sl * (int64_t)sizeof(T);
#pragma unroll
      for (int n = 0; n < kVecsPerLane; ++n) {
        copy_async_16(ring_k + RingT::vec_index(slot, u, n), krow + n * kLanes * 16, valid);
        copy_async_16(ring_v + RingT::vec_index(slot, u, n), vrow + n * kLanes * 16, valid);
      }
      if (size_head) {
        copy_async_4(ring_s + RingT::size_index(slot, u), size_head + row * p.s_sl, valid);
      }
    }
  };
  // Prologue: the first Stages steps in flight before the q rows are even read. One commit
  // per step, empty or not, so that wait_group counts steps.
#pragma unroll
  for (int s = 0; s < Stages; ++s) {
    issue(s, k_begin + s * kKeysPerStep);
    copy_async_commit();
  }

  float qv[QT][kElemsPerLane];
#pragma unroll
  for (int i = 0; i < QT; ++i) {
    const int r = tile * QT + i;
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_sb +
                    (int64_t)(h * p.group + (r < rows ? r / p.tq : 0)) * p.q_sh +
                    (int64_t)(r < rows ? r % p.tq : 0) * p.q_st;
#pragma unroll
    for (int n = 0; n < kVecsPerLane; ++n)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int d = (lane + n * kLanes) * kVec + e;
        qv[i][n * kVec + e] =
            r < rows ? static_cast<float>(qrow[d * p.q_sd]) * p.scale_log2 : 0.f;
      }
  }

  float run_max[QT], run_sum[QT], acc[QT][kElemsPerLane];
#pragma unroll
  for (int i = 0; i < QT; ++i) {
    run_max[i] = -INFINITY;
    run_sum[i] = 0.f;
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) acc[i][e] = 0.f;
  }

  // The loop bound is uniform over the block, so every lane of a warp takes part in the
  // shuffles; keys past k_end are masked instead of skipped.
  int slot = 0;  // ring slot of this step
  for (int step = k_begin; step < k_end; step += kKeysPerStep) {
    int4 kraw[U][kVecsPerLane], vraw[U][kVecsPerLane];
    float bias[U];  // log2(size), -inf for a masked or absent key
    // Steps issued so far: Stages + (steps done); leaving Stages - 1 pending means this one
    // has landed.
    copy_async_wait<Stages - 1>();
    const int4* ring_k = dynamic_smem;
    const int4* ring_v = dynamic_smem + RingT::kVecs;
    const float* ring_s = reinterpret_cast<const float*>(dynamic_smem + 2 * RingT::kVecs);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = step + u * kGroups + grp;
#pragma unroll
      for (int n = 0; n < kVecsPerLane; ++n) {
        kraw[u][n] = ring_k[RingT::vec_index(slot, u, n)];  // zeros past k_end
        vraw[u][n] = ring_v[RingT::vec_index(slot, u, n)];
      }
      if (j >= k_end) {
        bias[u] = -INFINITY;
      } else if (size_head) {
        const float s = ring_s[RingT::size_index(slot, u)];
        bias[u] = s > 0.f ? log2f(s) : -INFINITY;  // `> 0` is false for 0 and NaN
      } else {
        bias[u] = 0.f;
      }
    }

    float logit[QT][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[kElemsPerLane];
#pragma unroll
      for (int n = 0; n < kVecsPerLane; ++n) Vec16<T>::to_float(kraw[u][n], kf + n * kVec);
#pragma unroll
      for (int i = 0; i < QT; ++i) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kElemsPerLane; ++e) dot = fmaf(qv[i][e], kf[e], dot);
        logit[i][u] = dot;
      }
    }
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2)
#pragma unroll
      for (int i = 0; i < QT; ++i)
#pragma unroll
        for (int u = 0; u < U; ++u)
          logit[i][u] += __shfl_xor_sync(0xffffffffu, logit[i][u], offset);

    float weight[QT][U], rescale[QT];
#pragma unroll
    for (int i = 0; i < QT; ++i) {
      float step_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = step + u * kGroups + grp;
        const bool visible = j < limit[i] && bias[u] != -INFINITY;
        logit[i][u] = visible ? logit[i][u] + bias[u] : -INFINITY;
        step_max = fmaxf(step_max, logit[i][u]);
      }
      const float new_max = fmaxf(run_max[i], step_max);
      // While nothing is visible the max stays -inf; shift by 0 then so no inf - inf appears.
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      rescale[i] = exp2f(run_max[i] - shift);
      float step_sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        weight[i][u] = exp2f(logit[i][u] - shift);  // exp2(-inf) = 0 for masked keys
        step_sum += weight[i][u];
      }
      run_sum[i] = run_sum[i] * rescale[i] + step_sum;
      run_max[i] = new_max;
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) acc[i][e] *= rescale[i];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[kElemsPerLane];
#pragma unroll
      for (int n = 0; n < kVecsPerLane; ++n) Vec16<T>::to_float(vraw[u][n], vf + n * kVec);
#pragma unroll
      for (int i = 0; i < QT; ++i)
#pragma unroll
        for (int e = 0; e < kElemsPerLane; ++e) acc[i][e] = fmaf(weight[i][u], vf[e], acc[i][e]);
    }
    // The slot's values were consumed above (the arithmetic depends on them), so it can be
    // refilled with the step Stages ahead.
    issue(slot, step + Stages * kKeysPerStep);
    copy_async_commit();
    slot = slot + 1 == Stages ? 0 : slot + 1;
  }

  // The merge below reuses the ring: no copy may still land, no thread may still read it.
  copy_async_wait<0>();
  __syncthreads();

  // Merge the groups of the block: rescale each group to the block max, then sum.
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < QT; ++i) group_max[grp * QT + i] = run_max[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < QT; ++i) {
    float block_max = -INFINITY;
    for (int g = 0; g < kGroups; ++g) block_max = fmaxf(block_max, group_max[g * QT + i]);
    const float factor = block_max == -INFINITY ? 0.f : exp2f(run_max[i] - block_max);
    if (lane == 0) group_sum[grp * QT + i] = run_sum[i] * factor;
#pragma unroll
    for (int n = 0; n < kVecsPerLane; ++n)
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        group_acc[(grp * QT + i) * D + (lane + n * kLanes) * kVec + e] = acc[i][n * kVec + e] * factor;
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < QT * D; idx += kThreads) {
    const int i = idx / D, d = idx % D;
    const int r = tile * QT + i;
    if (r >= rows) continue;
    float total = 0.f, sum = 0.f, block_max = -INFINITY;
    for (int g = 0; g < kGroups; ++g) {
      total += group_acc[(g * QT + i) * D + d];
      sum += group_sum[g * QT + i];
      block_max = fmaxf(block_max, group_max[g * QT + i]);
    }
    const float value = sum > 0.f ? total / sum : 0.f;  // nothing visible -> zeros
    const int64_t row = ((int64_t)b * p.q_heads + h * p.group + r / p.tq) * p.tq + r % p.tq;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[row * D + d] = static_cast<T>(length_ok ? value : NAN);
    } else {
      p.partial_out[(row * p.splits + split) * D + d] = value;
      if (d == 0) {
        p.partial_lse[row * p.splits + split] = sum > 0.f ? block_max + log2f(sum) : -INFINITY;
      }
    }
  }
}

// One block per query row: weights exp2(lse_s - max) over the chunks, then the weighted mean.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
attention_combine_kernel(const Params p, int dim) {
  __shared__ float weight[kMaxSplits];
  __shared__ float warp_partial[kCombineThreads / 32];
  const int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / ((int64_t)p.q_heads * p.tq));
  bool length_ok;
  row_length(p, b, &length_ok);
  const float* lse = p.partial_lse + row * p.splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float local_max = -INFINITY;
  for (int s = threadIdx.x; s < p.splits; s += kCombineThreads) local_max = fmaxf(local_max, lse[s]);
  for (int offset = 16; offset > 0; offset /= 2)
    local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  if (lane == 0) warp_partial[warp] = local_max;
  __syncthreads();
  float max_lse = -INFINITY;
  for (int w = 0; w < kCombineThreads / 32; ++w) max_lse = fmaxf(max_lse, warp_partial[w]);
  __syncthreads();  // warp_partial is reused for the sum

  float local_sum = 0.f;
  for (int s = threadIdx.x; s < p.splits; s += kCombineThreads) {
    const float w = max_lse == -INFINITY ? 0.f : exp2f(lse[s] - max_lse);
    weight[s] = w;
    local_sum += w;
  }
  for (int offset = 16; offset > 0; offset /= 2)
    local_sum += __shfl_xor_sync(0xffffffffu, local_sum, offset);
  if (lane == 0) warp_partial[warp] = local_sum;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kCombineThreads / 32; ++w) total += warp_partial[w];

  const float* partial = p.partial_out + row * p.splits * dim;
  T* out = static_cast<T*>(p.out) + row * dim;
  for (int d = threadIdx.x; d < dim; d += kCombineThreads) {
    // Four independent sums so that several partial loads are in flight at once.
    float acc4[4] = {0.f, 0.f, 0.f, 0.f};
    int s = 0;
#pragma unroll 2
    for (; s + 4 <= p.splits; s += 4)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc4[k] = fmaf(weight[s + k], partial[(s + k) * dim + d], acc4[k]);
    for (; s < p.splits; ++s) acc4[0] = fmaf(weight[s], partial[s * dim + d], acc4[0]);
    const float acc = (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]);
    const float value = total > 0.f ? acc / total : 0.f;
    out[d] = static_cast<T>(length_ok ? value : NAN);
  }
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 64 && cached[device] > 0) return cached[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device] = count;
  return count;
}

// Chunks per KV head: the count whose grid best fills whole waves of resident blocks, from 1 up
// to 4x the count that first fills the GPU, keeping at least kMinChunk keys per block.
void choose_splits(int64_t base_blocks, int length, int keys_per_step, int slots, int* splits,
                   int* chunk) {
  const int min_chunk = std::max(kMinChunk, keys_per_step);
  const int most = std::max(1, std::min(kMaxSplits, (length + min_chunk - 1) / min_chunk));
  const int64_t fill = (slots + base_blocks - 1) / base_blocks;
  const int limit = static_cast<int>(std::min<int64_t>(most, std::max<int64_t>(1, 4 * fill)));
  double best = -1.0;
  *splits = 1;
  *chunk = std::max(length, 1);
  for (int s = 1; s <= limit; ++s) {
    const int per_split = (length + s - 1) / s;
    const int c = std::max(keys_per_step,
                           (per_split + keys_per_step - 1) / keys_per_step * keys_per_step);
    const int used = (length + c - 1) / c;
    if (used != s) continue;  // rounding gave the same grid as a smaller count
    const int64_t blocks = base_blocks * used;
    const int64_t waves = (blocks + slots - 1) / slots;
    const double fill_ratio = static_cast<double>(blocks) / static_cast<double>(waves * slots);
    if (fill_ratio > best + 1e-3) {
      best = fill_ratio;
      *splits = used;
      *chunk = c;
    }
  }
}

// Steps in the ring: as many as fit in 56 KiB (four 128-thread blocks per SM still fit in
// the 228 KiB of an H100/H200 SM), so each block keeps Stages - 1 steps (~36 KiB) in flight.
template <typename T, int D, int U>
constexpr int ring_stages() {
  constexpr int per_stage = Ring<T, D, U, 1>::kBytes;
  constexpr int fit = (56 * 1024) / per_stage;
  return fit < 2 ? 2 : (fit > 8 ? 8 : fit);
}

template <typename T, int D, int QT>
void launch(Params& p, const at::Tensor& q, int batch, cudaStream_t stream) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kLanes = (D / kVec) < 32 ? (D / kVec) : 32;
  // Keys per group per step: fewer where the rows or wide lanes (fp32, D=256) fill registers.
  constexpr int U = (QT >= 8 || D > kLanes * kVec) ? 2 : 4;
  constexpr int kKeysPerStep = (kThreads / kLanes) * U;
  constexpr int kStages = ring_stages<T, D, U>();
  auto kernel = attention_split_kernel<T, D, QT, U, kStages>;
  constexpr int kMergeBytes = merge_floats<D, QT, kThreads / kLanes>() * 4;
  constexpr int kRingBytes = Ring<T, D, U, kStages>::kBytes;
  constexpr size_t smem = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;

  const int device = q.get_device();
  static int resident[64] = {0};  // blocks per SM; depends only on the kernel and the GPU
  int per_sm = device < 64 ? resident[device] : 0;
  if (per_sm == 0) {
    if (smem > 48 * 1024) {  // opt in to more than the default dynamic shared memory
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    per_sm = std::max(per_sm, 1);
    if (device < 64) resident[device] = per_sm;
  }
  const int tiles = (p.group * p.tq + QT - 1) / QT;
  const int64_t base_blocks = (int64_t)batch * p.kv_heads * tiles;
  choose_splits(base_blocks, p.length, kKeysPerStep, sm_count(device) * per_sm, &p.splits,
                &p.chunk);
  TORCH_CHECK(tiles <= 65535 && (int64_t)batch * p.kv_heads <= 65535,
              "centroidkv.attention: too many query rows or batch x KV heads for one launch (",
              tiles, " query tiles, ", (int64_t)batch * p.kv_heads, " batch x KV heads)");

  const int64_t rows_total = (int64_t)batch * p.q_heads * p.tq;
  at::Tensor partial_out, partial_lse;
  if (p.splits > 1) {
    const auto opts = q.options().dtype(at::kFloat);
    partial_out = at::empty({rows_total, p.splits, D}, opts);
    partial_lse = at::empty({rows_total, p.splits}, opts);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  const dim3 grid(p.splits, tiles, batch * p.kv_heads);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    attention_combine_kernel<T><<<rows_total, kCombineThreads, 0, stream>>>(p, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void launch_for_rows(Params& p, const at::Tensor& q, int batch, cudaStream_t stream) {
  const int rows = p.group * p.tq;
  // The smallest power-of-two tile that holds the rows, at most 8 (more rows -> more tiles).
  if (rows > 4) return launch<T, D, 8>(p, q, batch, stream);
  if (rows > 2) return launch<T, D, 4>(p, q, batch, stream);
  if (rows == 2) return launch<T, D, 2>(p, q, batch, stream);
  return launch<T, D, 1>(p, q, batch, stream);
}

template <typename T>
void launch_for_dim(Params& p, const at::Tensor& q, int dim, int batch, cudaStream_t stream) {
  switch (dim) {
    case 64: return launch_for_rows<T, 64>(p, q, batch, stream);
    case 128: return launch_for_rows<T, 128>(p, q, batch, stream);
    case 256: return launch_for_rows<T, 256>(p, q, batch, stream);
    default: TORCH_CHECK(false, "centroidkv.attention: no kernel for head dim ", dim);
  }
}

// Rows are read with 16-byte loads: the last dim must be dense and every row 16-byte aligned.
bool rows_aligned(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  return t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.stride(0) * elem) % 16 == 0 && (t.stride(1) * elem) % 16 == 0 &&
         (t.stride(2) * elem) % 16 == 0;
}

at::Tensor with_aligned_rows(const at::Tensor& t) {
  return rows_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Any head-dim shape the kernel does not cover: the same math with ATen ops (no sync).
at::Tensor attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& sizes, double scale, const at::Tensor& lengths) {
  const int64_t batch = q.size(0), q_heads = q.size(1), tq = q.size(2);
  const int64_t kv_heads = k.size(1), length = k.size(2);
  const int64_t group = q_heads / kv_heads;
  const at::Tensor qf = q.to(at::kFloat).reshape({batch, kv_heads, group * tq, q.size(3)});
  at::Tensor logits = at::matmul(qf, k.to(at::kFloat).transpose(-1, -2)) * scale;  // [B,Hkv,G*Tq,L]
  if (sizes.defined()) {
    logits = logits + at::where(sizes > 0, sizes.log(), -INFINITY).unsqueeze(2);
  }
  at::Tensor row_len = lengths.defined()
                           ? lengths.to(at::kLong)
                           : at::full({batch}, length, q.options().dtype(at::kLong));
  const at::Tensor key_pos = at::arange(length, q.options().dtype(at::kLong));
  const at::Tensor t_pos = at::arange(tq, q.options().dtype(at::kLong)).repeat({group});
  const at::Tensor last = row_len.view({batch, 1}) - tq + t_pos.view({1, -1});  // [B, G*Tq]
  const at::Tensor visible = key_pos.view({1, 1, -1}) <= last.unsqueeze(-1);   // [B, G*Tq, L]
  logits = logits.masked_fill(visible.logical_not().unsqueeze(1), -INFINITY);
  at::Tensor weights = at::softmax(logits, -1).nan_to_num(0.0);
  at::Tensor out = at::matmul(weights, v.to(at::kFloat));
  const at::Tensor bad = (row_len < 0).logical_or(row_len > length).view({batch, 1, 1, 1});
  out = out.masked_fill(bad, NAN);
  return out.reshape({batch, q_heads, tq, v.size(3)}).to(q.scalar_type());
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                          const c10::optional<at::Tensor>& sizes_in, double scale,
                          const c10::optional<at::Tensor>& lengths_in) {
  check_attention_args(q, k_in, v_in, sizes_in, scale, lengths_in);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), q_heads = q.size(1), tq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k_in.size(1), length = k_in.size(2), dim_v = v_in.size(3);
  TORCH_CHECK(length < (int64_t{1} << 30) && tq < (int64_t{1} << 20),
              "centroidkv.attention: cache length ", length, " or query length ", tq,
              " too large for the CUDA kernel");
  at::Tensor lengths;
  if (lengths_in.has_value()) lengths = lengths_in->to(at::kLong).contiguous();
  at::Tensor sizes;
  if (sizes_in.has_value()) sizes = *sizes_in;

  at::Tensor out = at::empty({batch, q_heads, tq, dim_v}, q.options());
  if (out.numel() == 0) return out;
  if (length == 0) return out.zero_();  // no key to see: zeros
  if (dim != dim_v || (dim != 64 && dim != 128 && dim != 256)) {
    return attention_composite(q, k_in, v_in, sizes, scale, lengths);
  }
  const at::Tensor k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);

  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.sizes = sizes.defined() ? sizes.data_ptr<float>() : nullptr;
  p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_st = q.stride(2), p.q_sd = q.stride(3);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  if (sizes.defined()) p.s_sb = sizes.stride(0), p.s_sh = sizes.stride(1), p.s_sl = sizes.stride(2);
  p.kv_heads = static_cast<int>(kv_heads);
  p.q_heads = static_cast<int>(q_heads);
  p.tq = static_cast<int>(tq);
  p.length = static_cast<int>(length);
  p.group = static_cast<int>(q_heads / kv_heads);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int b = static_cast<int>(batch);
  switch (q.scalar_type()) {
    case at::kFloat: launch_for_dim<float>(p, q, static_cast<int>(dim), b, stream); break;
    case at::kHalf: launch_for_dim<c10::Half>(p, q, static_cast<int>(dim), b, stream); break;
    case at::kBFloat16: launch_for_dim<c10::BFloat16>(p, q, static_cast<int>(dim), b, stream); break;
    default: TORCH_CHECK(false, "centroidkv.attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(centroidkv, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace centroidkv

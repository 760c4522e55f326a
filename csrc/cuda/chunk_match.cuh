// Device building blocks of the CUDA merge kernels: element formats, row access, and the
// per-chunk bipartite matching of SPEC.md done by one thread block entirely in shared memory.
//
// A chunk's rows are addressed as two sets: source a (token 2a) and destination b (token
// 2b + 1). When rows are staged in shared memory they are stored sources first, then
// destinations, with a pitch whose 16-byte count is odd, so that eight consecutive rows read
// 16 bytes each hit eight different bank groups (no bank conflicts in the dot-product loops).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

namespace centroidkv {
namespace cuda {

constexpr int kThreads = 128;
constexpr float kNormEps = 1e-6f;       // SPEC.md: norms are clamped to at least eps.
constexpr float kMinPositiveTotal = 1e-30f;  // reference.segment_average's clamp of the divisor.

// ---------------------------------------------------------------------------------------------
// Element formats. Rows are moved as raw bits (a single token is copied bit-exactly) and
// converted to fp32 only for arithmetic; widening fp16/bf16 to fp32 is exact.
struct Float32 {
  using Bits = uint32_t;
  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ static Bits from_float(float f) { return __float_as_uint(f); }
};
struct Float16 {
  using Bits = uint16_t;
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BFloat16 {
  using Bits = uint16_t;
  __device__ static float to_float(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
  __device__ static Bits from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// Elements of format Fmt in one 16-byte vector.
template <class Fmt>
constexpr int kVec16 = 16 / int(sizeof(typename Fmt::Bits));

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Loads N consecutive elements at p as fp32: one 16-byte load when N fills a vector (p must
// then be 16-byte aligned), else N element loads. p may point to shared or global memory.
template <class Fmt, int N>
__device__ __forceinline__ void load_floats(const char* p, float (&x)[N]) {
  using Bits = typename Fmt::Bits;
  if constexpr (N == kVec16<Fmt>) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if constexpr (sizeof(Bits) == 4) {
        x[e] = Fmt::to_float(word_of(raw, e));
      } else {
        x[e] = Fmt::to_float(Bits((word_of(raw, e / 2) >> (16 * (e % 2))) & 0xffffu));
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) x[e] = Fmt::to_float(reinterpret_cast<const Bits*>(p)[e]);
  }
}

template <class Fmt, int N>
__device__ __forceinline__ void store_floats(char* p, const float (&x)[N]) {
  using Bits = typename Fmt::Bits;
  if constexpr (N == kVec16<Fmt>) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(Bits) == 4) {
        w[i] = Fmt::from_float(x[i]);
      } else {
        w[i] = uint32_t(Fmt::from_float(x[2 * i])) | (uint32_t(Fmt::from_float(x[2 * i + 1])) << 16);
      }
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) reinterpret_cast<Bits*>(p)[e] = Fmt::from_float(x[e]);
  }
}

template <class Fmt, int N>
__device__ __forceinline__ void copy_bits(char* dst, const char* src) {
  using Bits = typename Fmt::Bits;
  if constexpr (N == kVec16<Fmt>) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) reinterpret_cast<Bits*>(dst)[e] = reinterpret_cast<const Bits*>(src)[e];
  }
}

// 16-byte asynchronous copy global -> shared (sm_80+), so every row load of a block is in
// flight at once without passing through registers.
__device__ __forceinline__ void copy16_async(char* smem_dst, const char* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(global_src);
#endif
}

__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Rows of one chunk: source a at a_base + a * pitch, destination b at b_base + b * pitch.
struct ChunkRows {
  const char* a_base;
  const char* b_base;
  int64_t pitch;  // bytes

  __device__ const char* source(int a) const { return a_base + a * pitch; }
  __device__ const char* destination(int b) const { return b_base + b * pitch; }
  __device__ const char* token(int i) const { return (i & 1) ? destination(i >> 1) : source(i >> 1); }
};

// Host-side description of a [B, H, L, D] tensor with unit stride in D (strides in bytes).
struct RowsArg {
  const char* ptr;
  int64_t stride_b, stride_h, stride_l;
  int dim;
  bool vec16;  // every row is 16-byte aligned and D * element size is a multiple of 16
};

// Shared-memory row pitch for rows of row_bytes: a multiple of 16 with an odd 16-byte count.
__host__ __device__ inline int staged_pitch(int row_bytes) {
  int pitch = (row_bytes + 15) / 16 * 16;
  if ((pitch / 16) % 2 == 0) pitch += 16;
  return pitch;
}

// Copies the chunk's c rows (starting at global address chunk) to shared memory, sources
// first, then destinations. Asynchronous when rows allow 16-byte copies: the caller must call
// wait_async_copies() and __syncthreads() before reading.
template <class Fmt>
__device__ void stage_rows(char* smem, const char* chunk, const RowsArg& arg, int c) {
  using Bits = typename Fmt::Bits;
  const int half = c / 2;
  const int pitch = staged_pitch(arg.dim * int(sizeof(Bits)));
  if (arg.vec16) {
    const int per_row = arg.dim * int(sizeof(Bits)) / 16;
    for (int t = threadIdx.x; t < c * per_row; t += blockDim.x) {
      const int i = t / per_row, v = t % per_row;
      const int row = (i & 1) ? half + (i >> 1) : (i >> 1);
      copy16_async(smem + row * pitch + v * 16, chunk + i * arg.stride_l + v * 16);
    }
  } else {
    for (int t = threadIdx.x; t < c * arg.dim; t += blockDim.x) {
      const int i = t / arg.dim, d = t % arg.dim;
      const int row = (i & 1) ? half + (i >> 1) : (i >> 1);
      reinterpret_cast<Bits*>(smem + row * pitch)[d] =
          reinterpret_cast<const Bits*>(chunk + i * arg.stride_l)[d];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dot products. Every sum runs over d = 0 .. D-1 in order with fmaf, whichever load width is
// used, so identical rows give bit-identical similarities (exact ties stay exact ties) and the
// result does not depend on alignment or on where the rows live.
template <class Fmt, int N>
__device__ __forceinline__ void dot_2x2_steps(const char* a0, const char* a1, const char* b0,
                                              const char* b1, int steps, float (&acc)[2][2]) {
  const int bytes = N * int(sizeof(typename Fmt::Bits));
  for (int s = 0; s < steps; ++s) {
    float x0[N], x1[N], y0[N], y1[N];
    load_floats<Fmt, N>(a0 + s * bytes, x0);
    load_floats<Fmt, N>(a1 + s * bytes, x1);
    load_floats<Fmt, N>(b0 + s * bytes, y0);
    load_floats<Fmt, N>(b1 + s * bytes, y1);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      acc[0][0] = fmaf(x0[e], y0[e], acc[0][0]);
      acc[0][1] = fmaf(x0[e], y1[e], acc[0][1]);
      acc[1][0] = fmaf(x1[e], y0[e], acc[1][0]);
      acc[1][1] = fmaf(x1[e], y1[e], acc[1][1]);
    }
  }
}

// acc[i][j] = <a_i, b_j> over dim elements.
template <class Fmt>
__device__ void dot_2x2(const char* a0, const char* a1, const char* b0, const char* b1, int dim,
                        bool vec, float (&acc)[2][2]) {
  acc[0][0] = acc[0][1] = acc[1][0] = acc[1][1] = 0.f;
  if (vec) {
    dot_2x2_steps<Fmt, kVec16<Fmt>>(a0, a1, b0, b1, dim / kVec16<Fmt>, acc);
  } else {
    dot_2x2_steps<Fmt, 1>(a0, a1, b0, b1, dim, acc);
  }
}

template <class Fmt, int N>
__device__ __forceinline__ float sum_squares_steps(const char* row, int steps) {
  const int bytes = N * int(sizeof(typename Fmt::Bits));
  float acc = 0.f;
  for (int s = 0; s < steps; ++s) {
    float x[N];
    load_floats<Fmt, N>(row + s * bytes, x);
#pragma unroll
    for (int e = 0; e < N; ++e) acc = fmaf(x[e], x[e], acc);
  }
  return acc;
}

// max(|row|, eps), with an IEEE square root (fast-math builds would otherwise approximate it).
template <class Fmt>
__device__ float clamped_norm(const char* row, int dim, bool vec) {
  const float squares = vec ? sum_squares_steps<Fmt, kVec16<Fmt>>(row, dim / kVec16<Fmt>)
                            : sum_squares_steps<Fmt, 1>(row, dim);
  return fmaxf(__fsqrt_rn(squares), kNormEps);
}

// ---------------------------------------------------------------------------------------------
// Matching state of one chunk in shared memory (half = c / 2, words = ceil(half / 32)).
struct MatchState {
  float* norms;       // [c]: sources 0 .. half-1, then destinations
  int* best;          // [half] best(a)
  float* score;       // [half] sim(a, best(a)), NaN already mapped to -inf
  float* sim;         // [half][strip + 1] similarities of one strip of destinations
  uint32_t* merged;   // [words] bit a: source a merges
  uint32_t* members;  // [half][words] bit a of row b: source a merges into destination b
                      // (shared memory, or global scratch for large chunks)
  int strip;          // destinations per strip of `sim`
  int words;
};

__device__ __forceinline__ bool is_merged(const MatchState& s, int a) {
  return (s.merged[a >> 5] >> (a & 31)) & 1u;
}

// Number of merged sources with index < k.
__device__ __forceinline__ int merged_before(const MatchState& s, int k) {
  int n = 0;
  for (int w = 0; w < (k >> 5); ++w) n += __popc(s.merged[w]);
  if (k & 31) n += __popc(s.merged[k >> 5] & ((1u << (k & 31)) - 1u));
  return n;
}

// Output slot inside the chunk of token i: survivors keep their order, so a surviving token's
// slot is its offset minus the merged sources before it; a merged source lands in best(a)'s slot.
__device__ __forceinline__ int slot_in_chunk(const MatchState& s, int i) {
  if (i & 1) return i - merged_before(s, (i >> 1) + 1);
  const int a = i >> 1;
  if (!is_merged(s, a)) return i - merged_before(s, a);
  const int b = s.best[a];
  return 2 * b + 1 - merged_before(s, b + 1);
}

// Calls f(token) for destination b and every source merged into it, in token order.
template <class F>
__device__ __forceinline__ void for_each_member(const MatchState& s, int b, F&& f) {
  const uint32_t* row = s.members + b * s.words;
  bool own_done = false;
  for (int w = 0; w < s.words; ++w) {
    uint32_t bits = row[w];
    while (bits) {
      const int a = (w << 5) + __ffs(bits) - 1;
      bits &= bits - 1;
      if (!own_done && a > b) {  // token 2a > 2b + 1
        f(2 * b + 1);
        own_done = true;
      }
      f(2 * a);
    }
  }
  if (!own_done) f(2 * b + 1);
}

__device__ __forceinline__ int member_count(const MatchState& s, int b) {
  int n = 1;
  for (int w = 0; w < s.words; ++w) n += __popc(s.members[b * s.words + w]);
  return n;
}

// Clears the merged / members bitmasks (call before the first __syncthreads of the block).
__device__ __forceinline__ void clear_match_bits(const MatchState& s, int half) {
  for (int t = threadIdx.x; t < s.words; t += blockDim.x) s.merged[t] = 0u;
  for (int t = threadIdx.x; t < half * s.words; t += blockDim.x) s.members[t] = 0u;
}

// Steps 2-4 of SPEC.md for one chunk: best(a), score(a), which sources merge. Needs the
// chunk's metric rows readable and the bitmasks cleared (and a __syncthreads since). Ends
// with a __syncthreads; afterwards s.best, s.merged and s.members are final.
template <class Fmt>
__device__ void match_chunk(const ChunkRows& rows, int dim, bool vec, int c, int r,
                            const MatchState& s) {
  const int half = c / 2;
  const int tid = threadIdx.x, threads = blockDim.x;

  // Norms, one row per thread (consecutive threads read consecutive staged rows).
  for (int i = tid; i < c; i += threads) {
    const char* row = i < half ? rows.source(i) : rows.destination(i - half);
    s.norms[i] = clamped_norm<Fmt>(row, dim, vec);
  }
  for (int a = tid; a < half; a += threads) {
    s.best[a] = 0;  // if every similarity is -inf, the first destination wins
    s.score[a] = -CUDART_INF_F;
  }
  __syncthreads();

  // Similarities in strips of destinations; a thread computes a 2 x 2 tile {ta, ta + tiles_a}
  // x {tb, tb + tiles_b}: neighbouring threads take neighbouring destination rows.
  const int tiles_a = (half + 1) / 2;
  const int sim_pitch = s.strip + 1;
  for (int b0 = 0; b0 < half; b0 += s.strip) {
    const int nb = min(s.strip, half - b0);
    const int tiles_b = (nb + 1) / 2;
    for (int t = tid; t < tiles_a * tiles_b; t += threads) {
      const int a_lo = t / tiles_b, b_lo = t % tiles_b;
      const int a_hi = a_lo + tiles_a, b_hi = b_lo + tiles_b;  // relative to b0 for b
      const bool has_a_hi = a_hi < half, has_b_hi = b_hi < nb;
      float dot[2][2];
      dot_2x2<Fmt>(rows.source(a_lo), rows.source(has_a_hi ? a_hi : a_lo),
                   rows.destination(b0 + b_lo), rows.destination(b0 + (has_b_hi ? b_hi : b_lo)),
                   dim, vec, dot);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if ((i == 1 && !has_a_hi) || (j == 1 && !has_b_hi)) continue;
          const int a = i ? a_hi : a_lo, b = j ? b_hi : b_lo;
          // Same operation order as the reference: dot / (|a| * |b|), IEEE division.
          float value = __fdiv_rn(dot[i][j], __fmul_rn(s.norms[a], s.norms[half + b0 + b]));
          if (isnan(value)) value = -CUDART_INF_F;
          s.sim[a * sim_pitch + b] = value;
        }
      }
    }
    __syncthreads();
    // Running argmax in destination order; strict '>' keeps the smaller offset on ties.
    for (int a = tid; a < half; a += threads) {
      float best_value = s.score[a];
      int best = s.best[a];
      for (int b = 0; b < nb; ++b) {
        const float value = s.sim[a * sim_pitch + b];
        if (value > best_value) {
          best_value = value;
          best = b0 + b;
        }
      }
      s.score[a] = best_value;
      s.best[a] = best;
    }
    __syncthreads();
  }

  // Top-r by rank counting: rank(a) = #{a' : score(a') > score(a), or equal and a' < a}.
  // Ranks are a permutation of 0 .. half-1, so exactly r sources merge; no sort needed.
  for (int a = tid; a < half; a += threads) {
    const float mine = s.score[a];
    int rank = 0;
    for (int o = 0; o < half; ++o) {
      const float other = s.score[o];
      rank += (other > mine) || (other == mine && o < a);
    }
    if (rank < r) {
      const uint32_t bit = 1u << (a & 31);
      atomicOr(&s.merged[a >> 5], bit);  // bitwise OR: the result is order independent
      atomicOr(&s.members[s.best[a] * s.words + (a >> 5)], bit);
    }
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace centroidkv

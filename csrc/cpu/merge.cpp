// CPU kernels for centroidkv.match and centroidkv.merge (semantics: SPEC.md; every choice SPEC
// leaves open is made the way python/centroidkv/reference.py makes it).
//
// One task = one chunk of one (batch, head): match_chunk() computes the chunk's merge map from
// its metric rows, and merge reuses that map for keys, values and sizes, writing every output row
// exactly once. Chunks are independent, so at::parallel_for splits over (batch, head, chunk).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace centroidkv {
namespace {

constexpr float kEps = 1e-6f;  // SPEC.md: norms are clamped to at least eps.

// The similarity loops get an AVX2 clone picked at load time. Only the vector width changes (no
// FMA contraction: "fma" is not enabled), so every clone rounds exactly alike.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CENTROIDKV_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CENTROIDKV_SIMD_CLONES
#endif

// Strided view of one [B, H, L, D] tensor whose last dim is contiguous.
struct Rows {
  const char* data;
  int64_t stride_b, stride_h, stride_l;  // in elements
  int64_t dim;
  int64_t elem;  // bytes per element

  const char* row(int64_t b, int64_t h, int64_t l) const {
    return data + (b * stride_b + h * stride_h + l * stride_l) * elem;
  }
};

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
}

Rows rows_of(const at::Tensor& t) {
  return Rows{static_cast<const char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2),
              t.size(3), t.element_size()};
}

// Dot products keep 8 independent partial sums (one 8-float vector) and add them up in a fixed
// order, so the result does not depend on the vector width the compiler picks.
using Float8 = float __attribute__((vector_size(32)));

// Vectors go by reference: passing a 32-byte vector by value changes the ABI with AVX on or off.
__attribute__((always_inline)) inline void load8(Float8& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }

__attribute__((always_inline)) inline float sum8(const Float8& a) {
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

// out[i * NB + j] = <x_i, y_j> for NA rows x and NB rows y of length n: each loaded vector is
// used NB (or NA) times, which keeps the loop on arithmetic rather than loads.
template <int NA, int NB>
__attribute__((always_inline)) inline void dot_block(const float* const* x, const float* const* y,
                                                     int64_t n, float* out) {
  Float8 acc[NA][NB];
  for (int i = 0; i < NA; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = Float8{};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    Float8 xv[NA], yv[NB];
    for (int i = 0; i < NA; ++i) load8(xv[i], x[i] + d);
    for (int j = 0; j < NB; ++j) load8(yv[j], y[j] + d);
    for (int i = 0; i < NA; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] += xv[i] * yv[j];
  }
  for (int i = 0; i < NA; ++i) {
    for (int j = 0; j < NB; ++j) {
      float tail = 0.f;
      for (int64_t e = d; e < n; ++e) tail += x[i][e] * y[j][e];
      out[i * NB + j] = sum8(acc[i][j]) + tail;
    }
  }
}

// Per-task buffers, sized by the chunk and head dims (any chunk size works).
struct Scratch {
  std::vector<float> metric;   // c x Dm fp32 copy of a chunk's metric (non-fp32 metric only)
  std::vector<float> norms;    // c
  std::vector<float> dots;     // (c/2) x (c/2) A-to-B dot products
  std::vector<int32_t> best;   // c/2: best(a) as a B index
  std::vector<float> score;    // c/2
  std::vector<uint8_t> merged;  // c/2: whether source a merges
  std::vector<int32_t> slot;   // c: output slot in chunk of every token
  std::vector<int32_t> start;  // c - r + 1: CSR offsets of each slot's members
  std::vector<int32_t> members;  // c: tokens grouped by slot, in token order
  std::vector<float> sizes;    // c
  std::vector<float> acc;      // max(Dk, Dv)

  Scratch(int64_t c, int64_t r, int64_t metric_dim, bool metric_needs_copy, int64_t row_dim)
      : metric(metric_needs_copy ? c * metric_dim : 0),
        norms(c),
        dots((c / 2) * (c / 2)),
        best(c / 2),
        score(c / 2),
        merged(c / 2),
        slot(c),
        start(c - r + 1),
        members(c),
        sizes(c),
        acc(std::max<int64_t>(row_dim, 1)) {}
};

// One worker's scratch. Its similarity block grows as (c/2)^2 floats, so an oversized chunk_size
// fails here with a message naming it rather than a bare std::bad_alloc. With no full chunk
// (n == 0, everything passes through) nothing chunk-sized is allocated at all.
Scratch make_scratch(int64_t n, int64_t c, int64_t r, int64_t metric_dim, bool metric_needs_copy,
                     int64_t row_dim) {
  if (n == 0) return Scratch(0, 0, 0, false, row_dim);
  try {
    return Scratch(c, r, metric_dim, metric_needs_copy, row_dim);
  } catch (const std::bad_alloc&) {
  } catch (const std::length_error&) {
  }
  TORCH_CHECK(false, "centroidkv: chunk_size ", c, " needs (chunk_size / 2)^2 = ", (c / 2) * (c / 2),
              " floats of scratch per thread, which could not be allocated");
}

// Pointer to the fp32 rows of chunk tokens l0 .. l0+c-1 of metric for (b, h); non-fp32 metrics
// are converted once into scratch. *row_stride receives the distance between rows in floats.
template <typename metric_t>
const float* metric_rows_fp32(const Rows& m, int64_t b, int64_t h, int64_t l0, int64_t c,
                              Scratch& s, int64_t* row_stride) {
  if constexpr (std::is_same_v<metric_t, float>) {
    *row_stride = m.stride_l;
    return reinterpret_cast<const float*>(m.row(b, h, l0));
  } else {
    float* out = s.metric.data();
    for (int64_t t = 0; t < c; ++t) {
      const metric_t* src = reinterpret_cast<const metric_t*>(m.row(b, h, l0 + t));
      for (int64_t d = 0; d < m.dim; ++d) out[t * m.dim + d] = static_cast<float>(src[d]);
    }
    *row_stride = m.dim;
    return out;
  }
}

// The merge map of one chunk: s.slot[t] = output slot (0 .. c-r-1) of token t, from the chunk's
// fp32 metric rows. Also fills s.start/s.members (each slot's tokens in token order).
CENTROIDKV_SIMD_CLONES void match_chunk(const float* rows, int64_t row_stride, int64_t dim,
                                        int64_t c, int64_t r, Scratch& s) {
  const int64_t half = c / 2;
  for (int64_t t = 0; t < c; ++t) {
    const float* x = rows + t * row_stride;
    float sq;
    dot_block<1, 1>(&x, &x, dim, &sq);
    s.norms[t] = std::max(std::sqrt(sq), kEps);
  }
  // dots[a * half + b] = <k_a, k_b>, in 2 x 4 blocks with 1-row / 1-column remainders.
  auto src = [&](int64_t a) { return rows + 2 * a * row_stride; };
  auto dst = [&](int64_t b) { return rows + (2 * b + 1) * row_stride; };
  float* dots = s.dots.data();
  float block[8];
  int64_t a = 0;
  for (; a < half; a += 2) {
    const int na = a + 2 <= half ? 2 : 1;
    const float* x[2] = {src(a), src(a + na - 1)};
    int64_t b = 0;
    for (; b + 4 <= half; b += 4) {
      const float* y[4] = {dst(b), dst(b + 1), dst(b + 2), dst(b + 3)};
      if (na == 2) dot_block<2, 4>(x, y, dim, block);
      else dot_block<1, 4>(x, y, dim, block);
      for (int i = 0; i < na; ++i)
        for (int j = 0; j < 4; ++j) dots[(a + i) * half + b + j] = block[i * 4 + j];
    }
    for (; b < half; ++b) {
      const float* y[1] = {dst(b)};
      if (na == 2) dot_block<2, 1>(x, y, dim, block);
      else dot_block<1, 1>(x, y, dim, block);
      for (int i = 0; i < na; ++i) dots[(a + i) * half + b] = block[i];
    }
  }
  // sim(a, b) = <ka, kb> / (|ka| |kb|), rounded as the reference rounds it; NaN counts as -inf,
  // so a source whose similarities are all NaN picks b = 0 with score -inf. Strict '>' keeps the
  // first maximum: ties go to the smaller destination offset.
  for (a = 0; a < half; ++a) {
    int32_t best = 0;
    float best_sim = -std::numeric_limits<float>::infinity();
    for (int64_t b = 0; b < half; ++b) {
      float sim = dots[a * half + b] / (s.norms[2 * a] * s.norms[2 * b + 1]);
      if (std::isnan(sim)) sim = -std::numeric_limits<float>::infinity();
      if (sim > best_sim) best_sim = sim, best = static_cast<int32_t>(b);
    }
    s.best[a] = best;
    s.score[a] = best_sim;
  }

  // Source a merges iff fewer than r sources outrank it (higher score, or equal score and a
  // smaller offset): the top r of a stable descending sort.
  for (a = 0; a < half; ++a) {
    int64_t rank = 0;
    for (int64_t o = 0; o < half && rank < r; ++o) {
      rank += (s.score[o] > s.score[a]) || (s.score[o] == s.score[a] && o < a);
    }
    s.merged[a] = rank < r;
  }
  // Survivors keep their original order; a merged source takes the slot of best(a).
  int32_t next = 0;
  for (int64_t t = 0; t < c; ++t) {
    if (t % 2 == 1 || !s.merged[t / 2]) s.slot[t] = next++;
  }
  for (int64_t a = 0; a < half; ++a) {
    if (s.merged[a]) s.slot[2 * a] = s.slot[2 * s.best[a] + 1];
  }
  // Group tokens by slot (counting sort, stable: token order inside a slot).
  const int64_t out = c - r;
  std::fill(s.start.begin(), s.start.end(), 0);
  for (int64_t t = 0; t < c; ++t) s.start[s.slot[t] + 1]++;
  for (int64_t o = 0; o < out; ++o) s.start[o + 1] += s.start[o];
  for (int64_t t = 0; t < c; ++t) s.members[s.start[s.slot[t]]++] = static_cast<int32_t>(t);
  for (int64_t o = out; o > 0; --o) s.start[o] = s.start[o - 1];
  s.start[0] = 0;
}

template <typename metric_t>
void match_rows(const Rows& m, int64_t b, int64_t h, int64_t l0, int64_t c, int64_t r,
                Scratch& s) {
  int64_t row_stride = 0;
  const float* rows = metric_rows_fp32<metric_t>(m, b, h, l0, c, s, &row_stride);
  match_chunk(rows, row_stride, m.dim, c, r, s);
}

using MatchRows = void (*)(const Rows&, int64_t, int64_t, int64_t, int64_t, int64_t, Scratch&);

MatchRows match_rows_for(at::ScalarType metric_dtype) {
  switch (metric_dtype) {
    case at::kFloat: return &match_rows<float>;
    case at::kHalf: return &match_rows<c10::Half>;
    case at::kBFloat16: return &match_rows<c10::BFloat16>;
    default: TORCH_CHECK(false, "centroidkv: unsupported metric dtype ", metric_dtype);
  }
}

// Parallel loop over (batch, head, chunk); chunk index n (one past the last full chunk) stands
// for the tail. Each worker range gets its own scratch.
template <typename Body>
void for_each_chunk(int64_t batch, int64_t heads, int64_t num_chunks, int64_t chunk_size,
                    int64_t metric_dim, int64_t row_dims, const Body& body) {
  const int64_t per_bh = num_chunks + 1;
  // Similarities cost (c/2)^2 Dm, moving rows c (Dk + Dv); aim for ~32k of that per task. With
  // no full chunk only the tail moves (and a huge chunk_size must not overflow the estimate).
  const int64_t c = num_chunks > 0 ? chunk_size : 0;
  const int64_t work_per_chunk = (c / 2) * (c / 2) * metric_dim + c * (row_dims + 1);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_chunk, 1));
  at::parallel_for(0, batch * heads * per_bh, grain, [&](int64_t begin, int64_t end) {
    body(begin, end, per_bh);
  });
}

// out = size-weighted mean of the chunk rows listed in `members` (fp32 accumulation in token
// order, then division by the total size; the plain mean when the total is 0). A single member
// is copied bit-exact rather than rounded through s * x / s.
template <typename scalar_t>
void write_centroid(const Rows& x, int64_t b, int64_t h, int64_t l0, const int32_t* members,
                    int64_t count, const float* sizes, float total, scalar_t* out, float* acc) {
  const int64_t dim = x.dim;
  if (count == 1) {
    std::memcpy(out, x.row(b, h, l0 + members[0]), dim * sizeof(scalar_t));
    return;
  }
  const bool weighted = total > 0.f;
  std::fill(acc, acc + dim, 0.f);
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* src = reinterpret_cast<const scalar_t*>(x.row(b, h, l0 + members[i]));
    const float w = weighted ? sizes[members[i]] : 1.f;
    for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<float>(src[d]) * w;
  }
  const float denom = weighted ? total : static_cast<float>(count);
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(acc[d] / denom);
}

at::Tensor match_cpu(const at::Tensor& metric_in, int64_t chunk_size, int64_t num_merge) {
  check_match_args(metric_in, chunk_size, num_merge);
  const at::Tensor metric = last_dim_contiguous(metric_in);
  const int64_t batch = metric.size(0), heads = metric.size(1), length = metric.size(2);
  const int64_t c = chunk_size, r = num_merge, n = length / c;
  at::Tensor slots = at::empty({batch, heads, length}, metric.options().dtype(at::kLong));
  if (slots.numel() == 0) return slots;
  int64_t* out = slots.data_ptr<int64_t>();
  const Rows m = rows_of(metric);
  const MatchRows match_rows_fn = match_rows_for(metric.scalar_type());
  const bool needs_copy = metric.scalar_type() != at::kFloat;

  for_each_chunk(batch, heads, n, c, m.dim, 0, [&](int64_t begin, int64_t end, int64_t per_bh) {
    Scratch s = make_scratch(n, c, r, m.dim, needs_copy, 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / per_bh, j = i % per_bh, b = bh / heads, h = bh % heads;
      int64_t* o = out + bh * length;
      if (j == n) {  // the tail passes through
        for (int64_t t = n * c; t < length; ++t) o[t] = n * (c - r) + (t - n * c);
        continue;
      }
      match_rows_fn(m, b, h, j * c, c, r, s);
      for (int64_t t = 0; t < c; ++t) o[j * c + t] = j * (c - r) + s.slot[t];
    }
  });
  return slots;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cpu_impl(
    const at::Tensor& keys_in, const at::Tensor& values_in,
    const c10::optional<at::Tensor>& sizes_in, int64_t chunk_size, int64_t num_merge,
    const c10::optional<at::Tensor>& metric_in, bool check_sizes) {
  check_merge_args(keys_in, values_in, sizes_in, chunk_size, num_merge, metric_in);
  if (check_sizes && sizes_in.has_value()) check_sizes_values(*sizes_in, "centroidkv.merge");
  const at::Tensor keys = last_dim_contiguous(keys_in);
  const at::Tensor values = last_dim_contiguous(values_in);
  const at::Tensor metric = metric_in.has_value() ? last_dim_contiguous(*metric_in) : keys;
  const int64_t batch = keys.size(0), heads = keys.size(1), length = keys.size(2);
  const int64_t c = chunk_size, r = num_merge, n = length / c;
  const int64_t out_len = merged_length(length, c, r);
  const int64_t dk = keys.size(3), dv = values.size(3);

  at::Tensor out_keys = at::empty({batch, heads, out_len, dk}, keys.options());
  at::Tensor out_values = at::empty({batch, heads, out_len, dv}, values.options());
  at::Tensor out_sizes = at::empty({batch, heads, out_len}, keys.options().dtype(at::kFloat));
  if (batch * heads * length == 0) return {out_keys, out_values, out_sizes};

  const Rows k = rows_of(keys), v = rows_of(values), m = rows_of(metric);
  const float* sizes_ptr = sizes_in.has_value() ? sizes_in->data_ptr<float>() : nullptr;
  const int64_t ss_b = sizes_ptr ? sizes_in->stride(0) : 0;
  const int64_t ss_h = sizes_ptr ? sizes_in->stride(1) : 0;
  const int64_t ss_l = sizes_ptr ? sizes_in->stride(2) : 0;
  const MatchRows match_rows_fn = match_rows_for(metric.scalar_type());
  const bool needs_copy = metric.scalar_type() != at::kFloat;
  float* new_sizes = out_sizes.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "centroidkv_merge", [&] {
    scalar_t* ok = out_keys.data_ptr<scalar_t>();
    scalar_t* ov = out_values.data_ptr<scalar_t>();
    for_each_chunk(batch, heads, n, c, m.dim, dk + dv, [&](int64_t begin, int64_t end,
                                                        int64_t per_bh) {
      Scratch s = make_scratch(n, c, r, m.dim, needs_copy, std::max(dk, dv));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / per_bh, j = i % per_bh, b = bh / heads, h = bh % heads;
        const float* size_row = sizes_ptr ? sizes_ptr + b * ss_b + h * ss_h : nullptr;
        const int64_t o0 = bh * out_len;  // first output row of this (b, h)
        if (j == n) {  // the tail passes through unchanged
          for (int64_t t = n * c; t < length; ++t) {
            const int64_t o = o0 + n * (c - r) + (t - n * c);
            std::memcpy(ok + o * dk, k.row(b, h, t), dk * sizeof(scalar_t));
            std::memcpy(ov + o * dv, v.row(b, h, t), dv * sizeof(scalar_t));
            new_sizes[o] = size_row ? size_row[t * ss_l] : 1.f;
          }
          continue;
        }
        const int64_t l0 = j * c;
        match_rows_fn(m, b, h, l0, c, r, s);
        for (int64_t t = 0; t < c; ++t) s.sizes[t] = size_row ? size_row[(l0 + t) * ss_l] : 1.f;
        for (int64_t slot = 0; slot < c - r; ++slot) {
          const int32_t* members = s.members.data() + s.start[slot];
          const int64_t count = s.start[slot + 1] - s.start[slot];
          float total = 0.f;  // token order, as the reference's scatter_add sums
          for (int64_t q = 0; q < count; ++q) total += s.sizes[members[q]];
          const int64_t o = o0 + j * (c - r) + slot;
          write_centroid(k, b, h, l0, members, count, s.sizes.data(), total, ok + o * dk,
                         s.acc.data());
          write_centroid(v, b, h, l0, members, count, s.sizes.data(), total, ov + o * dv,
                         s.acc.data());
          new_sizes[o] = total;
        }
      }
    });
  });
  return {out_keys, out_values, out_sizes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cpu(
    const at::Tensor& keys, const at::Tensor& values, const c10::optional<at::Tensor>& sizes,
    int64_t chunk_size, int64_t num_merge, const c10::optional<at::Tensor>& metric) {
  return merge_cpu_impl(keys, values, sizes, chunk_size, num_merge, metric, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_unchecked_cpu(
    const at::Tensor& keys, const at::Tensor& values, const c10::optional<at::Tensor>& sizes,
    int64_t chunk_size, int64_t num_merge, const c10::optional<at::Tensor>& metric) {
  return merge_cpu_impl(keys, values, sizes, chunk_size, num_merge, metric, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(centroidkv, CPU, m) {
  m.impl("match", &match_cpu);
  m.impl("merge", &merge_cpu);
  m.impl("_merge_unchecked", &merge_unchecked_cpu);
}

}  // namespace centroidkv

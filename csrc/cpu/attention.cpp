// CPU kernel of centroidkv.attention: softmax(scale * q.k + log(size)) v with grouped KV heads.
//
// One task per (batch row, KV head, query position): the G query heads of the group share every
// K/V row the task converts to float. Keys are visited once in blocks of kKeyBlock with an
// online softmax in float32 (running max, running sum, rescaled accumulator), so nothing of
// length L is materialised.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

namespace centroidkv {
namespace {

constexpr int64_t kKeyBlock = 64;  // keys scored before one softmax rescale of the accumulators
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The kernel indexes rows by strides but reads each row as a dense vector.
at::Tensor with_dense_rows(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// Lengths are cheap to read on the CPU, so out-of-range values are rejected here (the CUDA
// kernel cannot without a device sync; see cuda/attention.cu).
void check_lengths_values(const at::Tensor& lengths, int64_t length) {
  const int64_t* data = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths.numel(); ++b) {
    TORCH_CHECK(data[b] >= 0 && data[b] <= length, "centroidkv.attention: lengths[", b, "] = ",
                data[b], " is outside [0, L] = [0, ", length, "]");
  }
}

// Eight independent partial sums, so the compiler can vectorise the reduction without
// reassociating floating point on its own.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int i = 0; i < 8; ++i) part[i] += a[d + i] * b[d + i];
  float total =
      ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

template <typename scalar_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const float* sizes, const at::Tensor& sizes_t, const int64_t* lengths,
                      double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), q_heads = q.size(1), tq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), length = k.size(2), dim_v = v.size(3);
  const int64_t group = q_heads / kv_heads;
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();  // contiguous [B, Hq, Tq, Dv]
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const int64_t ss_b = sizes ? sizes_t.stride(0) : 0, ss_h = sizes ? sizes_t.stride(1) : 0,
                ss_l = sizes ? sizes_t.stride(2) : 0;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads * tq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), kf(kKeyBlock * dim), vf(kKeyBlock * dim_v);
    std::vector<float> logits(group * kKeyBlock), acc(group * dim_v), run_max(group),
        run_sum(group), bias(kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % tq, h = (task / tq) % kv_heads, b = task / (tq * kv_heads);
      const int64_t row_length = lengths ? lengths[b] : length;
      // Query t of Tq sees keys 0 .. row_length - Tq + t (causal over the last Tq keys).
      const int64_t visible = std::min(row_length - tq + t + 1, row_length);
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = q_data + b * qs[0] + (h * group + g) * qs[1] + t * qs[2];
        for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = static_cast<float>(src[d]) * fscale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(run_max.begin(), run_max.end(), kNegInf);
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      const scalar_t* k_head = k_data + b * ks[0] + h * ks[1];
      const scalar_t* v_head = v_data + b * vs[0] + h * vs[1];
      const float* size_head = sizes ? sizes + b * ss_b + h * ss_h : nullptr;

      for (int64_t j0 = 0; j0 < visible; j0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, visible - j0);
        for (int64_t jj = 0; jj < n; ++jj) {
          const scalar_t* krow = k_head + (j0 + jj) * ks[2];
          const scalar_t* vrow = v_head + (j0 + jj) * vs[2];
          for (int64_t d = 0; d < dim; ++d) kf[jj * dim + d] = static_cast<float>(krow[d]);
          for (int64_t d = 0; d < dim_v; ++d) vf[jj * dim_v + d] = static_cast<float>(vrow[d]);
          // log(size) once per key for the whole group; `> 0` is false for 0 and NaN, so such
          // slots carry no weight.
          const float s = size_head ? size_head[(j0 + jj) * ss_l] : 1.f;
          bias[jj] = s > 0.f ? std::log(s) : kNegInf;
        }
        for (int64_t g = 0; g < group; ++g) {
          float* lg = &logits[g * kKeyBlock];
          float block_max = kNegInf;
          for (int64_t jj = 0; jj < n; ++jj) {
            if (bias[jj] == kNegInf) {
              lg[jj] = kNegInf;
              continue;
            }
            lg[jj] = dot(&qf[g * dim], &kf[jj * dim], dim) + bias[jj];
            block_max = std::max(block_max, lg[jj]);
          }
          if (block_max == kNegInf) continue;  // every key of the block is masked
          const float new_max = std::max(run_max[g], block_max);
          const float rescale = std::exp(run_max[g] - new_max);  // exp(-inf) = 0 at the start
          float* ag = &acc[g * dim_v];
          for (int64_t d = 0; d < dim_v; ++d) ag[d] *= rescale;
          float block_sum = 0.f;
          for (int64_t jj = 0; jj < n; ++jj) {
            if (lg[jj] == kNegInf) continue;
            const float p = std::exp(lg[jj] - new_max);
            block_sum += p;
            const float* vr = &vf[jj * dim_v];
            for (int64_t d = 0; d < dim_v; ++d) ag[d] += p * vr[d];
          }
          run_sum[g] = run_sum[g] * rescale + block_sum;
          run_max[g] = new_max;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = out_data + (((b * q_heads + h * group + g) * tq) + t) * dim_v;
        // A query that sees no key with size > 0 returns zeros.
        const float inv = run_sum[g] > 0.f ? 1.f / run_sum[g] : 0.f;
        for (int64_t d = 0; d < dim_v; ++d) dst[d] = static_cast<scalar_t>(acc[g * dim_v + d] * inv);
      }
    }
  });
}

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const c10::optional<at::Tensor>& sizes_in, double scale,
                         const c10::optional<at::Tensor>& lengths_in) {
  check_attention_args(q_in, k_in, v_in, sizes_in, scale, lengths_in);
  // Reading sizes costs 1/D of the attention itself here; the CUDA kernel skips it (a sync).
  if (sizes_in.has_value()) check_sizes_values(*sizes_in, "centroidkv.attention");
  const at::Tensor q = with_dense_rows(q_in), k = with_dense_rows(k_in), v = with_dense_rows(v_in);
  at::Tensor sizes, lengths;
  if (sizes_in.has_value()) sizes = sizes_in->contiguous();
  if (lengths_in.has_value()) {
    lengths = lengths_in->to(at::kLong).contiguous();
    check_lengths_values(lengths, k.size(2));
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    attention_kernel<scalar_t>(q, k, v, sizes.defined() ? sizes.data_ptr<float>() : nullptr, sizes,
                               lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, scale,
                               out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(centroidkv, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace centroidkv

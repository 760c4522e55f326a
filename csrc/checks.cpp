#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace centroidkv {
namespace {

void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                   t.scalar_type() == at::kBFloat16),
              op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name,
                const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have ", rank, " dimensions ", layout,
              ", got shape ", t.sizes());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// sizes [B, H, L] float32 on the device of `ref` [B, H, L, D].
void check_sizes_tensor(const at::Tensor& sizes, const at::Tensor& ref, const char* op,
                        const char* ref_name) {
  check_rank(sizes, 3, op, "sizes", "[B, H, L]");
  TORCH_CHECK(sizes.scalar_type() == at::kFloat, op, ": sizes must be float32, got ",
              sizes.scalar_type());
  check_same_device(sizes, ref, op, "sizes", ref_name);
  TORCH_CHECK(sizes.size(0) == ref.size(0) && sizes.size(1) == ref.size(1) &&
                  sizes.size(2) == ref.size(2),
              op, ": sizes shape ", sizes.sizes(), " does not match ", ref_name, " shape ",
              ref.sizes(), " in [B, H, L]");
}

}  // namespace

void check_chunking(int64_t chunk_size, int64_t num_merge) {
  TORCH_CHECK(chunk_size >= 2 && chunk_size % 2 == 0,
              "centroidkv: chunk_size must be an even number >= 2, got ", chunk_size);
  TORCH_CHECK(num_merge >= 0 && num_merge <= chunk_size / 2,
              "centroidkv: num_merge must be in [0, chunk_size / 2] = [0, ", chunk_size / 2,
              "], got ", num_merge);
}

void check_match_args(const at::Tensor& metric, int64_t chunk_size, int64_t num_merge) {
  check_rank(metric, 4, "centroidkv.match", "metric", "[B, H, L, D]");
  check_float_tensor(metric, "centroidkv.match", "metric");
  check_chunking(chunk_size, num_merge);
}

void check_merge_args(const at::Tensor& keys, const at::Tensor& values,
                      const c10::optional<at::Tensor>& sizes, int64_t chunk_size,
                      int64_t num_merge, const c10::optional<at::Tensor>& metric) {
  const char* op = "centroidkv.merge";
  check_rank(keys, 4, op, "keys", "[B, H, L, Dk]");
  check_rank(values, 4, op, "values", "[B, H, L, Dv]");
  check_float_tensor(keys, op, "keys");
  check_float_tensor(values, op, "values");
  TORCH_CHECK(values.scalar_type() == keys.scalar_type(), op, ": values dtype ",
              values.scalar_type(), " differs from keys dtype ", keys.scalar_type());
  check_same_device(values, keys, op, "values", "keys");
  TORCH_CHECK(values.size(0) == keys.size(0) && values.size(1) == keys.size(1) &&
                  values.size(2) == keys.size(2),
              op, ": values shape ", values.sizes(), " does not match keys shape ", keys.sizes(),
              " in [B, H, L]");
  if (sizes.has_value()) check_sizes_tensor(*sizes, keys, op, "keys");
  if (metric.has_value()) {
    check_rank(*metric, 4, op, "metric", "[B, H, L, Dm]");
    check_float_tensor(*metric, op, "metric");
    check_same_device(*metric, keys, op, "metric", "keys");
    TORCH_CHECK(metric->size(0) == keys.size(0) && metric->size(1) == keys.size(1) &&
                    metric->size(2) == keys.size(2),
                op, ": metric shape ", metric->sizes(), " does not match keys shape ",
                keys.sizes(), " in [B, H, L]");
  }
  check_chunking(chunk_size, num_merge);
}

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& sizes, double scale,
                          const c10::optional<at::Tensor>& lengths) {
  const char* op = "centroidkv.attention";
  check_rank(q, 4, op, "q", "[B, Hq, Tq, D]");
  check_rank(k, 4, op, "k", "[B, Hkv, L, D]");
  check_rank(v, 4, op, "v", "[B, Hkv, L, Dv]");
  check_float_tensor(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op,
              ": batch sizes differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k head dim ", k.size(3), " differs from q head dim ",
              q.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v shape ", v.sizes(),
              " does not match k shape ", k.sizes(), " in [B, Hkv, L]");
  TORCH_CHECK(k.size(1) > 0, op, ": k must have at least one KV head, got shape ", k.sizes());
  TORCH_CHECK(q.size(1) % k.size(1) == 0, op, ": query heads (", q.size(1),
              ") must be a multiple of KV heads (", k.size(1), ")");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be a finite number, got ", scale);
  if (sizes.has_value()) check_sizes_tensor(*sizes, k, op, "k");
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == q.size(0), op,
                ": lengths must have shape [B] = [", q.size(0), "], got ", lengths->sizes());
    TORCH_CHECK(lengths->scalar_type() == at::kLong || lengths->scalar_type() == at::kInt, op,
                ": lengths must be int64 or int32, got ", lengths->scalar_type());
    check_same_device(*lengths, q, op, "lengths", "q");
  }
}

void check_sizes_values(const at::Tensor& sizes, const char* op) {
  if (sizes.numel() == 0) return;
  // `>= 0` is false for NaN, and `< inf` for inf: one reduction rejects all three.
  TORCH_CHECK(sizes.ge(0).logical_and(sizes.lt(std::numeric_limits<float>::infinity())).all().item<bool>(),
              op, ": sizes must be finite and >= 0 (0 marks padding)");
}

}  // namespace centroidkv

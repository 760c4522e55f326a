// Argument validation shared by the CPU and CUDA kernels, so every backend rejects bad input
// with the same message naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace centroidkv {

// Number of tokens left by one merge pass: every full chunk keeps c - r, the tail passes through.
inline int64_t merged_length(int64_t length, int64_t chunk_size, int64_t num_merge) {
  return (length / chunk_size) * (chunk_size - num_merge) + length % chunk_size;
}

void check_chunking(int64_t chunk_size, int64_t num_merge);
void check_match_args(const at::Tensor& metric, int64_t chunk_size, int64_t num_merge);
void check_merge_args(const at::Tensor& keys, const at::Tensor& values,
                      const c10::optional<at::Tensor>& sizes, int64_t chunk_size,
                      int64_t num_merge, const c10::optional<at::Tensor>& metric);
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& sizes, double scale,
                          const c10::optional<at::Tensor>& lengths);

// Values that can only be checked by reading the data (a device sync on CUDA).
void check_sizes_values(const at::Tensor& sizes, const char* op);

}  // namespace centroidkv

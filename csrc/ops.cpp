// The whole public surface of torch.ops.centroidkv: every schema, in one place.
// Kernels live in csrc/cpu and csrc/cuda and register with TORCH_LIBRARY_IMPL;
// semantics are defined in SPEC.md (clustering) and README.md (choices SPEC leaves open).
#include <torch/library.h>

TORCH_LIBRARY(centroidkv, m) {
  // For every token of metric [B, H, L, D], the index of the output slot it lands in
  // (int64 [B, H, L]): per chunk of chunk_size tokens, the num_merge even-offset tokens most
  // cosine-similar to an odd-offset token merge into it; the L % chunk_size tail passes through.
  m.def("match(Tensor metric, int chunk_size, int num_merge) -> Tensor");

  // Clusters keys [B, H, L, Dk] and values [B, H, L, Dv] by match() on metric (default: keys)
  // into size-weighted centroids. sizes [B, H, L] float32 (default all ones) counts the tokens
  // each slot stands for. Returns (keys, values, sizes) of length (L // c) * (c - r) + L % c.
  m.def(
      "merge(Tensor keys, Tensor values, Tensor? sizes, int chunk_size, int num_merge, "
      "Tensor? metric=None) -> (Tensor, Tensor, Tensor)");

  // merge() for sizes the library produced itself (a cache's buffers, a previous merge's
  // output): the same kernels without reading the sizes back to check their values, which on
  // CUDA is a device sync that stalls the launch queue of a prefill once per clustering pass.
  // Internal: user code calls merge().
  m.def(
      "_merge_unchecked(Tensor keys, Tensor values, Tensor? sizes, int chunk_size, int num_merge, "
      "Tensor? metric=None) -> (Tensor, Tensor, Tensor)");

  // Attention over a clustered cache: softmax(scale * q.k + log(size)) v with grouped KV heads.
  // q [B, Hq, Tq, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], sizes [B, Hkv, L] float32 (0 masks a
  // slot; default all ones), lengths [B] int64 valid keys per row (default L). Query i of Tq
  // sees keys 0 .. length - Tq + i. Returns [B, Hq, Tq, Dv] in q's dtype.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? sizes, float scale, "
      "Tensor? lengths=None) -> Tensor");
}

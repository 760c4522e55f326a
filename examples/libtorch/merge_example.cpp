// Clusters a random cache from C++ through the dispatcher and prints what it kept.
// Usage: merge_example [length] [chunk_size] [num_merge]
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>

int main(int argc, char** argv) {
  const int64_t length = argc > 1 ? std::atoll(argv[1]) : 1000;
  const int64_t chunk = argc > 2 ? std::atoll(argv[2]) : 32;
  const int64_t num_merge = argc > 3 ? std::atoll(argv[3]) : chunk / 2;

  torch::manual_seed(0);
  auto keys = torch::randn({1, 4, length, 64});
  auto values = torch::randn({1, 4, length, 64});
  static auto merge = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("centroidkv::merge", "")
                          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                              const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, int64_t,
                              const std::optional<at::Tensor>&)>();
  auto [k, v, sizes] = merge.call(keys, values, std::nullopt, chunk, num_merge, std::nullopt);
  // Proportional attention relies on these two staying put.
  const double size_error =
      (sizes.sum() - double(keys.size(0) * keys.size(1) * length)).abs().item<double>();
  const double value_error =
      ((sizes.unsqueeze(-1) * v).sum(2) - values.sum(2)).abs().max().item<double>();
  std::cout << "tokens " << length << " -> " << k.size(2) << "; size sum error " << size_error
            << "; weighted value sum error " << value_error << std::endl;
  return 0;
}

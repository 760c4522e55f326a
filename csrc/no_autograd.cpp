// The ops are inference ops (clustering a cache is not differentiable in any useful sense).
// Rather than let autograd's fallback hand back outputs with a silently wrong (absent) gradient,
// the Autograd key of merge and attention raises a clear error when grad mode is on and any
// input requires grad, and otherwise passes straight through to the backend kernel. match
// returns an integer map, which has no gradient to get wrong, so it always passes through.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace centroidkv {
namespace {

// Schema name of the first tensor argument that requires grad, or nullptr if none does.
const char* input_requiring_grad(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& arg = stack[first + i];
    if (arg.isTensor() && arg.toTensor().defined() && arg.toTensor().requires_grad()) {
      return args[i].name().c_str();
    }
  }
  return nullptr;
}

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset);
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void reject_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                 torch::jit::Stack* stack) {
  const char* name = c10::GradMode::is_enabled() ? input_requiring_grad(op, *stack) : nullptr;
  TORCH_CHECK(name == nullptr, op.schema().name(),
              " is an inference op and has no gradient, but its argument '", name,
              "' requires grad; call it under torch.no_grad() or pass detached tensors");
  below_autograd(op, keys, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(centroidkv, Autograd, m) {
  m.impl("match", torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  m.impl("merge", torch::CppFunction::makeFromBoxedFunction<&reject_grad>());
  m.impl("_merge_unchecked", torch::CppFunction::makeFromBoxedFunction<&reject_grad>());
  m.impl("attention", torch::CppFunction::makeFromBoxedFunction<&reject_grad>());
}

}  // namespace centroidkv

// Small math shared by the C++ CPU kernels and the CUDA kernels of every family.
// No torch headers here: nvcc compiles this header into the CUDA kernels.
#pragma once

#include "macros.h"

namespace fusedloss {

// sign(x) in {-1, 0, 1}: the derivative of |x|, 0 at 0 as in torch.abs.
template <typename acc_t>
FL_HOST_DEVICE acc_t sign(acc_t x) {
  return acc_t(x > acc_t(0)) - acc_t(x < acc_t(0));
}

}  // namespace fusedloss

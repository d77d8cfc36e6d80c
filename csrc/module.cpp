// The Python module fusedloss._C that setup.py builds: importing it loads the operator library,
// whose TORCH_LIBRARY blocks register the fusedloss::* operators. It defines no Python functions.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedloss C++ operators, registered as torch.ops.fusedloss.*";
}

// The Python module lvopt._C: importing it registers the ops (csrc/register.cpp) and exposes
// what this build contains, for lvopt.build_info().
#include <torch/extension.h>

#include "cpu/isa.h"

#ifndef LVOPT_CUDA_ARCHS
#define LVOPT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict d;
    d["cpu_isa_compiled"] = lvopt::cpu::compiled_isas();
    d["cpu_isa_hardware"] = lvopt::cpu::isa_name(lvopt::cpu::hardware_isa());
    d["cpu_isa_active"] = lvopt::cpu::isa_name(lvopt::cpu::active_isa());
    d["cuda_archs"] = std::string(LVOPT_CUDA_ARCHS);
#ifdef LVOPT_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["parallel"] = at::get_parallel_info();
    return d;
  });
}

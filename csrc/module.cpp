// The Python module lvopt._C: importing it registers the ops (csrc/register.cpp) and exposes
// what this build contains, for lvopt.build_info().
#include <torch/extension.h>

#include "cpu/isa.h"
#include "cpu/workspace.h"
#include "lvopt/step_args.h"

#include <optional>
#include <string>
#include <vector>

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
    d["cpu_workspace_limit_mb"] =
        static_cast<double>(lvopt::cpu::workspace_limit_bytes()) / (1 << 20);
    d["cpu_workspace_held_mb"] =
        static_cast<double>(lvopt::cpu::workspace_held_bytes()) / (1 << 20);
    d["parallel"] = at::get_parallel_info();
    return d;
  });
  // lvopt.set_cpu_isa: the level the CPU kernels run at from now on (csrc/cpu/isa.h).
  m.def("set_cpu_isa", [](const std::string& name) {
    lvopt::cpu::Isa want;
    if (!lvopt::cpu::parse_isa(name.c_str(), &want)) {
      throw pybind11::value_error("lvopt.set_cpu_isa: unknown CPU ISA level '" + name +
                                  "'; the levels are 'baseline', 'avx2', 'avx512'");
    }
    const lvopt::cpu::Isa hw = lvopt::cpu::hardware_isa();
    if (static_cast<int>(want) > static_cast<int>(hw)) {
      throw pybind11::value_error("lvopt.set_cpu_isa: '" + name + "' is above this CPU's level '" +
                                  lvopt::cpu::isa_name(hw) + "'");
    }
    return std::string(lvopt::cpu::isa_name(lvopt::cpu::set_active_isa(want)));
  });
  // lvopt.set_cpu_workspace_limit: the CPU kernels' scratch buffer (csrc/cpu/workspace.h), in
  // bytes; returns the previous limit.
  m.def("set_cpu_workspace_limit", [](int64_t bytes) {
    if (bytes < 0) {
      throw pybind11::value_error(
          "lvopt.set_cpu_workspace_limit: the limit must be >= 0 bytes, got " +
          std::to_string(bytes));
    }
    return lvopt::cpu::set_workspace_limit_bytes(bytes);
  });
  // The argument checks of the dense step ops (lvopt/step_args.h), for the Triton ops' host path
  // (lvopt/triton/_common.py): the same checks and messages as the CPU and CUDA kernels, at a
  // few tens of nanoseconds per tensor instead of microseconds in Python. `cuda`: the kernel's
  // device type (false: CPU tensors, the Triton interpreter).
  m.def("check_dense_step_args",
        [](const std::string& op, const std::vector<at::Tensor>& params,
           const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
           const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& steps,
           const at::Tensor& hyper, const std::optional<std::vector<at::Tensor>>& max_exp_avg_sqs,
           bool cuda) {
          const lvopt::StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
          lvopt::check_step_args(op.c_str(), args,
                                 cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU);
          if (max_exp_avg_sqs.has_value()) {
            const std::optional<at::TensorList> x{at::TensorList(*max_exp_avg_sqs)};
            lvopt::check_amsgrad_args(op.c_str(), args, x);
          }
        });
}

// Pieces of error messages, formatted as strings before they reach TORCH_CHECK.
//
// Seen on the GPU machine (torch 2.11+cu130, gcc 13): inserting a number, a shape or a dtype into
// the std::ostream that c10::str builds inside this library segfaults
// (std::ostream::_M_insert<double>, IntArrayRef's operator<<), while strings print fine. Every
// TORCH_CHECK in csrc/ therefore passes strings only.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>

namespace rlgaf_fast {

inline std::string num_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

inline std::string num_str(int64_t v) { return std::to_string(v); }

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

inline std::string dtype_str(at::ScalarType dtype) { return c10::toString(dtype); }

}  // namespace rlgaf_fast

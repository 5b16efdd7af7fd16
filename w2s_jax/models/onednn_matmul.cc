// An XLA FFI handler: y = op(a) @ op(b) for bfloat16 a and b, y in bfloat16 or float32 (accumulated in float32),
// or for float32 a and b, y in float32, computed by oneDNN's matmul (AMX or AVX-512 kernels). op transposes the
// last two axes of an operand stored the other way round. Leading axes are batch axes, the same in a, b and y: one
// matmul per batch index.
// Built and registered by w2s_jax/models/onednn.py.
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
// batch, m, k, n, trans_a, trans_b, float32 operands, float32 result
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// `batch` [rows, cols] matrices one after the other, each row-major or the transpose of a row-major [cols, rows].
dnnl::memory::desc Matrices(int64_t batch, int64_t rows, int64_t cols, dt type, bool transposed) {
  return dnnl::memory::desc({batch, rows, cols}, type, transposed ? dnnl::memory::dims{rows * cols, 1, rows}
                                                                  : dnnl::memory::dims{rows * cols, cols, 1});
}

// One matmul at a time: each already runs on every core (OpenMP), and XLA would otherwise start independent ones
// (a backward pass's dx and d_kernel) on two of its threads at once, whose OpenMP teams then spin against each
// other for the same cores.
std::mutex& Running() {
  static std::mutex running;
  return running;
}

struct Matmul {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul primitive;
};

// Creating a primitive takes milliseconds, so each shape's is made once (the caller holds `Running()`). The
// scratchpad is the caller's (scratchpad_mode::user).
const Matmul& Get(const Key& key) {
  static std::map<Key, Matmul> cache;
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto [batch, m, k, n, trans_a, trans_b, f32_in, f32] = key;
    const dt in = f32_in ? dt::f32 : dt::bf16;
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::desc desc(Matrices(batch, m, k, in, trans_a), Matrices(batch, k, n, in, trans_b),
                            Matrices(batch, m, n, f32 ? dt::f32 : dt::bf16, false));
    dnnl::matmul::primitive_desc pd(desc, attr, Engine());
    it = cache.emplace(key, Matmul{pd, dnnl::matmul(pd)}).first;
  }
  return it->second;
}

// Runs a matmul made by Get (the caller holds `Running()`).
void Execute(const Matmul& mm, void* a, void* b, void* y) {
  dnnl::engine& engine = Engine();
  // One scratchpad for every call, grown to the largest asked for (not allocated and zero-filled per call).
  static std::vector<uint8_t> scratch;
  if (scratch.size() < mm.pd.scratchpad_desc().get_size()) scratch.resize(mm.pd.scratchpad_desc().get_size());
  static dnnl::stream stream(engine);
  mm.primitive.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(mm.pd.src_desc(), engine, a)},
                                {DNNL_ARG_WEIGHTS, dnnl::memory(mm.pd.weights_desc(), engine, b)},
                                {DNNL_ARG_DST, dnnl::memory(mm.pd.dst_desc(), engine, y)},
                                {DNNL_ARG_SCRATCHPAD, dnnl::memory(mm.pd.scratchpad_desc(), engine, scratch.data())}});
  stream.wait();
}

ffi::Error Run(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> y, bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  const size_t rank = ad.size();
  const bool f32_in = a.element_type() == ffi::F32;
  if (rank < 2 || bd.size() != rank || (!f32_in && a.element_type() != ffi::BF16) ||
      b.element_type() != a.element_type()) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: expected two bfloat16 or two float32 operands of the same rank >= 2");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("onednn_matmul: the batch axes differ");
    batch *= ad[i];
  }
  const int64_t a0 = ad[rank - 2], a1 = ad[rank - 1], b0 = bd[rank - 2], b1 = bd[rank - 1];
  const int64_t m = trans_a ? a1 : a0, k = trans_a ? a0 : a1, n = trans_b ? b0 : b1;
  if ((trans_b ? b1 : b0) != k) return ffi::Error::InvalidArgument("onednn_matmul: inner dimensions differ");
  const bool f32 = y->element_type() == ffi::F32;
  if (!f32 && (f32_in || y->element_type() != ffi::BF16)) {
    return ffi::Error::InvalidArgument(f32_in ? "onednn_matmul: float32 operands need a float32 result"
                                              : "onednn_matmul: the result must be bfloat16 or float32");
  }
  std::lock_guard<std::mutex> lock(Running());
  try {
    Execute(Get({batch, m, k, n, trans_a, trans_b, f32_in, f32}), a.untyped_data(), b.untyped_data(),
            y->untyped_data());
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal("onednn_matmul: oneDNN failed on " + std::to_string(batch) +
                                (f32_in ? " float32" : " bfloat16") + " matmul(s) [" +
                                std::to_string(m) + ", " + std::to_string(k) + "] x [" + std::to_string(k) + ", " +
                                std::to_string(n) + "]: " + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 when oneDNN has bfloat16 matmuls for this CPU (every variant the handler runs, and the float32 ones), else 0:
// on a CPU without AVX-512 (or with oneDNN's ISA capped by ONEDNN_MAX_CPU_ISA) creating one fails, and the caller
// keeps XLA's dot.
extern "C" int OnednnSupported() {
  try {
    std::lock_guard<std::mutex> lock(Running());
    for (bool trans_a : {false, true}) {
      for (bool trans_b : {false, true}) {
        for (bool f32 : {false, true}) Get({1, 16, 32, 8, trans_a, trans_b, false, f32});
        Get({1, 16, 32, 8, trans_a, trans_b, true, true});
      }
    }
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmul, Run,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

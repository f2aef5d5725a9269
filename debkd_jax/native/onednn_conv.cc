// oneDNN 2-D convolutions as XLA FFI handlers: forward, backward-data and backward-weights.
//
// Layouts (row-major, as XLA hands them over): x (N, H, W, C), w (O, C, KH, KW), y (N, OH, OW, O), float32.
// (The weights come as OIHW: oneDNN's reorders from it into its blocked layouts are fast, those from HWIO are
// not; the caller transposes the small weight tensors.)
// Attributes: sh, sw (strides), pt, pb, pl, pr (padding top, bottom, left, right).
//
//   DebkdOnednnConvFwd          (x, w)  -> y
//   DebkdOnednnConvBwdData      (dy, w) -> dx    (the result's shape gives x's)
//   DebkdOnednnConvBwdWeights   (x, dy) -> dw    (the result's shape gives w's)
//
// Activations stay NHWC (no copies). Weights are reordered per call, on the calling thread, into the layout the primitive chose
// (format_tag::any), as small as a layer's weights. Primitives, their reorders and their descriptors are built
// once per shape and kept in a cache guarded by a mutex; scratchpads are per calling thread, so XLA may run
// several handlers at once.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;

namespace {

std::atomic<int> g_threads{0};
// Guarded mode (the self-check's): every call gets a scratchpad of exactly its size between two canary zones,
// checked after the primitive ran, so a kernel that writes past its scratchpad fails the call deterministically
// instead of corrupting memory that a later call may or may not notice.
std::atomic<int> g_guarded{0};
constexpr unsigned char kCanary = 0xA5;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum Direction : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;

  std::vector<int64_t> Key(Direction d) const {
    return {d, n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr};
  }
  memory::desc Src(tag t) const { return memory::desc({n, c, h, w}, dt::f32, t); }
  memory::desc Dst(tag t) const { return memory::desc({n, o, oh, ow}, dt::f32, t); }
  memory::desc Wei(tag t) const { return memory::desc({o, c, kh, kw}, dt::f32, t); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(tag::nhwc),
      g.Wei(tag::any), g.Dst(tag::nhwc), g.Strides(), g.PadL(), g.PadR(), UserScratchpad());
}

// One cached direction: the conv primitive, and the reorder between the user's OIHW weights and the
// primitive's weights layout (absent when they are the same).
struct Entry {
  dnnl::primitive conv;
  memory::desc weights;  // the primitive's weights (or weight-gradient) layout
  memory::desc scratchpad;
  bool reorder_needed = false;
  dnnl::reorder reorder;
};

Entry Build(const Geometry& g, Direction d) {
  Entry e;
  const memory::desc user_weights = g.Wei(tag::oihw);
  auto fwd = ForwardDesc(g);
  if (d == kFwd) {
    e.conv = dnnl::convolution_forward(fwd);
    e.weights = fwd.weights_desc();
    e.scratchpad = fwd.scratchpad_desc();
  } else if (d == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(tag::nhwc), g.Wei(tag::any), g.Dst(tag::nhwc),
        g.Strides(), g.PadL(), g.PadR(), fwd, UserScratchpad());
    e.conv = dnnl::convolution_backward_data(pd);
    e.weights = pd.weights_desc();
    e.scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(tag::nhwc), g.Wei(tag::any), g.Dst(tag::nhwc),
        g.Strides(), g.PadL(), g.PadR(), fwd, UserScratchpad());
    e.conv = dnnl::convolution_backward_weights(pd);
    e.weights = pd.diff_weights_desc();
    e.scratchpad = pd.scratchpad_desc();
  }
  e.reorder_needed = e.weights != user_weights;
  if (e.reorder_needed) {
    e.reorder = d == kBwdWeights
                    ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e.weights, Engine(), user_weights))
                    : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_weights, Engine(), e.weights));
  }
  return e;
}

const Entry& Cached(const Geometry& g, Direction d) {
  static std::mutex mu;
  static std::map<std::vector<int64_t>, std::unique_ptr<Entry>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[g.Key(d)];
  if (!slot) slot = std::make_unique<Entry>(Build(g, d));
  return *slot;
}

// Per-thread buffers that only grow: the scratchpad and the weights in the primitive's layout.
void* Grow(std::vector<char>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// A scratchpad of `bytes` between two canary zones of `guard` bytes each.
struct GuardedBuffer {
  std::vector<unsigned char> bytes;
  size_t guard, size;
  GuardedBuffer(size_t size, size_t guard) : bytes(size + 2 * guard, kCanary), guard(guard), size(size) {}
  void* data() { return bytes.data() + guard; }
  // The bytes written outside the scratchpad (0: none).
  size_t Overrun() const {
    size_t bad = 0;
    for (size_t i = 0; i < guard; ++i) bad += (bytes[i] != kCanary) + (bytes[guard + size + i] != kCanary);
    return bad;
  }
};

ffi::Error Run(Direction d, const Geometry& g, float* src, float* weights, float* dst) {
  try {
    const Entry& e = Cached(g, d);
    dnnl::stream stream(Engine());
    const int threads = g_threads.load() > 0 ? g_threads.load() : omp_get_max_threads();
    // Weight reorders are small: on the calling thread, without waking the OpenMP team for them.
    auto reorder_weights = [&](memory& from, memory& to) {
      omp_set_num_threads(1);
      e.reorder.execute(stream, from, to);
      omp_set_num_threads(threads);
    };
    if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
    thread_local std::vector<char> scratch_buffer, weights_buffer;
    const size_t scratch_bytes = e.scratchpad.get_size();
    std::unique_ptr<GuardedBuffer> guarded;
    if (g_guarded.load()) {
      guarded = std::make_unique<GuardedBuffer>(scratch_bytes, std::max<size_t>(1 << 20, 8 * scratch_bytes));
    }
    memory user_weights(g.Wei(tag::oihw), Engine(), weights);
    memory prim_weights = e.reorder_needed
                              ? memory(e.weights, Engine(), Grow(weights_buffer, e.weights.get_size()))
                              : user_weights;
    memory scratch(e.scratchpad, Engine(), guarded ? guarded->data() : Grow(scratch_buffer, scratch_bytes));
    memory src_mem(g.Src(tag::nhwc), Engine(), src);
    memory dst_mem(g.Dst(tag::nhwc), Engine(), dst);
    if (d != kBwdWeights && e.reorder_needed) {
      reorder_weights(user_weights, prim_weights);
    }
    if (d == kFwd) {
      e.conv.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, prim_weights},
                              {DNNL_ARG_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (d == kBwdData) {
      e.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_WEIGHTS, prim_weights},
                              {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      e.conv.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_WEIGHTS, prim_weights},
                              {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (e.reorder_needed) reorder_weights(prim_weights, user_weights);
    }
    stream.wait();
    if (guarded) {
      if (size_t bad = guarded->Overrun()) {
        static const char* kNames[] = {"forward", "backward-data", "backward-weights"};
        return ffi::Error(ffi::ErrorCode::kInternal,
                          std::string("oneDNN convolution (") + kNames[d] + ") wrote " + std::to_string(bad) +
                              " bytes past its " + std::to_string(scratch_bytes) + "-byte scratchpad");
      }
    }
    return ffi::Error::Success();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + err.what());
  }
}

ffi::Error CheckRank(ffi::Span<const int64_t> dims, const char* what) {
  if (dims.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(what) + " must have rank 4");
  }
  return ffi::Error::Success();
}

// x (N, H, W, C), w (O, C, KH, KW), y (N, OH, OW, O): the geometry, from whichever three the direction holds.
Geometry GeometryOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[2], w[3], w[0], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

ffi::Error ConvFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  for (auto [dims, what] : {std::pair{x.dimensions(), "x"}, {w.dimensions(), "w"}, {y->dimensions(), "y"}}) {
    if (auto err = CheckRank(dims, what); err.failure()) return err;
  }
  Geometry g = GeometryOf(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(kFwd, g, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error ConvBwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  for (auto [dims, what] : {std::pair{dy.dimensions(), "dy"}, {w.dimensions(), "w"}, {dx->dimensions(), "dx"}}) {
    if (auto err = CheckRank(dims, what); err.failure()) return err;
  }
  Geometry g = GeometryOf(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(kBwdData, g, dx->typed_data(), w.typed_data(), dy.typed_data());
}

ffi::Error ConvBwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  for (auto [dims, what] : {std::pair{x.dimensions(), "x"}, {dy.dimensions(), "dy"}, {dw->dimensions(), "dw"}}) {
    if (auto err = CheckRank(dims, what); err.failure()) return err;
  }
  Geometry g = GeometryOf(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(kBwdWeights, g, x.typed_data(), dw->typed_data(), dy.typed_data());
}

template <typename Binding>
auto WithAttrs(Binding b) {
  return std::move(b)
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pb")
      .template Attr<int64_t>("pl")
      .template Attr<int64_t>("pr");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DebkdOnednnConvFwd, ConvFwd,
                              WithAttrs(ffi::Ffi::Bind()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DebkdOnednnConvBwdData, ConvBwdData,
                              WithAttrs(ffi::Ffi::Bind()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DebkdOnednnConvBwdWeights, ConvBwdWeights,
                              WithAttrs(ffi::Ffi::Bind()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

// The OpenMP threads every later call runs oneDNN with (<= 0: OpenMP's default).
extern "C" void DebkdOnednnSetThreads(int threads) { g_threads.store(threads); }

// Guarded scratchpads for every later call (the self-check): a write past one fails that call.
extern "C" void DebkdOnednnSetGuarded(int guarded) { g_guarded.store(guarded); }

// oneDNN's version, major * 10000 + minor * 100 + patch.
extern "C" int DebkdOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

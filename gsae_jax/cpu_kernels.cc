// Fused elementwise passes of the gated SAE training step on CPU (XLA FFI).
//
// XLA on CPU writes every elementwise pass over a [rows, d_sae] block to
// memory and hands each reduction to a library call that cannot fuse its
// producer, so the step's masks, latents and bias sums cost a dozen passes
// over 16 MiB blocks. Each kernel below is one pass, split over the rows
// between the caller and XLA's intra-op thread pool. Compiled and loaded by
// gsae_jax/cpu_kernels.py; models.py falls back to plain XLA without them.
//
// T is the compute dtype's storage: float, or uint16_t holding bfloat16 bits
// (rounded to nearest even, as XLA converts). Products' outputs (pre, d_f,
// d_acts) are float32 either way.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Load(float x) { return x; }
inline float Load(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

template <typename T>
inline T Store(float x);
template <>
inline float Store<float>(float x) {
  return x;
}
template <>
inline uint16_t Store<uint16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// fn(chunk) for every chunk in [0, n), on the calling thread and on up to
// n - 1 tasks of the pool; returns when all chunks are done. Chunks are
// claimed from a shared counter, so the caller never waits for a task that
// has not started (the pool may be busy, even with other callers of these
// kernels): it claims what is left itself, and waits only for chunks that
// other threads are running. A task that starts late finds nothing to claim;
// it holds the counters through a shared_ptr and never touches fn.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, &fn] {
    for (int64_t c; (c = counters->next.fetch_add(1)) < n;) {
      fn(c);
      counters->done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  for (int64_t t = 1; t < n; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

int64_t Chunks(ffi::ThreadPool& pool, int64_t rows) {
  int64_t n = pool.num_threads();
  if (n < 1) n = 1;
  return n < rows ? n : (rows > 0 ? rows : 1);
}

// pre_raw [R, S] = x W_enc (float32). With pre = pre_raw - enc_bias:
//   f = pi_mag > 0 ? pi_mag : 0 where pi_gate > 0, else -0.0 (closed gate);
//   acts = ReLU(pi_gate); fires[s] = #rows with f > 0; penalty[r] = acts . w.
// pi_gate = pre + b_gate, pi_mag = exp_r_mag * pre + b_mag.
template <typename T, ffi::DataType DT>
ffi::Error GatedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pre_raw,
                        ffi::Buffer<ffi::F32> enc_bias, ffi::Buffer<ffi::F32> b_gate,
                        ffi::Buffer<ffi::F32> exp_r_mag, ffi::Buffer<ffi::F32> b_mag,
                        ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<DT> f_out,
                        ffi::ResultBuffer<DT> acts_out, ffi::ResultBuffer<ffi::F32> fires_out,
                        ffi::ResultBuffer<ffi::F32> penalty_out) {
  auto dims = pre_raw.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("pre_raw must be [rows, d_sae]");
  const int64_t rows = dims[0], s_len = dims[1];
  const float* pre_p = pre_raw.typed_data();
  T* f_p = reinterpret_cast<T*>(f_out->untyped_data());
  T* a_p = reinterpret_cast<T*>(acts_out->untyped_data());
  float* pen_p = penalty_out->typed_data();
  const int64_t n = Chunks(pool, rows);
  std::vector<float> counts(n * s_len, 0.0f);
  ParallelFor(pool, n, [&](int64_t c) {
    float* __restrict cnt = counts.data() + c * s_len;
    const float* __restrict eb = enc_bias.typed_data();
    const float* __restrict bg = b_gate.typed_data();
    const float* __restrict er = exp_r_mag.typed_data();
    const float* __restrict bm = b_mag.typed_data();
    const float* __restrict w = weights.typed_data();
    for (int64_t r = rows * c / n; r < rows * (c + 1) / n; ++r) {
      const float* __restrict p = pre_p + r * s_len;
      T* __restrict fr = f_p + r * s_len;
      T* __restrict ar = a_p + r * s_len;
      float pen = 0.0f;
#pragma omp simd reduction(+ : pen)
      for (int64_t s = 0; s < s_len; ++s) {
        const float pre = p[s] - eb[s];
        const float pi_gate = pre + bg[s];
        const float pi_mag = er[s] * pre + bm[s];
        const T f = Store<T>(pi_gate > 0.0f ? (pi_mag > 0.0f ? pi_mag : 0.0f) : -0.0f);
        const T a = Store<T>(pi_gate > 0.0f ? pi_gate : 0.0f);
        fr[s] = f;
        ar[s] = a;
        cnt[s] += Load(f) > 0.0f ? 1.0f : 0.0f;
        pen += Load(a) * Load(Store<T>(w[s]));
      }
      pen_p[r] = pen;
    }
  });
  float* fires = fires_out->typed_data();
  for (int64_t s = 0; s < s_len; ++s) fires[s] = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t s = 0; s < s_len; ++s) fires[s] += counts[c * s_len + s];
  }
  return ffi::Error::Success();
}

// One block of latents [start, start + cs) of SAE `sae`, f_all [N, B, S]:
//   d_mag = f > 0 ? d_f : 0;  d_gate = f is not -0.0 ? d_acts + lam_b w_s : 0;
//   d_pre = exp_r_mag d_mag + d_gate;  b_mag = sum_b d_mag;  b_gate = sum_b d_gate;
//   f_block = the block of f, contiguous, for the decoder-weight product.
template <typename T, ffi::DataType DT>
ffi::Error GatedBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d_f,
                         ffi::Buffer<ffi::F32> d_acts, ffi::Buffer<DT> f_all,
                         ffi::Buffer<ffi::S32> position, ffi::Buffer<ffi::F32> lam,
                         ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> exp_r_mag,
                         ffi::ResultBuffer<DT> d_pre_out, ffi::ResultBuffer<ffi::F32> b_mag_out,
                         ffi::ResultBuffer<ffi::F32> b_gate_out, ffi::ResultBuffer<DT> f_block_out) {
  auto dims = d_f.dimensions();
  auto f_dims = f_all.dimensions();
  if (dims.size() != 2 || f_dims.size() != 3 || f_dims[1] != dims[0]) {
    return ffi::Error::InvalidArgument("d_f must be [B, cs] and f_all [N, B, S]");
  }
  const int64_t batch = dims[0], cs = dims[1], s_len = f_dims[2];
  const int32_t sae = position.typed_data()[0], start = position.typed_data()[1];
  if (sae < 0 || sae >= f_dims[0] || start < 0 || start + cs > s_len) {
    return ffi::Error::InvalidArgument("latent block outside f_all");
  }
  const T* f_p = reinterpret_cast<const T*>(f_all.untyped_data()) + sae * batch * s_len + start;
  const float* df_p = d_f.typed_data();
  const float* da_p = d_acts.typed_data();
  const float* lam_p = lam.typed_data();
  T* dp_p = reinterpret_cast<T*>(d_pre_out->untyped_data());
  T* fb_p = reinterpret_cast<T*>(f_block_out->untyped_data());
  const int64_t n = Chunks(pool, batch);
  std::vector<float> sums(2 * n * cs, 0.0f);
  ParallelFor(pool, n, [&](int64_t c) {
    float* __restrict s_mag = sums.data() + 2 * c * cs;
    float* __restrict s_gate = s_mag + cs;
    const float* __restrict w = weights.typed_data();
    const float* __restrict er = exp_r_mag.typed_data();
    for (int64_t b = batch * c / n; b < batch * (c + 1) / n; ++b) {
      const T* __restrict fr = f_p + b * s_len;
      const float* __restrict dfr = df_p + b * cs;
      const float* __restrict dar = da_p + b * cs;
      T* __restrict dpr = dp_p + b * cs;
      T* __restrict fbr = fb_p + b * cs;
      const float lam_b = lam_p[b];
#pragma omp simd
      for (int64_t j = 0; j < cs; ++j) {
        const float f = Load(fr[j]);
        const float mag = f > 0.0f ? dfr[j] : 0.0f;
        const float gate = std::signbit(f) ? 0.0f : dar[j] + lam_b * w[j];
        dpr[j] = Store<T>(er[j] * mag + gate);
        s_mag[j] += mag;
        s_gate[j] += gate;
        fbr[j] = fr[j];
      }
    }
  });
  float* bm = b_mag_out->typed_data();
  float* bg = b_gate_out->typed_data();
  for (int64_t j = 0; j < cs; ++j) bm[j] = bg[j] = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t j = 0; j < cs; ++j) {
      bm[j] += sums[2 * c * cs + j];
      bg[j] += sums[(2 * c + 1) * cs + j];
    }
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
auto ForwardBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // pre_raw
      .template Arg<ffi::Buffer<ffi::F32>>()  // enc_bias
      .template Arg<ffi::Buffer<ffi::F32>>()  // b_gate
      .template Arg<ffi::Buffer<ffi::F32>>()  // exp_r_mag
      .template Arg<ffi::Buffer<ffi::F32>>()  // b_mag
      .template Arg<ffi::Buffer<ffi::F32>>()  // weights
      .template Ret<ffi::Buffer<DT>>()        // f
      .template Ret<ffi::Buffer<DT>>()        // acts
      .template Ret<ffi::Buffer<ffi::F32>>()  // fires
      .template Ret<ffi::Buffer<ffi::F32>>();  // penalty
}

template <ffi::DataType DT>
auto BackwardBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // d_f
      .template Arg<ffi::Buffer<ffi::F32>>()  // d_acts
      .template Arg<ffi::Buffer<DT>>()        // f_all
      .template Arg<ffi::Buffer<ffi::S32>>()  // position (sae, start)
      .template Arg<ffi::Buffer<ffi::F32>>()  // lam
      .template Arg<ffi::Buffer<ffi::F32>>()  // weights
      .template Arg<ffi::Buffer<ffi::F32>>()  // exp_r_mag
      .template Ret<ffi::Buffer<DT>>()        // d_pre
      .template Ret<ffi::Buffer<ffi::F32>>()  // b_mag
      .template Ret<ffi::Buffer<ffi::F32>>()  // b_gate
      .template Ret<ffi::Buffer<DT>>();       // f_block
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(gsae_gated_forward_f32, (GatedForward<float, ffi::F32>),
                              ForwardBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(gsae_gated_forward_bf16, (GatedForward<uint16_t, ffi::U16>),
                              ForwardBinding<ffi::U16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(gsae_gated_backward_f32, (GatedBackward<float, ffi::F32>),
                              BackwardBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(gsae_gated_backward_bf16, (GatedBackward<uint16_t, ffi::U16>),
                              BackwardBinding<ffi::U16>());

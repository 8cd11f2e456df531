// chatserve's native CPU kernels (built once by models/native.py, loaded with
// torch.ops.load_library):
// - the small ops of a decoder layer fused (RMSNorm with the residual add, SiLU-and-multiply,
//   decode attention with the q/k norms, RoPE and the K/V write), so a decode step runs a handful
//   of calls per layer instead of ~50 PyTorch ops, each a few microseconds of dispatch on the CPU,
//   which for a small model is as long as its matmuls. Computed in fp32 and rounded to the
//   activations' dtype where the PyTorch path rounds (tests/test_native.py holds them to it);
// - matmuls that read the weights at memory speed: int4 and int8 with the activations quantized to
//   int8 blocks of 32 (AVX-512 VNNI, as llama.cpp's Q4/Q8 products), bf16 (vdpbf16ps) and fp32,
//   the weights in tiles of 16 outputs so the outputs sit in the vector lanes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 16;  // one AVX-512 register of floats: partial sums kept per lane

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }
template <>
inline float to_f<float>(float x) { return x; }
template <>
inline float to_f<c10::BFloat16>(c10::BFloat16 x) {
  // The bit pattern shifted up: the compiler vectorises this, unlike the library conversion.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float x) {
  // Round to nearest even, as c10's conversion, without its NaN branch, so loops vectorise.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// Rounded to T and back: the value the PyTorch path holds after an op that outputs T.
template <typename T>
inline float round_to(float x) { return to_f<T>(from_f<T>(x)); }

template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += to_f<A>(a[i + j]) * to_f<B>(b[i + j]);
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; i < n; ++i) sum += to_f<A>(a[i]) * to_f<B>(b[i]);
  return sum;
}

// exp(x) in a form the compiler vectorises (std::exp is a scalar call: for the softmax and SiLU
// of a decode step it was most of their time): 2^(x log2 e) as 2^integer, put in the exponent
// bits, times a degree-6 polynomial for 2^fraction; about 1e-7 relative error.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// RMSNorm of one row as models/layers.py's RMSNorm: normalised in fp32, rounded to T, times the
// weight (a T by T product).
template <typename T>
inline void rms_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float ss = dot<T, T>(x, x, n);
  float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = from_f<T>(to_f<T>(w[i]) * round_to<T>(to_f<T>(x[i]) * r));
}

// The same over fp32 values in place (per-head q/k norms of Qwen3), giving T-rounded values.
template <typename T>
inline void rms_row_f(float* x, const T* w, int64_t n, float eps) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  float ss = 0.f;
  for (int j = 0; j < kLanes; ++j) ss += acc[j];
  for (; i < n; ++i) ss += x[i] * x[i];
  float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) x[i] = round_to<T>(to_f<T>(w[i]) * round_to<T>(x[i] * r));
}

// Rows per parallel task: below this much work a task is not worth a thread.
inline int64_t grain(int64_t work_per_item, int64_t min_work = 32768) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_item));
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), name,
              ": expected a contiguous 2-D CPU tensor");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight must be [hidden] of the input's dtype");
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) rms_row<scalar_t>(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// x += delta (in place: the residual stream), then RMSNorm(x): the two ops between a layer's
// sublayers in one pass.
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm");
  check_rows(delta, "add_rms_norm");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(),
              "add_rms_norm: delta must match x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1) && weight.is_contiguous(),
              "add_rms_norm: weight must be [hidden] of the input's dtype");
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* row = xp + r * n;
        const scalar_t* d = dp + r * n;
        for (int64_t i = 0; i < n; ++i) row[i] = from_f<scalar_t>(to_f<scalar_t>(row[i]) + to_f<scalar_t>(d[i]));
        rms_row<scalar_t>(row, wp, op + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Lane i of the result: the sum of a[i]'s 16 lanes. A transpose-add tree (pairs within 128-bit
// lanes, then pairs of pairs, then across the 128-bit lanes): 8 + 8 + 6 shuffles and 15 adds for 16
// sums, where one _mm512_reduce_add_ps per sum is ~8 dependent ops each.
inline __m512 sum16(const __m512 (&a)[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // c[i], 128-bit lane L: lane L's partial sums of a[4i .. 4i + 3]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q . k for 16 tokens (kt: their K vectors), in the lanes: 16 independent FMA chains, one load of
// q per 8 FMAs. q fp32, dim % 16 == 0. Eight tokens at a time and not inlined: with all 16 pointers
// and the caller's state live, g++ spilled the accumulators to the stack (1.3x slower).
template <typename T>
__attribute__((noinline)) __m512 scores16(const float* q, const T* const* kt, int64_t dim) {
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int h = 0; h < 16; h += 8) {
    const T* k[8];
    for (int t = 0; t < 8; ++t) k[t] = kt[h + t];
    for (int64_t c = 0; c < dim; c += 16) {
      const __m512 qv = _mm512_loadu_ps(q + c);
      for (int t = 0; t < 8; ++t) acc[h + t] = _mm512_fmadd_ps(qv, load16(k[t] + c), acc[h + t]);
    }
  }
  return sum16(acc);
}

#ifdef __AVX512BF16__
// The same for a bf16 cache with q in bf16 (exact: the roped q holds bf16 values), by vdpbf16ps:
// the products are exact and summed in fp32, two per lane per instruction. dim % 32 == 0.
__attribute__((noinline)) __m512 scores16(const uint16_t* q, const c10::BFloat16* const* kt, int64_t dim) {
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int h = 0; h < 16; h += 8) {
    const c10::BFloat16* k[8];
    for (int t = 0; t < 8; ++t) k[t] = kt[h + t];
    for (int64_t c = 0; c < dim; c += 32) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + c);
      for (int t = 0; t < 8; ++t)
        acc[h + t] = _mm512_dpbf16_ps(acc[h + t], qv, (__m512bh)_mm512_loadu_si512(k[t] + c));
    }
  }
  return sum16(acc);
}
#endif

// out[0 .. 16 W) += sum over 16 tokens of p[t] * vt[t][0 .. 16 W), in fp32: even and odd tokens in
// two sets of accumulators, so even one slab of 16 columns has two chains to hide the FMA latency.
// Not inlined, as scores16.
template <int W, typename T>
__attribute__((noinline)) void weigh16(const float* p, const T* const* vt, int64_t col, float* out) {
  __m512 a[W], b[W];
  for (int w = 0; w < W; ++w) a[w] = _mm512_loadu_ps(out + w * 16), b[w] = _mm512_setzero_ps();
  for (int t = 0; t < 16; t += 2) {
    const __m512 pa = _mm512_set1_ps(p[t]), pb = _mm512_set1_ps(p[t + 1]);
    for (int w = 0; w < W; ++w) {
      a[w] = _mm512_fmadd_ps(pa, load16(vt[t] + col + w * 16), a[w]);
      b[w] = _mm512_fmadd_ps(pb, load16(vt[t + 1] + col + w * 16), b[w]);
    }
  }
  for (int w = 0; w < W; ++w) _mm512_storeu_ps(out + w * 16, _mm512_add_ps(a[w], b[w]));
}

// fast_exp on 16 lanes (the compiler leaves fast_exp's loops scalar around the softmax's max and
// sum: a third of attention's time).
inline __m512 fast_exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Softmax weights of s[0, n) in place, unnormalised (exp(s - top)), s[n, 16 ceil(n / 16)) set to 0;
// returns top and the sum. The padding past n holds copies of token n - 1's score (see
// attend_chunk), so the max runs over whole vectors.
inline void softmax16(float* s, int64_t n, float* top, float* total) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < n; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  const float mx = _mm512_reduce_max_ps(m);
  const __m512 mv = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv)));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  *top = mx;
  *total = _mm512_reduce_add_ps(sum);
}
#endif

// Tokens per attention task. A sequence's context is cut into chunks of this many tokens, each a
// task of its own whose partial result (unnormalised sum, its max and its sum of weights) is merged
// after (flash-decoding): one row's heads are then spread over every thread. Always the same cut,
// whatever the thread count, so the results do not depend on it. (2 threads, one bf16 row of 600
// tokens, best wall time: SmolLM2 34.3 -> 25.1 us, Qwen2.5-0.5B 44.6 -> 33.5, Qwen3 80.5 -> 64.9.)
constexpr int64_t kChunk = 256;

constexpr int64_t kPad = kChunk + 16;  // a head's scores in attend_chunk's scratch

#ifdef __AVX512F__
// attend_chunk for fp32 and bf16 caches, dim % 16 == 0: 16 tokens at a time, each K and V vector
// read from memory once for the whole group (the other heads find it in L1).
template <typename T>
void attend_chunk_avx512(const float* q, const uint16_t* qb, const T* k, const T* v, int64_t stride,
                         const int64_t* slot_of, int64_t n, int64_t dim, int64_t group, float scale, float* scores,
                         float* acc, float* top, float* total) {
  const T* rows[16];
  // The 16 vectors at tokens b .. b + 16 of pool p; past n, token n - 1 again (weighted 0 after).
  auto gather16 = [&](const T* p, int64_t b) {
    for (int t = 0; t < 16; ++t) rows[t] = p + slot_of[std::min(b + t, n - 1)] * stride;
  };
  // Tokens b .. b + 16's vectors of pool p asked for ahead (K two steps ahead, V one): KV blocks lie
  // anywhere in the pool, so the hardware prefetcher loses the stream at every block's end (32 rows
  // of 600 tokens: 1.1-1.4x faster with; asking for V during the scores as well was slower).
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  auto prefetch16 = [&](const T* p, int64_t b) {
    for (int64_t t = b; t < std::min(b + 16, n); ++t) {
      const char* row = reinterpret_cast<const char*>(p + slot_of[t] * stride);
      for (int64_t x = 0; x < row_bytes; x += 64) _mm_prefetch(row + x, _MM_HINT_T0);
    }
  };
  prefetch16(k, 0);
  prefetch16(k, 16);
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < n; b += 16) {
    gather16(k, b);
    prefetch16(k, b + 32);
    for (int64_t j = 0; j < group; ++j) {
      __m512 s;
#ifdef __AVX512BF16__
      if constexpr (std::is_same_v<T, c10::BFloat16>)
        s = qb != nullptr ? scores16(qb + j * dim, rows, dim) : scores16<T>(q + j * dim, rows, dim);
      else
#endif
        s = scores16<T>(q + j * dim, rows, dim);
      _mm512_storeu_ps(scores + j * kPad + b, _mm512_mul_ps(s, sv));
    }
  }
  prefetch16(v, 0);
  for (int64_t j = 0; j < group; ++j) softmax16(scores + j * kPad, n, top + j, total + j);
  for (int64_t b = 0; b < n; b += 16) {
    gather16(v, b);
    prefetch16(v, b + 16);
    for (int64_t j = 0; j < group; ++j) {
      const float* p = scores + j * kPad + b;
      float* o = acc + j * dim;
      int64_t col = 0;
      for (; col + 64 <= dim; col += 64) weigh16<4, T>(p, rows, col, o + col);
      switch ((dim - col) / 16) {
        case 3: weigh16<3, T>(p, rows, col, o + col); break;
        case 2: weigh16<2, T>(p, rows, col, o + col); break;
        case 1: weigh16<1, T>(p, rows, col, o + col); break;
        default: break;
      }
    }
  }
}
#endif

// One task of decode attention: the `group` query heads sharing one KV head (q: [group, dim] fp32;
// qb: the same in bf16 for vdpbf16ps, or null) over n <= kChunk tokens of their sequence (k, v: the
// pools at that KV head, `stride` elements from one slot to the next; slot_of: the tokens' slots).
// Writes per head its unnormalised weighted sum of V (acc [group, dim]), its highest score (top)
// and its sum of weights (total). scores: scratch of group * kPad floats. vectorised: an fp32 or
// bf16 cache with dim % 16 == 0 on an AVX-512 build.
template <typename T>
void attend_chunk(const float* q, const uint16_t* qb, const T* k, const T* v, int64_t stride, const int64_t* slot_of,
                  int64_t n, int64_t dim, int64_t group, float scale, bool vectorised, float* scores, float* acc,
                  float* top, float* total) {
  std::fill(acc, acc + group * dim, 0.f);
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (vectorised) {
      attend_chunk_avx512<T>(q, qb, k, v, stride, slot_of, n, dim, group, scale, scores, acc, top, total);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < group; ++j) {
    float* s = scores + j * kPad;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) {
      s[t] = dot<float, T>(q + j * dim, k + slot_of[t] * stride, dim) * scale;
      m = std::max(m, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += s[t] = fast_exp(s[t] - m);
    top[j] = m;
    total[j] = sum;
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = v + slot_of[t] * stride;
    for (int64_t j = 0; j < group; ++j) {
      const float p = scores[j * kPad + t];
      float* o = acc + j * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] += p * to_f<T>(vt[i]);
    }
  }
}

// What decode_attention and rope_kv_write share, for rows of fused qkv [rows, (heads + 2 * kv_heads)
// * head_dim]: the arguments checked (`name` in the messages), then, per row, the per-head q/k norms
// (when given) and RoPE applied, the row's K and V written at its slot, and its roped queries put in
// q_out [rows, heads, head_dim] (fp32 or T: T-rounded values either way, as the PyTorch path's).
//   cos, sin [max_positions, head_dim] fp32 (sin with its first half negated, as RotaryEmbedding
//   keeps it); positions, slots [rows]; k_pool, v_pool [num_slots, kv_heads, head_dim].
void check_rope_args(const char* name, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& positions, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& slots, const std::optional<at::Tensor>& q_norm,
                     const std::optional<at::Tensor>& k_norm, int64_t heads, int64_t kv_heads) {
  check_rows(qkv, name);
  const int64_t rows = qkv.size(0), dim = k_pool.size(2);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, name, ": qkv width");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.scalar_type() == qkv.scalar_type() &&
                  v_pool.scalar_type() == qkv.scalar_type() && k_pool.size(1) == kv_heads &&
                  v_pool.sizes() == k_pool.sizes(),
              name, ": the KV pools must be contiguous [slots, kv_heads, head_dim] of qkv's dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.size(1) == dim &&
                  sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              name, ": cos/sin tables must be fp32 [positions, head_dim]");
  for (const at::Tensor* t : {&positions, &slots})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == rows && t->is_contiguous(), name,
                ": positions and slots must be int64 [rows]");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, name, ": heads must be a multiple of kv_heads");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), name, ": q_norm and k_norm come together");
  for (const auto* norm : {&q_norm, &k_norm})
    TORCH_CHECK(!norm->has_value() || ((*norm)->numel() == dim && (*norm)->scalar_type() == qkv.scalar_type() &&
                                       (*norm)->is_contiguous()),
                name, ": q_norm and k_norm must be [head_dim] of qkv's dtype");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(slot[r] >= 0 && slot[r] < k_pool.size(0), name, ": slot out of range");
    TORCH_CHECK(pos[r] >= 0 && pos[r] < cos.size(0), name, ": position out of range");
  }
}

template <typename T, typename Q>
void rope_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
               at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slots,
               const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double eps,
               int64_t heads, int64_t kv_heads, Q* q_out) {
  const int64_t rows = qkv.size(0), width = qkv.size(1), dim = k_pool.size(2), half = dim / 2;
  const T* in = qkv.data_ptr<T>();
  T* kp = k_pool.data_ptr<T>();
  T* vp = v_pool.data_ptr<T>();
  const T* qn = q_norm ? q_norm->data_ptr<T>() : nullptr;
  const T* kn = k_norm ? k_norm->data_ptr<T>() : nullptr;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  // One (row, head) of q or k at a time.
  at::parallel_for(0, rows * (heads + kv_heads), grain(dim * 8), [&](int64_t b, int64_t e) {
    std::vector<float> h(dim);
    for (int64_t k = b; k < e; ++k) {
      const int64_t r = k / (heads + kv_heads), hh = k % (heads + kv_heads);
      const bool is_q = hh < heads;
      const T* src = in + r * width + hh * dim;  // q heads then k heads, side by side
      for (int64_t i = 0; i < dim; ++i) h[i] = to_f<T>(src[i]);
      if (qn != nullptr) rms_row_f<T>(h.data(), is_q ? qn : kn, dim, static_cast<float>(eps));
      const float* c = cos_p + pos[r] * dim;
      const float* s = sin_p + pos[r] * dim;
      // x * cos + roll(x, dim / 2) * signed_sin, with the tables rounded to T as the PyTorch path does.
      Q* dst_q = is_q ? q_out + (r * heads + hh) * dim : nullptr;
      T* dst_k = is_q ? nullptr : kp + (slot[r] * kv_heads + (hh - heads)) * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const float rolled = h[i < half ? i + half : i - half];
        const float v = round_to<T>(round_to<T>(h[i] * round_to<T>(c[i])) + rolled * round_to<T>(s[i]));
        if (is_q) dst_q[i] = from_f<Q>(v); else dst_k[i] = from_f<T>(v);
      }
      if (!is_q) {
        const T* vsrc = in + r * width + (heads + kv_heads + hh - heads) * dim;
        T* vdst = vp + (slot[r] * kv_heads + (hh - heads)) * dim;
        std::memcpy(vdst, vsrc, dim * sizeof(T));
      }
    }
  });
}

// The prefill rows' half of attention on the native path: rope_rows alone, the roped queries out
// [rows, heads, head_dim] in qkv's dtype (PyTorch's norms, RoPE and index_copy_ were ~8 ops and 4
// temporaries a layer).
at::Tensor rope_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions, at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slots,
                         const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double eps,
                         int64_t heads, int64_t kv_heads) {
  check_rope_args("rope_kv_write", qkv, cos, sin, positions, k_pool, v_pool, slots, q_norm, k_norm, heads, kv_heads);
  auto q = at::empty({qkv.size(0), heads, k_pool.size(2)}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_kv_write", [&] {
    rope_rows<scalar_t, scalar_t>(qkv, cos, sin, positions, k_pool, v_pool, slots, q_norm, k_norm, eps, heads,
                                  kv_heads, q.data_ptr<scalar_t>());
  });
  return q;
}

// Tasks [0, cost.size()) cut into `threads` contiguous shares of about equal cost: share w is
// tasks [share[w], share[w + 1]), a task going to the share that holds its middle.
std::vector<int64_t> split_by_cost(const std::vector<int64_t>& cost, int64_t threads) {
  const int64_t tasks = static_cast<int64_t>(cost.size());
  int64_t total = 0;
  for (const int64_t c : cost) total += c;
  std::vector<int64_t> share(threads + 1, tasks);
  share[0] = 0;
  for (int64_t i = 0, w = 0, done = 0; i < tasks; ++i) {
    while (w + 1 < threads && (2 * done + cost[i]) * threads > 2 * (w + 1) * total) share[++w] = i;
    done += cost[i];
  }
  return share;
}

// One decode step of attention for a batch of single-token queries over the paged KV cache:
// split the fused qkv rows, apply the per-head q/k norms (when given) and RoPE, write this token's
// K and V at its slot, and attend over the sequence's context. out [rows, heads * head_dim].
//   qkv [rows, (heads + 2 * kv_heads) * head_dim]; cos, sin [max_positions, head_dim] fp32 (sin with
//   its first half negated, as RotaryEmbedding keeps it); positions, slots, context_lens [rows];
//   k_pool, v_pool [num_slots, kv_heads, head_dim]; block_tables [rows, max_blocks].
// Against one task per (row, query head), each scoring 4 tokens at a time with one horizontal sum
// each (1 thread, best of runs on a shared 2-core EPYC, us per call, 128 / 600 tokens of context):
//   SmolLM2 (9/3 heads x 64)  bf16  1 row 14.8 / 53.7 -> 11.2 / 38.2; 32 rows 374 / 3753 -> 266 / 3256
//                             fp32  1 row 13.2 / 52.4 -> 11.6 / 44.0; 32 rows 439 / 4926 -> 299 / 4700-5400
//   Qwen2.5-0.5B (14/2 x 64)  bf16  1 row 20.1 / 78.3 -> 14.5 / 51.3; 32 rows 541 / 3599 -> 354 / 2625
//   Qwen3 (16/8 x 128, norms) bf16  1 row 36.4 / 149 -> 28.2 / 114;   32 rows 2834 / 13161 -> 2152 / 13042
//                             fp32  1 row 35.2 / 162 -> 40.3 / 180 (its 4 KB from one token's K to
//   the next alias 16 tokens' vectors onto the same L1 sets; 7 KV heads instead: 30.4 -> 27.3).
// The 32-row calls at 600 tokens read 15-30 MB of KV and run at the memory's pace either way.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& positions, at::Tensor& k_pool, at::Tensor& v_pool,
                            const at::Tensor& slots, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, const std::optional<at::Tensor>& q_norm,
                            const std::optional<at::Tensor>& k_norm, double eps, int64_t heads,
                            int64_t kv_heads, int64_t block_size, double scale) {
  check_rope_args("decode_attention", qkv, cos, sin, positions, k_pool, v_pool, slots, q_norm, k_norm, heads,
                  kv_heads);
  const int64_t rows = qkv.size(0);
  const int64_t dim = k_pool.size(2);
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == rows && context_lens.is_contiguous(),
              "decode_attention: context_lens must be int64 [rows]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == rows &&
                  block_tables.is_contiguous(),
              "decode_attention: block_tables must be int64 [rows, max_blocks]");
  const int64_t group = heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1), num_slots = k_pool.size(0);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= max_blocks * block_size, "decode_attention: context length out of range");
  auto out = at::empty({rows, heads * dim}, qkv.options());
  // The roped queries, fp32 (T-rounded values), [rows, heads, dim].
  std::vector<float> q_all(rows * heads * dim);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "decode_attention", [&] {
    using T = scalar_t;
    T* kp = k_pool.data_ptr<T>();
    T* vp = v_pool.data_ptr<T>();
    T* op = out.data_ptr<T>();

    // 1. Norms, RoPE and the K/V write.
    rope_rows<T, float>(qkv, cos, sin, positions, k_pool, v_pool, slots, q_norm, k_norm, eps, heads, kv_heads,
                        q_all.data());

    // 2. Attention: tasks of (row, chunk of kChunk tokens, KV head), each over the whole group of
    // query heads sharing the KV head, fp32 throughout; then each (row, head)'s chunks merged.
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) longest = std::max(longest, lens[r]);
#ifdef __AVX512F__
    constexpr bool vector_type = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
    const bool vectorised = vector_type && dim % 16 == 0 && dim <= 256;
#else
    const bool vectorised = false;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    const bool bf16_scores = vectorised && std::is_same_v<T, c10::BFloat16> && dim % 32 == 0;
#else
    const bool bf16_scores = false;
#endif
    // Each token's slot, once per sequence rather than once per head (a division each).
    std::vector<int64_t> slot_of(rows * longest);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < lens[r]; ++t) {
        const int64_t at = tables[r * max_blocks + t / block_size] * block_size + t % block_size;
        TORCH_CHECK(at >= 0 && at < num_slots, "decode_attention: a block table entry is out of range");
        slot_of[r * longest + t] = at;
      }
    // Tasks in (row, chunk, KV head) order, so the KV heads of a chunk run one after the other
    // while its tokens' K and V (all heads side by side in the pool) are in L2; first[r]: row r's
    // first task, that of its chunk c and KV head g being first[r] + c * kv_heads + g.
    std::vector<int64_t> first(rows + 1, 0);
    for (int64_t r = 0; r < rows; ++r) first[r + 1] = first[r] + (lens[r] + kChunk - 1) / kChunk * kv_heads;
    const int64_t tasks = first[rows];
    // Per task and head: the unnormalised sum [dim], then the top score and the sum of weights.
    const int64_t part = group * (dim + 2);
    std::vector<float> partial(tasks * part);
    // The tasks cut into one contiguous share per thread of about equal tokens (a task costs its
    // tokens plus ~32 tokens' worth of setup), so rows of other lengths and chunk tails balance;
    // as few threads as leave each some 32K multiply-adds (a tiny step is not worth waking them).
    std::vector<int64_t> task_row(tasks), task_head(tasks), task_start(tasks), task_cost(tasks);
    int64_t cost = 0;
    {
      int64_t i = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t s = 0; s < lens[r]; s += kChunk)
          for (int64_t g = 0; g < kv_heads; ++g, ++i) {
            task_row[i] = r, task_head[i] = g, task_start[i] = s;
            cost += task_cost[i] = std::min(kChunk, lens[r] - s) + 32;
          }
    }
    const int64_t threads = std::max<int64_t>(
        1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), tasks, cost * group * dim * 2 / 32768}));
    const std::vector<int64_t> share = split_by_cost(task_cost, threads);
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      std::vector<float> scores(group * kPad);
      std::vector<uint16_t> qb(bf16_scores ? group * dim : 0);
      for (int64_t w = b; w < e; ++w)
        for (int64_t i = share[w]; i < share[w + 1]; ++i) {
          const int64_t r = task_row[i], g = task_head[i], s = task_start[i];
          const float* q = q_all.data() + (r * heads + g * group) * dim;
          if (bf16_scores)  // exact: the roped q holds bf16 values
            for (int64_t x = 0; x < group * dim; ++x) qb[x] = from_f<c10::BFloat16>(q[x]).x;
          float* p = partial.data() + i * part;
          attend_chunk<T>(q, bf16_scores ? qb.data() : nullptr, kp + g * dim, vp + g * dim, kv_heads * dim,
                          slot_of.data() + r * longest + s, std::min(kChunk, lens[r] - s), dim, group,
                          static_cast<float>(scale), vectorised, scores.data(), p, p + group * dim,
                          p + group * dim + group);
        }
    });
    // 3. Merge each (row, query head)'s chunks: weights rescaled to the highest top (one chunk:
    // a weight of exactly 1), normalised, rounded to T.
    at::parallel_for(0, rows * kv_heads, grain(dim * group * 4), [&](int64_t b, int64_t e) {
      std::vector<float> o(dim);
      for (int64_t rg = b; rg < e; ++rg) {
        const int64_t r = rg / kv_heads, g = rg % kv_heads;
        for (int64_t j = 0; j < group; ++j) {
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t i = first[r] + g; i < first[r + 1]; i += kv_heads) m = std::max(m, partial[i * part + group * dim + j]);
          std::fill(o.begin(), o.end(), 0.f);
          float total = 0.f;
          for (int64_t i = first[r] + g; i < first[r + 1]; i += kv_heads) {
            const float* p = partial.data() + i * part;
            const float w = fast_exp(p[group * dim + j] - m);
            total += w * p[group * dim + group + j];
            for (int64_t x = 0; x < dim; ++x) o[x] += w * p[j * dim + x];
          }
          const float inv = 1.f / total;
          T* dst = op + (r * heads + g * group + j) * dim;
          for (int64_t x = 0; x < dim; ++x) dst[x] = from_f<T>(o[x] * inv);
        }
      }
    });
  });
  return out;
}

#ifdef __AVX512F__
// 16 fp32 results stored as the output's dtype (bf16 rounded to nearest even, as PyTorch does).
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
// 16 fp32 values rounded to bf16 (nearest even), the bits in each lane's low half.
inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
}
// The same as fp32 values.
inline __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
inline void store16(c10::BFloat16* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// The R x T tiles of sums, plus the bias (fp32, before the one rounding, as F.linear), stored as the
// output's dtype.
template <int R, int T, typename OutT>
inline void store_sums(__m512 (&acc)[R][T], const float* bias, OutT* out, int64_t row0, int64_t N, int64_t tile) {
  for (int t = 0; t < T; ++t) {
    const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(bias + (tile + t) * 16);
    for (int r = 0; r < R; ++r) store16(out + (row0 + r) * N + (tile + t) * 16, _mm512_add_ps(acc[r][t], b));
  }
}
#endif

// [rows, 2 * I] (gate, up) -> silu(gate) * up, [rows, I], silu's result rounded to the dtype as
// PyTorch's F.silu(gate) * up. Vectorised for fp32 and bf16 (the compiler left the loop scalar: a
// 512-token SmolLM2 prefill's 30 calls took 30-50 ms, now ~3).
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* o, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      const __m512 x = load16(g + i);
      const __m512 e = fast_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      const __m512 rounded = std::is_same_v<T, float> ? silu : round_bf16(silu);  // F.silu's output
      store16(o + i, _mm512_mul_ps(rounded, load16(u + i)));
    }
  }
#endif
  for (; i < n; ++i) {
    const float x = to_f<T>(g[i]);
    o[i] = from_f<T>(round_to<T>(x / (1.f + fast_exp(-x))) * to_f<T>(u[i]));
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = at::empty({rows, n}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) silu_mul_row<scalar_t>(gp + r * 2 * n, gp + r * 2 * n + n, op + r * n, n);
    });
  });
  return out;
}


// Runs `body` with a pointer to `out`'s data as its C++ type (fp32 or bf16): the integer and bf16
// kernels write their results in the activations' dtype directly, no conversion op after.
template <typename F>
void with_output_type(const at::Tensor& out, F&& body) {
  if (out.scalar_type() == at::kBFloat16) body(out.data_ptr<c10::BFloat16>());
  else body(out.data_ptr<float>());
}

// The dtype a kernel writes: the one asked for where it can (fp32, bf16), else fp32 and a cast.
at::ScalarType direct_dtype(at::ScalarType want) {
  return want == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

// The activations as fp32 or bf16 (what the quantizers read), without a copy when they are.
at::Tensor readable(const at::Tensor& x) {
  return (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) ? x : x.to(at::kFloat);
}

// A compile-time count of rows or tiles, for over_tiles' kernels.
template <int N>
using Count = std::integral_constant<int, N>;

// Every row of x against the tiles [b, e) of a tiled weight, through kernel(Count<R> rows,
// Count<T> tiles, row0, tile): one or two rows (decode steps) take Few tiles at once, more rows go
// four at a time against Many tiles at once (which stay in L1 while the row groups pass over them).
// Each kernel's Few and Many are measured: more tiles at once hide the multiply latency, but each is
// a stream of its own from memory.
template <int Few, int Many, typename Kernel>
inline void over_tiles(int64_t rows, int64_t b, int64_t e, Kernel&& kernel) {
  auto by_fours = [&](auto tiles, int64_t t) {
    for (int64_t r = 0; r < rows; r += 4) {
      switch (std::min<int64_t>(4, rows - r)) {
        case 1: kernel(Count<1>{}, tiles, r, t); break;
        case 2: kernel(Count<2>{}, tiles, r, t); break;
        case 3: kernel(Count<3>{}, tiles, r, t); break;
        default: kernel(Count<4>{}, tiles, r, t); break;
      }
    }
  };
  int64_t t = b;
  if (rows == 1) {
    for (; t + Few <= e; t += Few) kernel(Count<1>{}, Count<Few>{}, 0, t);
  } else if (rows == 2) {
    for (; t + Few <= e; t += Few) kernel(Count<2>{}, Count<Few>{}, 0, t);
  } else {
    for (; t + Many <= e; t += Many) by_fours(Count<Many>{}, t);
  }
  for (; t < e; ++t) by_fours(Count<1>{}, t);
}

// Prefill attention: a chunk's T queries (the last T of a C-token context) attend causally to the
// whole context over the paged KV cache, flash-attention style (scores, softmax and the weighted
// sum of V tile by tile, the softmax online), so no [T, C] matrix is ever made.
//
// A task is one KV head and a block of 16 query rows (tokens); its M = 16 * group rows are the
// group's query heads at those tokens, head-major, so each vector of 16 lanes is one head at 16
// consecutive tokens: the causal mask of a lane depends on its token alone, the softmax's running
// max and sum are per lane (no horizontal reductions), and Q and the output accumulator are kept
// transposed, [dim][M]. Per tile of 64 context tokens, their K and V rows found through the slots
// (read in the pool; bf16 V interleaved in pairs of tokens for vdpbf16ps):
//   scores  S[t][rows] = sum over d of K[t][d] * Q^T[d][rows]: K broadcast, Q^T one load a vector;
//   softmax new max, the rows' rescale alpha = exp(old max - new max), P = exp(S * scale - max),
//           masks only where a tile crosses the diagonal, tiles past the block's last token skipped;
//   P . V   O^T[d][rows] = alpha O^T[d][rows] + sum over t of V[t][d] * P[t][rows].
// Sums in fp32; for bf16, Q . K and P . V by vdpbf16ps (exact products), with P rounded to bf16 as
// PyTorch's own bf16 flash attention does (2.2e-3 of the output's norm from an fp32 reference,
// 1.6e-3 with P kept fp32; 1.2-1.5x faster).
constexpr int64_t kPrefillRows = 16;  // query tokens a task: the lanes of a vector
constexpr int64_t kPrefillTile = 64;  // context tokens a tile (32: 4-10% slower, 128: no faster)

#ifdef __AVX512F__
// r[i] lane c <- r[c] lane i: a 16 x 16 transpose of 32-bit values, 4 x 4 within the 128-bit lanes
// (unpacks), then the lanes (two rounds of shuffles); 64 shuffles.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int g = 0; g < 4; ++g) {  // t[4g + e], 128-bit lane L: rows 4g .. 4g + 3 at column 4L + e
    const __m512 *x = r + 4 * g;
    const __m512d u0 = _mm512_castps_pd(_mm512_unpacklo_ps(x[0], x[1])), u1 = _mm512_castps_pd(_mm512_unpackhi_ps(x[0], x[1]));
    const __m512d u2 = _mm512_castps_pd(_mm512_unpacklo_ps(x[2], x[3])), u3 = _mm512_castps_pd(_mm512_unpackhi_ps(x[2], x[3]));
    t[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(u0, u2));
    t[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(u0, u2));
    t[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(u1, u3));
    t[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(u1, u3));
  }
  for (int e = 0; e < 4; ++e) {  // column 4L + e: lane L of t[e], t[4 + e], t[8 + e], t[12 + e]
    const __m512 x0 = _mm512_shuffle_f32x4(t[e], t[4 + e], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 x1 = _mm512_shuffle_f32x4(t[8 + e], t[12 + e], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 y0 = _mm512_shuffle_f32x4(t[e], t[4 + e], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 y1 = _mm512_shuffle_f32x4(t[8 + e], t[12 + e], _MM_SHUFFLE(3, 2, 3, 2));
    r[e] = _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + e] = _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + e] = _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + e] = _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// S[t][v] (16 rows each), times the scale sv, for tokens t < TB of the tile (kt: their fp32 K rows,
// in the pool or converted) and MV vectors of rows (qt: Q^T at the first, `m` floats from one dim to the next).
// TB * MV accumulators.
template <int TB, int MV>
__attribute__((noinline)) void prefill_scores(const float* const* kt, const float* qt, int64_t m, int64_t dim,
                                              __m512 sv, float* s) {
  const float* k[TB];
  for (int t = 0; t < TB; ++t) k[t] = kt[t];
  __m512 acc[TB][MV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < MV; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    __m512 qv[MV];
    for (int v = 0; v < MV; ++v) qv[v] = _mm512_loadu_ps(qt + d * m + v * 16);
    for (int t = 0; t < TB; ++t) {
      const __m512 kb = _mm512_set1_ps(k[t][d]);
      for (int v = 0; v < MV; ++v) acc[t][v] = _mm512_fmadd_ps(kb, qv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(s + t * m + v * 16, _mm512_mul_ps(acc[t][v], sv));
}

#ifdef __AVX512BF16__
// The same for bf16 K rows and Q^T in pairs of dims ([dim / 2][m][2]: each 32-bit lane one row's
// dims 2p and 2p + 1), by vdpbf16ps: a K pair broadcast, two exact products a lane summed in fp32.
template <int TB, int MV>
__attribute__((noinline)) void prefill_scores(const c10::BFloat16* const* kt, const uint16_t* qp, int64_t m,
                                              int64_t dim, __m512 sv, float* s) {
  const c10::BFloat16* k[TB];
  for (int t = 0; t < TB; ++t) k[t] = kt[t];
  __m512 acc[TB][MV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < MV; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 2) {
    __m512bh qv[MV];
    for (int v = 0; v < MV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qp + (d * m + v * 32));
    for (int t = 0; t < TB; ++t) {
      int32_t pair;
      std::memcpy(&pair, k[t] + d, sizeof(pair));
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < MV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], qv[v], kb);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(s + t * m + v * 16, _mm512_mul_ps(acc[t][v], sv));
}
#endif

// O^T[d0 .. d0 + DB][v] = alpha[v] O^T[..][v] + sum over tokens t < n of V[t][d] P[t][v], for MV
// vectors of rows (ot, p, alpha at the first; `m` floats a dim or token); vt: the tile's fp32 V
// rows, in the pool or converted. DB * MV accumulators, each loaded and stored once a tile.
template <int DB, int MV>
__attribute__((noinline)) void prefill_weigh(const float* const* vt, int64_t d0, int64_t n, int64_t dim,
                                             const float* p, const float* alpha, int64_t m, float* ot) {
  __m512 acc[DB][MV];
  for (int v = 0; v < MV; ++v) {
    const __m512 a = _mm512_loadu_ps(alpha + v * 16);
    for (int d = 0; d < DB; ++d) acc[d][v] = _mm512_mul_ps(a, _mm512_loadu_ps(ot + (d0 + d) * m + v * 16));
  }
  for (int64_t t = 0; t < n; ++t) {
    __m512 pv[MV];
    for (int v = 0; v < MV; ++v) pv[v] = _mm512_loadu_ps(p + t * m + v * 16);
    const float* row = vt[t] + d0;
    for (int d = 0; d < DB; ++d) {
      const __m512 vb = _mm512_set1_ps(row[d]);
      for (int v = 0; v < MV; ++v) acc[d][v] = _mm512_fmadd_ps(vb, pv[v], acc[d][v]);
    }
  }
  for (int d = 0; d < DB; ++d)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(ot + (d0 + d) * m + v * 16, acc[d][v]);
}

#ifdef __AVX512BF16__
// The same by vdpbf16ps, two tokens a step: vp, the tile's V in pairs of tokens ([n / 2][dim][2]:
// a 32-bit lane holds dim d of tokens 2p and 2p + 1), p the weights rounded to bf16 in the same
// pairs ([n / 2][m][2]).
template <int DB, int MV>
__attribute__((noinline)) void prefill_weigh(const uint16_t* vp, int64_t d0, int64_t n, int64_t dim,
                                             const uint16_t* p, const float* alpha, int64_t m, float* ot) {
  __m512 acc[DB][MV];
  for (int v = 0; v < MV; ++v) {
    const __m512 a = _mm512_loadu_ps(alpha + v * 16);
    for (int d = 0; d < DB; ++d) acc[d][v] = _mm512_mul_ps(a, _mm512_loadu_ps(ot + (d0 + d) * m + v * 16));
  }
  for (int64_t t = 0; t < n; t += 2) {
    __m512bh pv[MV];
    for (int v = 0; v < MV; ++v) pv[v] = (__m512bh)_mm512_loadu_si512(p + (t * m + v * 32));
    for (int d = 0; d < DB; ++d) {
      int32_t pair;
      std::memcpy(&pair, vp + t * dim + (d0 + d) * 2, sizeof(pair));
      const __m512bh vb = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < MV; ++v) acc[d][v] = _mm512_dpbf16_ps(acc[d][v], pv[v], vb);
    }
  }
  for (int d = 0; d < DB; ++d)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(ot + (d0 + d) * m + v * 16, acc[d][v]);
}

// 16 bf16 values a and 16 b (the halves of x) interleaved: a0 b0 a1 b1 ... a15 b15.
inline __m512i interleave_halves16(__m512i x) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, x);
}
#endif

// Up to three vectors of rows at once: 8 tokens (or dims) by 3 vectors is 24 accumulators of the 32
// registers; a group of 7 (Qwen2.5-0.5B) goes as 3 + 3 + 1.
template <typename F>
inline void by_row_vectors(int64_t vectors, F&& body) {
  for (int64_t v = 0; v < vectors; v += 3) {
    switch (std::min<int64_t>(3, vectors - v)) {
      case 1: body(Count<1>{}, v); break;
      case 2: body(Count<2>{}, v); break;
      default: body(Count<3>{}, v); break;
    }
  }
}

// Scratch of one thread's prefill tasks.
struct PrefillScratch {
  std::vector<float> qt, kt, vt, s, ot, top, sum, alpha;
  std::vector<uint16_t> qp, vb, pb;  // the bf16 pairs' layouts of qt, vt and s
  const float* krow[kPrefillTile];  // the tile's K and V rows (in the pool, or kt and vt)
  const float* vrow[kPrefillTile];
  const c10::BFloat16* kbrow[kPrefillTile];
  PrefillScratch(int64_t m, int64_t dim)
      : qt(dim * m), kt(kPrefillTile * dim), vt(kPrefillTile * dim), s(kPrefillTile * m), ot(dim * m), top(m),
        sum(m), alpha(m), qp(dim * m), vb(kPrefillTile * dim), pb(kPrefillTile * m) {}
};

// One task of prefill_attention on an fp32 or bf16 cache, dim % 16 == 0: KV head g, query rows
// [i0, i0 + 16) of T (fewer at the end). q [T, heads, dim]; k, v: the pools at head g, `stride`
// elements a slot; slot_of [C]; out [T, heads, dim].
template <typename T>
void prefill_task_avx512(const T* q, const T* k, const T* v, int64_t stride, const int64_t* slot_of, int64_t rows,
                         int64_t C, int64_t heads, int64_t group, int64_t dim, int64_t g, int64_t i0, float scale,
                         PrefillScratch& w, T* out) {
#ifdef __AVX512BF16__
  constexpr bool pairs = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool pairs = false;
#endif
  const int64_t m = kPrefillRows * group, n_rows = std::min(kPrefillRows, rows - i0);
  const int64_t pos0 = C - rows + i0;  // the context position of row i0: it sees tokens 0 .. pos0
  const int64_t last = pos0 + n_rows - 1;  // the last token any row of the block sees
  // Q^T, 16 rows by 16 32-bit words (dims, or pairs of bf16 dims for vdpbf16ps) at a time through
  // a transpose in registers (a gather a dim and a scatter back were a third of the time outside the
  // two products).
  // Lanes past the last row are zero: they compute finite values no one reads.
  const int64_t words = pairs ? dim / 2 : dim;  // a row's 32-bit words
  if constexpr (pairs || std::is_same_v<T, float>) {
    float* qw = pairs ? reinterpret_cast<float*>(w.qp.data()) : w.qt.data();
    for (int64_t j = 0; j < group; ++j)
      for (int64_t c0 = 0; c0 < words; c0 += 16) {
        const int64_t count = std::min<int64_t>(16, words - c0);
        const __mmask16 part = static_cast<__mmask16>((1u << count) - 1);
        __m512 r[16];
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < n_rows ? _mm512_maskz_loadu_ps(part, reinterpret_cast<const float*>(
                                                              q + ((i0 + i) * heads + g * group + j) * dim) + c0)
                            : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t c = 0; c < count; ++c) _mm512_storeu_ps(qw + (c0 + c) * m + j * kPrefillRows, r[c]);
      }
  } else {  // bf16 on a CPU without vdpbf16ps
    for (int64_t j = 0; j < group; ++j)
      for (int64_t i = 0; i < kPrefillRows; ++i)
        for (int64_t d = 0; d < dim; ++d)
          w.qt[d * m + j * kPrefillRows + i] = i < n_rows ? to_f<T>(q[((i0 + i) * heads + g * group + j) * dim + d]) : 0.f;
  }
  std::fill(w.ot.begin(), w.ot.end(), 0.f);
  std::fill(w.sum.begin(), w.sum.end(), 0.f);
  // Not -inf: a lane no token has reached yet then rescales by exp(0), not by exp(-inf + inf).
  std::fill(w.top.begin(), w.top.end(), -1e30f);
  const int64_t vectors = group;
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t k0 = 0; k0 <= last; k0 += kPrefillTile) {
    const int64_t n = std::min(kPrefillTile, last + 1 - k0);
    const int64_t n8 = (n + 7) / 8 * 8;  // scores run over whole steps of 8 tokens
    // The next tile's rows asked for now: KV blocks lie anywhere in the pool, which the hardware
    // prefetcher does not follow.
    for (int64_t t = k0 + kPrefillTile; t < std::min(k0 + 2 * kPrefillTile, last + 1); ++t)
      for (int64_t x = 0; x < dim * static_cast<int64_t>(sizeof(T)); x += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(k + slot_of[t] * stride) + x, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v + slot_of[t] * stride) + x, _MM_HINT_T0);
      }
    // The tile's rows: fp32 K and V read in the pool, bf16 K too (by vdpbf16ps); bf16 V in pairs of
    // tokens (tokens t and t + 1 side by side, zeros past n: weighted 0); converted to fp32 where
    // there is no vdpbf16ps. K past n: token n - 1 again (finite, masked out).
    for (int64_t t = 0; t < n8; ++t) {
      const T* kr = k + slot_of[k0 + std::min(t, n - 1)] * stride;
      if constexpr (std::is_same_v<T, float>) {
        w.krow[t] = kr;
      } else if constexpr (pairs) {
        w.kbrow[t] = kr;
      } else {
        for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(w.kt.data() + t * dim + d, load16(kr + d));
        w.krow[t] = w.kt.data() + t * dim;
      }
    }
    for (int64_t t = 0; t < n; t += pairs ? 2 : 1) {
      const T* vr = v + slot_of[k0 + t] * stride;
      if constexpr (std::is_same_v<T, float>) {
        w.vrow[t] = vr;
      } else {
        for (int64_t d = 0; d < dim; d += 16) {
          if constexpr (pairs) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + d));
            const __m256i b = t + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                              v + slot_of[k0 + t + 1] * stride + d))
                                        : _mm256_setzero_si256();
            _mm512_storeu_si512(w.vb.data() + t * dim + d * 2,
                                interleave_halves16(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)));
          } else {
            _mm512_storeu_ps(w.vt.data() + t * dim + d, load16(vr + d));
          }
        }
        w.vrow[t] = w.vt.data() + t * dim;
      }
    }
    by_row_vectors(vectors, [&](auto mv, int64_t v0) {
      constexpr int MV = decltype(mv)::value;
      for (int64_t t = 0; t < n8; t += 8) {
        if constexpr (pairs)
          prefill_scores<8, MV>(w.kbrow + t, w.qp.data() + v0 * 32, m, dim, sv, w.s.data() + t * m + v0 * 16);
        else
          prefill_scores<8, MV>(w.krow + t, w.qt.data() + v0 * 16, m, dim, sv, w.s.data() + t * m + v0 * 16);
      }
    });
    // Online softmax, 16 rows a vector. Token k0 + t is seen by lanes i with pos0 + i >= k0 + t.
    const bool diagonal = k0 + n - 1 > pos0;
    for (int64_t v = 0; v < vectors; ++v) {
      float* s = w.s.data() + v * 16;
      auto seen = [&](int64_t t) -> __mmask16 {
        const int64_t first = k0 + t - pos0;
        return !diagonal || first <= 0 ? __mmask16(0xFFFF) : first >= 16 ? __mmask16(0) : __mmask16(0xFFFF << first);
      };
      __m512 high = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < n; ++t) high = _mm512_mask_max_ps(high, seen(t), high, _mm512_loadu_ps(s + t * m));
      const __m512 old = _mm512_loadu_ps(w.top.data() + v * 16);
      const __m512 top = _mm512_max_ps(old, high);
      const __m512 alpha = fast_exp16(_mm512_sub_ps(old, top));
      __m512 total = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m512 p = _mm512_maskz_mov_ps(seen(t), fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t * m), top)));
        _mm512_storeu_ps(s + t * m, p);
        total = _mm512_add_ps(total, p);
      }
      if constexpr (pairs) {  // the weights rounded to bf16 in pairs of tokens, for vdpbf16ps
        for (int64_t t = 0; t < n; t += 2) {
          const __m512 a = _mm512_loadu_ps(s + t * m);
          const __m512 b = t + 1 < n ? _mm512_loadu_ps(s + (t + 1) * m) : _mm512_setzero_ps();
          _mm512_storeu_si512(w.pb.data() + (t * m + v * 32),
                              interleave_halves16((__m512i)_mm512_cvtne2ps_pbh(b, a)));
        }
      }
      _mm512_storeu_ps(w.top.data() + v * 16, top);
      _mm512_storeu_ps(w.alpha.data() + v * 16, alpha);
      _mm512_storeu_ps(w.sum.data() + v * 16,
                       _mm512_fmadd_ps(_mm512_loadu_ps(w.sum.data() + v * 16), alpha, total));
    }
    by_row_vectors(vectors, [&](auto mv, int64_t v0) {
      constexpr int MV = decltype(mv)::value;
      for (int64_t d = 0; d < dim; d += 8)
        if constexpr (pairs)
          prefill_weigh<8, MV>(w.vb.data(), d, n, dim, w.pb.data() + v0 * 32, w.alpha.data() + v0 * 16, m,
                               w.ot.data() + v0 * 16);
        else
          prefill_weigh<8, MV>(w.vrow, d, n, dim, w.s.data() + v0 * 16, w.alpha.data() + v0 * 16, m,
                               w.ot.data() + v0 * 16);
    });
  }
  // Normalised, rounded to T, and transposed back to the rows as Q^T came.
  for (int64_t j = 0; j < group; ++j) {
    const int64_t lane = j * kPrefillRows;
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(w.sum.data() + lane));
    auto row = [&](int64_t i, int64_t d) { return out + ((i0 + i) * heads + g * group + j) * dim + d; };
    if constexpr (pairs || std::is_same_v<T, float>) {
      for (int64_t c0 = 0; c0 < words; c0 += 16) {
        const int64_t count = std::min<int64_t>(16, words - c0);
        __m512 r[16];
        for (int64_t c = 0; c < 16; ++c) {
          if (c >= count) {
            r[c] = _mm512_setzero_ps();
          } else if constexpr (pairs) {  // dims 2c and 2c + 1 in one word
            const int64_t d = 2 * (c0 + c);
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(w.ot.data() + d * m + lane), inv);
            const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(w.ot.data() + (d + 1) * m + lane), inv);
            r[c] = _mm512_castsi512_ps(_mm512_or_si512(bf16_bits(x), _mm512_slli_epi32(bf16_bits(y), 16)));
          } else {
            r[c] = _mm512_mul_ps(_mm512_loadu_ps(w.ot.data() + (c0 + c) * m + lane), inv);
          }
        }
        transpose16(r);
        const __mmask16 part = static_cast<__mmask16>((1u << count) - 1);
        for (int64_t i = 0; i < n_rows; ++i)
          _mm512_mask_storeu_ps(reinterpret_cast<float*>(row(i, 0)) + c0, part, r[i]);
      }
    } else {
      for (int64_t d = 0; d < dim; ++d) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, _mm512_mul_ps(_mm512_loadu_ps(w.ot.data() + d * m + lane), inv));
        for (int64_t i = 0; i < n_rows; ++i) *row(i, d) = from_f<T>(lanes[i]);
      }
    }
  }
}
#endif

// prefill_attention's vector path: tasks (KV head, block of 16 rows), each costing the tokens its
// rows see (plus setup), cut into one contiguous share a thread: a thread's tasks mostly share a KV
// head, whose K and V stay in its L2. False for dtypes it does not cover.
template <typename T>
bool prefill_avx512(const T* q, const T* k, const T* v, int64_t stride, const int64_t* slot_of, int64_t rows,
                    int64_t C, int64_t heads, int64_t kv_heads, int64_t dim, float scale, T* out) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    const int64_t blocks = (rows + kPrefillRows - 1) / kPrefillRows, tasks = blocks * kv_heads;
    const int64_t group = heads / kv_heads;
    std::vector<int64_t> cost(tasks);
    for (int64_t i = 0; i < tasks; ++i)
      cost[i] = C - rows + std::min(rows, (i % blocks + 1) * kPrefillRows) + kPrefillTile;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
    const std::vector<int64_t> share = split_by_cost(cost, threads);
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      PrefillScratch w(kPrefillRows * group, dim);
      for (int64_t th = b; th < e; ++th)
        for (int64_t i = share[th]; i < share[th + 1]; ++i) {
          const int64_t g = i / blocks, blk = i % blocks;
          prefill_task_avx512<T>(q, k + g * dim, v + g * dim, stride, slot_of, rows, C, heads, group, dim, g,
                                 blk * kPrefillRows, scale, w, out);
        }
    });
    return true;
  }
#endif
  return false;
}

// One query row and head of prefill_attention for what the vector path does not cover (fp16, dims
// not a multiple of 16, builds without AVX-512): its scores over tokens 0 .. pos, softmax, the
// weighted sum of V. scores: scratch of pos + 1 floats.
template <typename T>
void prefill_row(const T* q, const T* k, const T* v, int64_t stride, const int64_t* slot_of, int64_t pos,
                 int64_t dim, float scale, float* scores, float* acc, T* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t <= pos; ++t) {
    scores[t] = dot<T, T>(q, k + slot_of[t] * stride, dim) * scale;
    top = std::max(top, scores[t]);
  }
  std::fill(acc, acc + dim, 0.f);
  float total = 0.f;
  for (int64_t t = 0; t <= pos; ++t) {
    const float p = fast_exp(scores[t] - top);
    total += p;
    const T* vt = v + slot_of[t] * stride;
    for (int64_t d = 0; d < dim; ++d) acc[d] += p * to_f<T>(vt[d]);
  }
  for (int64_t d = 0; d < dim; ++d) out[d] = from_f<T>(acc[d] / total);
}

// Whether prefill_attention runs vectorised for this dtype and head size (models/layers.py keeps
// PyTorch's SDPA for the rest: the fallback is scalar).
bool prefill_attention_vectorised(at::ScalarType dtype, int64_t dim) {
#ifdef __AVX512F__
  return (dtype == at::kFloat || dtype == at::kBFloat16) && dim % 16 == 0 && dim > 0;
#else
  return false;
#endif
}

// Causal attention of a prefill chunk over the paged KV cache: q [T, heads, dim] (normed and
// roped), k_pool, v_pool [num_slots, kv_heads, dim] holding the whole context's K/V (the chunk's
// own included), slots [C] the slot of each context token, C >= T. Query i is context position
// C - T + i and sees tokens 0 .. C - T + i; query head h reads KV head h / (heads / kv_heads).
// Returns [T, heads, dim] in q's dtype.
// Against F.scaled_dot_product_attention (is_causal, enable_gqa) on [1, heads, T, dim] as
// Attention._prefill calls it, per layer, T = C = 512, median of 20 interleaved runs (ms),
// 2 threads (1 thread) on the shared 2-core EPYC:
//   SmolLM2 (9/3 x 64)       fp32  5.28 -> 2.29 (9.15 -> 4.20)   bf16  5.35 -> 1.55 (10.8 -> 2.92)
//   Qwen2.5-0.5B (14/2 x 64) fp32  7.68 -> 3.27 (13.3 -> 6.07)   bf16  8.47 -> 2.28 (13.7 -> 3.76)
//   Qwen3 (16/8 x 128)       fp32  18.0 -> 7.95 (33.7 -> 15.4)   bf16  15.7 -> 4.26 (32.2 -> 8.52)
// (fp32: ~80 GFLOPS a core of causal work at best, over 80% of the FMA peak; the two products are
// ~80% of the time, the softmax and the tiles' set-up the rest.) A whole 512-token SmolLM2 prefill
// (engine.step, 2 threads, median of 6 interleaved): fp32 818 -> 719 ms, bf16 566 -> 450 ms.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                             const at::Tensor& slots, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.device().is_cpu(),
              "prefill_attention: q must be a contiguous [T, heads, head_dim] CPU tensor");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.device().is_cpu() && v_pool.device().is_cpu(),
              "prefill_attention: the KV pools must be contiguous CPU tensors [slots, kv_heads, head_dim] of one shape");
  TORCH_CHECK(k_pool.scalar_type() == q.scalar_type() && v_pool.scalar_type() == q.scalar_type(),
              "prefill_attention: q and the KV pools must have one dtype");
  TORCH_CHECK(k_pool.size(2) == q.size(2), "prefill_attention: q's head_dim is not the pools'");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_pool.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "prefill_attention: heads must be a multiple of kv_heads");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.device().is_cpu(),
              "prefill_attention: slots must be a contiguous int64 [context] CPU tensor");
  const int64_t C = slots.size(0), num_slots = k_pool.size(0);
  TORCH_CHECK(C >= rows, "prefill_attention: fewer slots (", C, ") than queries (", rows, ")");
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < C; ++t)
    TORCH_CHECK(slot_of[t] >= 0 && slot_of[t] < num_slots, "prefill_attention: slot ", slot_of[t], " of token ", t,
                " is outside the pool's ", num_slots, " slots");
  auto out = at::empty_like(q);
  if (rows == 0) return out;
  const int64_t group = heads / kv_heads, stride = kv_heads * dim;
  const float sc = static_cast<float>(scale);
  const bool vectorised = prefill_attention_vectorised(q.scalar_type(), dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention", [&] {
    using T = scalar_t;
    const T* qp = q.data_ptr<T>();
    const T* kp = k_pool.data_ptr<T>();
    const T* vp = v_pool.data_ptr<T>();
    T* op = out.data_ptr<T>();
    if (vectorised && prefill_avx512<T>(qp, kp, vp, stride, slot_of, rows, C, heads, kv_heads, dim, sc, op)) return;
    at::parallel_for(0, rows * heads, grain(C * dim * 2), [&](int64_t b, int64_t e) {
      std::vector<float> scores(C), acc(dim);
      for (int64_t x = b; x < e; ++x) {
        const int64_t r = x / heads, h = x % heads;
        prefill_row<T>(qp + x * dim, kp + h / group * dim, vp + h / group * dim, stride, slot_of, C - rows + r, dim,
                       sc, scores.data(), acc.data(), op + x * dim);
      }
    });
  });
  return out;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kHaveIntegerGemm = true;

// Activations quantized as llama.cpp quantizes them for its integer dot products: int8 in blocks
// of 32 with one fp32 scale each, and each block's sum (vpdpbusd multiplies unsigned by signed
// bytes: the weights are the unsigned side, int4 as 0..15 and int8 stored + 128, and the block
// sums take the offsets back out).
struct QuantizedRows {
  std::vector<int8_t> q;       // [rows, K]
  std::vector<float> scale;    // [rows, K / 32]
  std::vector<float> sum;      // [rows, K / 32] the block's sum of its quantized activations, scaled
  std::vector<int32_t> isum;   // [rows, K / 32] the same in integers
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t K) {
  const int64_t blocks = K / 32;
  QuantizedRows out{std::vector<int8_t>(rows * K), std::vector<float>(rows * blocks),
                    std::vector<float>(rows * blocks), std::vector<int32_t>(rows * blocks)};
  auto one = [&](int64_t r) {
    for (int64_t b = 0; b < blocks; ++b) {
      float v[32];
      for (int i = 0; i < 32; ++i) v[i] = to_f<T>(x[r * K + b * 32 + i]);
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qsum = 0;
      for (int i = 0; i < 32; ++i) {
        const int iq = static_cast<int>(std::nearbyint(v[i] * inv));
        out.q[r * K + b * 32 + i] = static_cast<int8_t>(iq);
        qsum += iq;
      }
      out.scale[r * blocks + b] = amax / 127.f;
      // The sum of the quantized activations, not of the exact ones: the product is then the
      // dequantized weights times the quantized activations, whose error follows the weights
      // (centred) rather than q * scale (all positive, cancelled by int4's mins): 1% against 0.4%.
      out.sum[r * blocks + b] = static_cast<float>(qsum) * (amax / 127.f);
      out.isum[r * blocks + b] = qsum;
    }
  };
  if (rows * K < 65536) {
    for (int64_t r = 0; r < rows; ++r) one(r);
  } else {  // a prefill's rows: worth the threads
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) one(r);
    });
  }
  return out;
}

// The activations x (any floating dtype; fp32 and bf16 read in place) in int8 blocks of 32.
QuantizedRows quantize_activations(const at::Tensor& x) {
  const at::Tensor xr = readable(x);
  return xr.scalar_type() == at::kBFloat16 ? quantize_rows(xr.data_ptr<c10::BFloat16>(), xr.size(0), xr.size(1))
                                           : quantize_rows(xr.data_ptr<float>(), xr.size(0), xr.size(1));
}

// Four int8 activations as one 32-bit pattern, broadcast to every lane.
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// What int8 and Q4_0-style int4 share per block of 32 inputs: the integer dot products start from
// -offset * sum(qx) (the weights are stored + offset as unsigned bytes: 128 for int8, 8 for int4),
// and end scaled by the weights' 16 fp16 block scales of each tile (at d + t * tile_stride) times the
// row's activation scale.
template <int R, int T>
inline void start_dots(__m512i (&dot)[R][T], const QuantizedRows& x, int64_t row0, int64_t blocks, int64_t b,
                       int32_t offset) {
  for (int r = 0; r < R; ++r) {
    const __m512i start = _mm512_set1_epi32(-offset * x.isum[(row0 + r) * blocks + b]);
    for (int t = 0; t < T; ++t) dot[r][t] = start;
  }
}

template <int R, int T>
inline void add_fp16_scaled(__m512 (&acc)[R][T], const __m512i (&dot)[R][T], const QuantizedRows& x, int64_t row0,
                            int64_t blocks, int64_t b, const uint16_t* d, int64_t tile_stride) {
  for (int t = 0; t < T; ++t) {
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + t * tile_stride)));
    for (int r = 0; r < R; ++r)
      acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]),
                                  _mm512_mul_ps(scale, _mm512_set1_ps(x.scale[(row0 + r) * blocks + b])), acc[r][t]);
  }
}

// int8 weights in int8_pack's layout: tiles of 16 outputs; per tile and 4 inputs, 64 bytes (each
// output's 4 weights side by side, stored + 128 as unsigned bytes), so one load is one vpdpbusd
// operand with the outputs in the lanes: no horizontal sums, and each thread streams its tiles in
// order. Per tile and block of 32 inputs, 16 fp16 scales (a Q8_0 block's own: w = q * d).
//   out[r, n] = sum over blocks b of d[n, b] * dx[r, b] * (sum (q + 128) qx - 128 * sum qx)
// R rows of x against T tiles at a time: R * T independent accumulators.
template <int R, int T, typename OutT>
inline void int8_gemm_tile(const QuantizedRows& x, int64_t row0, int64_t K, const uint8_t* packed,
                           const uint16_t* scales, const float* bias, OutT* out, int64_t N, int64_t tile) {
  const int64_t blocks = K / 32;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dot[R][T];
    start_dots(dot, x, row0, blocks, b, 128);
    for (int o = 0; o < 8; ++o) {
      __m512i xv[R];
      for (int r = 0; r < R; ++r) xv[r] = broadcast4(x.q.data() + (row0 + r) * K + b * 32 + o * 4);
      for (int t = 0; t < T; ++t) {
        const __m512i wv = _mm512_loadu_si512(packed + ((tile + t) * (K / 4) + b * 8 + o) * 64);
        for (int r = 0; r < R; ++r) dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], wv, xv[r]);
      }
    }
    add_fp16_scaled(acc, dot, x, row0, blocks, b, scales + (tile * blocks + b) * 16, blocks * 16);
  }
  store_sums(acc, bias, out, row0, N, tile);
}

// int4 weights in the native layout (int4_pack): tiles of 16 outputs; per tile and 8 inputs, 64
// bytes whose low nibbles are inputs 0-3 and high nibbles inputs 4-7 of the 16 outputs (4 bytes an
// output), so one load and two masks give two vpdpbusd operands with the outputs in the lanes:
// no horizontal sums. Per tile and group of 32 inputs, either 16 bf16 scales then 16 bf16 mins
// (kMins: w = q * scale + min, Q4_1 and --quantization int4), or 16 fp16 scales alone (Q4_0's
// own: w = d * (q - 8), a tenth less to read, and the - 8 in the integer dot product as int8's + 128):
//   kMins: out[r, n] = sum over groups g of scale[n, g] * dx[r, g] * (q[n, g] . qx[r, g]) + min[n, g] * xsum[r, g]
//   else:  out[r, n] = sum over groups g of d[n, g] * dx[r, g] * (q[n, g] . qx[r, g] - 8 * sum qx[r, g])
template <int R, int T, typename OutT, bool kMins>
inline void int4_gemm_tile(const QuantizedRows& x, int64_t row0, int64_t K, const uint8_t* packed,
                           const uint16_t* scales, const float* bias, OutT* out, int64_t N, int64_t tile) {
  const int64_t groups = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[R][T];
    start_dots(dot, x, row0, groups, g, kMins ? 0 : 8);
    for (int o = 0; o < 4; ++o) {
      __m512i xa[R], xb[R];  // inputs 0-3 and 4-7 of these 8
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = x.q.data() + (row0 + r) * K + g * 32 + o * 8;
        xa[r] = broadcast4(xq);
        xb[r] = broadcast4(xq + 4);
      }
      for (int t = 0; t < T; ++t) {
        const __m512i v = _mm512_loadu_si512(packed + (tile + t) * 16 * (K / 2) + (g * 4 + o) * 64);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], lo, xa[r]);
          dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], hi, xb[r]);
        }
      }
    }
    if constexpr (kMins) {
      for (int t = 0; t < T; ++t) {
        const c10::BFloat16* sm = reinterpret_cast<const c10::BFloat16*>(scales) + ((tile + t) * groups + g) * 32;
        const __m512 scale = load16(sm), mins = load16(sm + 16);
        for (int r = 0; r < R; ++r) {
          const int64_t xi = (row0 + r) * groups + g;
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]),
                                      _mm512_mul_ps(scale, _mm512_set1_ps(x.scale[xi])), acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(mins, _mm512_set1_ps(x.sum[xi]), acc[r][t]);
        }
      }
    } else {
      add_fp16_scaled(acc, dot, x, row0, groups, g, scales + (tile * groups + g) * 16, groups * 16);
    }
  }
  store_sums(acc, bias, out, row0, N, tile);
}

// The two tile kernels as integer_gemm takes them.
// Tiles at once (over_tiles), measured on 2 threads with weights from memory: one int4 row streams a
// single tile best (two vpdpbusd and two masks per load: 16-20 GB/s for a SmolLM2 step's matmuls,
// 14 with four tiles); int8 four (19 against 14-16 GB/s); many rows two tiles (int4 +12%).
struct Int8Tiles {
  static constexpr int kFew = 4, kMany = 2;
  template <int R, int T, typename OutT, typename... Args>
  static void run(Args&&... args) { int8_gemm_tile<R, T, OutT>(std::forward<Args>(args)...); }
};
template <bool kMins>
struct Int4Tiles {
  static constexpr int kFew = 1, kMany = 2;
  template <int R, int T, typename OutT, typename... Args>
  static void run(Args&&... args) { int4_gemm_tile<R, T, OutT, kMins>(std::forward<Args>(args)...); }
};
#else
constexpr bool kHaveIntegerGemm = false;
struct Int8Tiles { static constexpr int kFew = 1, kMany = 1; };
template <bool kMins>
struct Int4Tiles { static constexpr int kFew = 1, kMany = 1; };
#endif


#ifdef __AVX512F__
// What the bf16 and fp32 tiles share: two accumulators per row and tile, zeroed, the steps over the
// inputs alternating between them (hiding the FMA latency), and the two summed, plus the bias, stored.
template <typename Step>
inline void alternate_steps(int64_t steps, Step&& step) {
  int64_t i = 0;
  for (; i + 2 <= steps; i += 2) {
    step(i, 0);
    step(i + 1, 1);
  }
  if (i < steps) step(i, 0);
}

template <int R, int T>
inline void zero_tiles(__m512 (&acc)[R][T][2]) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
}

template <int R, int T, typename OutT>
inline void store_tiles(__m512 (&acc)[R][T][2], const float* bias, OutT* out, int64_t row0, int64_t N, int64_t tile) {
  __m512 sums[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) sums[r][t] = _mm512_add_ps(acc[r][t][0], acc[r][t][1]);
  store_sums(sums, bias, out, row0, N, tile);
}
#endif

#ifdef __AVX512F__
// Many rows pass over a float tile in groups of four (over_tiles), the first pass reading it from
// memory and the rest from L2. Each step of every pass asks for the same step's line of the next
// tile (into L2; a request the memory system drops is asked again in the next pass), so that tile's
// first pass finds it there too. 32 rows, 2 threads, GFLOPS: Qwen2.5-0.5B's gate_up fp32 135 -> 192,
// bf16 390 -> 439; its output head fp32 165 -> 181, bf16 306 -> 335; 8 rows of the gate_up in fp32
// 74 -> 165; 512 rows as before (fp32 ~215, bf16 ~440).
inline void prefetch_line(const void* line) { _mm_prefetch(static_cast<const char*>(line), _MM_HINT_T1); }
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
constexpr bool kHaveBf16Gemm = true;

// bf16 weights in float_pack's layout: tiles of 16 outputs; per tile and pair of inputs, 64 bytes
// (each output's two weights side by side), one vdpbf16ps operand with the outputs in the lanes.
// R rows of x and T tiles at a time, two accumulators each (even and odd pairs) to hide the latency.
template <int R, int T, typename OutT>
inline void bf16_gemm_tile(const uint16_t* x, int64_t row0, int64_t K, const uint16_t* packed, const float* bias,
                           OutT* out, int64_t N, int64_t tile) {
  // T tiles at once: R * T * 2 independent accumulators hide vdpbf16ps's latency even for one row.
  __m512 acc[R][T][2];
  zero_tiles(acc);
  const int64_t pairs = K / 2;
  auto step = [&](int64_t p, int u) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + (row0 + r) * K + p * 2, 4);
      xv[r] = (__m512bh)_mm512_set1_epi32(pair);
    }
    for (int t = 0; t < T; ++t) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(packed + ((tile + t) * pairs + p) * 32);
      for (int r = 0; r < R; ++r) acc[r][t][u] = _mm512_dpbf16_ps(acc[r][t][u], wv, xv[r]);
    }
    if constexpr (R >= 3) prefetch_line(packed + ((tile + T) * pairs + p) * 32);
  };
  alternate_steps(pairs, step);
  store_tiles<R, T, OutT>(acc, bias, out, row0, N, tile);
}
#else
constexpr bool kHaveBf16Gemm = false;
#endif


#ifdef __AVX512F__
// fp32 weights in float_pack's layout: tiles of 16 outputs, per tile and input 64 bytes (the 16
// outputs' weights), one FMA with the input broadcast. MKL multiplies one row on one thread at half
// the memory's speed; this streams the weights on every thread.
template <int R, int T, typename OutT>
inline void f32_gemm_tile(const float* x, int64_t row0, int64_t K, const float* packed, const float* bias,
                          OutT* out, int64_t N, int64_t tile) {
  __m512 acc[R][T][2];
  zero_tiles(acc);
  auto step = [&](int64_t k, int u) {
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_set1_ps(x[(row0 + r) * K + k]);
    for (int t = 0; t < T; ++t) {
      const __m512 wv = _mm512_loadu_ps(packed + ((tile + t) * K + k) * 16);
      for (int r = 0; r < R; ++r) acc[r][t][u] = _mm512_fmadd_ps(wv, xv[r], acc[r][t][u]);
    }
    if constexpr (R >= 3) prefetch_line(packed + ((tile + T) * K + k) * 16);
  };
  alternate_steps(K, step);
  store_tiles<R, T, OutT>(acc, bias, out, row0, N, tile);
}
#endif

// float_gemm for fp32 weights (any AVX-512 CPU) and bf16 ones (AVX-512 BF16).
bool float_kernels_available(at::ScalarType dtype) {
#ifdef __AVX512F__
  return dtype == at::kFloat || (dtype == at::kBFloat16 && kHaveBf16Gemm);
#else
  return false;
#endif
}

// int8_gemm and int4_gemm: built only where the compiler targets AVX-512 with VNNI.
bool integer_kernels_available() { return kHaveIntegerGemm; }

// What int8_gemm and int4_gemm share: x [rows, K] quantized to int8 blocks of 32, the bias in fp32,
// the output [rows, N] in out_dtype (default x's), every row against every tile of 16 outputs
// through Tiles::run<R, T, OutT>(x, row0, K, packed, scales, bias, out, N, tile).
template <typename Tiles>
at::Tensor integer_gemm(const at::Tensor& x, const uint8_t* packed, const uint16_t* scales, int64_t N,
                        const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(kHaveIntegerGemm, "the int8/int4 kernels are built only for CPUs with AVX-512 VNNI");
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "one bias per output");
  const at::ScalarType want = out_dtype.value_or(x.scalar_type());
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(direct_dtype(want)));
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const QuantizedRows q = quantize_activations(x);
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  const int64_t K = x.size(1);
  with_output_type(out, [&](auto* op) {
    using OutT = std::remove_pointer_t<decltype(op)>;
    at::parallel_for(0, N / 16, 4, [&](int64_t b, int64_t e) {
      over_tiles<Tiles::kFew, Tiles::kMany>(x.size(0), b, e, [&](auto r, auto t, int64_t row0, int64_t tile) {
        Tiles::template run<decltype(r)::value, decltype(t)::value, OutT>(q, row0, K, packed, scales, bp, op, N, tile);
      });
    });
  });
#endif
  return out.scalar_type() == want ? out : out.to(want);
}

// q [N, K] int8, scales [N, K / 32] (one per block of 32 inputs) -> (packed [N * K] uint8,
// scales [N / 16 * K / 32 * 16] fp16) in int8_gemm's layout (see int8_gemm_tile). N a multiple of
// 16, K of 32. A per-row scale is the same scale for each of the row's blocks.
std::vector<at::Tensor> int8_pack(const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.size(0) % 16 == 0 && q.size(1) % 32 == 0,
              "int8_pack: q must be int8 [N, K] with N a multiple of 16 and K of 32");
  const int64_t N = q.size(0), K = q.size(1), blocks = K / 32;
  TORCH_CHECK(scales.numel() == N * blocks, "int8_pack: one scale per block of 32");
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scales.to(at::kHalf).contiguous();
  at::Tensor packed = at::empty({N * K}, q.options().dtype(at::kByte));
  at::Tensor scale_out = at::empty({N * blocks}, q.options().dtype(at::kHalf));
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qc.data_ptr<int8_t>());
  uint8_t* pp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = sc.data_ptr<c10::Half>();
  c10::Half* so = scale_out.data_ptr<c10::Half>();
  at::parallel_for(0, N / 16, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t k = 0; k < K; ++k)  // + 128 as unsigned bytes: the top bit flipped
          pp[(t * (K / 4) + k / 4) * 64 + j * 4 + k % 4] = qp[(t * 16 + j) * K + k] ^ 0x80;
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int64_t j = 0; j < 16; ++j) so[(t * blocks + blk) * 16 + j] = sp[(t * 16 + j) * blocks + blk];
    }
  });
  return {packed, scale_out};
}

// x [rows, K] times int8 weights in int8_pack's layout, plus the bias (fp32, before the one
// rounding): out [rows, N] in out_dtype (default x's). The activations in int8 blocks of 32 (as
// llama.cpp's Q8_0 x Q8_0 product). One row of SmolLM2's output head (576 x 49152) on one thread:
// 14 GB/s, 12% faster than the row-major kernel it replaced; 280 GOPS a core for 32-512 rows.
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t N,
                     const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  check_rows(x, "int8_gemm");
  TORCH_CHECK(N % 16 == 0 && x.size(1) % 32 == 0 && packed.numel() == N * x.size(1) &&
                  scales.numel() == N * x.size(1) / 32 && packed.scalar_type() == at::kByte &&
                  scales.scalar_type() == at::kHalf,
              "int8_gemm: the packed weight does not match x");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::Half>());
  return integer_gemm<Int8Tiles>(x, pp, sp, N, bias, out_dtype);
}


// q [N, K] integers 0..15, scales [N, K / 32] and mins (or none) -> (packed [N * K / 2] uint8,
// scales in int4_gemm's layout (see above): with mins [N / 16 * K / 32 * 32] bf16, scale and min
// per group and output; without, [N / 16 * K / 32 * 16] fp16, w = scale * (q - 8)).
std::vector<at::Tensor> int4_pack(const at::Tensor& q, const at::Tensor& scales, const std::optional<at::Tensor>& mins) {
  TORCH_CHECK(q.dim() == 2 && q.size(0) % 16 == 0 && q.size(1) % 32 == 0,
              "int4_pack: q must be [N, K] with N a multiple of 16 and K of 32");
  const int64_t N = q.size(0), K = q.size(1), groups = K / 32;
  const at::Tensor qc = q.to(at::kByte).contiguous();
  const at::ScalarType scale_type = mins ? at::kBFloat16 : at::kHalf;
  const at::Tensor sc = scales.to(scale_type).contiguous();
  const at::Tensor mc = mins ? mins->to(scale_type).contiguous() : sc;
  TORCH_CHECK(sc.numel() == N * groups && mc.numel() == N * groups, "int4_pack: one scale (and min) per group of 32");
  const int64_t per_group = mins ? 32 : 16;
  at::Tensor packed = at::empty({N * K / 2}, q.options().dtype(at::kByte));
  at::Tensor packed_scales = at::empty({N / 16 * groups * per_group}, q.options().dtype(scale_type));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(mc.data_ptr());
  uint16_t* out = reinterpret_cast<uint16_t*>(packed_scales.data_ptr());
  for (int64_t t = 0; t < N / 16; ++t) {
    for (int64_t oct = 0; oct < K / 8; ++oct)
      for (int64_t j = 0; j < 64; ++j) {
        const int64_t n = t * 16 + j / 4, k = oct * 8 + j % 4;
        pp[(t * (K / 8) + oct) * 64 + j] = static_cast<uint8_t>((qp[n * K + k] & 15) | ((qp[n * K + k + 4] & 15) << 4));
      }
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t l = 0; l < 16; ++l) {
        out[(t * groups + g) * per_group + l] = sp[(t * 16 + l) * groups + g];
        if (mins) out[(t * groups + g) * per_group + 16 + l] = mp[(t * 16 + l) * groups + g];
      }
  }
  return {packed, packed_scales};
}

// x [rows, K] times int4 weights in int4_pack's layout: out [rows, N] in out_dtype (default x's).
// Activations in int8 blocks of 32 (llama.cpp's scheme for its Q4 x Q8 products), weights widened
// in registers, the outputs of a tile in the vector lanes. The scales' dtype tells the layout:
// bf16 scales and mins, or fp16 scales alone.
at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t N,
                     const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  check_rows(x, "int4_gemm");
  const bool with_mins = scales.scalar_type() == at::kBFloat16;
  TORCH_CHECK(with_mins || scales.scalar_type() == at::kHalf, "int4_gemm: scales are bf16 (with mins) or fp16");
  TORCH_CHECK(N % 16 == 0 && x.size(1) % 32 == 0 && packed.numel() == N * x.size(1) / 2 &&
                  scales.numel() == N / 16 * x.size(1) / (with_mins ? 1 : 2),
              "int4_gemm: the packed weight does not match x");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  return with_mins ? integer_gemm<Int4Tiles<true>>(x, pp, sp, N, bias, out_dtype)
                   : integer_gemm<Int4Tiles<false>>(x, pp, sp, N, bias, out_dtype);
}


// weight [N, K] -> float_gemm's layout for `dtype` (fp32 or bf16): [N / 16, K / g, 16, g], g inputs
// of an output side by side (g = 2 for bf16, the pair vdpbf16ps takes; 1 for fp32). N a multiple of
// 16, K of g. Converted in the same copy: the loader's peak stays the source plus the packed weight.
at::Tensor float_pack(const at::Tensor& weight, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float_pack: fp32 or bf16");
  const int64_t g = dtype == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 16 == 0 && weight.size(1) % g == 0,
              "float_pack: weight must be [N, K] with N a multiple of 16 (and K even for bf16)");
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor packed = at::empty({N / 16, K / g, 16, g}, weight.options().dtype(dtype));
  packed.copy_(weight.contiguous().view({N / 16, 16, K / g, g}).permute({0, 2, 1, 3}));
  return packed;
}

template <typename W, typename OutT, int R, int T>
inline void float_tile(const W* x, int64_t row0, int64_t K, const W* w, const float* bias, OutT* out, int64_t N,
                       int64_t tile) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<W, float>) {
    f32_gemm_tile<R, T, OutT>(x, row0, K, w, bias, out, N, tile);
  } else {
#if defined(__AVX512BF16__)
    bf16_gemm_tile<R, T, OutT>(x, row0, K, w, bias, out, N, tile);
#endif
  }
#endif
}

// x [rows, K] times fp32 or bf16 weights in float_pack's layout, plus the bias, summed in fp32
// (bf16 products by vdpbf16ps, as oneDNN's bf16 GEMM): out [rows, N] in out_dtype (default x's).
// Decode steps read the weights at memory speed (one row of a bf16 layer: 1.5-2.3x oneDNN's
// packed layout on 2 threads); 32 and 512 rows run at par with oneDNN.
at::Tensor float_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                      std::optional<at::ScalarType> out_dtype) {
  check_rows(x, "float_gemm");
  const at::ScalarType wt = packed.scalar_type();
  TORCH_CHECK(float_kernels_available(wt), "float_gemm: no kernel for these weights on this build");
  const int64_t rows = x.size(0), K = x.size(1);
  TORCH_CHECK(N % 16 == 0 && packed.numel() == N * K && packed.is_contiguous(),
              "float_gemm: the packed weight does not match x");
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "float_gemm: one bias per output");
  const at::ScalarType want = out_dtype.value_or(x.scalar_type());
  at::Tensor out = at::empty({rows, N}, x.options().dtype(direct_dtype(want)));
  const at::Tensor xw = x.scalar_type() == wt ? x : x.to(wt);  // the weights' dtype
  // The bias is added in fp32 before the one rounding, as F.linear does.
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  auto run = [&](auto* xp, auto* wp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    with_output_type(out, [&](auto* op) {
      using OutT = std::remove_pointer_t<decltype(op)>;
      at::parallel_for(0, N / 16, 4, [&](int64_t b, int64_t e) {
        // Four tiles at once for one or two rows; one for more (fp32 prefill: two, 20% slower).
        over_tiles<4, 1>(rows, b, e, [&](auto r, auto t, int64_t row0, int64_t tile) {
          float_tile<W, OutT, decltype(r)::value, decltype(t)::value>(xp, row0, K, wp, bp, op, N, tile);
        });
      });
    });
  };
  if (wt == at::kFloat) {
    run(xw.data_ptr<float>(), packed.data_ptr<float>());
  } else {
    run(reinterpret_cast<const uint16_t*>(xw.data_ptr<c10::BFloat16>()),
        reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>()));
  }
  return out.scalar_type() == want ? out : out.to(want);
}

}  // namespace

TORCH_LIBRARY(chatserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("integer_kernels_available() -> bool", &integer_kernels_available);
  m.def("int8_pack(Tensor q, Tensor scales) -> Tensor[]", &int8_pack);
  m.def("int8_gemm(Tensor x, Tensor packed, Tensor scales, int N, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
        &int8_gemm);
  m.def("int4_pack(Tensor q, Tensor scales, Tensor? mins=None) -> Tensor[]", &int4_pack);
  m.def("int4_gemm(Tensor x, Tensor packed, Tensor scales, int N, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
        &int4_gemm);
  m.def("float_kernels_available(ScalarType dtype) -> bool", &float_kernels_available);
  m.def("float_pack(Tensor weight, ScalarType dtype) -> Tensor", &float_pack);
  m.def("float_gemm(Tensor x, Tensor packed, int N, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
        &float_gemm);
  m.def("rope_kv_write(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor(a!) k_pool, Tensor(b!) v_pool, "
        "Tensor slots, Tensor? q_norm, Tensor? k_norm, float eps, int heads, int kv_heads) -> Tensor", &rope_kv_write);
  m.def("prefill_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, float scale) -> Tensor",
        &prefill_attention);
  m.def("prefill_attention_vectorised(ScalarType dtype, int head_dim) -> bool", &prefill_attention_vectorised);
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor(a!) k_pool, "
        "Tensor(b!) v_pool, Tensor slots, Tensor block_tables, Tensor context_lens, Tensor? q_norm, "
        "Tensor? k_norm, float eps, int heads, int kv_heads, int block_size, float scale) -> Tensor",
        &decode_attention);
}

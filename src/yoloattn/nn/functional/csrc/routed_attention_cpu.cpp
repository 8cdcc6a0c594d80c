// Routed (BRA) attention on the CPU: fp32 forward and backward, no attention matrix, no K/V copies.
//
// Built on first use by yoloattn/nn/functional/cpu_kernel.py (g++ -O3 -march=native) and called through
// ctypes with raw pointers; there is no Python or PyTorch header here.
//
// Tensors (each token's channels contiguous; where a token lives is given by a Layout, below):
//   q    (N, P, Lq, Cq)        Cq = heads * dk; head h owns channels [h*dk, (h+1)*dk)
//   kv   (N, P, Lkv, Cq + Cv)  keys in [0, Cq), values in [Cq, Cq + Cv), Cv = heads * dv
//   idx  (N, P, topk) int64    key windows routed to each query window
//   out  (N, P, Lq, Cv)
// A Layout maps (window w = b * P + p, token i) to the float offset win[w] + tok[i] of that token's first
// channel, so windows may be contiguous blocks or tiles of an (N, H, W, C) image read in place; it is built
// from 9 numbers per tensor (see Layout's constructor).
//   lse, delta (N, P, heads, Lq) contiguous: log2-sum-exp2 of the logits in log2 units (scale * log2(e) *
//                              q.k, so every exponential is an exp2); sum(dout * out) per head
//
// Vectorisation: LANES query tokens (forward, dq) or LANES key tokens (dk, dv) sit in one vector, and the
// other operand is broadcast, so every multiply-add is a full-width FMA whatever the head size. Each output
// element is written by one thread in a fixed order: the results do not depend on the thread count.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int LANES = 16;
constexpr int MAX_HEAD_DIM = 128;
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));
constexpr float LOG2E = 1.4426950408889634f;

inline vec splat(float x) { return vec{} + x; }

// 2^r for |r| <= 1/2: degree-5 minimax polynomial for the relative error (< 1.9e-7 evaluated in fp32,
// about 1.5 ulp; fitted for this file).
inline vec exp2_reduced(vec r) {
    vec p = splat(1.3264727214e-3f);
    p = p * r + 9.6715128125e-3f;
    p = p * r + 5.5507337448e-2f;
    p = p * r + 2.4022242083e-1f;
    p = p * r + 6.9314697760e-1f;
    return p * r + 1.0f;
}

// 2^x for a vector of finite x <= ~0 (logits minus their max or log-sum-exp, in log2 units):
// x = n + r with n = round(x), then 2^r * 2^n.
#if defined(__AVX512F__)
inline vec vexp2(vec x) {
    __m512 n = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // scalef computes p * 2^n with the exponent range handled: very negative n gives 0, not garbage
    return (vec)_mm512_scalef_ps((__m512)exp2_reduced(x - (vec)n), n);
}
#else
inline vec vexp2(vec x) {
    // n is written straight into the exponent bits, so clamp to the normal range; 2^-126 instead of 0
    // is far below float32's resolution next to the row maximum (2^0)
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    x = x < -126.0f ? splat(-126.0f) : x;
    vec z = x + kRound;
    vec p = exp2_reduced(x - (z - kRound));
    uvec bits;
    std::memcpy(&bits, &z, sizeof(bits));
    bits = (bits + 127u) << 23;  // the low bits of z hold n; (magic << 23) wraps to 0
    vec two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    return p * two_n;
}
#endif

struct Layout {
    std::vector<int64_t> win;  // (N * P,)
    std::vector<int64_t> tok;  // (tokens per window,)
    int64_t at(int64_t w, int64_t i) const { return win[w] + tok[i]; }

    // desc = (Py, Px, h, w, stride of n, py, px, y, x): window (b, py, px) and token (y, x) in a strided tensor
    Layout(int64_t n, const int64_t* desc) {
        const int64_t py = desc[0], px = desc[1], th = desc[2], tw = desc[3];
        for (int64_t b = 0; b < n; ++b)
            for (int64_t i = 0; i < py; ++i)
                for (int64_t j = 0; j < px; ++j) win.push_back(b * desc[4] + i * desc[5] + j * desc[6]);
        for (int64_t y = 0; y < th; ++y)
            for (int64_t x = 0; x < tw; ++x) tok.push_back(y * desc[7] + x * desc[8]);
    }
};

struct Shape {
    int64_t n, p, lq, lkv, topk, heads, dk, dv;
    float scale;
    int64_t cq() const { return heads * dk; }
};

// Runs body(item) for item in [0, count) on `threads` threads, handing items out one by one. With OpenMP
// this is the OpenMP runtime PyTorch already loaded (same libgomp.so.1), so PyTorch's idle worker threads
// take the items instead of new threads competing with them for the cores.
template <class Body>
void parallel_items(int64_t count, int threads, Body body) {
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < count; ++item) body(item);
#else
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) body(item);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
#endif
}

// Loads channels [col, col + d) of tokens i0 .. i0 + valid - 1 of window w as d vectors (lane = token);
// lanes past `valid` read as zero.
template <int D>
inline void load_lanes(vec* dst, int d_rt, const float* base, const Layout& lay, int64_t w, int64_t i0,
                       int64_t col, int valid) {
    const int d = D > 0 ? D : d_rt;
    for (int c = 0; c < d; ++c) dst[c] = vec{};
    for (int l = 0; l < valid; ++l) {
        const float* row = base + lay.at(w, i0 + l) + col;
        for (int c = 0; c < d; ++c) dst[c][l] = row[c];
    }
}

template <int D>
inline void store_lanes(float* base, const Layout& lay, int64_t w, int64_t i0, int64_t col, const vec* src,
                        int d_rt, int valid) {
    const int d = D > 0 ? D : d_rt;
    for (int l = 0; l < valid; ++l) {
        float* row = base + lay.at(w, i0 + l) + col;
        for (int c = 0; c < d; ++c) row[c] = src[c][l];
    }
}

// ---- forward -------------------------------------------------------------------------------------------
// NB blocks of LANES queries (tokens i0 .. i0 + NB * LANES - 1 of window `win`, head h) against all their
// routed keys. Two blocks at once share every key/value broadcast and give the core independent FMA chains.
template <int NB, int DK, int DV>
inline void forward_blocks(const Shape& s, const float* q, const Layout& ql, const float* kv, const Layout& kvl,
                           const int64_t* idx, float* out, const Layout& ol, float* lse, int64_t win, int64_t h,
                           int64_t i0, vec* logits) {
    const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
    const int64_t b = win / s.p, cq = s.cq();
    vec qv[NB][DK > 0 ? DK : MAX_HEAD_DIM], ov[NB][DV > 0 ? DV : MAX_HEAD_DIM], m[NB], sum[NB];
    int valid[NB];
    for (int k = 0; k < NB; ++k) {
        valid[k] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(LANES, s.lq - i0 - k * LANES)));
        load_lanes<DK>(qv[k], dk, q, ql, win, i0 + k * LANES, h * dk, valid[k]);
        for (int c = 0; c < dk; ++c) qv[k][c] *= s.scale * LOG2E;
        m[k] = splat(-INFINITY);
        sum[k] = vec{};
        for (int c = 0; c < dv; ++c) ov[k][c] = vec{};
    }
    // logits (log2 units) against every routed key, stored as logits[key * NB + block], and their max
    for (int64_t t = 0; t < s.topk; ++t) {
        const float* keys_t = kv + kvl.win[b * s.p + idx[win * s.topk + t]] + h * dk;
        vec* lg = logits + t * s.lkv * NB;
        for (int64_t j = 0; j < s.lkv; ++j) {
            const float* krow = keys_t + kvl.tok[j];
            vec acc[NB];
            for (int k = 0; k < NB; ++k) acc[k] = qv[k][0] * krow[0];
            for (int c = 1; c < dk; ++c)
                for (int k = 0; k < NB; ++k) acc[k] += qv[k][c] * krow[c];
            for (int k = 0; k < NB; ++k) {
                lg[j * NB + k] = acc[k];
                m[k] = acc[k] > m[k] ? acc[k] : m[k];
            }
        }
    }
    // exp, row sums and the weighted values in one sweep
    for (int64_t t = 0; t < s.topk; ++t) {
        const float* values_t = kv + kvl.win[b * s.p + idx[win * s.topk + t]] + cq + h * dv;
        const vec* lg = logits + t * s.lkv * NB;
        for (int64_t j = 0; j < s.lkv; ++j) {
            const float* vrow = values_t + kvl.tok[j];
            vec e[NB];
            for (int k = 0; k < NB; ++k) {
                e[k] = vexp2(lg[j * NB + k] - m[k]);
                sum[k] += e[k];
            }
            for (int c = 0; c < dv; ++c)
                for (int k = 0; k < NB; ++k) ov[k][c] += e[k] * vrow[c];
        }
    }
    for (int k = 0; k < NB; ++k) {
        vec inv = 1.0f / sum[k];
        for (int c = 0; c < dv; ++c) ov[k][c] *= inv;
        store_lanes<DV>(out, ol, win, i0 + k * LANES, h * dv, ov[k], dv, valid[k]);
        float* lse_row = lse + (win * s.heads + h) * s.lq + i0 + k * LANES;
        for (int l = 0; l < valid[k]; ++l) lse_row[l] = m[k][l] + std::log2(sum[k][l]);
    }
}

template <int DK, int DV>
void forward(const Shape& s, const float* q, const Layout& ql, const float* kv, const Layout& kvl,
             const int64_t* idx, float* out, const Layout& ol, float* lse, int threads) {
    parallel_items(s.n * s.p, threads, [&](int64_t win) {  // win = b * P + p
        std::vector<vec> logits(2 * s.topk * s.lkv);
        for (int64_t h = 0; h < s.heads; ++h) {
            int64_t i0 = 0;
            // pairs of blocks (measured 13% faster than single blocks; triples gained nothing more)
            for (; i0 + LANES < s.lq; i0 += 2 * LANES)
                forward_blocks<2, DK, DV>(s, q, ql, kv, kvl, idx, out, ol, lse, win, h, i0, logits.data());
            if (i0 < s.lq)  // one block left
                forward_blocks<1, DK, DV>(s, q, ql, kv, kvl, idx, out, ol, lse, win, h, i0, logits.data());
        }
    });
}

// ---- backward, dq: one query window per item, queries in lanes -----------------------------------------
template <int DK, int DV>
void backward_dq(const Shape& s, const float* q, const Layout& ql, const float* kv, const Layout& kvl,
                 const int64_t* idx, const float* dout, const Layout& gl, const float* lse, const float* delta,
                 float* dq, const Layout& dql, int threads) {
    const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
    const int64_t cq = s.cq();
    parallel_items(s.n * s.p, threads, [&](int64_t win) {
        const int64_t b = win / s.p;
        vec qv[DK > 0 ? DK : MAX_HEAD_DIM], dqv[DK > 0 ? DK : MAX_HEAD_DIM], gv[DV > 0 ? DV : MAX_HEAD_DIM];
        for (int64_t h = 0; h < s.heads; ++h) {
            for (int64_t i0 = 0; i0 < s.lq; i0 += LANES) {
                const int valid = static_cast<int>(std::min<int64_t>(LANES, s.lq - i0));
                load_lanes<DK>(qv, dk, q, ql, win, i0, h * dk, valid);
                load_lanes<DV>(gv, dv, dout, gl, win, i0, h * dv, valid);
                vec lse_v = vec{}, delta_v = vec{};
                const int64_t stat = (win * s.heads + h) * s.lq + i0;
                for (int l = 0; l < valid; ++l) lse_v[l] = lse[stat + l], delta_v[l] = delta[stat + l];
                for (int c = 0; c < dk; ++c) qv[c] *= s.scale * LOG2E, dqv[c] = vec{};
                for (int64_t t = 0; t < s.topk; ++t) {
                    const int64_t kwin = b * s.p + idx[win * s.topk + t];
                    const float* keys = kv + kvl.win[kwin] + h * dk;
                    const float* values = kv + kvl.win[kwin] + cq + h * dv;
                    for (int64_t j = 0; j < s.lkv; ++j) {
                        const float* krow = keys + kvl.tok[j];
                        const float* vrow = values + kvl.tok[j];
                        vec logit = qv[0] * krow[0];
                        for (int c = 1; c < dk; ++c) logit += qv[c] * krow[c];
                        vec prob = vexp2(logit - lse_v);
                        vec dprob = gv[0] * vrow[0];
                        for (int c = 1; c < dv; ++c) dprob += gv[c] * vrow[c];
                        vec dlogit = prob * (dprob - delta_v);
                        for (int c = 0; c < dk; ++c) dqv[c] += dlogit * krow[c];
                    }
                }
                for (int c = 0; c < dk; ++c) dqv[c] *= s.scale;
                store_lanes<DK>(dq, dql, win, i0, h * dk, dqv, dk, valid);
            }
        }
    });
}

// ---- backward, dk and dv: one key window per item, keys in lanes ---------------------------------------
// inv_start (N, P + 1) and inv_win (N, P * topk): the query windows that routed key window r of image b are
// inv_win[b, inv_start[b, r] : inv_start[b, r + 1]]. dkv has the channels of kv (keys, then values).
template <int DK, int DV>
void backward_dkv(const Shape& s, const float* q, const Layout& ql, const float* kv, const Layout& kvl,
                  const int64_t* inv_start, const int64_t* inv_win, const float* dout, const Layout& gl,
                  const float* lse, const float* delta, float* dkv, const Layout& dkvl, int threads) {
    const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
    const int64_t cq = s.cq();
    parallel_items(s.n * s.p, threads, [&](int64_t kwin) {  // kwin = b * P + r
        const int64_t b = kwin / s.p, r = kwin % s.p;
        vec kv_[DK > 0 ? DK : MAX_HEAD_DIM], vv[DV > 0 ? DV : MAX_HEAD_DIM];
        vec dkv_[DK > 0 ? DK : MAX_HEAD_DIM], dvv[DV > 0 ? DV : MAX_HEAD_DIM];
        const int64_t* starts = inv_start + b * (s.p + 1);
        for (int64_t h = 0; h < s.heads; ++h) {
            for (int64_t j0 = 0; j0 < s.lkv; j0 += LANES) {
                const int valid = static_cast<int>(std::min<int64_t>(LANES, s.lkv - j0));
                load_lanes<DK>(kv_, dk, kv, kvl, kwin, j0, h * dk, valid);
                load_lanes<DV>(vv, dv, kv, kvl, kwin, j0, cq + h * dv, valid);
                for (int c = 0; c < dk; ++c) kv_[c] *= s.scale * LOG2E, dkv_[c] = vec{};
                for (int c = 0; c < dv; ++c) dvv[c] = vec{};
                for (int64_t u = starts[r]; u < starts[r + 1]; ++u) {
                    const int64_t qwin = b * s.p + inv_win[b * s.p * s.topk + u];
                    const float* queries = q + ql.win[qwin] + h * dk;
                    const float* grads = dout + gl.win[qwin] + h * dv;
                    const float* lse_row = lse + (qwin * s.heads + h) * s.lq;
                    const float* delta_row = delta + (qwin * s.heads + h) * s.lq;
                    for (int64_t i = 0; i < s.lq; ++i) {
                        const float* qrow = queries + ql.tok[i];
                        const float* grow = grads + gl.tok[i];
                        vec logit = kv_[0] * qrow[0];
                        for (int c = 1; c < dk; ++c) logit += kv_[c] * qrow[c];
                        vec prob = vexp2(logit - lse_row[i]);
                        vec dprob = vv[0] * grow[0];
                        for (int c = 1; c < dv; ++c) dprob += vv[c] * grow[c];
                        vec dlogit = prob * (dprob - delta_row[i]);
                        for (int c = 0; c < dv; ++c) dvv[c] += prob * grow[c];
                        for (int c = 0; c < dk; ++c) dkv_[c] += dlogit * qrow[c];
                    }
                }
                for (int c = 0; c < dk; ++c) dkv_[c] *= s.scale;
                store_lanes<DK>(dkv, dkvl, kwin, j0, h * dk, dkv_, dk, valid);
                store_lanes<DV>(dkv, dkvl, kwin, j0, cq + h * dv, dvv, dv, valid);
            }
        }
    });
}

// Head sizes with a compiled specialisation (BRA in YOLO: 64..512 channels over 8 heads) get unrolled loops;
// others run the generic ones, up to MAX_HEAD_DIM. `run` is called with std::integral_constant<int, D>,
// D = 0 for the generic loops.
template <class Run>
int dispatch(int64_t dk, int64_t dv, Run run) {
    if (dk < 1 || dv < 1 || dk > MAX_HEAD_DIM || dv > MAX_HEAD_DIM) return 1;
    if (dk == dv && dk == 8) run(std::integral_constant<int, 8>{});
    else if (dk == dv && dk == 16) run(std::integral_constant<int, 16>{});
    else if (dk == dv && dk == 32) run(std::integral_constant<int, 32>{});
    else run(std::integral_constant<int, 0>{});
    return 0;
}

Shape make_shape(const int64_t* dims, float scale) {
    return Shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], scale};
}

// layouts: 9 numbers per tensor argument, in argument order
Layout layout(const Shape& s, const int64_t* layouts, int k) { return Layout(s.n, layouts + 9 * k); }

}  // namespace

extern "C" {

int yoloattn_abi_version() { return 3; }

// dims: n, p, lq, lkv, topk, heads, dk, dv.  layouts: of q, kv, out.  Returns 0, or 1 for
// unsupported head sizes.
int yoloattn_routed_forward(const int64_t* dims, const int64_t* layouts, float scale, const float* q,
                            const float* kv, const int64_t* idx, float* out, float* lse, int threads) {
    const Shape s = make_shape(dims, scale);
    const Layout ql = layout(s, layouts, 0), kvl = layout(s, layouts, 1), ol = layout(s, layouts, 2);
    return dispatch(s.dk, s.dv, [&](auto d) {
        forward<d.value, d.value>(s, q, ql, kv, kvl, idx, out, ol, lse, threads);
    });
}

// layouts: of q, kv, dout, dq.
int yoloattn_routed_backward_dq(const int64_t* dims, const int64_t* layouts, float scale, const float* q,
                                const float* kv, const int64_t* idx, const float* dout, const float* lse,
                                const float* delta, float* dq, int threads) {
    const Shape s = make_shape(dims, scale);
    const Layout ql = layout(s, layouts, 0), kvl = layout(s, layouts, 1), gl = layout(s, layouts, 2);
    const Layout dql = layout(s, layouts, 3);
    return dispatch(s.dk, s.dv, [&](auto d) {
        backward_dq<d.value, d.value>(s, q, ql, kv, kvl, idx, dout, gl, lse, delta, dq, dql, threads);
    });
}

// layouts: of q, kv, dout, dkv.  inv_*: see backward_dkv.
int yoloattn_routed_backward_dkv(const int64_t* dims, const int64_t* layouts, float scale,
                                 const float* q, const float* kv, const int64_t* inv_start,
                                 const int64_t* inv_win, const float* dout, const float* lse,
                                 const float* delta, float* dkv, int threads) {
    const Shape s = make_shape(dims, scale);
    const Layout ql = layout(s, layouts, 0), kvl = layout(s, layouts, 1), gl = layout(s, layouts, 2);
    const Layout dkvl = layout(s, layouts, 3);
    return dispatch(s.dk, s.dv, [&](auto d) {
        backward_dkv<d.value, d.value>(s, q, ql, kv, kvl, inv_start, inv_win, dout, gl, lse, delta, dkv, dkvl,
                                       threads);
    });
}

}  // extern "C"

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
// Query region: only query tokens at rows < rows_valid and columns < cols_valid of q's tile grid (Py * h by
// Px * w) are computed (BRA crops its zero padding away, so the padded queries' outputs are never used and
// they receive no gradient). dq is zero at the other tokens; out is too, unless its Layout is a cropped image
// that has no such tokens (zero_outside = 0).
//
// Vectorisation: LANES query tokens (forward, dq) or LANES key tokens (dk, dv) sit in one vector, and the
// other operand is broadcast, so every multiply-add is a full-width FMA whatever the head size. Each output
// element is written by one thread in a fixed order: the results do not depend on the thread count.
//
// Per 16 query-key pairs and head size 8 the forward issues about 25 vector operations (8 + 8 FMAs, a
// 7-operation exp2, a sum), which this loop structure runs at about 1.2 per cycle on a Sapphire Rapids core:
// short dependency chains matter more than operation counts (a fused one-pass loop that waited on each
// exp2 was slower than storing a window's logits first).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
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

// 2^x for a vector of finite x. Callers keep |x| <= 64 or x <= 0 (logits minus their max or log-sum-exp,
// in log2 units), so the result is a normal number or, far below the largest term, zero.
#if defined(__AVX512F__)
// x = floor(x) + r with r in [0, 1): vreduceps gives r exactly in one instruction, vscalefps multiplies by
// 2^floor(x) with the exponent range handled (very negative x gives 0, not garbage). Degree-5 polynomial
// for 2^r on [0, 1), fitted here for the relative error (< 1.5e-7 evaluated with FMAs in fp32).
inline vec vexp2(vec x) {
    const vec r = (vec)_mm512_reduce_ps((__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    vec p = splat(1.8775766948e-3f);
    p = p * r + 8.9893406257e-3f;
    p = p * r + 5.5826317519e-2f;
    p = p * r + 2.4015361071e-1f;
    p = p * r + 6.9315308332e-1f;
    p = p * r + 9.9999994040e-1f;
    return (vec)_mm512_scalef_ps((__m512)p, (__m512)x);
}
#else
// 2^r for |r| <= 1/2: degree-5 minimax polynomial for the relative error (< 1.9e-7 evaluated in fp32).
inline vec exp2_reduced(vec r) {
    vec p = splat(1.3264727214e-3f);
    p = p * r + 9.6715128125e-3f;
    p = p * r + 5.5507337448e-2f;
    p = p * r + 2.4022242083e-1f;
    p = p * r + 6.9314697760e-1f;
    return p * r + 1.0f;
}

// x = n + r with n = round(x), then 2^r * 2^n with n written straight into the exponent bits.
inline vec vexp2(vec x) {
    // clamp to the normal range; 2^-126 instead of 0 is far below float32's resolution next to the largest
    // term (>= 2^-64)
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
    int64_t py = 0, px = 0, th = 0, tw = 0;
    int64_t at(int64_t w, int64_t i) const { return win[w] + tok[i]; }

    // desc = (Py, Px, h, w, stride of n, py, px, y, x): window (b, py, px) and token (y, x) in a strided tensor
    Layout(int64_t n, const int64_t* desc) : py(desc[0]), px(desc[1]), th(desc[2]), tw(desc[3]) {
        for (int64_t b = 0; b < n; ++b)
            for (int64_t i = 0; i < py; ++i)
                for (int64_t j = 0; j < px; ++j) win.push_back(b * desc[4] + i * desc[5] + j * desc[6]);
        for (int64_t y = 0; y < th; ++y)
            for (int64_t x = 0; x < tw; ++x) tok.push_back(y * desc[7] + x * desc[8]);
    }
};

// The query tokens of each window that lie inside the query region, as token indices in window order. A
// window cut by the region's bottom or right edge has a shorter list; there are at most four distinct lists.
struct QueryTokens {
    std::vector<std::vector<int32_t>> lists;
    std::vector<int32_t> which;  // (N * P,) index into lists

    QueryTokens(const Layout& ql, int64_t n, int64_t rows_valid, int64_t cols_valid) {
        std::vector<std::pair<int64_t, int64_t>> sizes;
        for (int64_t b = 0; b < n; ++b)
            for (int64_t i = 0; i < ql.py; ++i)
                for (int64_t j = 0; j < ql.px; ++j) {
                    const int64_t vy = std::clamp<int64_t>(rows_valid - i * ql.th, 0, ql.th);
                    const int64_t vx = std::clamp<int64_t>(cols_valid - j * ql.tw, 0, ql.tw);
                    const auto key = std::make_pair(vy, vx);
                    auto found = std::find(sizes.begin(), sizes.end(), key);
                    if (found == sizes.end()) {
                        std::vector<int32_t> list;
                        for (int64_t y = 0; y < vy; ++y)
                            for (int64_t x = 0; x < vx; ++x) list.push_back(static_cast<int32_t>(y * ql.tw + x));
                        lists.push_back(std::move(list));
                        found = sizes.insert(sizes.end(), key);
                    }
                    which.push_back(static_cast<int32_t>(found - sizes.begin()));
                }
    }
    const int32_t* list(int64_t w) const { return lists[which[w]].data(); }
    int64_t count(int64_t w) const { return static_cast<int64_t>(lists[which[w]].size()); }

    // zeroes channels [0, channels) of window w's tokens outside the region (lists are ascending)
    void zero_outside(float* base, const Layout& lay, int64_t w, int64_t channels) const {
        const std::vector<int32_t>& inside = lists[which[w]];
        size_t next = 0;
        for (int64_t i = 0; i < static_cast<int64_t>(lay.tok.size()); ++i) {
            if (next < inside.size() && inside[next] == i) { ++next; continue; }
            std::memset(base + lay.at(w, i), 0, channels * sizeof(float));
        }
    }
};

struct Shape {
    int64_t n, p, lq, lkv, topk, heads, dk, dv, rows_valid, cols_valid, zero_outside;
    float scale;
    int64_t cq() const { return heads * dk; }
};

// Results below float32's normal range become zero while it lives (MXCSR flush-to-zero, restored after):
// exponentials of very negative logits would otherwise be subnormal, and every operation on or producing a
// subnormal takes a microcode assist, 10x slower; such terms are below 2^-126 next to a row's largest one.
struct FlushToZero {
#if defined(__SSE__)
    unsigned saved = _mm_getcsr();
    FlushToZero() { _mm_setcsr(saved | _MM_FLUSH_ZERO_ON); }
    ~FlushToZero() { _mm_setcsr(saved); }
#endif
};

// Runs body(item) for item in [0, count) on `threads` threads, handing items out one by one. With OpenMP
// this is the OpenMP runtime PyTorch already loaded (same libgomp.so.1), so PyTorch's idle worker threads
// take the items instead of new threads competing with them for the cores.
template <class Body>
void parallel_items(int64_t count, int threads, Body body) {
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
        FlushToZero ftz;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < count; ++item) body(item);
    }
#else
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        FlushToZero ftz;
        for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) body(item);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
#endif
}

// Loads channels [col, col + d) of tokens toks[i0 .. i0 + valid - 1] of window w as d vectors (lane = token);
// lanes past `valid` read as zero.
template <int D>
inline void load_lanes(vec* dst, int d_rt, const float* base, const Layout& lay, int64_t w, const int32_t* toks,
                       int64_t i0, int64_t col, int valid) {
    const int d = D > 0 ? D : d_rt;
    for (int c = 0; c < d; ++c) dst[c] = vec{};
    for (int l = 0; l < valid; ++l) {
        const float* row = base + lay.at(w, toks[i0 + l]) + col;
        for (int c = 0; c < d; ++c) dst[c][l] = row[c];
    }
}

template <int D>
inline void store_lanes(float* base, const Layout& lay, int64_t w, const int32_t* toks, int64_t i0, int64_t col,
                        const vec* src, int d_rt, int valid) {
    const int d = D > 0 ? D : d_rt;
    for (int l = 0; l < valid; ++l) {
        float* row = base + lay.at(w, toks[i0 + l]) + col;
        for (int c = 0; c < d; ++c) row[c] = src[c][l];
    }
}

// Gathers per-token statistics (lse, delta: (.., Lq) rows in token order) of toks[i0 ..] into lanes.
inline vec load_stats(const float* row, const int32_t* toks, int64_t i0, int valid) {
    vec v = vec{};
    for (int l = 0; l < valid; ++l) v[l] = row[toks[i0 + l]];
    return v;
}

inline float lane_max(vec v) {
    float m = v[0];
    for (int l = 1; l < LANES; ++l) m = std::max(m, v[l]);
    return m;
}

// ---- forward -------------------------------------------------------------------------------------------
// Logits in log2 units whose magnitude is at most this are exponentiated as they are (2^-64 .. 2^64: no
// overflow, no underflow), so softmax needs no max subtraction and the forward is one pass over the keys.
constexpr float DIRECT_LOGIT_BOUND = 64.0f;

template <int D>
constexpr int head_capacity() { return D > 0 ? D : MAX_HEAD_DIM; }

// Logits (log2 units) of NB query blocks against the lkv keys of one window (keys: that window's first key
// row, head offset included): lg[j * NB + block]; with MAX, m[block] also becomes their running max.
template <int NB, int DK, bool MAX>
inline void window_logits(const vec (&qv)[NB][head_capacity<DK>()], int dk_rt, const float* keys, const Layout& kvl,
                          int64_t lkv, vec* lg, vec* m) {
    const int dk = DK > 0 ? DK : dk_rt;
    for (int64_t j = 0; j < lkv; ++j) {
        const float* krow = keys + kvl.tok[j];
        vec acc[NB];
        for (int k = 0; k < NB; ++k) acc[k] = qv[k][0] * krow[0];
        for (int c = 1; c < dk; ++c)
            for (int k = 0; k < NB; ++k) acc[k] += qv[k][c] * krow[c];
        for (int k = 0; k < NB; ++k) {
            lg[j * NB + k] = acc[k];
            if (MAX) m[k] = acc[k] > m[k] ? acc[k] : m[k];
        }
    }
}

// e = 2^(logit - m) (SHIFT) or 2^logit for the lkv keys of one window: sum += e, ov += e * values.
template <int NB, int DV, bool SHIFT>
inline void window_values(int dv_rt, const float* values, const Layout& kvl, int64_t lkv, const vec* lg,
                          const vec* m, vec* sum, vec (&ov)[NB][head_capacity<DV>()]) {
    const int dv = DV > 0 ? DV : dv_rt;
    for (int64_t j = 0; j < lkv; ++j) {
        const float* vrow = values + kvl.tok[j];
        vec e[NB];
        for (int k = 0; k < NB; ++k) {
            e[k] = vexp2(SHIFT ? lg[j * NB + k] - m[k] : lg[j * NB + k]);
            sum[k] += e[k];
        }
        for (int c = 0; c < dv; ++c)
            for (int k = 0; k < NB; ++k) ov[k][c] += e[k] * vrow[c];
    }
}

// NB blocks of LANES query tokens (toks[i0 .. i0 + NB * LANES - 1] of window `win`, head h) against all
// their routed keys.
//
// If |q| * max|k| over the routed windows bounds every logit by DIRECT_LOGIT_BOUND (Cauchy-Schwarz; the
// usual case), each key is visited once: logit, exp2, row sum and weighted values together. Otherwise the
// logits are stored with their max first and exponentiated in a second sweep. Blocks share every key/value
// broadcast and give the core independent FMA chains.
template <int NB, int DK, int DV>
inline void forward_blocks(const Shape& s, const float* q, const Layout& ql, const float* kv, const Layout& kvl,
                           const int64_t* idx, const float* key_norm, float* out, const Layout& ol, float* lse,
                           int64_t win, const int32_t* toks, int64_t count, int64_t h, int64_t i0, vec* logits) {
    const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
    const int64_t b = win / s.p, cq = s.cq();
    const int64_t* routed = idx + win * s.topk;
    vec qv[NB][head_capacity<DK>()], ov[NB][head_capacity<DV>()], sum[NB];
    int valid[NB];
    float q_norm2 = 0.0f, k_norm = 0.0f;
    for (int k = 0; k < NB; ++k) {
        valid[k] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(LANES, count - i0 - k * LANES)));
        load_lanes<DK>(qv[k], dk, q, ql, win, toks, i0 + k * LANES, h * dk, valid[k]);
        vec norm2 = vec{};
        for (int c = 0; c < dk; ++c) qv[k][c] *= s.scale * LOG2E, norm2 += qv[k][c] * qv[k][c];
        q_norm2 = std::max(q_norm2, lane_max(norm2));
        sum[k] = vec{};
        for (int c = 0; c < dv; ++c) ov[k][c] = vec{};
    }
    for (int64_t t = 0; t < s.topk; ++t) k_norm = std::max(k_norm, key_norm[(b * s.p + routed[t]) * s.heads + h]);
    const bool direct = std::sqrt(q_norm2) * k_norm <= DIRECT_LOGIT_BOUND;

    vec m[NB];
    if (direct) {
        // per routed window: its logits into the buffer (L1-sized), then exp2, sums and values
        for (int k = 0; k < NB; ++k) m[k] = vec{};
        for (int64_t t = 0; t < s.topk; ++t) {
            const float* row_t = kv + kvl.win[b * s.p + routed[t]];
            window_logits<NB, DK, false>(qv, dk, row_t + h * dk, kvl, s.lkv, logits, m);
            window_values<NB, DV, false>(dv, row_t + cq + h * dv, kvl, s.lkv, logits, m, sum, ov);
        }
    } else {
        // logits (log2 units) against every routed key, stored as logits[key * NB + block], and their max
        for (int k = 0; k < NB; ++k) m[k] = splat(-INFINITY);
        for (int64_t t = 0; t < s.topk; ++t)
            window_logits<NB, DK, true>(qv, dk, kv + kvl.win[b * s.p + routed[t]] + h * dk, kvl, s.lkv,
                                        logits + t * s.lkv * NB, m);
        for (int64_t t = 0; t < s.topk; ++t)
            window_values<NB, DV, true>(dv, kv + kvl.win[b * s.p + routed[t]] + cq + h * dv, kvl, s.lkv,
                                        logits + t * s.lkv * NB, m, sum, ov);
    }
    for (int k = 0; k < NB; ++k) {
        vec inv = 1.0f / sum[k];
        for (int c = 0; c < dv; ++c) ov[k][c] *= inv;
        store_lanes<DV>(out, ol, win, toks, i0 + k * LANES, h * dv, ov[k], dv, valid[k]);
        if (lse == nullptr) continue;
        float* lse_row = lse + (win * s.heads + h) * s.lq;
        for (int l = 0; l < valid[k]; ++l) lse_row[toks[i0 + k * LANES + l]] = m[k][l] + std::log2(sum[k][l]);
    }
}

// lse may be null (inference: nothing to save for a backward).
template <int DK, int DV>
void forward(const Shape& s, const float* q, const Layout& ql, const float* kv, const Layout& kvl,
             const int64_t* idx, float* out, const Layout& ol, float* lse, int threads) {
    const QueryTokens region(ql, s.n, s.rows_valid, s.cols_valid);
    // max |k| * scale * log2(e) per (key window, head): bounds the logits together with |q|
    std::vector<float> key_norm(s.n * s.p * s.heads);
    parallel_items(s.n * s.p, threads, [&](int64_t kwin) {
        for (int64_t h = 0; h < s.heads; ++h) {
            float largest = 0.0f;
            for (int64_t j = 0; j < s.lkv; ++j) {
                const float* krow = kv + kvl.at(kwin, j) + h * s.dk;
                float norm2 = 0.0f;
                for (int64_t c = 0; c < s.dk; ++c) norm2 += krow[c] * krow[c];
                largest = std::max(largest, norm2);
            }
            key_norm[kwin * s.heads + h] = std::sqrt(largest);
        }
    });
    parallel_items(s.n * s.p, threads, [&](int64_t win) {  // win = b * P + p
        const int32_t* toks = region.list(win);
        const int64_t count = region.count(win);
        if (count < s.lq && s.zero_outside) region.zero_outside(out, ol, win, s.heads * s.dv);
        std::vector<vec> logits(2 * s.topk * s.lkv);
        for (int64_t h = 0; h < s.heads; ++h) {
            int64_t i0 = 0;
            // pairs of blocks (measured 13% faster than single blocks; triples gained nothing more)
            for (; i0 + LANES < count; i0 += 2 * LANES)
                forward_blocks<2, DK, DV>(s, q, ql, kv, kvl, idx, key_norm.data(), out, ol, lse, win, toks, count,
                                          h, i0, logits.data());
            if (i0 < count)  // one block left
                forward_blocks<1, DK, DV>(s, q, ql, kv, kvl, idx, key_norm.data(), out, ol, lse, win, toks, count,
                                          h, i0, logits.data());
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
    const QueryTokens region(ql, s.n, s.rows_valid, s.cols_valid);
    parallel_items(s.n * s.p, threads, [&](int64_t win) {
        const int64_t b = win / s.p;
        const int32_t* toks = region.list(win);
        const int64_t count = region.count(win);
        if (count < s.lq) region.zero_outside(dq, dql, win, cq);
        vec qv[DK > 0 ? DK : MAX_HEAD_DIM], dqv[DK > 0 ? DK : MAX_HEAD_DIM], gv[DV > 0 ? DV : MAX_HEAD_DIM];
        for (int64_t h = 0; h < s.heads; ++h) {
            const int64_t stats = (win * s.heads + h) * s.lq;
            for (int64_t i0 = 0; i0 < count; i0 += LANES) {
                const int valid = static_cast<int>(std::min<int64_t>(LANES, count - i0));
                load_lanes<DK>(qv, dk, q, ql, win, toks, i0, h * dk, valid);
                load_lanes<DV>(gv, dv, dout, gl, win, toks, i0, h * dv, valid);
                const vec lse_v = load_stats(lse + stats, toks, i0, valid);
                const vec delta_v = load_stats(delta + stats, toks, i0, valid);
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
                store_lanes<DK>(dq, dql, win, toks, i0, h * dk, dqv, dk, valid);
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
    const QueryTokens region(ql, s.n, s.rows_valid, s.cols_valid);
    std::vector<int32_t> all_keys(s.lkv);
    for (int64_t j = 0; j < s.lkv; ++j) all_keys[j] = static_cast<int32_t>(j);
    parallel_items(s.n * s.p, threads, [&](int64_t kwin) {  // kwin = b * P + r
        const int64_t b = kwin / s.p, r = kwin % s.p;
        vec kv_[DK > 0 ? DK : MAX_HEAD_DIM], vv[DV > 0 ? DV : MAX_HEAD_DIM];
        vec dkv_[DK > 0 ? DK : MAX_HEAD_DIM], dvv[DV > 0 ? DV : MAX_HEAD_DIM];
        const int64_t* starts = inv_start + b * (s.p + 1);
        for (int64_t h = 0; h < s.heads; ++h) {
            for (int64_t j0 = 0; j0 < s.lkv; j0 += LANES) {
                const int valid = static_cast<int>(std::min<int64_t>(LANES, s.lkv - j0));
                load_lanes<DK>(kv_, dk, kv, kvl, kwin, all_keys.data(), j0, h * dk, valid);
                load_lanes<DV>(vv, dv, kv, kvl, kwin, all_keys.data(), j0, cq + h * dv, valid);
                for (int c = 0; c < dk; ++c) kv_[c] *= s.scale * LOG2E, dkv_[c] = vec{};
                for (int c = 0; c < dv; ++c) dvv[c] = vec{};
                for (int64_t u = starts[r]; u < starts[r + 1]; ++u) {
                    const int64_t qwin = b * s.p + inv_win[b * s.p * s.topk + u];
                    const int32_t* toks = region.list(qwin);
                    const int64_t count = region.count(qwin);
                    const float* queries = q + ql.win[qwin] + h * dk;
                    const float* grads = dout + gl.win[qwin] + h * dv;
                    const float* lse_row = lse + (qwin * s.heads + h) * s.lq;
                    const float* delta_row = delta + (qwin * s.heads + h) * s.lq;
                    for (int64_t i = 0; i < count; ++i) {
                        const int32_t token = toks[i];
                        const float* qrow = queries + ql.tok[token];
                        const float* grow = grads + gl.tok[token];
                        vec logit = kv_[0] * qrow[0];
                        for (int c = 1; c < dk; ++c) logit += kv_[c] * qrow[c];
                        vec prob = vexp2(logit - lse_row[token]);
                        vec dprob = vv[0] * grow[0];
                        for (int c = 1; c < dv; ++c) dprob += vv[c] * grow[c];
                        vec dlogit = prob * (dprob - delta_row[token]);
                        for (int c = 0; c < dv; ++c) dvv[c] += prob * grow[c];
                        for (int c = 0; c < dk; ++c) dkv_[c] += dlogit * qrow[c];
                    }
                }
                for (int c = 0; c < dk; ++c) dkv_[c] *= s.scale;
                store_lanes<DK>(dkv, dkvl, kwin, all_keys.data(), j0, h * dk, dkv_, dk, valid);
                store_lanes<DV>(dkv, dkvl, kwin, all_keys.data(), j0, cq + h * dv, dvv, dv, valid);
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

// dims: n, p, lq, lkv, topk, heads, dk, dv, rows_valid, cols_valid, zero_outside
Shape make_shape(const int64_t* dims, float scale) {
    return Shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8], dims[9], dims[10],
                 scale};
}

// layouts: 9 numbers per tensor argument, in argument order
Layout layout(const Shape& s, const int64_t* layouts, int k) { return Layout(s.n, layouts + 9 * k); }

}  // namespace

extern "C" {

int yoloattn_abi_version() { return 4; }

// dims: n, p, lq, lkv, topk, heads, dk, dv, rows_valid, cols_valid, zero_outside.  layouts: of q, kv, out.
// lse may be null.  Returns 0, or 1 for unsupported head sizes.
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

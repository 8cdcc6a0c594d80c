// Routed (BRA) attention on the CPU: fp32 forward and backward, no attention matrix, no gathered K/V tensors
// (the forward copies one head's routed keys and values at a time into a per-thread buffer, see RoutedHead).
//
// Built on first use by yoloattn/nn/functional/routed_attention_cpu.py with the system C++ compiler and
// loaded with ctypes; there is no Python or PyTorch header here. That file passes YOLOATTN_ABI and
// YOLOATTN_MAX_HEAD_DIM on the command line (they are defined there only), and checks at load time that the
// library reports the same ABI and the same size of RoutedArgs.
//
// Tensors (each token's channels contiguous; where a token lives is given by its Tiles descriptor):
//   q    (N, P, Lq, Cq)        Cq = heads * dk; head h owns channels [h*dk, (h+1)*dk)
//   kv   (N, P, Lkv, Cq + Cv)  keys in [0, Cq), values in [Cq, Cq + Cv), Cv = heads * dv
//   idx  (N, P, topk) int64    key windows routed to each query window, contiguous
//   out  (N, P, Lq, Cv)        and dout, dq, dkv with the channels of out, out, q, kv
//   lse  (N, P, heads, Lq)     contiguous: log2-sum-exp2 of the logits in log2 units (scale * log2(e) * q.k,
//                              so every exponential is an exp2)
// P = Py * Px windows of Lq = th * tw tokens: window (b, i, j), token (y, x) starts at float offset
// b * s_n + i * s_py + j * s_px + y * s_y + x * s_x, so windows may be contiguous blocks or tiles of an
// (N, H, W, C) image read in place.
// Query region: only query tokens at rows < rows_valid and columns < cols_valid of q's tile grid (Py * th by
// Px * tw) are computed (BRA crops its zero padding away, so the padded queries' outputs are never used and
// they receive no gradient). dq is zero at the other tokens; out is too, unless zero_outside = 0 (its tiles
// then describe a cropped image that has no such tokens).
//
// Vectorisation: LANES query tokens (forward) or LANES key tokens (backward) sit in one vector, and the
// other operand is broadcast, so every multiply-add is a full-width FMA whatever the head size; the backward
// computes each logit and exponential once and sums dq from its logit gradients, keys in lanes, turned into
// queries-in-lanes vectors by in-register transposes. LANES is the
// float count of the widest vector register of the target (16 with AVX-512, 8 with AVX2, 4 with SSE2 or
// NEON). Inner loops keep at most half the vector registers of operands and accumulators (see CHUNK), so
// they do not spill; small heads on 32-register CPUs take a fused backward instead (fused_backward_fits).
// Without AVX-512's broadcast memory operand, the phased backward splats its broadcast operands into vectors
// once and reuses them (BROADCAST_OPERANDS).
// Backward work items are (window, head) pairs, one image at a time. Each output element is written by one
// thread in a fixed order: the results do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#ifndef YOLOATTN_ABI
#error "build with -DYOLOATTN_ABI=<n> (routed_attention_cpu.py passes it)"
#endif
#ifndef YOLOATTN_MAX_HEAD_DIM
#error "build with -DYOLOATTN_MAX_HEAD_DIM=<n> (routed_attention_cpu.py passes it)"
#endif

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int BLOCKS = 2;  // query blocks sharing each broadcast key/value element in the forward
constexpr const char* ISA = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int LANES = 8;
constexpr int BLOCKS = 1;  // two blocks measured no faster with 16 registers
constexpr const char* ISA = "avx2";
#elif defined(__ARM_NEON)
constexpr int LANES = 4;
constexpr int BLOCKS = 2;
constexpr const char* ISA = "neon";
#elif defined(__SSE2__)
constexpr int LANES = 4;
constexpr int BLOCKS = 1;
constexpr const char* ISA = "sse2";
#else
constexpr int LANES = 4;
constexpr int BLOCKS = 1;
constexpr const char* ISA = "generic";
#endif

constexpr int MAX_HEAD_DIM = YOLOATTN_MAX_HEAD_DIM;
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));
constexpr float LOG2E = 1.4426950408889634f;

inline vec splat(float x) { return vec{} + x; }

// 2^x for a vector of finite x. Callers keep |x| <= 64 or x <= 0 (logits minus their max or log-sum-exp,
// in log2 units), so the result is a normal number or, far below the largest term, zero.
#if defined(__AVX512F__)
// x = floor(x) + r with r in [0, 1): vreduceps gives r exactly in one instruction, vscalefps multiplies by
// 2^floor(x) with the exponent range handled (very negative x gives 0). Degree-5 polynomial for 2^r on
// [0, 1), fitted for the relative error (< 1.5e-7 evaluated with FMAs in fp32).
template <bool CLAMP = true>
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
#elif defined(__AVX2__) && defined(__FMA__)
// x = k/8 + r with k = round(8x), |r| <= 1/16: 2^x = 2^r * (2^((k mod 8)/8) * 2^floor(k/8)), 2^r by a degree-3
// polynomial (relative error of the product < 1.6e-7 evaluated in fp32) and the factor in brackets built as
// float bits: an 8-entry table held in one register (vpermps on k's low 3 bits) plus k << 20, whose low 3
// bits land in the mantissa's top bits; each entry holds 2^(j/8)'s bits minus j << 20, so they cancel and
// floor(k/8) is added to the exponent. Without AVX-512's vreduceps/vscalefps this takes four FP multiplies and
// multiply-adds instead of six, and the FMA ports are what the forward's inner loops are bound by. CLAMP =
// false: the caller guarantees |x| <= 125 (the forward's direct path: |logit| <= DIRECT_LOGIT_BOUND); with
// CLAMP, x is raised to -125 first, so every result is a normal number (2^-125 is far below float32's
// resolution next to the largest term, >= 2^-64).
template <bool CLAMP = true>
inline vec vexp2(vec x) {
    constexpr float kRound = 1572864.0f;  // 1.5 * 2^20: adding it rounds to a multiple of 1/8, k in the low bits
    if constexpr (CLAMP) x = (vec)_mm256_max_ps((__m256)x, _mm256_set1_ps(-125.0f));
    const vec z = x + kRound;
    const vec r = x - (z - kRound);
    vec p = splat(5.5496223271e-2f);
    p = p * r + 2.4025763571e-1f;
    p = p * r + 6.9314724207e-1f;
    p = p * r + 1.0f;
    // bits of 2^(j/8) (1.0, 1.0905077457, 1.1892070770, 1.2968395948, 1.4142135382, 1.5422108173,
    // 1.6817928553, 1.8340080976) minus j << 20
    const __m256i table = _mm256_setr_epi32(0x3F800000, 0x3F8B95C2 - (1 << 20), 0x3F9837F0 - (2 << 20),
                                            0x3FA5FED7 - (3 << 20), 0x3FB504F3 - (4 << 20), 0x3FC5672A - (5 << 20),
                                            0x3FD744FD - (6 << 20), 0x3FEAC0C7 - (7 << 20));
    const __m256i bits = _mm256_castps_si256((__m256)z);  // low 3 bits: k mod 8, the bits above: floor(k/8)
    // the magic's bits are all shifted out (its low 12 bits are zero)
    const __m256i factor = _mm256_add_epi32(_mm256_permutevar8x32_epi32(table, bits), _mm256_slli_epi32(bits, 20));
    return p * (vec)_mm256_castsi256_ps(factor);
}
#else
// x = n + r with n = round(x), |r| <= 1/2, then 2^r * 2^n with n written straight into the exponent bits.
// Degree-5 minimax polynomial for 2^r (relative error < 1.9e-7 evaluated in fp32). Every step is a plain
// vector operation, so it compiles to 8-lane AVX2, 4-lane SSE2 or NEON code alike. CLAMP = false: the caller
// guarantees |x| <= 126 (the forward's direct path: |logit| <= DIRECT_LOGIT_BOUND).
template <bool CLAMP = true>
inline vec vexp2(vec x) {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    // clamp to the normal range; 2^-126 instead of 0 is far below float32's resolution next to the largest
    // term (>= 2^-64)
    if constexpr (CLAMP) x = x < -126.0f ? splat(-126.0f) : x;
    const vec z = x + kRound;
    const vec r = x - (z - kRound);
    vec p = splat(1.3264727214e-3f);
    p = p * r + 9.6715128125e-3f;
    p = p * r + 5.5507337448e-2f;
    p = p * r + 2.4022242083e-1f;
    p = p * r + 6.9314697760e-1f;
    p = p * r + 1.0f;
    uvec bits;
    std::memcpy(&bits, &z, sizeof(bits));
    bits = (bits + 127u) << 23;  // the low bits of z hold n (two's complement); the magic's bits shift out
    vec two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    return p * two_n;
}
#endif

inline float lane_max(vec v) {
    float m = v[0];
    for (int l = 1; l < LANES; ++l) m = std::max(m, v[l]);
    return m;
}

// ---- the argument block shared with Python (ctypes.Structure RoutedArgs there, field for field) ----------
struct Tiles {
    float* data;
    int64_t py, px, th, tw;             // windows per column and row, token rows and columns per window
    int64_t s_n, s_py, s_px, s_y, s_x;  // strides in floats
    int64_t channels;                   // channels of each token, contiguous
};

struct RoutedArgs {
    int64_t abi;         // YOLOATTN_ABI
    int64_t size;        // sizeof(RoutedArgs)
    int64_t n, p, lq, lkv, topk, heads, dk, dv;
    int64_t rows_valid, cols_valid, zero_outside;
    double scale;
    int64_t threads;
    Tiles q, kv, out, dout, dq, dkv;  // dout, dq, dkv: backward only (dq or dkv data may be null)
    const int64_t* idx;
    float* lse;  // may be null in the forward (inference)
};

enum Status : int {
    OK = 0,
    BAD_ABI = 1,
    BAD_SHAPE = 2,
    BAD_HEAD_DIM = 3,
    NULL_POINTER = 4,
    BAD_INDEX = 5,
    BAD_LAYOUT = 6,
};

const char* status_message(int status) {
    switch (status) {
        case OK: return "ok";
        case BAD_ABI: return "the library was built for another version of its Python wrapper (ABI or argument block size differs)";
        case BAD_SHAPE: return "inconsistent sizes: the tiles of q, kv or out do not match n, p, lq, lkv, heads, dk or dv";
        case BAD_HEAD_DIM: return "head sizes must be between 1 and YOLOATTN_MAX_HEAD_DIM";
        case NULL_POINTER: return "a required tensor pointer is null";
        case BAD_INDEX: return "r_idx holds a window index outside [0, P)";
        case BAD_LAYOUT: return "a tiles descriptor has a negative stride or a zero size";
        default: return "unknown status";
    }
}

struct Layout {
    std::vector<int64_t> win;  // (N * P,)
    std::vector<int64_t> tok;  // (tokens per window,)
    int64_t py = 0, px = 0, th = 0, tw = 0;
    int64_t at(int64_t w, int64_t i) const { return win[w] + tok[i]; }

    Layout(int64_t n, const Tiles& t) : py(t.py), px(t.px), th(t.th), tw(t.tw) {
        win.reserve(n * py * px);
        for (int64_t b = 0; b < n; ++b)
            for (int64_t i = 0; i < py; ++i)
                for (int64_t j = 0; j < px; ++j) win.push_back(b * t.s_n + i * t.s_py + j * t.s_px);
        tok.reserve(th * tw);
        for (int64_t y = 0; y < th; ++y)
            for (int64_t x = 0; x < tw; ++x) tok.push_back(y * t.s_y + x * t.s_x);
    }
};

bool tiles_ok(const Tiles& t) {
    return t.py > 0 && t.px > 0 && t.th > 0 && t.tw > 0 && t.s_n >= 0 && t.s_py >= 0 && t.s_px >= 0 &&
           t.s_y >= 0 && t.s_x >= 0 && t.channels > 0;
}

// the tiles of a tensor with the window grid of q (out, dout, dq) or kv (dkv) and `channels` channels
bool same_grid(const Tiles& t, const Tiles& like, int64_t channels) {
    return t.py == like.py && t.px == like.px && t.th == like.th && t.tw == like.tw && t.channels == channels;
}

int validate(const RoutedArgs& a, bool backward) {
    if (a.abi != YOLOATTN_ABI || a.size != static_cast<int64_t>(sizeof(RoutedArgs))) return BAD_ABI;
    if (a.n < 1 || a.p < 1 || a.lq < 1 || a.lkv < 1 || a.topk < 1 || a.heads < 1 || a.rows_valid < 1 ||
        a.cols_valid < 1 || a.threads < 1)
        return BAD_SHAPE;
    if (a.dk < 1 || a.dv < 1 || a.dk > MAX_HEAD_DIM || a.dv > MAX_HEAD_DIM) return BAD_HEAD_DIM;
    if (a.q.data == nullptr || a.kv.data == nullptr || a.out.data == nullptr || a.idx == nullptr)
        return NULL_POINTER;
    if (!tiles_ok(a.q) || !tiles_ok(a.kv) || !tiles_ok(a.out)) return BAD_LAYOUT;
    const int64_t cq = a.heads * a.dk, cv = a.heads * a.dv;
    if (a.q.py * a.q.px != a.p || a.q.th * a.q.tw != a.lq || a.kv.py * a.kv.px != a.p ||
        a.kv.th * a.kv.tw != a.lkv || a.q.channels != cq || a.kv.channels != cq + cv ||
        !same_grid(a.out, a.q, cv) || a.rows_valid > a.q.py * a.q.th || a.cols_valid > a.q.px * a.q.tw)
        return BAD_SHAPE;
    if (backward) {
        if (a.lse == nullptr || a.dout.data == nullptr) return NULL_POINTER;
        if (!tiles_ok(a.dout) || !same_grid(a.dout, a.q, cv)) return BAD_SHAPE;
        if (a.dq.data != nullptr && (!tiles_ok(a.dq) || !same_grid(a.dq, a.q, cq))) return BAD_SHAPE;
        if (a.dkv.data != nullptr && (!tiles_ok(a.dkv) || !same_grid(a.dkv, a.kv, cq + cv))) return BAD_SHAPE;
    }
    for (int64_t i = 0; i < a.n * a.p * a.topk; ++i)
        if (a.idx[i] < 0 || a.idx[i] >= a.p) return BAD_INDEX;
    return OK;
}

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
void parallel_items(int64_t count, int64_t threads, Body body) {
    const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
#if defined(_OPENMP)
#pragma omp parallel num_threads(n_threads)
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
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
#endif
}

template <int D>
constexpr int head_capacity() { return D > 0 ? D : MAX_HEAD_DIM; }

// Loads channels [col, col + d) of tokens toks[i0 .. i0 + valid - 1] of window w as d vectors (lane = token);
// lanes past `valid` read as zero.
template <int D>
inline void load_lanes(vec* dst, int d_rt, const float* base, const Layout& lay, int64_t w, const int32_t* toks,
                       int64_t i0, int64_t col, int valid) {
    const int d = D > 0 ? D : d_rt;
    alignas(64) float tmp[head_capacity<D>()][LANES];
    for (int c = 0; c < d; ++c)
        for (int l = valid; l < LANES; ++l) tmp[c][l] = 0.0f;
    for (int l = 0; l < valid; ++l) {
        const float* row = base + lay.at(w, toks[i0 + l]) + col;
        for (int c = 0; c < d; ++c) tmp[c][l] = row[c];
    }
    for (int c = 0; c < d; ++c) std::memcpy(&dst[c], tmp[c], sizeof(vec));
}

template <int D>
inline void store_lanes(float* base, const Layout& lay, int64_t w, const int32_t* toks, int64_t i0, int64_t col,
                        const vec* src, int d_rt, int valid) {
    const int d = D > 0 ? D : d_rt;
    alignas(64) float tmp[head_capacity<D>()][LANES];
    for (int c = 0; c < d; ++c) std::memcpy(tmp[c], &src[c], sizeof(vec));
    for (int l = 0; l < valid; ++l) {
        float* row = base + lay.at(w, toks[i0 + l]) + col;
        for (int c = 0; c < d; ++c) row[c] = tmp[c][l];
    }
}

// Gathers per-token statistics (lse, delta: (.., Lq) rows in token order) of toks[i0 ..] into lanes.
inline vec load_stats(const float* row, const int32_t* toks, int64_t i0, int valid) {
    alignas(64) float tmp[LANES] = {};
    for (int l = 0; l < valid; ++l) tmp[l] = row[toks[i0 + l]];
    vec v;
    std::memcpy(&v, tmp, sizeof(v));
    return v;
}

struct Shape {
    int64_t n, p, lq, lkv, topk, heads, dk, dv, rows_valid, cols_valid, zero_outside;
    float scale;
    int64_t threads;
    int64_t cq() const { return heads * dk; }
    explicit Shape(const RoutedArgs& a)
        : n(a.n), p(a.p), lq(a.lq), lkv(a.lkv), topk(a.topk), heads(a.heads), dk(a.dk), dv(a.dv),
          rows_valid(a.rows_valid), cols_valid(a.cols_valid), zero_outside(a.zero_outside),
          scale(static_cast<float>(a.scale)), threads(a.threads) {}
};

// ---- forward -------------------------------------------------------------------------------------------
// Logits in log2 units whose magnitude is at most this are exponentiated as they are (2^-64 .. 2^64: no
// overflow, no underflow), so softmax needs no max subtraction and the forward is one pass over the keys.
constexpr float DIRECT_LOGIT_BOUND = 64.0f;

// Forward and backward run in phases over one (query blocks, key window) or (key block, query window) pair:
// dot products into a scratch row of vectors, exponentials, then accumulations. Each phase keeps at most
// CHUNK vectors of head channels in registers (wider heads go in further chunks), so no inner loop spills
// its operands or accumulators, and the exponentials of a row are independent of each other instead of one
// dependency chain per token. NB blocks of lanes share each broadcast row element.
#if defined(__AVX512F__) || defined(__ARM_NEON)
constexpr int VREGS = 32;
#else
constexpr int VREGS = 16;
#endif
constexpr int CHUNK = VREGS / 2;
// The forward's direct path: exponentials EXP_AHEAD rows ahead inside the value accumulation
// (accumulate_exp_rows), or 0: a pass of exp_rows over the key window's logits first, then accumulate_rows.
// Measured at (1, 64, 80, 80) on a Xeon, 2 threads, against exponentiating each row as it is accumulated:
// AVX2 7.42 -> 7.07 ms with 2 ahead (the pass first: 8% slower), AVX-512 4.47 -> 4.18 ms and SSE2 (1 thread)
// 46.7 -> 43.2 ms with the pass first (2 ahead spills there: NB = 2, or 4-float vectors without FMA).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int EXP_AHEAD = 2;
#else
constexpr int EXP_AHEAD = 0;
#endif

// out[i * NB + k] = sum_c a[k * stride + c] * rows(i)[c], i in [0, count), c in [0, d): a in lanes, rows broadcast.
template <int NB, int D, class Rows>
inline void dot_rows(const vec* a, int stride, int d_rt, int64_t count, Rows rows, vec* out) {
    constexpr int CB = CHUNK / NB;
    const int d = D > 0 ? D : d_rt;
    for (int c0 = 0; c0 < d; c0 += CB) {
        const int cn = std::min(CB, d - c0);
        vec ac[NB][CB];
        for (int k = 0; k < NB; ++k)
            for (int c = 0; c < cn; ++c) ac[k][c] = a[k * stride + c0 + c];
        for (int64_t i = 0; i < count; ++i) {
            const auto r = rows(i) + c0;  // floats (broadcast) or splatted vectors
            vec acc[NB];
            for (int k = 0; k < NB; ++k) acc[k] = ac[k][0] * r[0];
            for (int c = 1; c < cn; ++c)
                for (int k = 0; k < NB; ++k) acc[k] += ac[k][c] * r[c];
            for (int k = 0; k < NB; ++k) out[i * NB + k] = c0 == 0 ? acc[k] : out[i * NB + k] + acc[k];
        }
    }
}

// b[k * stride + c] += sum_i w[i * NB + k] * rows(i)[c], c in [0, d): w in lanes, rows broadcast.
template <int NB, int D, class Rows>
inline void accumulate_rows(vec* b, int stride, int d_rt, int64_t count, const vec* w, Rows rows) {
    constexpr int CB = CHUNK / NB;
    const int d = D > 0 ? D : d_rt;
    for (int c0 = 0; c0 < d; c0 += CB) {
        const int cn = std::min(CB, d - c0);
        vec bc[NB][CB];
        for (int k = 0; k < NB; ++k)
            for (int c = 0; c < cn; ++c) bc[k][c] = b[k * stride + c0 + c];
        for (int64_t i = 0; i < count; ++i) {
            const auto r = rows(i) + c0;  // floats (broadcast) or splatted vectors
            for (int c = 0; c < cn; ++c)
                for (int k = 0; k < NB; ++k) bc[k][c] += w[i * NB + k] * r[c];
        }
        for (int k = 0; k < NB; ++k)
            for (int c = 0; c < cn; ++c) b[k * stride + c0 + c] = bc[k][c];
    }
}

// The forward's direct path, exp_rows<NB, false> then accumulate_rows in one loop (same operations, same
// order, same bits): w holds logits within +-DIRECT_LOGIT_BOUND; the first chunk replaces each by 2^w (for
// the later chunks) and adds it to sum[k]. Row i + EXP_AHEAD is exponentiated while row i is accumulated, so
// the exponential's chain of dependent operations (about 25 cycles) is never waited on.
template <int NB, int D, class Rows>
inline void accumulate_exp_rows(vec* b, int stride, int d_rt, int64_t count, vec* w, Rows rows, vec* sum) {
    constexpr int CB = CHUNK / NB, AHEAD = EXP_AHEAD > 0 ? EXP_AHEAD : 1;
    const int d = D > 0 ? D : d_rt;
    const int cn = std::min(CB, d);
    vec bc[NB][CB], ahead[AHEAD][NB] = {};
    for (int k = 0; k < NB; ++k)
        for (int c = 0; c < cn; ++c) bc[k][c] = b[k * stride + c];
    for (int l = 0; l < AHEAD && l < count; ++l)
        for (int k = 0; k < NB; ++k) ahead[l][k] = vexp2<false>(w[l * NB + k]);
    for (int64_t i0 = 0; i0 < count; i0 += AHEAD)
        for (int l = 0; l < AHEAD && i0 + l < count; ++l) {  // unrolled: ahead[l] stays in a register
            const int64_t i = i0 + l;
            const auto r = rows(i);
            vec e[NB];
            for (int k = 0; k < NB; ++k) {
                e[k] = ahead[l][k];
                sum[k] += e[k];
                if (cn < d) w[i * NB + k] = e[k];
            }
            if (i + AHEAD < count)
                for (int k = 0; k < NB; ++k) ahead[l][k] = vexp2<false>(w[(i + AHEAD) * NB + k]);
            for (int c = 0; c < cn; ++c)
                for (int k = 0; k < NB; ++k) bc[k][c] += e[k] * r[c];
        }
    for (int k = 0; k < NB; ++k)
        for (int c = 0; c < cn; ++c) b[k * stride + c] = bc[k][c];
    if (cn < d)  // the later chunks: the exponentials are in w now
        accumulate_rows<NB, (D > CB ? D - CB : 0)>(b + cn, stride, d - cn, count, w, [&rows](int64_t i) {
            return rows(i) + CB;
        });
}

// e = 2^(logit - m) (SHIFT) or 2^logit in place over n rows of NB lanes, sum += e.
template <int NB, bool SHIFT>
inline void exp_rows(vec* lg, int64_t n, const vec* m, vec* sum) {
    for (int64_t j = 0; j < n; ++j)
        for (int k = 0; k < NB; ++k) {
            // unshifted logits are within +-DIRECT_LOGIT_BOUND: no clamp needed
            const vec e = SHIFT ? vexp2<true>(lg[j * NB + k] - m[k]) : vexp2<false>(lg[j * NB + k]);
            lg[j * NB + k] = e;
            sum[k] += e;
        }
}

// n floats from src to dst (not overlapping); with D compiled in, a fixed-size memcpy that compiles to vector
// moves (std::copy_n of a constant count still calls memmove: 6% of the AVX2 forward at (1, 64, 80, 80))
template <int D>
inline void copy_row(const float* src, int n, float* dst) {
    if constexpr (D > 0)
        std::memcpy(dst, src, D * sizeof(float));
    else
        std::memcpy(dst, src, n * sizeof(float));
}

// One head's keys and values of the windows routed to one query window, copied into dense rows (keys: topk *
// Lkv rows of dk floats, then values: rows of dv). Every query block of the window sweeps them, so they should
// stay in L1: read in place they are 32-byte pieces of the image's (2 Cq + Cv)-float token rows, a cache line
// each, twice the bytes (at YOLOv8n's P3, 73 KB per sweep against a 48 KB L1; 36 KB packed). Measured with
// AVX2 on a Xeon, BRA's forward at (1, 64, 80, 80): 17.0 -> 13.8 ms; with AVX-512 (two query blocks share
// each sweep there) and SSE2 (bound by arithmetic), no change.
struct RoutedHead {
    const Shape& s;
    std::vector<float> keys, values;
    explicit RoutedHead(const Shape& shape)
        : s(shape), keys(shape.topk * shape.lkv * shape.dk), values(shape.topk * shape.lkv * shape.dv) {}

    // DK, DV: the head sizes when compiled in (then each row's copy is a fixed-size move, see copy_row)
    template <int DK, int DV>
    void gather(const float* kv, const Layout& kvl, const int64_t* idx, int64_t win, int64_t h) {
        const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
        const int64_t b = win / s.p, key_col = h * dk, value_col = s.cq() + h * dv;
        float* k = keys.data();
        float* v = values.data();
        for (int64_t t = 0; t < s.topk; ++t) {
            const float* base = kv + kvl.win[b * s.p + idx[win * s.topk + t]];
            for (int64_t j = 0; j < s.lkv; ++j, k += dk, v += dv) {
                const float* row = base + kvl.tok[j];
                copy_row<DK>(row + key_col, dk, k);
                copy_row<DV>(row + value_col, dv, v);
            }
        }
    }
};

struct ForwardPass {
    const Shape& s;
    const float* q;
    const Layout& ql;
    const float* kv;
    const Layout& kvl;
    const int64_t* idx;
    const float* key_norm;
    float* out;
    const Layout& ol;
    float* lse;

    // NB blocks of LANES query tokens (toks[i0 .. i0 + NB * LANES - 1] of window `win`, head h) against all
    // their routed keys.
    //
    // If |q| * max|k| over the routed windows bounds every logit by DIRECT_LOGIT_BOUND (Cauchy-Schwarz; the
    // usual case), each routed window's logits go to an L1-sized buffer and are exponentiated right away, with
    // no max subtracted. Otherwise all logits are stored with their max first and exponentiated in a second
    // sweep. Blocks share every key/value broadcast and give the core independent FMA chains.
    template <int NB, int DK, int DV>
    void blocks(int64_t win, const int32_t* toks, int64_t count, int64_t h, int64_t i0, vec* logits,
                const RoutedHead& routed_kv) const {
        const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
        const int64_t b = win / s.p;
        const int64_t* routed = idx + win * s.topk;
        constexpr int SK = head_capacity<DK>(), SV = head_capacity<DV>();
        alignas(64) vec qv[NB][SK], ov[NB][SV];
        vec sum[NB];
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

        const auto key_rows = [&](int64_t t) {
            const float* base = routed_kv.keys.data() + t * s.lkv * dk;
            return [base, dk](int64_t j) { return base + j * dk; };
        };
        const auto value_rows = [&](int64_t t) {
            const float* base = routed_kv.values.data() + t * s.lkv * dv;
            return [base, dv](int64_t j) { return base + j * dv; };
        };
        vec m[NB];
        if (direct) {
            for (int k = 0; k < NB; ++k) m[k] = vec{};
            for (int64_t t = 0; t < s.topk; ++t) {
                dot_rows<NB, DK>(&qv[0][0], SK, dk, s.lkv, key_rows(t), logits);
                if constexpr (EXP_AHEAD > 0) {
                    accumulate_exp_rows<NB, DV>(&ov[0][0], SV, dv, s.lkv, logits, value_rows(t), sum);
                } else {
                    exp_rows<NB, false>(logits, s.lkv, m, sum);
                    accumulate_rows<NB, DV>(&ov[0][0], SV, dv, s.lkv, logits, value_rows(t));
                }
            }
        } else {
            for (int k = 0; k < NB; ++k) m[k] = splat(-INFINITY);
            for (int64_t t = 0; t < s.topk; ++t)
                dot_rows<NB, DK>(&qv[0][0], SK, dk, s.lkv, key_rows(t), logits + t * s.lkv * NB);
            for (int64_t j = 0; j < s.topk * s.lkv; ++j)
                for (int k = 0; k < NB; ++k) m[k] = logits[j * NB + k] > m[k] ? logits[j * NB + k] : m[k];
            for (int64_t t = 0; t < s.topk; ++t) {
                exp_rows<NB, true>(logits + t * s.lkv * NB, s.lkv, m, sum);
                accumulate_rows<NB, DV>(&ov[0][0], SV, dv, s.lkv, logits + t * s.lkv * NB, value_rows(t));
            }
        }
        for (int k = 0; k < NB; ++k) {
            if (valid[k] == 0) continue;
            const vec inv = 1.0f / sum[k];
            for (int c = 0; c < dv; ++c) ov[k][c] *= inv;
            store_lanes<DV>(out, ol, win, toks, i0 + k * LANES, h * dv, ov[k], dv, valid[k]);
            if (lse == nullptr) continue;
            float* lse_row = lse + (win * s.heads + h) * s.lq;
            for (int l = 0; l < valid[k]; ++l) lse_row[toks[i0 + k * LANES + l]] = m[k][l] + std::log2(sum[k][l]);
        }
    }

    template <int DK, int DV>
    void run() const {
        const QueryTokens region(ql, s.n, s.rows_valid, s.cols_valid);
        parallel_items(s.n * s.p, s.threads, [&](int64_t win) {  // win = b * P + p
            const int32_t* toks = region.list(win);
            const int64_t count = region.count(win);
            if (count < s.lq && s.zero_outside) region.zero_outside(out, ol, win, s.heads * s.dv);
            std::vector<vec> logits(BLOCKS * s.topk * s.lkv);
            RoutedHead routed_kv(s);
            for (int64_t h = 0; h < s.heads; ++h) {
                routed_kv.gather<DK, DV>(kv, kvl, idx, win, h);
                int64_t i0 = 0;
                if constexpr (BLOCKS > 1)
                    for (; i0 + (BLOCKS - 1) * LANES < count; i0 += BLOCKS * LANES)
                        blocks<BLOCKS, DK, DV>(win, toks, count, h, i0, logits.data(), routed_kv);
                for (; i0 < count; i0 += LANES) blocks<1, DK, DV>(win, toks, count, h, i0, logits.data(), routed_kv);
            }
        });
    }
};

// max |k| * scale * log2(e) per (key window, head): bounds the logits together with |q|
std::vector<float> key_norms(const Shape& s, const float* kv, const Layout& kvl) {
    std::vector<float> key_norm(s.n * s.p * s.heads);
    parallel_items(s.n * s.p, s.threads, [&](int64_t kwin) {
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
    return key_norm;
}

// ---- backward ------------------------------------------------------------------------------------------
// delta = rowsum(dout * out) per (window, head, query token): the softmax backward's correction term.
std::vector<float> deltas(const Shape& s, const QueryTokens& region, const float* out, const Layout& ol,
                          const float* dout, const Layout& gl) {
    std::vector<float> delta(s.n * s.p * s.heads * s.lq, 0.0f);
    parallel_items(s.n * s.p, s.threads, [&](int64_t win) {
        const int32_t* toks = region.list(win);
        for (int64_t i = 0; i < region.count(win); ++i) {
            const float* o = out + ol.at(win, toks[i]);
            const float* g = dout + gl.at(win, toks[i]);
            for (int64_t h = 0; h < s.heads; ++h) {
                float acc = 0.0f;
                for (int64_t c = h * s.dv; c < (h + 1) * s.dv; ++c) acc += o[c] * g[c];
                delta[(win * s.heads + h) * s.lq + toks[i]] = acc;
            }
        }
    });
    return delta;
}

// The inverse of the routing, a counting sort of the routing slots by routed key window, stable: the slots
// u = p * topk + t (query window p's t-th routed window) of image b that route key window r are
// slot[b * P * topk + start[b * (P + 1) + r] ... start[b * (P + 1) + r + 1]]. keys: the token indices
// 0 .. Lkv - 1 (every key of a window is read).
struct RoutingInverse {
    std::vector<int64_t> start, slot;
    std::vector<int32_t> keys;
    RoutingInverse(const Shape& s, const int64_t* idx)
        : start(s.n * (s.p + 1), 0), slot(s.n * s.p * s.topk), keys(s.lkv) {
        for (int64_t b = 0; b < s.n; ++b) {
            int64_t* starts = start.data() + b * (s.p + 1);
            const int64_t* routed = idx + b * s.p * s.topk;
            for (int64_t u = 0; u < s.p * s.topk; ++u) ++starts[routed[u] + 1];
            for (int64_t r = 0; r < s.p; ++r) starts[r + 1] += starts[r];
            std::vector<int64_t> fill(starts, starts + s.p);
            for (int64_t u = 0; u < s.p * s.topk; ++u) slot[b * s.p * s.topk + fill[routed[u]]++] = u;
        }
        for (int64_t j = 0; j < s.lkv; ++j) keys[j] = static_cast<int32_t>(j);
    }
};

// m[j][i] <- m[i][j] for a LANES x LANES block of floats (LANES vectors).
inline void transpose_block(vec* m) {
#if defined(__AVX512F__)
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = (__m512)m[i];
    for (int i = 0; i < 8; ++i) {  // per 128-bit lane: t[2i] = a0 b0 a1 b1, t[2i+1] = a2 b2 a3 b3 of rows 2i, 2i+1
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // 128-bit lane k of r[4i + c]: column 4k + c of rows 4i .. 4i + 3
        const __m512d t0 = (__m512d)t[4 * i], t1 = (__m512d)t[4 * i + 1], t2 = (__m512d)t[4 * i + 2],
                      t3 = (__m512d)t[4 * i + 3];
        r[4 * i] = (__m512)_mm512_unpacklo_pd(t0, t2);
        r[4 * i + 1] = (__m512)_mm512_unpackhi_pd(t0, t2);
        r[4 * i + 2] = (__m512)_mm512_unpacklo_pd(t1, t3);
        r[4 * i + 3] = (__m512)_mm512_unpackhi_pd(t1, t3);
    }
    for (int c = 0; c < 4; ++c) {  // gather the four 128-bit pieces of each column
        const __m512 lo01 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), hi01 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
        const __m512 lo23 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44),
                     hi23 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        m[c] = (vec)_mm512_shuffle_f32x4(lo01, lo23, 0x88);
        m[4 + c] = (vec)_mm512_shuffle_f32x4(lo01, lo23, 0xDD);
        m[8 + c] = (vec)_mm512_shuffle_f32x4(hi01, hi23, 0x88);
        m[12 + c] = (vec)_mm512_shuffle_f32x4(hi01, hi23, 0xDD);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = (__m256)m[i];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // 128-bit lane k of r[4i + c]: column 4k + c of rows 4i .. 4i + 3
        r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
        m[c] = (vec)_mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
        m[4 + c] = (vec)_mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
    }
#elif defined(__SSE__) && !defined(__AVX2__)
    __m128 r0 = (__m128)m[0], r1 = (__m128)m[1], r2 = (__m128)m[2], r3 = (__m128)m[3];
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    m[0] = (vec)r0, m[1] = (vec)r1, m[2] = (vec)r2, m[3] = (vec)r3;
#else
    alignas(64) float tmp[LANES][LANES];
    for (int i = 0; i < LANES; ++i)
        for (int j = 0; j < LANES; ++j) tmp[j][i] = m[i][j];
    std::memcpy(m, tmp, sizeof(tmp));
#endif
}

// Small heads on a CPU with 32 vector registers: a key block's state (its vectors of k and v and their
// gradients: 2 * DK + 2 * DV vectors) stays in registers through one fused loop over the query tokens, which
// computes each logit, exponential and gradient term in one pass instead of in phases.
template <int DK, int DV>
constexpr bool fused_backward_fits() { return DK > 0 && DV > 0 && 2 * DK + 2 * DV <= VREGS; }

// AVX-512 FMAs take a broadcast memory operand ({1to16}) for free. Elsewhere (AVX2, SSE, NEON) each broadcast
// is an operation of its own on the FP pipes, as costly as the FMA using it. Measured (the backward at
// (1, 64, 80, 80), 2 threads of an AMD Zen 5), a broadcast per FMA against operands splatted once and reused:
// AVX2 build 25.6 -> 18.5 ms, SSE2 58.6 -> 39.6 ms; with AVX-512 and head size 16, 30.6 -> 37.9 ms (slower).
// The forward gained nothing from it (an A/B with AVX2: 11.4 ms at best either way): it keeps broadcasting.
#if defined(__AVX512F__)
constexpr bool BROADCAST_OPERANDS = true;
#else
constexpr bool BROADCAST_OPERANDS = false;
#endif

// dq partial sums of one image: slot u = p * topk + t, head h holds, at (u * heads + h) * blocks * dk, what the
// key window routed at slot t of query window p adds to head h's dq: ceil(Lq / LANES) blocks of dk vectors
// (queries in lanes, unscaled). The (key window, head) item of the slot's key window writes it, its key
// blocks in order (add_dq_partial) or all at once (dq_partial_keys_in_lanes); the query side then sums the
// topk slots in order.
//
// Adds key block [j0, j0 + valid_k) of one key window to one query block's slot, part[0 .. dk): ds holds the
// block's logit gradients, ds[l] the LANES keys of query l (zero for absent queries), and is transposed in
// place to queries in lanes. first: the slot's first key block (it is written, not added to).
// key_row(j) gives key j0 + j's channels: floats (broadcast here) or splatted vectors.
template <int DK, class KeyRow>
inline void add_dq_partial(vec* part, bool first, vec* ds, int valid_k, KeyRow key_row, int dk_rt) {
    const int dk = DK > 0 ? DK : dk_rt;
    transpose_block(ds);
    for (int c0 = 0; c0 < dk; c0 += CHUNK) {
        const int cn = std::min(CHUNK, dk - c0);
        vec acc[CHUNK];
        for (int c = 0; c < cn; ++c) acc[c] = first ? vec{} : part[c0 + c];
        for (int j = 0; j < valid_k; ++j) {
            const auto krow = key_row(j) + c0;
            for (int c = 0; c < cn; ++c) acc[c] += ds[j] * krow[c];
        }
        for (int c = 0; c < cn; ++c) part[c0 + c] = acc[c];
    }
}

// dq partial sums of `count` queries from the logit gradients of all key blocks, keys in lanes:
// ds[jb * ds_stride + i] holds query i's gradients to the LANES keys of block jb (finite for absent keys),
// keys[jb * key_stride + c] the keys' channel c (zero for absent keys). Each query's channel sums run over the
// key blocks in lanes (one multiply-add per block and channel, no transposes), then over the lanes; the sums of
// LANES queries are transposed to queries in lanes and written to part (blocks of dk vectors), once.
template <int DK>
inline void dq_partial_keys_in_lanes(vec* part, const vec* ds, int64_t ds_stride, int64_t count, int64_t key_blocks,
                                     const vec* keys, int64_t key_stride, int dk_rt) {
    const int dk = DK > 0 ? DK : dk_rt;
    alignas(64) vec acc[LANES], sums[LANES];
    for (int64_t i0 = 0; i0 < count; i0 += LANES) {
        const int nq = static_cast<int>(std::min<int64_t>(LANES, count - i0));
        for (int c0 = 0; c0 < dk; c0 += LANES) {
            const int cn = std::min(LANES, dk - c0);
            for (int l = 0; l < LANES; ++l) {
                if (l >= nq) { sums[l] = vec{}; continue; }
                for (int c = 0; c < LANES; ++c) acc[c] = vec{};
                for (int64_t jb = 0; jb < key_blocks; ++jb) {
                    const vec d = ds[jb * ds_stride + i0 + l];
                    const vec* k = keys + jb * key_stride + c0;
                    for (int c = 0; c < cn; ++c) acc[c] += d * k[c];
                }
                transpose_block(acc);  // acc[l'] lane c: key lane l' of channel c0 + c
                vec sum = acc[0];
                for (int k = 1; k < LANES; ++k) sum += acc[k];
                sums[l] = sum;  // lane c: channel c0 + c of query i0 + l
            }
            transpose_block(sums);  // sums[c] lane l: channel c0 + c of query i0 + l
            for (int c = 0; c < cn; ++c) part[(i0 / LANES) * dk + c0 + c] = sums[c];
        }
    }
}

// The backward of one image b, in one pass over the (key window, head) items: keys in lanes, over the query
// windows that routed the key window, each logit and exponential computed once; dk and dv accumulate in
// registers, and the logit gradients give, as queries in lanes, that query window's dq partial sums (dq_part,
// when dq is wanted). A second pass sums
// each query window's partials into dq. Every element is written by one item in a fixed order.
template <int DK, int DV>
void backward_image(int64_t b, const Shape& s, const QueryTokens& region, const RoutingInverse& inv,
                    const float* q, const Layout& ql, const float* kv, const Layout& kvl, const float* dout,
                    const Layout& gl, const float* lse, const float* delta, vec* dq_part, float* dq,
                    const Layout* dql, float* dkv, const Layout* dkvl) {
    constexpr bool FUSED = fused_backward_fits<DK, DV>();
    const int dk = DK > 0 ? DK : s.dk, dv = DV > 0 ? DV : s.dv;
    const int64_t cq = s.cq(), blocks = (s.lq + LANES - 1) / LANES, slot_vecs = blocks * dk;
    const int64_t* starts = inv.start.data() + b * (s.p + 1);
    const int64_t* slots = inv.slot.data() + b * s.p * s.topk;
    parallel_items(s.p * s.heads, s.threads, [&](int64_t item) {  // item = r * heads + h
        const int64_t r = item / s.heads, h = item % s.heads, kwin = b * s.p + r;
        const float* keys = kv + kvl.win[kwin] + h * dk;
        // the routing slot u's query window: its query tokens and their rows, statistics and dq partials
        struct Slot {
            const int32_t* toks;
            int64_t count;
            const float *queries, *grads, *lse_row, *delta_row;
            vec* part;
        };
        const auto slot_of = [&](int64_t u) {
            const int64_t qwin = b * s.p + slots[u] / s.topk;
            return Slot{region.list(qwin), region.count(qwin), q + ql.win[qwin] + h * dk, dout + gl.win[qwin] + h * dv,
                        lse + (qwin * s.heads + h) * s.lq, delta + (qwin * s.heads + h) * s.lq,
                        dq_part == nullptr ? nullptr : dq_part + (slots[u] * s.heads + h) * slot_vecs};
        };
        if constexpr (FUSED || BROADCAST_OPERANDS) {
            // Every key block sweeps all the routing slots' queries: their head-h rows of q and dout, lse and
            // delta are copied once per item into dense rows, so the sweeps read whole cache lines from L1
            // instead of 32-byte pieces of image rows (the RoutedHead argument of the forward).
            const int64_t first = starts[r], n_slots = starts[r + 1] - first;
            std::vector<int64_t> offset(n_slots + 1, 0);
            for (int64_t k = 0; k < n_slots; ++k) offset[k + 1] = offset[k] + slot_of(first + k).count;
            std::vector<float> qpack(offset[n_slots] * dk), gpack(offset[n_slots] * dv), lse_pack(offset[n_slots]),
                delta_pack(offset[n_slots]);
            for (int64_t k = 0; k < n_slots; ++k) {
                const Slot sl = slot_of(first + k);
                for (int64_t i = 0, o = offset[k]; i < sl.count; ++i, ++o) {
                    const int32_t t = sl.toks[i];
                    std::copy_n(sl.queries + ql.tok[t], dk, qpack.data() + o * dk);
                    std::copy_n(sl.grads + gl.tok[t], dv, gpack.data() + o * dv);
                    lse_pack[o] = sl.lse_row[t];
                    delta_pack[o] = sl.delta_row[t];
                }
            }
            std::vector<vec> prob(FUSED ? 0 : s.lq), dlogit(FUSED ? 0 : s.lq);
            alignas(64) vec kv_[head_capacity<DK>()], vv[head_capacity<DV>()], dkv_[head_capacity<DK>()],
                dvv[head_capacity<DV>()], ds[LANES], probs[LANES];
            for (int64_t j0 = 0; j0 < s.lkv; j0 += LANES) {
                const int valid = static_cast<int>(std::min<int64_t>(LANES, s.lkv - j0));
                load_lanes<DK>(kv_, dk, kv, kvl, kwin, inv.keys.data(), j0, h * dk, valid);
                load_lanes<DV>(vv, dv, kv, kvl, kwin, inv.keys.data(), j0, cq + h * dv, valid);
                for (int c = 0; c < dk; ++c) kv_[c] *= s.scale * LOG2E, dkv_[c] = vec{};
                for (int c = 0; c < dv; ++c) dvv[c] = vec{};
                const auto key_row = [&](int j) { return keys + kvl.tok[j0 + j]; };
                for (int64_t k = 0; k < n_slots; ++k) {
                    const Slot sl = slot_of(first + k);
                    const float* queries = qpack.data() + offset[k] * dk;
                    const float* grads = gpack.data() + offset[k] * dv;
                    const float* lse_of = lse_pack.data() + offset[k];
                    const float* delta_of = delta_pack.data() + offset[k];
                    const auto query_row = [&](int64_t i) { return queries + i * dk; };
                    const auto grad_row = [&](int64_t i) { return grads + i * dv; };
                    if constexpr (FUSED) {
                        for (int64_t i0 = 0; i0 < sl.count; i0 += LANES) {
                            const int nq = static_cast<int>(std::min<int64_t>(LANES, sl.count - i0));
                            for (int l = 0; l < nq; ++l) {
                                const float* qrow = query_row(i0 + l);
                                const float* grow = grad_row(i0 + l);
                                vec logit = kv_[0] * qrow[0];
                                for (int c = 1; c < DK; ++c) logit += kv_[c] * qrow[c];
                                const vec p = vexp2(logit - lse_of[i0 + l]);
                                vec dprob = vv[0] * grow[0];
                                for (int c = 1; c < DV; ++c) dprob += vv[c] * grow[c];
                                probs[l] = p;
                                ds[l] = p * (dprob - delta_of[i0 + l]);
                            }
                            // the dv and dk sums apart: with either in the loop above, its operands and
                            // accumulators outnumber the 32 registers; with the dv sums there GCC, tuning for
                            // an Intel core, stored all eight on every query (1.5% of BRA's f+b on a Xeon)
                            for (int l = 0; l < nq; ++l) {
                                const float* qrow = query_row(i0 + l);
                                const float* grow = grad_row(i0 + l);
                                for (int c = 0; c < DV; ++c) dvv[c] += probs[l] * grow[c];
                                for (int c = 0; c < DK; ++c) dkv_[c] += ds[l] * qrow[c];
                            }
                            if (sl.part == nullptr) continue;
                            for (int l = nq; l < LANES; ++l) ds[l] = vec{};
                            add_dq_partial<DK>(sl.part + (i0 / LANES) * dk, j0 == 0, ds, valid, key_row, dk);
                        }
                    } else {
                        dot_rows<1, DK>(kv_, 0, dk, sl.count, query_row, prob.data());
                        for (int64_t i = 0; i < sl.count; ++i) prob[i] = vexp2(prob[i] - lse_of[i]);
                        accumulate_rows<1, DV>(dvv, 0, dv, sl.count, prob.data(), grad_row);
                        dot_rows<1, DV>(vv, 0, dv, sl.count, grad_row, dlogit.data());
                        for (int64_t i = 0; i < sl.count; ++i)
                            dlogit[i] = prob[i] * (dlogit[i] - delta_of[i]);
                        accumulate_rows<1, DK>(dkv_, 0, dk, sl.count, dlogit.data(), query_row);
                        if (sl.part == nullptr) continue;
                        for (int64_t i0 = 0; i0 < sl.count; i0 += LANES) {
                            const int nq = static_cast<int>(std::min<int64_t>(LANES, sl.count - i0));
                            for (int l = 0; l < LANES; ++l) ds[l] = l < nq ? dlogit[i0 + l] : vec{};
                            add_dq_partial<DK>(sl.part + (i0 / LANES) * dk, j0 == 0, ds, valid, key_row, dk);
                        }
                    }
                }
                if (dkv == nullptr) continue;
                for (int c = 0; c < dk; ++c) dkv_[c] *= s.scale;
                store_lanes<DK>(dkv, *dkvl, kwin, inv.keys.data(), j0, h * dk, dkv_, dk, valid);
                store_lanes<DV>(dkv, *dkvl, kwin, inv.keys.data(), j0, cq + h * dv, dvv, dv, valid);
            }
        } else {
            // Without broadcast operands: phases over a chunk of queries per key block, every broadcast operand
            // splatted into a vector once per routing slot (query and output-gradient rows, statistics) instead
            // of once per key block, so the FMAs read plain vectors. Key blocks keep their k and v vectors and
            // their dk and dv sums here between slots; each sum still runs over the slots and then the queries in
            // order, as in the loop above (the same to the bit). The chunk's logit gradients of all key blocks
            // are kept, and dq sums them with keys in lanes afterwards: one multiply-add per key block and
            // channel, a transpose per query and one per LANES queries, where transposing every LANES x LANES
            // block of them to queries in lanes took three shuffles per query and key block. Measured with AVX2
            // on a Xeon, the backward at (4, 64, 80, 80), 2 threads: 111 -> 105 ms; SSE2 unchanged.
            const int64_t key_blocks = (s.lkv + LANES - 1) / LANES, state = 2 * (dk + dv) + dk;
            // queries per chunk: their splatted q and dout rows take about 12 KiB, and their logit gradients (one
            // vector per key block) about as much at YOLOv8n's P3; 24 KiB measured the same
            const int64_t chunk = std::max<int64_t>(LANES, 12288 / ((dk + dv) * sizeof(vec)) / LANES * LANES);
            std::vector<vec> kstate(key_blocks * state), qsplat(chunk * dk), gsplat(chunk * dv),
                lse_splat(chunk), delta_splat(chunk), prob(chunk), dlogits(key_blocks * chunk);
            for (int64_t jb = 0; jb < key_blocks; ++jb) {  // block jb: k (scaled), v, dk sum, dv sum, k as read
                vec* st = kstate.data() + jb * state;
                const int valid = static_cast<int>(std::min<int64_t>(LANES, s.lkv - jb * LANES));
                load_lanes<DK>(st, dk, kv, kvl, kwin, inv.keys.data(), jb * LANES, h * dk, valid);
                load_lanes<DV>(st + dk, dv, kv, kvl, kwin, inv.keys.data(), jb * LANES, cq + h * dv, valid);
                std::copy(st, st + dk, st + 2 * (dk + dv));
                for (int c = 0; c < dk; ++c) st[c] *= s.scale * LOG2E;
                std::fill(st + dk + dv, st + 2 * (dk + dv), vec{});
            }
            for (int64_t u = starts[r]; u < starts[r + 1]; ++u) {
                const Slot sl = slot_of(u);
                for (int64_t c0 = 0; c0 < sl.count; c0 += chunk) {
                    const int64_t cn = std::min(chunk, sl.count - c0);
                    for (int64_t i = 0; i < cn; ++i) {
                        const int32_t t = sl.toks[c0 + i];
                        const float* qrow = sl.queries + ql.tok[t];
                        const float* grow = sl.grads + gl.tok[t];
                        for (int c = 0; c < dk; ++c) qsplat[i * dk + c] = splat(qrow[c]);
                        for (int c = 0; c < dv; ++c) gsplat[i * dv + c] = splat(grow[c]);
                        lse_splat[i] = splat(sl.lse_row[t]);
                        delta_splat[i] = splat(sl.delta_row[t]);
                    }
                    const auto query_row = [&](int64_t i) { return qsplat.data() + i * dk; };
                    const auto grad_row = [&](int64_t i) { return gsplat.data() + i * dv; };
                    for (int64_t jb = 0; jb < key_blocks; ++jb) {
                        vec* st = kstate.data() + jb * state;
                        dot_rows<1, DK>(st, 0, dk, cn, query_row, prob.data());
                        for (int64_t i = 0; i < cn; ++i) prob[i] = vexp2(prob[i] - lse_splat[i]);
                        accumulate_rows<1, DV>(st + 2 * dk + dv, 0, dv, cn, prob.data(), grad_row);
                        vec* dlogit = dlogits.data() + jb * chunk;
                        dot_rows<1, DV>(st + dk, 0, dv, cn, grad_row, dlogit);
                        for (int64_t i = 0; i < cn; ++i) dlogit[i] = prob[i] * (dlogit[i] - delta_splat[i]);
                        accumulate_rows<1, DK>(st + dk + dv, 0, dk, cn, dlogit, query_row);
                    }
                    if (sl.part != nullptr)
                        dq_partial_keys_in_lanes<DK>(sl.part + (c0 / LANES) * dk, dlogits.data(), chunk, cn, key_blocks,
                                                     kstate.data() + 2 * (dk + dv), state, dk);
                }
            }
            if (dkv == nullptr) return;
            for (int64_t jb = 0; jb < key_blocks; ++jb) {
                vec* st = kstate.data() + jb * state;
                const int valid = static_cast<int>(std::min<int64_t>(LANES, s.lkv - jb * LANES));
                for (int c = 0; c < dk; ++c) st[dk + dv + c] *= s.scale;
                store_lanes<DK>(dkv, *dkvl, kwin, inv.keys.data(), jb * LANES, h * dk, st + dk + dv, dk, valid);
                store_lanes<DV>(dkv, *dkvl, kwin, inv.keys.data(), jb * LANES, cq + h * dv, st + 2 * dk + dv, dv, valid);
            }
        }
    });
    if (dq == nullptr) return;
    parallel_items(s.p * s.heads, s.threads, [&](int64_t item) {  // item = p * heads + h
        const int64_t p = item / s.heads, h = item % s.heads, win = b * s.p + p;
        const int32_t* toks = region.list(win);
        const int64_t count = region.count(win);
        if (count < s.lq) region.zero_outside(dq + h * dk, *dql, win, dk);
        alignas(64) vec sum[head_capacity<DK>()];
        for (int64_t i0 = 0; i0 < count; i0 += LANES) {
            const int valid = static_cast<int>(std::min<int64_t>(LANES, count - i0));
            for (int64_t t = 0; t < s.topk; ++t) {
                const vec* part = dq_part + ((p * s.topk + t) * s.heads + h) * slot_vecs + (i0 / LANES) * dk;
                for (int c = 0; c < dk; ++c) sum[c] = t == 0 ? part[c] : sum[c] + part[c];
            }
            for (int c = 0; c < dk; ++c) sum[c] *= s.scale;
            store_lanes<DK>(dq, *dql, win, toks, i0, h * dk, sum, dk, valid);
        }
    });
}

// Head sizes with a compiled specialisation (BRA in YOLO: 64..512 channels over 8 heads) get unrolled loops;
// others run the generic ones, up to MAX_HEAD_DIM. `run` is called with std::integral_constant<int, D>,
// D = 0 for the generic loops.
template <class Run>
void dispatch(int64_t dk, int64_t dv, Run run) {
    if (dk == dv && dk == 8) run(std::integral_constant<int, 8>{});
    else if (dk == dv && dk == 16) run(std::integral_constant<int, 16>{});
    else if (dk == dv && dk == 32) run(std::integral_constant<int, 32>{});
    else run(std::integral_constant<int, 0>{});
}

}  // namespace

extern "C" {

int yoloattn_abi() { return YOLOATTN_ABI; }
int64_t yoloattn_args_size() { return static_cast<int64_t>(sizeof(RoutedArgs)); }
int yoloattn_max_head_dim() { return MAX_HEAD_DIM; }
int yoloattn_lanes() { return LANES; }
const char* yoloattn_isa() { return ISA; }
const char* yoloattn_status_message(int status) { return status_message(status); }

// Forward: reads q, kv, idx; writes out and, unless null, lse.
int yoloattn_routed_forward(const RoutedArgs* args) {
    if (args == nullptr) return NULL_POINTER;
    const int status = validate(*args, false);
    if (status != OK) return status;
    const Shape s(*args);
    const Layout ql(s.n, args->q), kvl(s.n, args->kv), ol(s.n, args->out);
    const std::vector<float> key_norm = key_norms(s, args->kv.data, kvl);
    const ForwardPass pass{s, args->q.data, ql, args->kv.data, kvl, args->idx, key_norm.data(),
                           args->out.data, ol, args->lse};
    dispatch(s.dk, s.dv, [&](auto d) { pass.run<d.value, d.value>(); });
    return OK;
}

// Backward: reads q, kv, idx, out, dout, lse; writes dq and dkv where their data is not null.
int yoloattn_routed_backward(const RoutedArgs* args) {
    if (args == nullptr) return NULL_POINTER;
    const int status = validate(*args, true);
    if (status != OK) return status;
    const Shape s(*args);
    const Layout ql(s.n, args->q), kvl(s.n, args->kv), ol(s.n, args->out), gl(s.n, args->dout);
    const QueryTokens region(ql, s.n, s.rows_valid, s.cols_valid);
    const std::vector<float> delta = deltas(s, region, args->out.data, ol, args->dout.data, gl);
    const RoutingInverse inv(s, args->idx);
    const std::optional<Layout> dql = args->dq.data ? std::optional<Layout>(Layout(s.n, args->dq)) : std::nullopt;
    const std::optional<Layout> dkvl = args->dkv.data ? std::optional<Layout>(Layout(s.n, args->dkv)) : std::nullopt;
    dispatch(s.dk, s.dv, [&](auto d) {
        // one image at a time: the dq partial sums (topk slots per query window and head) are reused
        const int64_t slot_vecs = (s.lq + LANES - 1) / LANES * s.dk;
        std::unique_ptr<vec[]> dq_part(args->dq.data ? new vec[s.p * s.topk * s.heads * slot_vecs] : nullptr);
        for (int64_t b = 0; b < s.n; ++b)
            backward_image<d.value, d.value>(b, s, region, inv, args->q.data, ql, args->kv.data, kvl,
                                             args->dout.data, gl, args->lse, delta.data(), dq_part.get(),
                                             args->dq.data, dql ? &*dql : nullptr, args->dkv.data,
                                             dkvl ? &*dkvl : nullptr);
    });
    return OK;
}

}  // extern "C"

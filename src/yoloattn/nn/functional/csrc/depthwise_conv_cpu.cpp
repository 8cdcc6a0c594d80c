// Weight and bias gradients of a stride-1 depthwise 2-D convolution on channels-last float32 maps.
//
// Built on first use by yoloattn/nn/functional/depthwise_conv.py with the system C++ compiler and loaded with
// ctypes. That file passes YOLOATTN_DW_ABI (defined there only) and checks at load time that the library
// reports the same ABI and the same size of DepthwiseArgs.
//
// Why: PyTorch's CPU convolution backward for depthwise kernels larger than 3x3 (BRA's 5x5 LePE) takes
// 5-10x its forward; the weight gradient is a small reduction (kh*kw*C sums over N*H*W) that runs at memory
// speed when channels sit in vector lanes. The input gradient needs no kernel: it is the forward convolution
// of the output gradient with the flipped weights (the Python side runs it).
//
// Tensors (each pixel's C channels contiguous; pixel (n, y, x) starts at float n * s_n + y * s_h + x * s_w):
//   x      (N, H, W, C)  the convolution's input
//   grad   (N, H, W, C)  the gradient of its output (stride 1, padding (ph, pw): the output is H x W too)
//   grad_weight  (kh, kw, C) contiguous, written
//   grad_bias    (C) contiguous, written where not null
// grad_weight[i, j, c] = sum over n, y, x of grad[n, y, x, c] * x[n, y + i - ph, x + j - pw, c] (zero outside).
//
// Work: chunks of ROWS output rows of one image, in a fixed order; each chunk's sums go to its own partial
// buffer, and the partials are then added in chunk order per element. Nothing depends on the thread count,
// so neither do the results.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#ifndef YOLOATTN_DW_ABI
#error "build with -DYOLOATTN_DW_ABI=<n> (depthwise_conv.py passes it)"
#endif

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr const char* ISA = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int LANES = 8;
constexpr const char* ISA = "avx2";
#elif defined(__ARM_NEON)
constexpr int LANES = 4;
constexpr const char* ISA = "neon";
#elif defined(__SSE2__)
constexpr int LANES = 4;
constexpr const char* ISA = "sse2";
#else
constexpr int LANES = 4;
constexpr const char* ISA = "generic";
#endif

// unaligned loads and stores of LANES floats (aligned(4): channels start anywhere)
typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
constexpr int VECS = 4;  // accumulators per tap: 4 * LANES channels at a time, well inside the register file
constexpr int64_t ROWS = 4;  // output rows per work chunk

struct Map {
    const float* data;
    int64_t s_n, s_h, s_w;  // strides in floats; the channel stride is 1
};

}  // namespace

extern "C" {

struct DepthwiseArgs {
    int64_t abi, size;  // YOLOATTN_DW_ABI and sizeof(DepthwiseArgs), checked first
    int64_t n, h, w, c, kh, kw, ph, pw, threads;
    Map x, grad;
    float* grad_weight;
    float* grad_bias;
};

}  // extern "C"

namespace {

enum Status { OK = 0, NULL_POINTER = 1, ABI_MISMATCH = 2, BAD_SHAPE = 3 };

// As in routed_attention_cpu.cpp: each kernel is one self-contained file, because its bytes are its cache key.
template <class Body>
void parallel_items(int64_t count, int64_t threads, Body body) {
    const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < count; ++item) body(item);
#else
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) body(item);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
#endif
}

// Channels [c0, c0 + V * LANES) of one chunk: for every tap, the sum over the chunk's pixels of
// grad * shifted x, kept in V vector accumulators; then, if `bias`, the plain sum of grad.
template <int V>
void chunk_block(const DepthwiseArgs& a, int64_t img, int64_t y0, int64_t y1, int64_t c0, float* partial,
                 float* bias) {
    const float* xb = a.x.data + img * a.x.s_n + c0;
    const float* gb = a.grad.data + img * a.grad.s_n + c0;
    for (int64_t i = 0; i < a.kh; ++i) {
        for (int64_t j = 0; j < a.kw; ++j) {
            vec acc[V] = {};
            const int64_t dy = i - a.ph, dx = j - a.pw;
            const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min<int64_t>(a.w, a.w - dx);
            for (int64_t y = y0; y < y1; ++y) {
                const int64_t sy = y + dy;
                if (sy < 0 || sy >= a.h) continue;
                const float* grow = gb + y * a.grad.s_h;
                const float* xrow = xb + sy * a.x.s_h;
                for (int64_t x = x_lo; x < x_hi; ++x) {
                    const float* g = grow + x * a.grad.s_w;
                    const float* s = xrow + (x + dx) * a.x.s_w;
                    for (int v = 0; v < V; ++v)
                        acc[v] += *reinterpret_cast<const vec*>(g + v * LANES) *
                                  *reinterpret_cast<const vec*>(s + v * LANES);
                }
            }
            float* out = partial + (i * a.kw + j) * a.c + c0;
            for (int v = 0; v < V; ++v) *reinterpret_cast<vec*>(out + v * LANES) = acc[v];
        }
    }
    if (bias == nullptr) return;
    vec acc[V] = {};
    for (int64_t y = y0; y < y1; ++y)
        for (int64_t x = 0; x < a.w; ++x)
            for (int v = 0; v < V; ++v)
                acc[v] += *reinterpret_cast<const vec*>(gb + y * a.grad.s_h + x * a.grad.s_w + v * LANES);
    for (int v = 0; v < V; ++v) *reinterpret_cast<vec*>(bias + c0 + v * LANES) = acc[v];
}

// The channels past the last whole vector, one at a time.
void chunk_tail(const DepthwiseArgs& a, int64_t img, int64_t y0, int64_t y1, int64_t c0, float* partial,
                float* bias) {
    for (int64_t c = c0; c < a.c; ++c) {
        const float* xb = a.x.data + img * a.x.s_n + c;
        const float* gb = a.grad.data + img * a.grad.s_n + c;
        for (int64_t i = 0; i < a.kh; ++i) {
            for (int64_t j = 0; j < a.kw; ++j) {
                float acc = 0.0f;
                const int64_t dy = i - a.ph, dx = j - a.pw;
                const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min<int64_t>(a.w, a.w - dx);
                for (int64_t y = y0; y < y1; ++y) {
                    const int64_t sy = y + dy;
                    if (sy < 0 || sy >= a.h) continue;
                    for (int64_t x = x_lo; x < x_hi; ++x)
                        acc += gb[y * a.grad.s_h + x * a.grad.s_w] * xb[sy * a.x.s_h + (x + dx) * a.x.s_w];
                }
                partial[(i * a.kw + j) * a.c + c] = acc;
            }
        }
        if (bias == nullptr) continue;
        float acc = 0.0f;
        for (int64_t y = y0; y < y1; ++y)
            for (int64_t x = 0; x < a.w; ++x) acc += gb[y * a.grad.s_h + x * a.grad.s_w];
        bias[c] = acc;
    }
}

int validate(const DepthwiseArgs* a) {
    if (a == nullptr || a->x.data == nullptr || a->grad.data == nullptr || a->grad_weight == nullptr)
        return NULL_POINTER;
    if (a->abi != YOLOATTN_DW_ABI || a->size != static_cast<int64_t>(sizeof(DepthwiseArgs))) return ABI_MISMATCH;
    if (a->n < 1 || a->h < 1 || a->w < 1 || a->c < 1 || a->kh < 1 || a->kw < 1 || a->ph < 0 || a->pw < 0 ||
        a->ph >= a->kh || a->pw >= a->kw || 2 * a->ph + 1 != a->kh || 2 * a->pw + 1 != a->kw || a->threads < 1)
        return BAD_SHAPE;
    return OK;
}

}  // namespace

extern "C" {

int yoloattn_dw_abi() { return YOLOATTN_DW_ABI; }
int64_t yoloattn_dw_args_size() { return static_cast<int64_t>(sizeof(DepthwiseArgs)); }
const char* yoloattn_dw_isa() { return ISA; }

const char* yoloattn_dw_status_message(int status) {
    switch (status) {
        case OK: return "ok";
        case NULL_POINTER: return "a required pointer is null";
        case ABI_MISMATCH: return "the argument block does not match this library's ABI";
        case BAD_SHAPE: return "sizes must be positive, the kernel odd and the padding 'same' (kernel // 2)";
        default: return "unknown status";
    }
}

// Writes grad_weight (kh, kw, C) and, unless null, grad_bias (C).
int yoloattn_dw_weight_grad(const DepthwiseArgs* args) {
    const int status = validate(args);
    if (status != OK) return status;
    const DepthwiseArgs& a = *args;
    const int64_t taps = a.kh * a.kw, row_chunks = (a.h + ROWS - 1) / ROWS, chunks = a.n * row_chunks;
    const int64_t per_chunk = (taps + 1) * a.c;  // tap sums, then the bias sum
    std::vector<float> partials(static_cast<size_t>(chunks * per_chunk));
    const bool bias = a.grad_bias != nullptr;
    parallel_items(chunks, a.threads, [&](int64_t chunk) {
        const int64_t img = chunk / row_chunks, y0 = (chunk % row_chunks) * ROWS, y1 = std::min(a.h, y0 + ROWS);
        float* partial = partials.data() + chunk * per_chunk;
        float* bias_partial = bias ? partial + taps * a.c : nullptr;
        int64_t c0 = 0;
        for (; c0 + VECS * LANES <= a.c; c0 += VECS * LANES) chunk_block<VECS>(a, img, y0, y1, c0, partial, bias_partial);
        for (; c0 + LANES <= a.c; c0 += LANES) chunk_block<1>(a, img, y0, y1, c0, partial, bias_partial);
        chunk_tail(a, img, y0, y1, c0, partial, bias_partial);
    });
    // every element summed over the chunks in chunk order, elements split into fixed spans
    const int64_t total = bias ? per_chunk : taps * a.c, span = 256;
    parallel_items((total + span - 1) / span, a.threads, [&](int64_t item) {
        const int64_t e0 = item * span, e1 = std::min(total, e0 + span);
        for (int64_t e = e0; e < e1; ++e) {
            float sum = 0.0f;
            for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * per_chunk + e];
            if (e < taps * a.c) a.grad_weight[e] = sum;
            else a.grad_bias[e - taps * a.c] = sum;
        }
    });
    return OK;
}

}  // extern "C"

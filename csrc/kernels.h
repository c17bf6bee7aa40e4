// The interface between the host code and the vector kernels: the jobs the kernels read and write
// (plain pointers and sizes), the table of kernel clones, one per instruction set, and the target
// attributes that make them. Apart from host.h so that the kernel files, the slow ones to compile
// (every kernel three times), parse c10's scalar types only and no ATen tensor header.
// What the op computes and how the files divide it: csrc/README.md.
#pragma once

#include <c10/core/ScalarType.h>  // at::ScalarType, at::BFloat16, at::Half

#include <cstdint>
#include <limits>

// Everything in namespace gircse stays inside the extension: hidden visibility keeps the functions the
// files share, and their inline constants, out of the .so's dynamic symbol table, as the anonymous
// namespace of a single file did, so that two builds loaded into one process (the installed _C and a
// JIT build, say) cannot bind to each other's definitions. Every file opens the namespace this way.
#define GIRCSE_NAMESPACE namespace gircse __attribute__((visibility("hidden")))

GIRCSE_NAMESPACE {

inline constexpr float kInf = std::numeric_limits<float>::infinity();

// The instruction sets the kernels are cloned for (plan.cpp detects and resolves them).
enum Isa : int64_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
inline constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
inline constexpr int64_t kIsaWidth[] = {4, 8, 16};  // fp32 lanes of a vector in each clone

inline constexpr int64_t kMaxW = 16;           // widest vector (AVX512): chunk of vocabulary rows
inline constexpr int64_t kStreamRows = 16;     // hidden rows per streaming group (stack state)
inline constexpr int64_t kMaxStreamRows = 64;  // largest stream_rows threshold
// Vocabulary rows per block of the streaming kernels' sums (a multiple of every clone's chunk): ~sqrt
// of a split's rows at V = 49k, which minimizes the longest chain of dependent fp32 additions.
inline constexpr int64_t kStreamBlock = 128;

// fp32 -> T, in the kernels and in the host's weight-gradient sums alike.
template <typename T>
inline __attribute__((always_inline)) T narrow_to(float x) {
  return static_cast<T>(x);  // c10 conversions: round to nearest even, NaN stays NaN
}

// ---- Streaming kernels (stream_kernels.cpp)

template <typename T>
struct StreamArgs {
  const T* w;  // [V, d], element strides w_s0, w_s1
  int64_t w_s0, w_s1;
  const T* e;  // [V, d_e] (the same memory as w when tied)
  int64_t e_s0, e_s1;
  const T* bias;  // [V] contiguous, or nullptr
  int64_t d, d_e;
  float temperature, softcap;  // softcap 0: none
  bool tied;
};

template <typename T>
struct StreamForwardJob {
  StreamArgs<T> a;
  const float* h;  // [rows, d] fp32, contiguous (pair-split order for bf16, see split_pairs)
  int64_t rows;    // <= kStreamRows
  int64_t v_begin, v_end;
  float* m_out;    // [rows] running max, running sum after the range
  float* s_out;
  float* acc;      // [rows, ld_acc] unnormalized output (zero on entry)
  float* block;    // [rows, ld_acc] scratch: the current vocabulary block's accumulator
  int64_t ld_acc;
  T* gather;       // kMaxW * (d + d_e) elements
};

template <typename T>
struct StreamBackwardJob {
  StreamArgs<T> a;
  const float* h;      // [rows, d] fp32
  const float* g;      // [rows, d_e] fp32 (grad_out)
  const float* h_dot;  // h and g in chunk_dots order (pair-split for bf16; else h, g)
  const float* g_dot;
  const float* lse;    // [rows]
  const float* delta;  // [rows]
  int64_t rows;
  int64_t v_begin, v_end;
  float* dh;  // [rows, ld_dh] this split's fp32 partial of d hidden, or nullptr
  float* dh_block;  // [rows, ld_dh] scratch (with dh): the current vocabulary block's part of it
  int64_t ld_dh;
  T* dw;  // [V, d] contiguous, or nullptr
  T* de;  // [V, d_e] contiguous, or nullptr (also when merged into dw)
  T* db;  // [V], or nullptr
  bool merge_tied;
  float grad_filter_eps;
  T* gather;    // kMaxW * (d + d_e) elements
  float* work;  // 2 * rows * kMaxW + rows floats
};

// Rows of x [rows, len] in the order chunk_dots<kW> expects for bf16 rows (identity otherwise); kw is
// the clone's vector width (kIsaWidth).
void split_pairs(const float* x, int64_t rows, int64_t len, int64_t kw, float* out);

// ---- Tile-path elementwise kernels (tile_kernels.cpp), on vocabulary-major tiles: row r = vocabulary
// row, column i = hidden row.

struct TileSoftmaxJob {
  float* z;  // [n, ldz]: raw logits in, fp32 probabilities p = exp(z - safe max) out (fp32 engine)
  int64_t n, m, ldz;
  const float* bias;  // [n] or nullptr
  float temperature, softcap;
  float* run_m;  // [m] running max and sum of these rows (updated)
  float* run_s;
  float* acc;  // [m, ld_acc] accumulator rows, rescaled here
  int64_t ld_acc, d_e;
  at::BFloat16* p16;  // bf16 engine: P [m, ldp] (row-major, transposed from z), pad columns zero
  int64_t ldp;
  float* work;  // 4 * m floats
};

struct TileGradJob {
  const float* zd;  // [n, ldz]: raw logits in columns [0, m), raw dp = <dO, E_v> in [m, 2m)
  int64_t n, m, ldz;
  const float* bias;
  float temperature, softcap;
  const float* lse;    // [m]
  const float* delta;  // [m]
  bool need_dz;
  // Outputs, per vocabulary row r: d raw logit in columns [0, m) and p in [p_col, p_col + m) of
  // pd32 (fp32 engine) or pd16 (bf16 engine; columns m..p_col and beyond p_col + m up to 2 * p_col zero),
  // or neither (both nullptr: the bf16 engine without weight gradients).
  float* pd32;
  at::BFloat16* pd16;
  int64_t ldpd, p_col;
  at::BFloat16* dz16;  // bf16 engine: d raw logits transposed [m, ld_dz16] (pad columns zero), or nullptr
  int64_t ld_dz16;
  float* db;  // [n]: row sums of the d raw logits (written), or nullptr
  float* p_max;  // out: largest p of the block (NaN if any is NaN)
};

// ---- One set of entry points per instruction set, chosen at run time (kernels_for).

struct Kernels {
  void (*stream)(at::ScalarType, bool backward, const void* job);
  void (*tile_forward_softmax)(const TileSoftmaxJob&);
  void (*tile_backward_elementwise)(const TileGradJob&);
  void (*pack_pairs)(const at::BFloat16*, int64_t, int64_t, int64_t, int64_t, at::BFloat16*);
};

// The clones: the same source compiled for each instruction set through GCC's function-level target
// attribute, every helper they call (vec.h) inlined into them. The kernel files define them, each
// with the attribute spelled here; plan.cpp puts them in the tables kernels_for returns.
#if defined(__x86_64__) && defined(__GNUC__)
#define GIRCSE_ISA_CLONES 1
#define GIRCSE_TARGET_avx2 __attribute__((target("arch=x86-64-v3")))
#define GIRCSE_TARGET_avx512 __attribute__((target("arch=x86-64-v4")))
#else
#define GIRCSE_ISA_CLONES 0
#endif
#define GIRCSE_TARGET_baseline

#define GIRCSE_DECLARE_CLONES(SUFFIX)                                                                       \
  GIRCSE_TARGET_##SUFFIX void stream_##SUFFIX(at::ScalarType dt, bool backward, const void* job);           \
  GIRCSE_TARGET_##SUFFIX void tile_forward_softmax_##SUFFIX(const TileSoftmaxJob& j);                       \
  GIRCSE_TARGET_##SUFFIX void tile_backward_elementwise_##SUFFIX(const TileGradJob& j);                     \
  GIRCSE_TARGET_##SUFFIX void pack_pairs_##SUFFIX(const at::BFloat16* s, int64_t s0, int64_t s1, int64_t r, \
                                                  int64_t c, at::BFloat16* d);

GIRCSE_DECLARE_CLONES(baseline)
#if GIRCSE_ISA_CLONES
GIRCSE_DECLARE_CLONES(avx2)
GIRCSE_DECLARE_CLONES(avx512)
#endif

const Kernels& kernels_for(int64_t isa);

}  // namespace gircse

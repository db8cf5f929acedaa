// Decode-shaped CPU products for moedesk: a few rows of activations times a weight that is read once.
//
//   moedesk::linear(x [M, K], weight) -> y [M, N] fp32        y = x · Wᵀ
//   moedesk::moe(x [M, H], ids [M, k], weights [M, k], gate_up [E, 2I, H], down [E, H, I]) -> y [M, H] fp32
//        y[m] = Σ_j weights[m, j] · down_e · (silu(gate_e · x[m]) * (up_e · x[m])),  e = ids[m, j]
//
// A weight is (q, scale, zero, fmt, group) in the formats of kernels/formats.py: fmt 0 fp32 and 1 bf16
// (q is the weight; scale, zero empty), 4 bf16 weights meeting fp32 activations (fp32 products, exactly
// those of the same values stored as fp32, with half the bytes read), 5 the same in blocks of 16 rows
// (blocked_rows), 2 int8 (q int8 [N, K], scale fp32 [N]), 3 int4 (q uint8 [N, K/2],
// column 2j in the low nibble, scale fp32 [N, G], zero uint8 [N, G], G = ceil(K / group)).
//
// Each output row walks its weight row in chunks: the chunk is widened to fp32 in a buffer that stays in
// L1, then dotted with every activation row. So the weight streams from memory once however many rows
// (verified tokens) use it, and each (row, output) dot runs the same way whatever M is: a verification
// pass gives the same bits as one-token steps. The MoE op reads each chosen expert once for all rows that
// chose it. Threads split the output rows on one team of threads (Team), kept across calls: inside a
// layers_decode pass, and for a product on its own above PARALLEL_BYTES (smaller ones run on one thread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

// ---- a team of threads for a pass's splits ----------------------------------------------------------
//
// layers_decode runs its layers on the calling thread (thread 0); threads 1.. of a Team, started once and
// kept, take their slices of each product, of the attention heads and of the MoE's pieces. Handing a
// slice over costs a fraction of a microsecond, against a few to open a parallel region per product, so
// the bundled model's small products (8-100 KB) split across threads too.
//
// A slice is claimed, not assigned: thread 0 runs its own slice and then every slice no helper has
// started, so a helper the OS has taken off its core (the app's window drawing, a browser on the other
// core) costs at most the slice it is inside, not a pass. With slices fixed to threads, a 2-thread decode
// of the bundled model beside one busy process fell from ~1,150 to ~240 tokens/s, and the app, whose
// window shares these cores with the worker, decoded at 0.70x the engine alone. Which thread runs a
// slice changes no bits: each output is computed whole by one thread.
//
// Helpers spin while a pass is on and for SPIN_AFTER_PASS after it (the Python between two decode steps),
// yielding now and then, then sleep on a futex (std::atomic::wait) until the next pass wakes them.
// The cache line at p into L2. As inline asm: GCC 12 dropped _mm_prefetch from every kernel but the int8
// ones. The address goes in a register: a memory operand made GCC store the accumulators to the stack
// before every prefetch.
inline void prefetch_l2(const void* p) {
#if defined(__x86_64__) || defined(_M_X64)
  asm volatile("prefetcht1 (%0)" : : "r"(p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

#ifdef __AVX512VNNI__
// acc += the products of a's and b's int16 pairs, two to a lane. As inline asm: around
// _mm512_dpwssd_epi32 GCC 12 copied each of vnni_rows' 16 accumulators through a spare register, two
// moves per vpdpwssd; without them its 4- and 8-token products in cache ran 1.4x faster (one thread,
// medians of 8 alternated pairs). (dpbusd_block keeps the intrinsic: there the asm form made GCC keep
// the accumulators on the stack.)
inline void dpwssd_into(__m512i& acc, __m512i a, __m512i b) {
#ifdef __GNUC__
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
#else
  acc = _mm512_dpwssd_epi32(acc, a, b);
#endif
}
#endif

inline void relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Team {
 public:
  explicit Team(int size) : size_(size), claimed_(size), done_(size) {
    for (int i = 1; i < size; ++i) helpers_.emplace_back([this, i] { serve(i); });
  }
  ~Team() {
    quit_.store(true);
    begin();  // wakes the sleepers
    for (auto& t : helpers_) t.join();
  }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  int size() const { return size_; }

  // A pass begins (helpers spin from now) or ends (they sleep after SPIN_AFTER_PASS).
  void begin() {
    active_.store(true);
    wake_.fetch_add(1);
    if (sleepers_.load() > 0) wake_.notify_all();
  }
  void end() { active_.store(false); }

  // f(lo, hi) on the team's slices of [0, n), cut at multiples of align; returns when every slice is done.
  template <class F>
  void split(int64_t n, int64_t align, F& f) {
    n_ = n;
    align_ = align;
    bounds_ = nullptr;
    go(f);
  }

  // f(bounds[i], bounds[i + 1]) for slices i = 0 .. size() - 1 (bounds: size() + 1 entries).
  template <class F>
  void split_at(const int64_t* bounds, F& f) {
    bounds_ = bounds;
    go(f);
  }

  // Whether a split is running: work inside one runs on its thread (no nested splits).
  bool busy() const { return busy_; }

 private:
  static constexpr auto SPIN_AFTER_PASS = std::chrono::microseconds(1000);
  static constexpr int64_t YIELD_EVERY = 256;  // spins: a helper sharing a core with thread 0 lets it run

  template <class F>
  void go(F& f) {
    using Fn = std::remove_reference_t<F>;
    call_ = [](void* c, int64_t lo, int64_t hi) { (*static_cast<Fn*>(c))(lo, hi); };
    ctx_ = static_cast<void*>(&f);
    busy_ = true;
    const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
    gen_.store(g, std::memory_order_release);  // publishes the split above
    run(0);
    for (int i = 1; i < size_; ++i)
      if (claim(i, g)) {
        run(i);
        done_[i].store(g, std::memory_order_relaxed);
      }
    for (int i = 1; i < size_; ++i)  // the slices that helpers took
      for (int spins = 0; done_[i].load(std::memory_order_acquire) != g; ++spins)
        spins < 4096 ? relax() : std::this_thread::yield();  // a preempted helper: let it have a core
    busy_ = false;
    if (failed_) std::rethrow_exception(std::exchange(failed_, nullptr));
  }

  // Slice i of split g for the caller, unless another thread has it (claimed_ holds the last split that
  // each slice was claimed in: a helper that wakes late finds its slice taken, or finished, and skips it).
  bool claim(int i, uint64_t g) {
    uint64_t seen = claimed_[i].load(std::memory_order_acquire);
    return seen < g && claimed_[i].compare_exchange_strong(seen, g, std::memory_order_acq_rel);
  }

  void run(int i) {
    try {
      if (bounds_) {
        if (bounds_[i] < bounds_[i + 1]) call_(ctx_, bounds_[i], bounds_[i + 1]);
        return;
      }
      const int64_t units = (n_ + align_ - 1) / align_, per = units / size_, extra = units % size_;
      const int64_t u0 = i * per + std::min<int64_t>(i, extra), u1 = u0 + per + (i < extra ? 1 : 0);
      const int64_t lo = std::min(n_, u0 * align_), hi = std::min(n_, u1 * align_);
      if (lo < hi) call_(ctx_, lo, hi);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failed_mutex_);
      if (!failed_) failed_ = std::current_exception();
    }
  }

  // Helper i: its slice of every split, claimed; spinning during passes, asleep between them.
  void serve(int i) {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    auto idle_since = std::chrono::steady_clock::now();
    int64_t spin = 0;
    bool was_on = false;
    while (!quit_.load(std::memory_order_relaxed)) {
      const uint64_t g = gen_.load(std::memory_order_acquire);
      if (g != seen) {
        seen = g;
        if (claim(i, g)) {
          run(i);
          done_[i].store(g, std::memory_order_release);
        }
        continue;
      }
      const bool on = active_.load(std::memory_order_relaxed);
      if (!on && was_on) idle_since = std::chrono::steady_clock::now();  // the pass just ended
      was_on = on;
      if (on || std::chrono::steady_clock::now() - idle_since < SPIN_AFTER_PASS) {
        ++spin % YIELD_EVERY ? relax() : std::this_thread::yield();
        continue;
      }
      const uint64_t w = wake_.load();
      sleepers_.fetch_add(1);
      if (!active_.load() && !quit_.load()) wake_.wait(w);
      sleepers_.fetch_sub(1);
      idle_since = std::chrono::steady_clock::now();
    }
  }

  const int size_;
  std::vector<std::thread> helpers_;
  std::atomic<uint64_t> gen_{0};          // the latest split
  std::vector<std::atomic<uint64_t>> claimed_, done_;  // per slice: the last split it was claimed in, done in
  std::atomic<bool> active_{false}, quit_{false};
  std::atomic<uint64_t> wake_{0};         // bumped by begin(): the sleepers' futex
  std::atomic<int> sleepers_{0};
  void (*call_)(void*, int64_t, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, align_ = 1;
  const int64_t* bounds_ = nullptr;
  bool busy_ = false;  // written by thread 0 only, read by the threads inside a split
  std::exception_ptr failed_;
  std::mutex failed_mutex_;
};

bool g_teams = true;     // whether layers_decode runs on a team (set_team: off for A/B and tests)
Team* g_team = nullptr;  // the team of the pass that is running, if any (only thread 0 reads it)
constexpr int64_t TEAM_BYTES = 4 * 1024;  // on a team, smaller weights stay on thread 0

// The team for this many threads, started at the first pass and kept. Never destroyed at exit: a pass
// still running on another Python thread then would find it gone (its threads end with the process).
Team& team_of(int threads) {
  static Team* team = nullptr;
  if (!team || team->size() != threads) {
    delete team;  // between passes (thread 0 asks here first): its helpers are idle, and joined
    team = new Team(threads);
  }
  return *team;
}

// pass() on this thread while the team serves its splits, or plainly where there is one thread, a team
// already (a nested call) or teams are off.
template <class F>
void on_team(F&& pass) {
  const int threads = at::get_num_threads();
  if (threads < 2 || g_team || !g_teams) {
    pass();
    return;
  }
  struct Pass {  // the team serves from here until the pass returns or throws
    Team& team;
    explicit Pass(Team& t) : team(t) { team.begin(), g_team = &team; }
    ~Pass() { g_team = nullptr, team.end(); }
  } on(team_of(threads));
  pass();
}

// f(lo, hi) over [0, n): on the running team when there is one and the work is worth a hand-off (work:
// bytes read); otherwise, above parallel_bytes, on the team for this call alone (ATen's pool with slices of
// at least grain where teams are off).
template <class F>
void parallel(int64_t n, int64_t grain, int64_t align, int64_t work, int64_t parallel_bytes, F&& f) {
  if (g_team && g_team->busy()) {
    f(int64_t{0}, n);
  } else if (g_team && g_team->size() > 1 && work >= TEAM_BYTES && n >= 2 * align) {
    g_team->split(n, align, f);
  } else if (g_team || work < parallel_bytes) {
    f(int64_t{0}, n);
  } else if (g_teams && at::get_num_threads() > 1) {  // a product on its own (the head): the team too
    on_team([&] { g_team->split(n, align, f); });
  } else {
    at::parallel_for(0, n, grain, f);
  }
}

// The instruction set the products use: the best this build has, or lower when set_isa asks (the tests
// run the AVX2 paths on an AVX-512 machine that way). Workstations without AVX-512 (most desktop Zen 2/3
// and Intel client parts) take the AVX2 paths: FMA for fp32 activations, vpmaddwd for int8 and int4
// against int16 activations.
enum Isa : int64_t { GENERIC = 0, AVX2 = 1, AVX512 = 2 };
constexpr int64_t BUILT_ISA =
#if defined(__AVX512F__)
    AVX512;
#elif defined(__AVX2__) && defined(__FMA__)
    AVX2;
#else
    GENERIC;
#endif
int64_t g_isa = BUILT_ISA;
inline int64_t isa() { return g_isa; }

#ifdef __AVX512F__
inline __m512 splat(float v, __m512) { return _mm512_set1_ps(v); }
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 splat(float v, __m256) { return _mm256_set1_ps(v); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// exp16's polynomial on 8 lanes; 2^n is built in the exponent bits (AVX2 has no scalef), so x is kept
// to [-87, 88], where n stays a normal exponent (smaller arguments give ~1e-38 instead of 0).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 fp32 or bf16 values from p as fp32.
inline __m256 load8_f32(const void* p, bool bf16) {
  if (!bf16) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

enum Fmt : int64_t { F32 = 0, BF16 = 1, I8 = 2, I4 = 3, BF16_EXACT = 4, BF16_BLOCKS = 5, I4_BLOCKS = 6 };
constexpr int64_t CHUNK = 512;                   // columns widened at a time (a multiple of every int4 group)
constexpr int64_t PARALLEL_BYTES = 32 * 1024;  // smaller weights: one thread (a region costs a few µs; 256 KB
                                                // left the bundled model's products on one core: 10-28% slower)

struct Weight {
  int64_t fmt, N, K, group;
  const uint8_t* q;
  const float* scale;
  const uint8_t* zero;
  const float* xsum = nullptr;    // int4: the activations' scale · Σ xq per row and group (AVX2: block)
  const float* xscale = nullptr;  // int8: x[m] ≈ xscale[m] · xq[m] (int16); int4: scale per row and block
  int64_t count = 1;            // matrices in a stacked weight [count, N, K] (experts)
  bool exact = false;           // bf16 weights with fp32 activations (format BF16_EXACT): fp32 FMAs
  bool blocked = false;         // exact, rows in blocks of 16 (format BF16_BLOCKS, blocked_rows)
  bool interleaved = false;     // int4 in dpbusd_block's order (format I4_BLOCKS; only dpbusd_rows reads it)

  // Whether the activations stay fp32 (no bf16 or int16 copy is made for this weight).
  bool fp32_activations() const { return fmt == F32 || exact; }

  int64_t groups() const { return (K + group - 1) / group; }

  // int8 read by vpdpwssd (vnni_rows) against activations quantized to int16 per row.
  bool vnni() const {
#ifdef __AVX512VNNI__
    return isa() == AVX512 && fmt == I8 && K % 32 == 0;
#else
    return false;
#endif
  }

  // int4 read by vpdpbusd, 16 rows at a time (dpbusd_rows), against int8 activations per 64 columns.
  bool dpbusd() const {
#ifdef __AVX512VNNI__
    return isa() == AVX512 && fmt == I4 && group % 64 == 0 && K % 64 == 0;
#else
    return false;
#endif
  }

  // AVX2: int8 read by vpmaddwd against int16 activations (madd_rows), int4 by vpmaddubsw against int8
  // activations, 64 columns a step, reordered to match (nibble_madd_rows).
  bool madd() const {
#if defined(__AVX2__) && defined(__FMA__)
    return isa() == AVX2 && ((fmt == I8 && K % 16 == 0) || (fmt == I4 && group % 64 == 0 && K % 64 == 0));
#else
    return false;
#endif
  }

  int64_t row_bytes() const {
    switch (fmt) {
      case F32: return K * 4;
      case BF16: return K * 2;
      case I8: return K;
      default: return K / 2;
    }
  }

  // Columns [k0, k0 + len) of row n as fp32: a pointer into the weight (fp32) or into buf.
  const float* chunk(int64_t n, int64_t k0, int64_t len, float* buf) const {
    const uint8_t* row = q + n * row_bytes();
    switch (fmt) {
      case F32:
        return reinterpret_cast<const float*>(row) + k0;
      case BF16: {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + k0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
          std::memcpy(buf + i, &bits, 4);
        }
        return buf;
      }
      case I8: {  // the row's scale is applied to the finished dot
        const int8_t* p = reinterpret_cast<const int8_t*>(row) + k0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<float>(p[i]);
        return buf;
      }
      default: {  // int4: (q - zero) * scale per group of columns
        const uint8_t* p = row + k0 / 2;
#pragma omp simd
        for (int64_t i = 0; i < len / 2; ++i) {
          buf[2 * i] = static_cast<float>(p[i] & 15);
          buf[2 * i + 1] = static_cast<float>(p[i] >> 4);
        }
        const int64_t G = groups();
        for (int64_t a = 0; a < len;) {
          const int64_t g = (k0 + a) / group;
          const int64_t b = std::min(len, (g + 1) * group - k0);
          const float s = scale[n * G + g], zs = static_cast<float>(zero[n * G + g]) * s;
#pragma omp simd
          for (int64_t i = a; i < b; ++i) buf[i] = buf[i] * s - zs;
          a = b;
        }
        return buf;
      }
    }
  }

  // y[m * ldy + n] = x[m] · row n, for rows n in [n0, n1).
  void rows(const float* x, const uint16_t* xb, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) const {
    const int64_t level = isa();
    const bool pf = (n1 - n0) * row_bytes() >= PREFETCH_FROM;  // smaller slices sit in cache: no prefetch
    if (blocked) return blocked_rows(x, M, n0, n1, y, ldy, pf);
#ifdef __AVX512BF16__
    if (level == AVX512 && xb && K % 32 == 0) {
      // 3 weight rows for 5-8 tokens (24 accumulators): each activation vector loaded serves 3 rows. 8
      // tokens of K = 2048 are 32 KB of bf16 activations, L1's size, so they come from L2 beside the
      // streaming weights; with 2 rows, 8-token products at that K read 15.5 GB/s, with 3 19.0 (2
      // threads, from memory, medians of 5 alternated runs; K = 1408: 24.1 → 23.3). (int8's vnni_rows
      // spilled its 24 accumulators to the stack at 3 rows, and keeps 2.)
      auto dp = [&]<int FMT>() {
        blocks<8, 4, 8, 3>(M, n0, n1, [&]<int R, int MB>(int64_t n, int64_t m0) {
          dp_rows<FMT, R, MB>(xb + m0 * K, n, y + m0 * ldy, ldy, pf);
        });
      };
      switch (fmt) {
        case BF16: return dp.template operator()<BF16>();
        case I8:
          if (!xscale) return dp.template operator()<I8>();
          return blocks<8, 4>(M, n0, n1, [&]<int R, int MB>(int64_t n, int64_t m0) {  // xb is int16
            vnni_rows<R, MB>(reinterpret_cast<const int16_t*>(xb) + m0 * K, n, y + m0 * ldy, ldy, m0, pf);
          });
        case I4:
#ifdef __AVX512VNNI__
          if (dpbusd()) return dpbusd_rows(reinterpret_cast<const int8_t*>(xb), M, n0, n1, y, ldy, pf);
#endif
          return dp.template operator()<I4>();
        default: break;
      }
    }
#endif
#ifdef __AVX512F__
    if (level == AVX512 && K % 16 == 0) {
      auto fma = [&]<int FMT>() {
        blocks<8, 4>(M, n0, n1, [&]<int R, int MB>(int64_t n, int64_t m0) {
          avx512_rows<FMT, R, MB>(x + m0 * K, n, y + m0 * ldy, ldy, pf);
        });
      };
      switch (fmt) {
        case F32: return fma.template operator()<F32>();
        case BF16: return fma.template operator()<BF16>();
        case I8: return fma.template operator()<I8>();
        default: return fma.template operator()<I4>();
      }
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (level >= AVX2) {  // 16 ymm registers: fewer weight rows per block than AVX-512's 32 zmm
      // xb is AVX2's int16/int8 only where madd() chose it; an AVX-512 pass left here by an odd K has bf16
      // in xb, and reads x (fp32) below
      if (xb && madd() && fmt == I8)
        return blocks<8, 2, 4>(M, n0, n1, [&]<int R, int MB>(int64_t n, int64_t m0) {
          madd_rows<R, MB>(reinterpret_cast<const int16_t*>(xb) + m0 * K, n, y + m0 * ldy, ldy, m0, pf);
        });
      if (xb && madd() && fmt == I4)
        return blocks<8, 1, 2>(M, n0, n1, [&]<int R, int MB>(int64_t n, int64_t m0) {  // xb: int8, reordered
          nibble_madd_rows<R, MB>(reinterpret_cast<const int8_t*>(xb) + m0 * K, n, y + m0 * ldy, ldy, m0, pf);
        });
      if (K % 8 == 0) {
        auto fma = [&]<int FMT>() {
          blocks<8, 2, 4>(M, n0, n1, [&]<int R, int MB>(int64_t n, int64_t m0) {
            avx2_rows<FMT, R, MB>(x + m0 * K, n, y + m0 * ldy, ldy, pf);
          });
        };
        switch (fmt) {
          case F32: return fma.template operator()<F32>();
          case BF16: return fma.template operator()<BF16>();
          case I8: return fma.template operator()<I8>();
          default: return fma.template operator()<I4>();
        }
      }
    }
#endif
    generic_rows(x, M, n0, n1, y, ldy);
  }

  // kernel.operator()<R, MB>(n, m0) over weight rows [n0, n1), R at a time (the rest one by one), and
  // activation rows in blocks of up to MAXB from m0: the counts are template arguments so that the
  // R × MB accumulators are registers. Blocks of up to SMALL_MB rows take 4 weight rows at a time, of up
  // to MID_MB rows MID_R, larger ones 1.
  template <int MAXB, int SMALL_MB, int MID_MB = 8, int MID_R = 2, class F>
  static void blocks(int64_t M, int64_t n0, int64_t n1, F&& kernel) {
    for (int64_t m0 = 0; m0 < M; m0 += MAXB) {
      switch (std::min<int64_t>(MAXB, M - m0)) {
        case 1: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 1>(n0, n1, m0, kernel); break;
        case 2: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 2>(n0, n1, m0, kernel); break;
        case 3: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 3>(n0, n1, m0, kernel); break;
        case 4: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 4>(n0, n1, m0, kernel); break;
        case 5: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 5>(n0, n1, m0, kernel); break;
        case 6: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 6>(n0, n1, m0, kernel); break;
        case 7: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 7>(n0, n1, m0, kernel); break;
        default: sweep<MAXB, SMALL_MB, MID_MB, MID_R, 8>(n0, n1, m0, kernel); break;
      }
    }
  }

  template <int MAXB, int SMALL_MB, int MID_MB, int MID_R, int MB, class F>
  static void sweep(int64_t n0, int64_t n1, int64_t m0, F& kernel) {
    if constexpr (MB <= MAXB) {
      constexpr int R = MB <= SMALL_MB ? 4 : MB <= MID_MB ? MID_R : 1;
      int64_t n = n0;
      for (; n + R <= n1; n += R) kernel.template operator()<R, MB>(n, m0);
      for (; n < n1; ++n) kernel.template operator()<1, MB>(n, m0);
    }
  }

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // The kernels read R weight rows side by side, each a few KB: short streams that the hardware
  // prefetchers pick up late and drop at every 4 KB page, so decode products ran at a third to a half of
  // the memory's speed, and at a sixth of L3's. So each kernel also asks for the line PREFETCH bytes
  // ahead of each row's read position, into L2, once per 64-byte line (it may run up to PREFETCH past
  // the slice: prefetches never fault). V2-Lite expert shapes from memory, 2 threads, one token: bf16
  // 24 → 30 GB/s, int8 16 → 30, int4 10 → 24. A slice under PREFETCH_FROM bytes (the bundled model's
  // products) asks for nothing: in-cache dot loops pay one well-predicted test of pf per step.
  static constexpr int64_t PREFETCH = 16384, PREFETCH_FROM = 64 * 1024, I4_BLOCKS_AHEAD = 8192;

  template <int FMT>
  static inline void ahead(const uint8_t* row, int64_t k, bool pf) {
    constexpr int64_t line = FMT == F32 ? 16 : FMT == BF16 ? 32 : FMT == I8 ? 64 : 128;  // columns a line
    if (!pf || k % line) return;
    prefetch_l2(row + (FMT == F32 ? k * 4 : FMT == BF16 ? k * 2 : FMT == I8 ? k : k / 2) + PREFETCH);
  }

  // step(k, s, zs) for every STEP columns of rows n..n+R-1: int4 group by group with each row's scale s
  // and scale·zero zs broadcast as vectors V, the other formats straight through (s, zs null).
  template <int FMT, int R, int STEP, class V, class S>
  void walk(int64_t n, S&& step) const {
    if constexpr (FMT == I4) {
      const int64_t G = groups();
      for (int64_t g = 0; g < G; ++g) {
        V s[R], zs[R];
        for (int r = 0; r < R; ++r) {
          const float sc = scale[(n + r) * G + g];
          s[r] = splat(sc, V());
          zs[r] = splat(static_cast<float>(zero[(n + r) * G + g]) * sc, V());
        }
        const int64_t k1 = std::min(K, (g + 1) * group);
        for (int64_t k = g * group; k < k1; k += STEP) step(k, s, zs);
      }
    } else {
      for (int64_t k = 0; k < K; k += STEP) step(k, static_cast<const V*>(nullptr), static_cast<const V*>(nullptr));
    }
  }
#endif

#ifdef __AVX512F__
  // The accumulators' sums into y, with int8's per-row scale.
  template <int FMT, int R, int MB>
  void store(__m512 (&acc)[R][MB], int64_t n, float* y, int64_t ldy) const {
    for (int r = 0; r < R; ++r) {
      const float rs = FMT == I8 ? scale[n + r] : 1.f;
      for (int m = 0; m < MB; ++m) y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]) * rs;
    }
  }

  // 16 fp32 weights of a row from column k (int4: before its group's scale and zero).
  template <int FMT>
  static inline __m512 load16(const uint8_t* row, int64_t k) {
    if constexpr (FMT == F32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
    } else if constexpr (FMT == BF16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + k));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if constexpr (FMT == I8) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
    } else {  // 8 bytes → 16 nibbles in column order (low nibble first)
      __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
      __m128i lohi = _mm_or_si128(_mm_and_si128(b, _mm_set1_epi16(0x0F)),
                                  _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0xF0)), 4));
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lohi));
    }
  }

  // R consecutive weight rows from n against MB activation rows: each weight vector is loaded once and
  // used MB times; the R × MB accumulators stay in registers.
  template <int FMT, int R, int MB>
  void avx512_rows(const float* x, int64_t n, float* y, int64_t ldy, bool pf) const {
    __m512 acc[R][MB];
    const uint8_t* row[R];
    for (int r = 0; r < R; ++r) {
      row[r] = q + (n + r) * row_bytes();
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    auto step = [&](int64_t k, const __m512* s, const __m512* zs) {
      __m512 w[R];
      for (int r = 0; r < R; ++r) {
        ahead<FMT>(row[r], k, pf);
        w[r] = load16<FMT>(row[r], k);
        if constexpr (FMT == I4) w[r] = _mm512_fmsub_ps(w[r], s[r], zs[r]);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
      }
    };
    walk<FMT, R, 16, __m512>(n, step);
    store<FMT, R, MB>(acc, n, y, ldy);
  }
#endif

#ifdef __AVX512BF16__
  // bf16 weights (int8 and int4 widened to bf16, exact for int8 and for int4 before its scale) dotted with
  // bf16 activations by vdpbf16ps: 32 products per instruction, summed in fp32. The weight-only formats
  // ran with bf16 activations before too (torch's CPU kernels take only those).
  // 32 weights of a row from column k as bf16 (int4: (q − zero) · scale, rounded to bf16).
  template <int FMT>
  static inline __m512bh load32(const uint8_t* row, int64_t k, __m512 s, __m512 zs) {
    if constexpr (FMT == BF16) {
      return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const uint16_t*>(row) + k);
    } else if constexpr (FMT == I8) {
      const __m128i* p = reinterpret_cast<const __m128i*>(row + k);
      __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
      __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
      return _mm512_cvtne2ps_pbh(hi, lo);
    } else {  // 16 bytes → 32 nibbles in column order (low nibble first)
      __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
      __m256i lohi = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x0F)),
                                     _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0xF0)), 4));
      __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lohi)));
      __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lohi, 1)));
      return _mm512_cvtne2ps_pbh(_mm512_fmsub_ps(hi, s, zs), _mm512_fmsub_ps(lo, s, zs));
    }
  }

#ifdef __AVX512VNNI__
  // int4 against int8 activations (one scale per 64 columns, as on AVX2), 16 rows at a time: each
  // accumulator lane is one row, so no horizontal sum per (row, token), and each unpacked weight vector
  // serves every token. Per 64 columns the 16 rows' 32 bytes are transposed in registers into 8 vectors,
  // vector j holding each row's columns 8j..8j+7 (the low nibbles the even ones, the high the odd); the
  // activations come reordered to match (per 8 columns: the 4 even, then the 4 odd), and one vpdpbusd
  // per nibble half and token takes 64 products against a broadcast of 4 activations. The block's
  // exact integer sums times (the rows' group scales · the activations' block scale) go to fp32; the zero
  // points come off at the end: Σ (q − z)·s·x = Σ_b s·xs_b·(Σ q·xq)_b − Σ_g z·s·(Σ_b∈g xs_b·Σ xq_b).
  // Against the bf16 path by nibbles (four vdpbf16ps and an FMA per row, token and 128 columns), in
  // cache on 2 threads: one token 25 → 36 GB/s, four 9.5 → 21 (int4 was bound by instructions). This
  // core issues about one 512-bit operation a cycle, products and shuffles alike (scripts/vnni_ceiling.py),
  // so what counts is every vector instruction per block: 16 vpdpbusd per token, against 32 for the
  // transpose, 16 for the nibbles and the scale tiles' few.
  // Each row's bits do not depend on the other rows or tokens in the call (verification equals one-token
  // steps), nor on how the rows are sliced.
  void dpbusd_rows(const int8_t* x, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy, bool pf) const {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      auto run = [&]<int MB>() {
        for (int64_t n = n0; n < n1; n += 16)
          dpbusd_block<MB>(x + m0 * K, n, std::min<int64_t>(16, n1 - n), y + m0 * ldy, ldy, m0, pf);
      };
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: run.template operator()<1>(); break;
        case 2: run.template operator()<2>(); break;
        case 3: run.template operator()<3>(); break;
        case 4: run.template operator()<4>(); break;
        case 5: run.template operator()<5>(); break;
        case 6: run.template operator()<6>(); break;
        case 7: run.template operator()<7>(); break;
        default: run.template operator()<8>(); break;
      }
    }
  }

  // v[i] lane j ← v[j] lane i: a 16 × 16 transpose of fp32 in registers (64 shuffles: 32- and 64-bit
  // interleaves transpose the 4 × 4 blocks inside each 128-bit lane, then 128-bit shuffles move the blocks).
  static inline void transpose16(__m512* v) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
      for (int h = 0; h < 2; ++h) {
        v[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + h]), _mm512_castps_pd(t[i + h + 2])));
        v[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + h]), _mm512_castps_pd(t[i + h + 2])));
      }
    // each 128-bit lane now holds a transposed 4 × 4 block; two passes of 128-bit shuffles place them
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h) {
        t[4 * h + i] = _mm512_shuffle_f32x4(v[i], v[i + 4], h ? 0xDD : 0x88);
        t[4 * h + i + 8] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], h ? 0xDD : 0x88);
      }
    for (int i = 0; i < 8; ++i) {
      v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
  }

  // Rows n .. n + rows − 1 (rows ≤ 16; the lanes past them repeat the last row and are not stored).
  // A whole block walks its rows by the row stride (16 row pointers do not fit the registers). Format
  // I4_BLOCKS stores each block's 16 rows as the 8 vectors the transpose below makes, 512 contiguous bytes
  // per 64 columns: one sequential stream instead of 16 rows 32 bytes at a time, and no transpose.
  template <int MB>
  void dpbusd_block(const int8_t* x, int64_t n, int64_t rows, float* y, int64_t ldy, int64_t m0, bool pf) const {
    const int64_t G = groups(), B = K / 64, rb = row_bytes();
    const int gs = __builtin_ctzll(static_cast<unsigned long long>(group)) - 6;  // blocks per group: 2^gs
    const float* xs = xscale + m0 * B;  // [MB, B]: the activations' scale per block
    const bool full = rows == 16;
    // The 16 rows' group scales and zero points · scales, transposed to [G][16] once per block of rows:
    // one load per 64 columns where a 16-lane gather per block cost ~15% of a 4-token product, and the
    // zero terms as one vector FMA per group and token instead of a horizontal sum per row and token
    const int64_t Gp = (G + 15) / 16 * 16;  // groups rounded up to the 16 a transpose writes
    thread_local std::vector<float> tiles;
    tiles.resize(32 * Gp);
    // I4_BLOCKS stores the scales and zero points as these tiles already ([G][16] per block of rows)
    const float* st = interleaved ? scale + n * G : tiles.data();
    float* zt = tiles.data() + 16 * Gp;
    for (int64_t g = 0; !interleaved && g < G; g += 16) {  // 16 groups of the 16 rows a step, transposed
      const __mmask16 mk = tail_mask(G - g);
      __m512 sc[16], zs[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t nr = n + std::min<int64_t>(r, rows - 1);
        sc[r] = _mm512_maskz_loadu_ps(mk, scale + nr * G + g);
        zs[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zero + nr * G + g))), sc[r]);
      }
      transpose16(sc);
      transpose16(zs);
      for (int i = 0; i < 16; ++i) {
        _mm512_storeu_ps(tiles.data() + 16 * (g + i), sc[i]);
        _mm512_storeu_ps(zt + 16 * (g + i), zs[i]);
      }
    }
    const uint8_t* base = q + n * rb;
    auto row = [&](int r) { return base + std::min<int64_t>(r, rows - 1) * rb; };  // a part block
    const __m512i nib = _mm512_set1_epi8(0x0F);
#ifdef __GFNI__
    // the 8x8 bit matrix of gf2p8affine that shifts each byte right by 4: the high nibble, in one op
    const __m512i high = _mm512_set1_epi64(0x1020408000000000ll);
#endif
    const __m512i lo_words = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), hi_words = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      __m512i z[8], t[8], u[8], v[8];
      if (pf && (full || interleaved)) {
        // the weights ahead: I4_BLOCKS, one stream, 8 KB ahead in it (the next block, 11-16 KB ahead, and 2 KB
        // read 0.94-0.96x and 0.81x of row order in decode; 4-8 KB 1.0-1.06x: medians of 8 alternated runs);
        // row order, the next block's 16 rows, one contiguous region, in order. 8 lines a step either way.
        const uint8_t* p = interleaved ? base + b * 512 + I4_BLOCKS_AHEAD : base + 16 * rb + b * 512;
        for (int i = 0; i < 8; ++i) prefetch_l2(p + 64 * i);
        // and the next block's scales and zero points (G and G / 4 lines, the same region in either layout),
        // which its tiles would otherwise wait for: a memory latency each, ~10% of a one-token product
        if (b < G) prefetch_l2(reinterpret_cast<const uint8_t*>(scale + (n + 16) * G) + 64 * b);
        if (4 * b < G) prefetch_l2(zero + (n + 16) * G + 64 * b);
      }
      if (interleaved) {  // N is a multiple of 16 here (weight_of): every block is full
        for (int i = 0; i < 8; ++i) v[i] = _mm512_loadu_si512(base + b * 512 + 64 * i);
      } else {
        if (full) {
          const uint8_t* p = base + b * 32;
          __m256i low[8];
          for (int i = 0; i < 8; ++i, p += rb) low[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          for (int i = 0; i < 8; ++i, p += rb)
            z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(low[i]), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 1);
        } else {
          for (int i = 0; i < 8; ++i)
            z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row(i) + b * 32))),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row(i + 8) + b * 32)), 1);
        }
        // z[i]: row i's 8 words in the low half, row i + 8's in the high half. An 8 × 8 transpose of
        // 32-bit words in each half, then the halves' 128-bit quarters paired up: v[j] lane r = row r's word j.
        for (int i = 0; i < 8; i += 2) {
          t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
          t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
        }
        for (int h = 0; h < 8; h += 4) {
          u[h] = _mm512_unpacklo_epi64(t[h], t[h + 2]);
          u[h + 1] = _mm512_unpackhi_epi64(t[h], t[h + 2]);
          u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]);
          u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
        }
        for (int c = 0; c < 4; ++c) {
          v[c] = _mm512_permutex2var_epi64(u[c], lo_words, u[c + 4]);
          v[c + 4] = _mm512_permutex2var_epi64(u[c], hi_words, u[c + 4]);
        }
      }
      const __m512 sv = _mm512_loadu_ps(st + 16 * (b >> gs));
      __m512i part[MB];
      for (int m = 0; m < MB; ++m) part[m] = _mm512_setzero_si512();
      // unrolled: left as a loop for 5-8 tokens, GCC 12 kept v[] on the stack and copied accumulators
      // between registers (one move per three vpdpbusd); 8 tokens in cache +6% (median of 8 alternated pairs)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512i lo = _mm512_and_si512(v[j], nib);
#ifdef __GFNI__
        const __m512i hi = _mm512_gf2p8affine_epi64_epi8(v[j], high, 0);
#else
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v[j], 4), nib);
#endif
        for (int m = 0; m < MB; ++m) {
          int32_t xe, xo;
          std::memcpy(&xe, x + m * K + b * 64 + 8 * j, 4);
          std::memcpy(&xo, x + m * K + b * 64 + 8 * j + 4, 4);
          part[m] = _mm512_dpbusd_epi32(part[m], lo, _mm512_set1_epi32(xe));
          part[m] = _mm512_dpbusd_epi32(part[m], hi, _mm512_set1_epi32(xo));
        }
      }
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[m]), _mm512_mul_ps(sv, _mm512_set1_ps(xs[m * B + b])), acc[m]);
    }
    __m512 corr[MB];  // Σ_g z·s·(xs·Σ xq over the group)
    for (int m = 0; m < MB; ++m) corr[m] = _mm512_setzero_ps();
    const float* t = xsum + m0 * G;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 zs = interleaved ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(zero + n * G + 16 * g)))),
                                      _mm512_loadu_ps(st + 16 * g))
                                    : _mm512_loadu_ps(zt + 16 * g);
      for (int m = 0; m < MB; ++m) corr[m] = _mm512_fmadd_ps(zs, _mm512_set1_ps(t[m * G + g]), corr[m]);
    }
    const __mmask16 keep = tail_mask(rows);
    for (int m = 0; m < MB; ++m)
      _mm512_mask_storeu_ps(y + m * ldy + n, keep, _mm512_sub_ps(acc[m], corr[m]));
  }
#endif

#ifdef __AVX512VNNI__
  // int8 weights sign-extended to int16 and dotted with int16 activations by vpdpwssd: 32 products per
  // instruction, summed exactly in int32, where the bf16 path spends five instructions widening each 32
  // weights. The activations' int16 rounding (2^-15 of the row's largest) is finer than bf16's (2^-9 of
  // each value) wherever a value is within 64x of the largest, where the dot's error comes from. int32
  // lanes are safe for 8,192 columns (2 · 127 · 32767 per instruction), so longer rows flush to fp32.
  template <int R, int MB>
  void vnni_rows(const int16_t* x, int64_t n, float* y, int64_t ldy, int64_t m0, bool pf) const {
    constexpr int64_t FLUSH = 8192;
    float acc[R][MB] = {};  // in memory: the R × MB int32 partials take the vector registers
    const int8_t* row[R];
    for (int r = 0; r < R; ++r) row[r] = reinterpret_cast<const int8_t*>(q + (n + r) * row_bytes());
    for (int64_t k0 = 0; k0 < K; k0 += FLUSH) {
      __m512i part[R][MB];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) part[r][m] = _mm512_setzero_si512();
      const int64_t k1 = std::min(K, k0 + FLUSH);
      for (int64_t k = k0; k < k1; k += 32) {
        __m512i w[R];
        for (int r = 0; r < R; ++r) {
          ahead<I8>(reinterpret_cast<const uint8_t*>(row[r]), k, pf);
          w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + k)));
        }
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_loadu_si512(x + m * K + k);
          for (int r = 0; r < R; ++r) dpwssd_into(part[r][m], w[r], xv);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(part[r][m]));
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * ldy + n + r] = acc[r][m] * (scale[n + r] * xscale[m0 + m]);
  }
#endif

  template <int FMT, int R, int MB>
  void dp_rows(const uint16_t* x, int64_t n, float* y, int64_t ldy, bool pf) const {
    __m512 acc[R][MB];
    const uint8_t* row[R];
    for (int r = 0; r < R; ++r) {
      row[r] = q + (n + r) * row_bytes();
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    auto step = [&](int64_t k, const __m512* s, const __m512* zs) {
      __m512bh w[R];
      for (int r = 0; r < R; ++r) {
        ahead<FMT>(row[r], k, pf);
        w[r] = load32<FMT>(row[r], k, s ? s[r] : __m512(), zs ? zs[r] : __m512());
      }
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w[r], xv);
      }
    };
    walk<FMT, R, 32, __m512>(n, step);
    store<FMT, R, MB>(acc, n, y, ldy);
  }
#endif

#if defined(__AVX2__) && defined(__FMA__)
  // 8 fp32 weights of a row from column k (int4: before its group's scale and zero).
  template <int FMT>
  static inline __m256 load8(const uint8_t* row, int64_t k) {
    if constexpr (FMT == F32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
    } else if constexpr (FMT == BF16) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + k));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else if constexpr (FMT == I8) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
    } else {  // 4 bytes → 8 nibbles in column order (low nibble first)
      int32_t b4;
      std::memcpy(&b4, row + k / 2, 4);
      __m128i b = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(b4));
      __m128i lohi = _mm_or_si128(_mm_and_si128(b, _mm_set1_epi16(0x0F)),
                                  _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0xF0)), 4));
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lohi));
    }
  }

  // avx512_rows with 8 columns a step: fp32 activations, each weight vector loaded once for MB rows.
  template <int FMT, int R, int MB>
  void avx2_rows(const float* x, int64_t n, float* y, int64_t ldy, bool pf) const {
    __m256 acc[R][MB];
    const uint8_t* row[R];
    for (int r = 0; r < R; ++r) {
      row[r] = q + (n + r) * row_bytes();
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    }
    auto step = [&](int64_t k, const __m256* s, const __m256* zs) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) {
        ahead<FMT>(row[r], k, pf);
        w[r] = load8<FMT>(row[r], k);
        if constexpr (FMT == I4) w[r] = _mm256_fmsub_ps(w[r], s[r], zs[r]);
      }
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(w[r], xv, acc[r][m]);
      }
    };
    walk<FMT, R, 8, __m256>(n, step);
    for (int r = 0; r < R; ++r) {
      const float rs = FMT == I8 ? scale[n + r] : 1.f;
      for (int m = 0; m < MB; ++m) y[m * ldy + n + r] = hsum8(acc[r][m]) * rs;
    }
  }

  // int8 weights sign-extended to int16 and multiplied by int16 activations with vpmaddwd (pairs summed
  // exactly into int32): the AVX2 form of vnni_rows. int32 lanes are safe for 4,096 columns (each lane
  // gains 2 · 127 · 32767 per 16 columns), so longer rows flush to fp32.
  template <int R, int MB>
  void madd_rows(const int16_t* x, int64_t n, float* y, int64_t ldy, int64_t m0, bool pf) const {
    constexpr int64_t FLUSH = 4096;
    float acc[R][MB] = {};
    const int8_t* row[R];
    for (int r = 0; r < R; ++r) row[r] = reinterpret_cast<const int8_t*>(q + (n + r) * row_bytes());
    for (int64_t k0 = 0; k0 < K; k0 += FLUSH) {
      __m256i part[R][MB];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) part[r][m] = _mm256_setzero_si256();
      const int64_t k1 = std::min(K, k0 + FLUSH);
      for (int64_t k = k0; k < k1; k += 16) {
        __m256i w[R];
        for (int r = 0; r < R; ++r) {
          ahead<I8>(reinterpret_cast<const uint8_t*>(row[r]), k, pf);
          w[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k)));
        }
        for (int m = 0; m < MB; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
          for (int r = 0; r < R; ++r) part[r][m] = _mm256_add_epi32(part[r][m], _mm256_madd_epi16(w[r], xv));
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] += static_cast<float>(hsum8i(part[r][m]));
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * ldy + n + r] = acc[r][m] * (scale[n + r] * xscale[m0 + m]);
  }

  // int4 against int8 activations, llama.cpp's way on AVX2: per 64 columns (32 bytes) the low nibbles are
  // the even columns and the high ones the odd columns, each met by 32 int8 activations (reordered to
  // match) with vpmaddubsw; the block's exact integer sum times (its group's scale · the activations'
  // scale for that block) goes to the fp32 accumulator. The zero point comes off at the end with the
  // activations' sums per block: Σ (q − z)·s·x = Σ_b s·xs_b·(Σ q·xq)_b − Σ_b z·s·(xs_b·Σ xq_b).
  // int8 activations (one scale per 64 values) err ~2^-8 per value, far below int4's own rounding, and
  // take half the multiplies of int16 ones: int4 is bound by instructions here, not bytes.
  template <int R, int MB>
  void nibble_madd_rows(const int8_t* x, int64_t n, float* y, int64_t ldy, int64_t m0, bool pf) const {
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t G = groups(), B = K / 64;
    const float* xs = xscale + m0 * B;   // [MB, B]: the activations' scale per block
    const float* xz = xsum + m0 * B;     // [MB, B]: xs_b · Σ xq over the block
    __m256 acc[R][MB];
    float corr[R][MB];
    const uint8_t* row[R];
    const int gs = __builtin_ctzll(static_cast<unsigned long long>(group)) - 6;  // blocks per group: 2^gs
    for (int r = 0; r < R; ++r) {
      row[r] = q + (n + r) * row_bytes();
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps(), corr[r][m] = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t g = (n + r) * G + (b >> gs);
        const float zs = static_cast<float>(zero[g]) * scale[g];
        for (int m = 0; m < MB; ++m) corr[r][m] = std::fma(zs, xz[m * B + b], corr[r][m]);
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      __m256i lo[R], hi[R];
      float sc[R];
      for (int r = 0; r < R; ++r) {
        ahead<I4>(row[r], b * 64, pf);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + b * 32));
        lo[r] = _mm256_and_si256(w, nib);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
        sc[r] = scale[(n + r) * G + (b >> gs)];
      }
      for (int m = 0; m < MB; ++m) {
        const __m256i* xk = reinterpret_cast<const __m256i*>(x + m * K + b * 64);
        const __m256i xe = _mm256_loadu_si256(xk), xo = _mm256_loadu_si256(xk + 1);
        const float xsb = xs[m * B + b];
        for (int r = 0; r < R; ++r) {
          const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe), _mm256_maddubs_epi16(hi[r], xo));
          const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
          acc[r][m] = _mm256_fmadd_ps(p, _mm256_set1_ps(sc[r] * xsb), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * ldy + n + r] = hsum8(acc[r][m]) - corr[r][m];
  }
#endif

  // Format BF16_BLOCKS: bf16 values met by fp32 activations, the rows in blocks of 16 laid out by pairs of
  // columns: (n, k) at (n / 16) · 16K + 32 (k / 2) + 2 (n % 16) + k % 2, so a 32-bit word holds one row's
  // columns k and k + 1. Each vector holds a pair of columns of 16 outputs, each activation is broadcast,
  // and each output's dot is one FMA per column in column order: no horizontal sum per (row, token), and
  // the weight vector serves every token. Rows of the bundled model's 192 columns were 12 FMAs each, then
  // a 16-lane sum; one thread, a 512 × 192 weight: 4.2 → 3.3 µs for one token, 13.6 → 7.3 µs for four.
  // By pairs (December 7, fifth session), one 64-byte load gives two columns, widened by one shift and
  // one mask, where one column took a widening load and a shift. The bits are the same for any row count
  // and any instruction set, and the same as column by column (the FMAs run in the same order).
  void blocked_rows(const float* x, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy, bool pf) const {
#ifdef __AVX512F__
    if (isa() == AVX512) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t b = n0 / 16;
        const int64_t b1 = (n1 + 15) / 16;
        auto run = [&]<int V, int MB>() {
          for (; b + V <= b1; b += V) block16<V, MB>(x + m0 * K, b, n0, n1, y + m0 * ldy, ldy, pf);
        };
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: run.template operator()<8, 1>(), run.template operator()<1, 1>(); break;
          case 2: run.template operator()<4, 2>(), run.template operator()<1, 2>(); break;
          case 3: run.template operator()<4, 3>(), run.template operator()<1, 3>(); break;
          default: run.template operator()<4, 4>(), run.template operator()<1, 4>(); break;
        }
      }
      return;
    }
#endif
    const uint16_t* w = reinterpret_cast<const uint16_t*>(q);
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* col = w + n / 16 * 16 * K + 2 * (n % 16);
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const uint32_t bits = static_cast<uint32_t>(col[32 * (k / 2) + k % 2]) << 16;
          float wk;
          std::memcpy(&wk, &bits, 4);
          acc = std::fma(wk, x[m * K + k], acc);
        }
        y[m * ldy + n] = acc;
      }
    }
  }

#ifdef __AVX512F__
  // Blocks b .. b+V-1 of 16 outputs for MB activation rows; outputs outside [n0, n1) are not stored.
  template <int V, int MB>
  void block16(const float* x, int64_t b, int64_t n0, int64_t n1, float* y, int64_t ldy, bool pf) const {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(q) + b * 16 * K;
    __m512 acc[V][MB];
    for (int v = 0; v < V; ++v)
      for (int m = 0; m < MB; ++m) acc[v][m] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t k = 0; k < K; k += 2) {
      __m512 even[V], odd[V];
      for (int v = 0; v < V; ++v) {
        const uint16_t* p = w + v * 16 * K + k * 16;
        if (pf) prefetch_l2(p + PREFETCH / 2);  // a line per 2 columns
        const __m512i pair = _mm512_loadu_si512(p);
        even[v] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
        odd[v] = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 xe = _mm512_set1_ps(x[m * K + k]);
        for (int v = 0; v < V; ++v) acc[v][m] = _mm512_fmadd_ps(even[v], xe, acc[v][m]);
        const __m512 xo = _mm512_set1_ps(x[m * K + k + 1]);
        for (int v = 0; v < V; ++v) acc[v][m] = _mm512_fmadd_ps(odd[v], xo, acc[v][m]);
      }
    }
    for (int v = 0; v < V; ++v) {
      const int64_t lo = (b + v) * 16;
      const int64_t from = std::max<int64_t>(n0 - lo, 0), to = std::min<int64_t>(n1 - lo, 16);
      const __mmask16 mk = static_cast<__mmask16>(((1u << to) - 1) & ~((1u << from) - 1));
      for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + m * ldy + lo, mk, acc[v][m]);
    }
  }
#endif

  void generic_rows(const float* x, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) const {
    float buf[CHUNK];
    float acc[16];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int64_t len = std::min(CHUNK, K - k0);
        const float* w = chunk(n, k0, len, buf);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * K + k0;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < len; ++i) s += w[i] * xm[i];
          acc[m] += s;
        }
      }
      const float rs = fmt == I8 ? scale[n] : 1.f;
      for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = acc[m] * rs;
    }
  }

  // y [M, N] = x [M, K] · Wᵀ, M <= 16; xb: x rounded to bf16 (the weight-only formats' activations), or null.
  void product(const float* x, const uint16_t* xb, int64_t M, float* y) const {
    const int64_t grain = std::max<int64_t>(8, N / (4 * at::get_num_threads()));
    parallel(N, grain, 16, N * row_bytes(), PARALLEL_BYTES,
             [&](int64_t n0, int64_t n1) { rows(x, fp32_activations() ? nullptr : xb, M, n0, n1, y, N); });
  }

  // Expert e of a stacked [E, N, K] weight.
  Weight expert(int64_t e) const {
    Weight w = *this;
    w.q = q + e * N * row_bytes();
    if (scale) w.scale = scale + e * (fmt == I8 ? N : N * groups());
    if (zero) w.zero = zero + e * N * groups();
    return w;
  }
};

// Whether an int4 weight [N, K / 2] can be read as I4_BLOCKS now: by dpbusd_rows, in whole blocks of 16 rows.
bool int4_blocks_ok(int64_t N, int64_t K, int64_t group) {
#ifdef __AVX512VNNI__
  return isa() == AVX512 && N % 16 == 0 && K % 64 == 0 && group % 64 == 0;
#else
  return false;
#endif
}

Weight weight_of(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t fmt, int64_t group,
                 int64_t N, int64_t K) {
  TORCH_CHECK(q.is_contiguous() && q.device().is_cpu(), "moedesk: weights must be contiguous CPU tensors");
  TORCH_CHECK(fmt >= F32 && fmt <= I4_BLOCKS, "moedesk: unknown weight format ", fmt);
  const bool interleaved = fmt == I4_BLOCKS;
  TORCH_CHECK(!interleaved || int4_blocks_ok(N, K, group),
              "moedesk: int4 in blocks of 16 rows needs AVX-512 VNNI, N a multiple of 16, K and the group of 64");
  if (interleaved) fmt = I4;
  const bool blocked = fmt == BF16_BLOCKS, exact = fmt == BF16_EXACT || blocked;
  TORCH_CHECK(!blocked || (N % 16 == 0 && K % 2 == 0),
              "moedesk: a weight in blocks of 16 rows needs N a multiple of 16 and K even");
  if (exact) fmt = BF16;
  Weight w{fmt, N, K, group, static_cast<const uint8_t*>(q.data_ptr()), nullptr, nullptr};
  w.exact = exact;
  w.blocked = blocked;
  w.interleaved = interleaved;
  w.count = q.dim() == 3 ? q.size(0) : 1;
  if (fmt == F32) TORCH_CHECK(q.scalar_type() == at::kFloat, "moedesk: fp32 weight expected");
  if (fmt == BF16) TORCH_CHECK(q.scalar_type() == at::kBFloat16, "moedesk: bf16 weight expected");
  if (fmt == I8 || fmt == I4) {
    TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat, "moedesk: fp32 scales expected");
    w.scale = scale.data_ptr<float>();
  }
  if (fmt == I4) {
    TORCH_CHECK(K % 2 == 0 && group > 0 && CHUNK % group == 0 && (group & (group - 1)) == 0,
                "moedesk: int4 needs even K and a power-of-two group dividing ", CHUNK);
    TORCH_CHECK(zero.is_contiguous() && zero.scalar_type() == at::kByte, "moedesk: uint8 zeros expected");
    w.zero = zero.data_ptr<uint8_t>();
  }
  return w;
}

inline uint16_t bf16_bits(float v) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_value(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// ---- elementwise and per-row helpers -------------------------------------------------------------

#ifdef __AVX512F__
// exp(x) = 2^n · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2 and Cephes' degree-6 polynomial for e^r
// (relative error below 2e-7): a scalar std::exp per softmax position cost more than the dot product.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972077f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// 16 (or the tail's) fp32 or bf16 values from p as fp32, zeros past the mask.
inline __m512 load_f32(const void* p, bool bf16, __mmask16 m) {
  if (!bf16) return _mm512_maskz_loadu_ps(m, p);
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// v = exp(v + shift) for n values; returns their sum.
float exp_shifted(float* v, int64_t n, float shift) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef __AVX512F__
  if (isa() == AVX512) {
    __m512 acc = _mm512_setzero_ps();
    const __m512 sh = _mm512_set1_ps(shift);
    for (; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 e = exp16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, v + i), sh));
      _mm512_mask_storeu_ps(v + i, m, e);
      acc = _mm512_mask_add_ps(acc, m, acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa() == AVX2) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 sh = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_add_ps(_mm256_loadu_ps(v + i), sh));
      _mm256_storeu_ps(v + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
  }
#endif
  for (; i < n; ++i) sum += (v[i] = std::exp(v[i] + shift));
  return sum;
}

// out = silu(g) · u = g / (1 + exp(−g)) · u for n values (out may be g).
void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; isa() == AVX512 && i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(gv, den), _mm512_maskz_loadu_ps(m, u + i)));
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  for (; isa() == AVX2 && i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// q · row over D values, the row fp32 or bf16 (the latent cache's dtypes).
inline float dot_row(const float* q, const void* row, bool bf16, int64_t D) {
  const uint16_t* rb = static_cast<const uint16_t*>(row);
  const float* rf = static_cast<const float*>(row);
#ifdef __AVX512F__
  if (isa() == AVX512) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = tail_mask(D - c);
      const void* p = bf16 ? static_cast<const void*>(rb + c) : static_cast<const void*>(rf + c);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + c), load_f32(p, bf16, m), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float acc = 0.f;
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (isa() == AVX2) {
    __m256 v = _mm256_setzero_ps();
    for (; c + 8 <= D; c += 8) {
      const void* p = bf16 ? static_cast<const void*>(rb + c) : static_cast<const void*>(rf + c);
      v = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8_f32(p, bf16), v);
    }
    acc = hsum8(v);
  }
#endif
  for (; c < D; ++c) acc += q[c] * (bf16 ? bf16_value(rb[c]) : rf[c]);
  return acc;
}

// sc[s] = dot_row(q, rows + s · stride) for s < n: four rows at a time on AVX-512, their four sums taken
// in one transposing tree with _mm512_reduce_add_ps's pairing (lanes i + 8, i + 4, i + 2, i + 1), so each
// score has dot_row's bits. The attention's scores were one 16-lane horizontal sum per cached row.
void dot_rows(const float* q, const void* rows, bool bf16, int64_t n, int64_t stride, int64_t D, float* sc) {
  const int64_t esz = bf16 ? 2 : 4;
  const char* base = static_cast<const char*>(rows);
  int64_t s = 0;
#ifdef __AVX512F__
  if (isa() == AVX512) {
    for (; s + 4 <= n; s += 4) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t c = 0; c < D; c += 16) {
        const __mmask16 m = tail_mask(D - c);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + c);
        for (int j = 0; j < 4; ++j)
          acc[j] = _mm512_fmadd_ps(qv, load_f32(base + ((s + j) * stride + c) * esz, bf16, m), acc[j]);
      }
      const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(acc[0], acc[1], 0x44), _mm512_shuffle_f32x4(acc[0], acc[1], 0xEE));
      const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2], acc[3], 0x44), _mm512_shuffle_f32x4(acc[2], acc[3], 0xEE));
      const __m512 quads = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
      const __m512 pairs = _mm512_add_ps(quads, _mm512_permute_ps(quads, 0x4E));
      const __m512 sums = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0xB1));  // row j's sum: lanes 4j..4j+3
      _mm_storeu_ps(sc + s, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(
          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), sums)));
    }
  }
#endif
  for (; s < n; ++s) sc[s] = dot_row(q, base + s * stride * esz, bf16, D);
}

// o[c] = Σ_s p[s] · rows[s][c] for c < C over n rows of stride `stride` values, fp32 or bf16: 64 columns
// (AVX2: 32) at a time stay in registers while the rows stream past.
void weighted_rows(const float* p, const void* rows, bool bf16, int64_t n, int64_t stride, float* o, int64_t C) {
  const int64_t esz = bf16 ? 2 : 4;
  const char* base = static_cast<const char*>(rows);
  int64_t done = 0;  // columns finished by the vector paths
#ifdef __AVX512F__
  if (isa() == AVX512) {
    for (int64_t c0 = 0; c0 < C; c0 += 64) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      __mmask16 m[4];
      for (int j = 0; j < 4; ++j) m[j] = c0 + 16 * j < C ? tail_mask(C - c0 - 16 * j) : 0;
      for (int64_t s2 = 0; s2 < n; ++s2) {
        const __m512 pv = _mm512_set1_ps(p[s2]);
        const char* r = base + (s2 * stride + c0) * esz;
        for (int j = 0; j < 4; ++j)
          if (m[j]) acc[j] = _mm512_fmadd_ps(pv, load_f32(r + 16 * j * esz, bf16, m[j]), acc[j]);
      }
      for (int j = 0; j < 4; ++j)
        if (m[j]) _mm512_mask_storeu_ps(o + c0 + 16 * j, m[j], acc[j]);
    }
    done = C;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa() == AVX2) {
    for (int64_t c0 = 0; c0 + 8 <= C; c0 += 32) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (C - c0) / 8));
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t s2 = 0; s2 < n; ++s2) {
        const __m256 pv = _mm256_set1_ps(p[s2]);
        const char* r = base + (s2 * stride + c0) * esz;
        for (int j = 0; j < nv; ++j) acc[j] = _mm256_fmadd_ps(pv, load8_f32(r + 8 * j * esz, bf16), acc[j]);
      }
      for (int j = 0; j < nv; ++j) _mm256_storeu_ps(o + c0 + 8 * j, acc[j]);
      done = c0 + 8 * nv;
    }
  }
#endif
  for (int64_t c = done; c < C; ++c) {
    float acc = 0.f;
    for (int64_t s2 = 0; s2 < n; ++s2) {
      const char* r = base + (s2 * stride + c) * esz;
      acc += p[s2] * (bf16 ? bf16_value(*reinterpret_cast<const uint16_t*>(r)) : *reinterpret_cast<const float*>(r));
    }
    o[c] = acc;
  }
}

#ifdef __AVX512VNNI__
// 64 activations as int8 with one scale (max|v| / 127, rounded to nearest even as std::nearbyint does),
// stored per 8 columns as the 4 even, then the 4 odd (dpbusd_rows); returns Σ xq and sets *scale.
inline int32_t int8_block64(const float* v, int8_t* out, float* scale) {
  __m512 a[4];
  __m512 amax = _mm512_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm512_loadu_ps(v + 16 * i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(a[i]));
  }
  const float mx = _mm512_reduce_max_ps(amax), sc = mx > 0.f ? mx / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / sc);
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  __m512i total = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    const __m512i t = _mm512_cvtps_epi32(_mm512_mul_ps(a[i], inv));
    total = _mm512_add_epi32(total, t);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(t), order));
  }
  *scale = sc;
  return _mm512_reduce_add_epi32(total);
}
#endif

// The activations x [M, K] rounded to int16 per row into out: x[m] ≈ scales[m] · out[m], scales[m] =
// max|x[m]| / 32767. Column i of a row goes to out[m · K + at(i)].
template <class At>
void int16_rows(const float* x, int64_t M, int64_t K, uint16_t* out, float* scales, At&& at) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float amax = 0.f;
    for (int64_t i = 0; i < K; ++i) amax = std::max(amax, std::fabs(xm[i]));
    const float s = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / s;
    for (int64_t i = 0; i < K; ++i)
      out[m * K + at(i)] = static_cast<uint16_t>(static_cast<int16_t>(std::nearbyint(xm[i] * inv)));
    scales[m] = s;
  }
}

// The activations x [M, K] as the kernels for weight w read them (empty: fp32, as they are). AVX-512:
// rounded to bf16 for the bf16 dot kernels; for int8 by VNNI, int16 with w.xscale set to each row's
// scale. AVX2: int8 as int16. int4 (AVX-512 VNNI and AVX2): int8 per 64 columns, reordered to match the
// nibbles, w.xscale the scale per block [M, K/64] and w.xsum the scale · Σ xq per group [M, G]
// (dpbusd_rows) or per block (nibble_madd_rows).
std::vector<uint16_t> activations(const float* x, int64_t M, int64_t K, Weight& w, std::vector<float>& xsum) {
  std::vector<uint16_t> out;
  if (w.fp32_activations()) return out;
  if (w.vnni() || (w.madd() && w.fmt == I8)) {
    out.resize(M * K);
    xsum.resize(M);
    int16_rows(x, M, K, out.data(), xsum.data(), [](int64_t i) { return i; });
    w.xscale = xsum.data();
    return out;
  }
  if (w.madd() || w.dpbusd()) {
    // AVX2: per 64 columns the even ones, then the odd; AVX-512: per 8 columns the 4 even, then the 4 odd
    const bool avx2 = w.madd();
    const int64_t B = K / 64, per = avx2 ? 1 : w.group / 64, Z = avx2 ? B : w.groups();  // xz: [M, Z]
    out.resize(M * K / 2);
    int8_t* xq = reinterpret_cast<int8_t*>(out.data());
    xsum.assign(M * B + M * Z, 0.f);
    float *xs = xsum.data(), *xz = xsum.data() + M * B;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < B; ++b) {
        const float* v = x + m * K + b * 64;
#ifdef __AVX512VNNI__
        if (!avx2) {  // the AVX2 loop's values, 16 at a time
          const int32_t sum = int8_block64(v, xq + m * K + b * 64, xs + m * B + b);
          xz[m * Z + b / per] += xs[m * B + b] * static_cast<float>(sum);
          continue;
        }
#endif
        float amax = 0.f;
        for (int64_t i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(v[i]));
        const float sc = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / sc;
        int32_t sum = 0;
        for (int64_t i = 0; i < 64; ++i) {
          const int8_t t = static_cast<int8_t>(std::nearbyint(v[i] * inv));
          xq[m * K + b * 64 + (i & 1) * 32 + (i >> 1)] = t;
          sum += t;
        }
        xs[m * B + b] = sc;
        xz[m * Z + b / per] += sc * static_cast<float>(sum);
      }
    w.xscale = xs;
    w.xsum = xz;
    return out;
  }
#ifdef __AVX512BF16__
  if (isa() != AVX512) return out;
  out.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) out[i] = bf16_bits(x[i]);
#endif
  return out;
}

int64_t in_features(const at::Tensor& q, int64_t fmt) { return q.size(-1) * (fmt == I4 || fmt == I4_BLOCKS ? 2 : 1); }

at::Tensor linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                  int64_t fmt, int64_t group) {
  const int64_t K = in_features(q, fmt), N = q.size(0);
  TORCH_CHECK(q.dim() == 2 && x.size(-1) == K, "moedesk.linear: x [..., ", K, "] expected");
  at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  TORCH_CHECK(M <= 16, "moedesk.linear takes at most 16 rows");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  Weight w = weight_of(q, scale, zero, fmt, group, N, K);
  std::vector<float> xsum;
  std::vector<uint16_t> xb = activations(xf.data_ptr<float>(), M, K, w, xsum);
  w.product(xf.data_ptr<float>(), xb.empty() ? nullptr : xb.data(), M, y.data_ptr<float>());
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

// Pieces of work that each write their own output (an expert's rows, the shared experts), run across the
// team at once where they split evenly by bytes (the bundled model's step: its two chosen experts and the
// shared ones, one hand-off instead of one per product), else one after another with their products
// split. Either way every output is the same, and the caller adds them up in a fixed order.
struct Task {
  int64_t bytes;
  std::function<void()> run;
};

void run_tasks(std::vector<Task>& tasks) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  auto each = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) tasks[i].run();
  };
  Team* team = g_team;
  if (team && !team->busy() && n >= team->size()) {
    // contiguous shares by bytes: a task goes to thread i while its middle lies before (i + 1) / size
    // of the total
    const int size = team->size();
    int64_t total = 0, acc = 0, worst = 0;
    for (auto& t : tasks) total += t.bytes;
    std::vector<int64_t> bounds(size + 1, n);
    bounds[0] = 0;
    for (int i = 1, j = 0; i < size; ++i) {
      while (j < n && size * (2 * acc + tasks[j].bytes) <= 2 * total * i) acc += tasks[j++].bytes;
      bounds[i] = j;
    }
    for (int i = 0; i < size; ++i) {
      int64_t share = 0;
      for (int64_t j = bounds[i]; j < bounds[i + 1]; ++j) share += tasks[j].bytes;
      worst = std::max(worst, share);
    }
    if (4 * worst * size <= 5 * total) {  // within 25% of an even split
      team->split_at(bounds.data(), each);
      return;
    }
  }
  each(0, n);
}

// One expert for its r rows: ye [r, H] = down_e · (silu(gate_e · xs) * (up_e · xs)), xs [r, H].
void expert_rows(const float* xs, int64_t r, const Weight& gu, const Weight& dn, float* ye) {
  const int64_t I2 = gu.N, I = I2 / 2;
  std::vector<float> h(r * I2), a(r * I), xsum, asum;
  Weight g = gu, d = dn;
  std::vector<uint16_t> xsb = activations(xs, r, g.K, g, xsum);
  g.product(xs, xsb.empty() ? nullptr : xsb.data(), r, h.data());
  for (int64_t i = 0; i < r; ++i) silu_mul(&h[i * I2], &h[i * I2 + I], &a[i * I], I);
  std::vector<uint16_t> ab = activations(a.data(), r, I, d, asum);
  d.product(a.data(), ab.empty() ? nullptr : ab.data(), r, ye);
}

// The routed experts' work for M rows (ids ip [M, k], weights wp [M, k]), as tasks, with what adds it up.
struct RoutedWork {
  struct Part {
    std::vector<int64_t> rows;
    std::vector<float> gains, xs, ye;
  };
  std::vector<Part> parts;  // the chosen experts in order
  int64_t H = 0;

  RoutedWork(const float* xp, int64_t M, const int64_t* ip, const float* wp, int64_t k, const Weight& gate_up,
             const Weight& down, std::vector<Task>& tasks) : H(gate_up.K) {
    parts.reserve(gate_up.count);
    for (int64_t e = 0; e < gate_up.count; ++e) {
      Part p;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < k; ++j)
          if (ip[m * k + j] == e) {
            p.rows.push_back(m);
            p.gains.push_back(wp[m * k + j]);
          }
      if (p.rows.empty()) continue;
      const int64_t r = static_cast<int64_t>(p.rows.size());
      p.xs.resize(r * H);
      p.ye.resize(r * H);
      for (int64_t i = 0; i < r; ++i) std::memcpy(&p.xs[i * H], xp + p.rows[i] * H, H * 4);
      parts.push_back(std::move(p));
      Part* q = &parts.back();
      Weight gu = gate_up.expert(e), dn = down.expert(e);
      tasks.push_back({(gu.N + dn.N) * gu.row_bytes(), [q, r, gu, dn] { expert_rows(q->xs.data(), r, gu, dn, q->ye.data()); }});
    }
  }

  // y[m] += Σ_j wts[m, j] · expert_{ids[m, j]}(x[m]): every chosen expert in order.
  void add_to(float* yp) const {
    for (const Part& p : parts)
      for (size_t i = 0; i < p.rows.size(); ++i)
        for (int64_t c = 0; c < H; ++c) yp[p.rows[i] * H + c] += p.gains[i] * p.ye[i * H + c];
  }
};

at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gu_q,
               const at::Tensor& gu_s, const at::Tensor& gu_z, const at::Tensor& dn_q, const at::Tensor& dn_s,
               const at::Tensor& dn_z, int64_t fmt, int64_t group) {
  const int64_t H = in_features(gu_q, fmt), I2 = gu_q.size(1), I = I2 / 2, E = gu_q.size(0);
  TORCH_CHECK(gu_q.dim() == 3 && dn_q.dim() == 3 && dn_q.size(1) == H && in_features(dn_q, fmt) == I,
              "moedesk.moe: gate_up [E, 2I, H] and down [E, H, I] expected");
  at::Tensor xf = x.reshape({-1, H}).to(at::kFloat).contiguous();
  at::Tensor id = ids.reshape({xf.size(0), -1}).to(at::kLong).contiguous();
  at::Tensor wt = weights.reshape({xf.size(0), -1}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), k = id.size(1);
  TORCH_CHECK(M <= 16, "moedesk.moe takes at most 16 rows");
  Weight gate_up = weight_of(gu_q, gu_s, gu_z, fmt, group, I2, H);
  Weight down = weight_of(dn_q, dn_s, dn_z, fmt, group, H, I);
  at::Tensor y = at::zeros({M, H}, x.options().dtype(at::kFloat));
  std::vector<Task> tasks;
  RoutedWork routed(xf.data_ptr<float>(), M, id.data_ptr<int64_t>(), wt.data_ptr<float>(), k, gate_up, down, tasks);
  run_tasks(tasks);
  routed.add_to(y.data_ptr<float>());
  return y.view(x.sizes());
}

// ---- one MLA attention sub-layer for a few new tokens (decode, verification) ----------------------
//
// x + out_proj(attention(rms_norm(x))) with DeepSeek's absorbed MLA against the latent cache kv
// [S_max, C + R] (the tokens' latents and rotary keys are written at rows start..start+T-1 first). What
// engine/model/attention.py does on this path, in one call: the intermediates stay fp32.
// w: attn_norm [H] fp32, q_down (q, scale, zero), q_norm [q_lora] fp32, q_up or q_proj (q, scale, zero),
//    kv_down (q, scale, zero), kv_norm [C] fp32, w_k [nh, C, nope] (softmax scale folded in), w_v
//    [nh, V, C], out_proj (q, scale, zero); unused entries empty.
// ints: start, nh, nope, R, V, C, q_lora (0: none), interleave, then (format, group) of q_down, q_up,
//    kv_down, the format of w_k/w_v, and (format, group) of out_proj. floats: eps, softmax scale.

struct Lin {  // a linear weight from the tensor list: (q, scale, zero) with its format and group
  Weight w;
  Lin(const at::Tensor* t, size_t i, int64_t fmt, int64_t group) {
    const at::Tensor& q = t[i];
    const int64_t K = in_features(q, fmt);
    w = weight_of(q, t[i + 1], t[i + 2], fmt, group, q.size(-2), K);
  }
  // y [M, N] = x [M, K] · Wᵀ
  void operator()(const float* x, int64_t M, float* y) {
    std::vector<float> xsum;
    std::vector<uint16_t> xb = activations(x, M, w.K, w, xsum);
    w.product(x, xb.empty() ? nullptr : xb.data(), M, y);
  }
};

void rms_norm_rows(float* x, int64_t M, int64_t D, const float* w, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    float* r = x + m * D;
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(r[i]) * r[i];
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / D) + eps);
    for (int64_t i = 0; i < D; ++i) r[i] = r[i] * inv * w[i];
  }
}

// Rotate v [R] of token t: interleaved pairs (v0, v1), (v2, v3).. or halves (v_i, v_{i+R/2}).
void rope(float* v, int64_t R, const float* cos, const float* sin, bool interleave) {
  for (int64_t i = 0; i < R / 2; ++i) {
    const int64_t a = interleave ? 2 * i : i, b = interleave ? 2 * i + 1 : i + R / 2;
    const float va = v[a], vb = v[b];
    v[a] = va * cos[i] - vb * sin[i];
    v[b] = vb * cos[i] + va * sin[i];
  }
}

// x [T, H] fp32 in place: x += attention(rms_norm(x)); t: the 17 tensors, ints: the 17 ints, floats: 2.
void mla_layer(float* x, int64_t T, int64_t H, const at::Tensor* t, const int64_t* ints, const double* floats,
               const at::Tensor& kv, const float* cosp, const float* sinp) {
  const int64_t start = ints[0], nh = ints[1], nope = ints[2], R = ints[3], V = ints[4], C = ints[5];
  const int64_t q_lora = ints[6];
  const bool interleave = ints[7] != 0;
  const float eps = static_cast<float>(floats[0]), scale = static_cast<float>(floats[1]);
  TORCH_CHECK(kv.is_contiguous() && kv.dim() == 2 && kv.size(1) == C + R, "moedesk.mla_decode: kv [S, C+R]");
  const int64_t D = nope + R, S = start + T;
  TORCH_CHECK(T <= 16 && S <= kv.size(0), "moedesk.mla_decode: at most 16 tokens, inside the cache");
  const float* norm_w = t[0].data_ptr<float>();

  std::vector<float> h(x, x + T * H);
  rms_norm_rows(h.data(), T, H, norm_w, eps);
  std::vector<float> q(T * nh * D);
  if (q_lora) {
    std::vector<float> a(T * q_lora);
    Lin(t, 1, ints[8], ints[9])(h.data(), T, a.data());
    rms_norm_rows(a.data(), T, q_lora, t[4].data_ptr<float>(), eps);
    Lin(t, 5, ints[10], ints[11])(a.data(), T, q.data());
  } else {
    Lin(t, 5, ints[10], ints[11])(h.data(), T, q.data());
  }
  std::vector<float> lat(T * (C + R));
  Lin(t, 8, ints[12], ints[13])(h.data(), T, lat.data());
  for (int64_t i = 0; i < T; ++i) {
    float* r = &lat[i * (C + R)];
    rms_norm_rows(r, 1, C, t[11].data_ptr<float>(), eps);
    rope(r + C, R, cosp + i * (R / 2), sinp + i * (R / 2), interleave);
    for (int64_t hd = 0; hd < nh; ++hd)
      rope(&q[(i * nh + hd) * D + nope], R, cosp + i * (R / 2), sinp + i * (R / 2), interleave);
  }
  // the new tokens into the cache
  void* kvp = kv.data_ptr();
  const bool bf16 = kv.scalar_type() == at::kBFloat16;  // the cache's dtype: fp32 or bf16
  const int64_t esz = bf16 ? 2 : 4;
  const char* kb = static_cast<const char*>(kvp);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t c = 0; c < C + R; ++c) {
      const int64_t at = (start + i) * (C + R) + c;
      if (bf16)
        static_cast<uint16_t*>(kvp)[at] = bf16_bits(lat[i * (C + R) + c]);
      else
        static_cast<float*>(kvp)[at] = lat[i * (C + R) + c];
    }
  // absorbed query per head: ql[t, h] = w_k[h]ᵀ · q_nope[t, h], w_k stored [nh, C, nope], scale folded in
  const int64_t abs_fmt = ints[14];
  Weight wk = weight_of(t[12], at::Tensor(), at::Tensor(), abs_fmt, 0, C, nope);  // fp32 or bf16: no scales
  Weight wv = weight_of(t[13], at::Tensor(), at::Tensor(), abs_fmt, 0, V, C);
  std::vector<float> ql(nh * T * (C + R)), ol(nh * T * C), out(T * nh * V);
  parallel(nh, 1, 1, nh * S * (C + R) * esz, 0, [&](int64_t h0, int64_t h1) {
    std::vector<float> xs(T * std::max(nope, C)), ys(T * std::max(C, V)), row(C + R), sc(S);
    for (int64_t hd = h0; hd < h1; ++hd) {
      for (int64_t i = 0; i < T; ++i) std::memcpy(&xs[i * nope], &q[(i * nh + hd) * D], nope * 4);
      std::vector<float> s0;
      Weight wkh = wk.expert(hd);
      std::vector<uint16_t> xb = activations(xs.data(), T, nope, wkh, s0);
      wkh.rows(xs.data(), xb.empty() ? nullptr : xb.data(), T, 0, C, ys.data(), C);
      float* qh = &ql[hd * T * (C + R)];
      for (int64_t i = 0; i < T; ++i) {
        std::memcpy(qh + i * (C + R), &ys[i * C], C * 4);
        for (int64_t r = 0; r < R; ++r) qh[i * (C + R) + C + r] = q[(i * nh + hd) * D + nope + r] * scale;
      }
      float* oh = &ol[hd * T * C];
      for (int64_t i = 0; i < T; ++i) {  // token i sees cache rows 0..start+i
        const int64_t n = start + i + 1;
        float mx = -INFINITY;
        dot_rows(qh + i * (C + R), kb, bf16, n, C + R, C + R, sc.data());
        for (int64_t s2 = 0; s2 < n; ++s2) mx = std::max(mx, sc[s2]);
        const float inv = 1.f / exp_shifted(sc.data(), n, -mx);
        for (int64_t s2 = 0; s2 < n; ++s2) sc[s2] *= inv;
        weighted_rows(sc.data(), kb, bf16, n, C + R, oh + i * C, C);
      }
      Weight wvh = wv.expert(hd);
      std::vector<float> s1;
      std::vector<uint16_t> ob = activations(oh, T, C, wvh, s1);
      wvh.rows(oh, ob.empty() ? nullptr : ob.data(), T, 0, V, ys.data(), V);
      for (int64_t i = 0; i < T; ++i) std::memcpy(&out[(i * nh + hd) * V], &ys[i * V], V * 4);
    }
  });
  std::vector<float> y(T * H);
  Lin(t, 14, ints[15], ints[16])(out.data(), T, y.data());  // out_proj
  for (int64_t i = 0; i < T * H; ++i) x[i] += y[i];
}

at::Tensor mla_decode(const at::Tensor& x, at::TensorList w, at::IntArrayRef ints, at::ArrayRef<double> floats,
                      const at::Tensor& kv, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(w.size() == 17 && ints.size() == 17, "moedesk.mla_decode: 17 tensors and 17 ints expected");
  at::Tensor res = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous().clone();
  at::Tensor cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
  TORCH_CHECK(cf.dim() == 2 && cf.size(0) == res.size(0) && sf.sizes() == cf.sizes(), "moedesk.mla_decode: cos, sin [T, R/2]");
  mla_layer(res.data_ptr<float>(), res.size(0), res.size(1), w.data(), ints.data(), floats.data(), kv,
            cf.data_ptr<float>(), sf.data_ptr<float>());
  return res.view(x.sizes());
}

// ---- one MoE feed-forward sub-layer for a few tokens ------------------------------------------------
//
// x + shared(h) + Σ_j w_j · expert_j(h), h = rms_norm(x), with the router in the same call: scores
// (sigmoid or softmax of h · Wᵀ in fp32), the score-correction bias and the group limit choosing the
// experts, their weights from the unbiased scores. Returns (y, ids [T, k], scores [T, E]) so that routing
// statistics still see every choice. What engine/model/moe.py + engine/routing.py do, in one call.
// w: ffn_norm [H] fp32, router weight [E, H] fp32, bias [E] fp32, gate_up (q, s, z), down (q, s, z), then
//    the shared experts' gate, up, down (q, s, z each; empty without shared experts).
// ints: experts' (format, group), top_k, n_group, topk_group, method (0 greedy, 1 group-limited greedy,
//    2 noaux_tc), scoring (0 sigmoid, 1 softmax), norm_topk_prob, v2 weighting, shared (0/1), then
//    (format, group) of the shared gate, up, down. floats: eps, routed scaling.
// x [T, H] fp32 in place: x += moe(rms_norm(x)); t: the 18 tensors, ints: the 16 ints, floats: 2; the
// choices into ip [T, top_k] and the affinities into sp [T, E]. top_k 0: a dense MLP (the shared part).
void moe_layer(float* x, int64_t T, int64_t H, const at::Tensor* t, const int64_t* ints, const double* floats,
               int64_t* ip, float* sp) {
  const int64_t E = t[1].numel() ? t[1].size(0) : 0;
  const int64_t fmt = ints[0], group = ints[1], top_k = ints[2], n_group = ints[3], topk_group = ints[4];
  const int64_t method = ints[5], scoring = ints[6];
  const bool norm_topk = ints[7] != 0, v2 = ints[8] != 0, shared = ints[9] != 0;
  const float eps = static_cast<float>(floats[0]), scaling = static_cast<float>(floats[1]);
  TORCH_CHECK(T <= 16 && top_k <= E, "moedesk.moe_ffn: at most 16 tokens");
  std::vector<float> h(x, x + T * H);
  rms_norm_rows(h.data(), T, H, t[0].data_ptr<float>(), eps);
  std::vector<float> gains(T * top_k);
  const float* rw = top_k ? t[1].data_ptr<float>() : nullptr;
  const float* bias = top_k ? t[2].data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < T && top_k; ++i) {
    float* sc = sp + i * E;
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.f;
      const float* r = rw + e * H;
      const float* hv = &h[i * H];
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < H; ++c) acc += r[c] * hv[c];
      sc[e] = acc;
    }
    if (scoring == 0) {
      for (int64_t e = 0; e < E; ++e) sc[e] = 1.f / (1.f + std::exp(-sc[e]));
    } else {
      float mx = -INFINITY, sum = 0.f;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, sc[e]);
      for (int64_t e = 0; e < E; ++e) sum += (sc[e] = std::exp(sc[e] - mx));
      for (int64_t e = 0; e < E; ++e) sc[e] /= sum;
    }
    std::vector<float> choice(sc, sc + E);
    if (method == 2)
      for (int64_t e = 0; e < E; ++e) choice[e] += bias[e];
    if (method != 0 && n_group > 1) {  // keep the best topk_group groups
      const int64_t per = E / n_group;
      std::vector<std::pair<float, int64_t>> gs(n_group);
      for (int64_t g = 0; g < n_group; ++g) {
        std::vector<float> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::sort(v.begin(), v.end(), std::greater<float>());
        gs[g] = {method == 2 ? v[0] + (per > 1 ? v[1] : 0.f) : v[0], g};
      }
      std::stable_sort(gs.begin(), gs.end(), [](auto& a, auto& b) { return a.first > b.first; });
      std::vector<bool> keep(n_group, false);
      for (int64_t g = 0; g < topk_group; ++g) keep[gs[g].second] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = -INFINITY;
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return choice[a] > choice[b]; });
    float sum = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      ip[i * top_k + j] = order[j];
      gains[i * top_k + j] = sc[order[j]];
      sum += sc[order[j]];
    }
    for (int64_t j = 0; j < top_k; ++j) {
      float& g = gains[i * top_k + j];
      if (v2)
        g = norm_topk && top_k > 1 ? g / (sum + 1e-20f) : g * scaling;
      else
        g = (norm_topk ? g / (sum + 1e-20f) : g) * scaling;
    }
  }
  std::vector<float> y(T * H, 0.f), ys;
  std::vector<Task> tasks;
  std::unique_ptr<RoutedWork> routed;
  if (top_k) {
    Weight gate_up = weight_of(t[3], t[4], t[5], fmt, group, t[3].size(1), in_features(t[3], fmt));
    Weight down = weight_of(t[6], t[7], t[8], fmt, group, H, in_features(t[6], fmt));
    routed = std::make_unique<RoutedWork>(h.data(), T, ip, gains.data(), top_k, gate_up, down, tasks);
  }
  std::unique_ptr<Lin> gate, up, dn;
  if (shared) {
    gate = std::make_unique<Lin>(t, 9, ints[10], ints[11]);
    up = std::make_unique<Lin>(t, 12, ints[12], ints[13]);
    dn = std::make_unique<Lin>(t, 15, ints[14], ints[15]);
    ys.resize(T * H);
    const int64_t bytes = (gate->w.N + up->w.N) * gate->w.row_bytes() + dn->w.N * dn->w.row_bytes();
    tasks.push_back({bytes, [&] {
      const int64_t I = gate->w.N;
      std::vector<float> g(T * I), u(T * I);
      (*gate)(h.data(), T, g.data());
      (*up)(h.data(), T, u.data());
      silu_mul(g.data(), u.data(), g.data(), T * I);
      (*dn)(g.data(), T, ys.data());
    }});
  }
  run_tasks(tasks);
  if (routed) routed->add_to(y.data());
  for (int64_t i = 0; i < T * H && shared; ++i) y[i] += ys[i];
  for (int64_t i = 0; i < T * H; ++i) x[i] += y[i];
}

std::vector<at::Tensor> moe_ffn(const at::Tensor& x, at::TensorList w, at::IntArrayRef ints,
                                at::ArrayRef<double> floats) {
  TORCH_CHECK(w.size() == 18 && ints.size() == 16, "moedesk.moe_ffn: 18 tensors and 16 ints expected");
  at::Tensor res = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous().clone();
  const int64_t T = res.size(0), E = w[1].numel() ? w[1].size(0) : 0, top_k = ints[2];
  at::Tensor scores = at::empty({T, E}, res.options()), ids = at::empty({T, top_k}, res.options().dtype(at::kLong));
  moe_layer(res.data_ptr<float>(), T, res.size(1), w.data(), ints.data(), floats.data(), ids.data_ptr<int64_t>(),
            scores.data_ptr<float>());
  return {res.view(x.sizes()), ids, scores};
}

// ---- every decoder layer of a decode or verification pass in one call -------------------------------
//
// x [T, H] through L layers, each mla_layer then moe_layer, with the arguments those ops take laid end to
// end: per layer 17 + 18 tensors, 17 + 16 ints (the attention's first, its start, is `start` here) and
// 2 + 2 floats, and its latent cache kvs[l] ([S, C+R] or [1, S, C+R]). Returns (x, ids [L, T, top_k], scores [L, T, E]) with the routed layers'
// choices (a dense layer's rows are -1 and 0); top_k and E are the largest of any layer.
// Layers l of a pass over res [T, H] in place, each mla_layer then moe_layer, their arguments laid end
// to end as layers_decode takes them; the routed choices into ids [L, T, top_k] and scores [L, T, E].
void run_layers(at::Tensor& res, at::TensorList w, at::IntArrayRef ints, at::ArrayRef<double> floats,
                at::TensorList kvs, const at::Tensor& cf, const at::Tensor& sf, int64_t start, int64_t top_k,
                int64_t E, at::Tensor& ids, at::Tensor& scores) {
  const int64_t L = kvs.size(), T = res.size(0), H = res.size(1);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* t = w.data() + 35 * l;
    std::vector<int64_t> in(ints.begin() + 33 * l, ints.begin() + 33 * (l + 1));
    in[0] = start;
    const double* fl = floats.data() + 4 * l;
    const at::Tensor kv = kvs[l].dim() == 3 ? kvs[l].select(0, 0) : kvs[l];  // [1, S, C+R] caches
    mla_layer(res.data_ptr<float>(), T, H, t, in.data(), fl, kv, cf.data_ptr<float>(), sf.data_ptr<float>());
    const int64_t k = in[17 + 2], e = t[18].numel() ? t[18].size(0) : 0;
    TORCH_CHECK(k == 0 || (k == top_k && e == E), "moedesk.layers_decode: every routed layer's top_k and E alike");
    moe_layer(res.data_ptr<float>(), T, H, t + 17, in.data() + 17, fl + 2, ids[l].data_ptr<int64_t>(),
              scores[l].data_ptr<float>());
  }
}

// The checks and outputs layers_decode and mtp_decode share: (cos, sin as fp32, ids, scores).
std::array<at::Tensor, 4> pass_inputs(const at::Tensor& res, at::TensorList w, at::IntArrayRef ints,
                                      at::ArrayRef<double> floats, at::TensorList kvs, const at::Tensor& cos,
                                      const at::Tensor& sin, int64_t top_k, int64_t E, const char* op) {
  const int64_t L = kvs.size(), T = res.size(0);
  TORCH_CHECK(w.size() == 35 * L && ints.size() == 33 * L && floats.size() == 4 * L, op,
              ": 35 tensors, 33 ints and 4 floats per layer expected");
  at::Tensor cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
  TORCH_CHECK(cf.dim() == 2 && cf.size(0) == T && sf.sizes() == cf.sizes(), op, ": cos, sin [T, R/2]");
  return {cf, sf, at::full({L, T, top_k}, -1, res.options().dtype(at::kLong)), at::zeros({L, T, E}, res.options())};
}

std::vector<at::Tensor> layers_decode(const at::Tensor& x, at::TensorList w, at::IntArrayRef ints,
                                      at::ArrayRef<double> floats, at::TensorList kvs, const at::Tensor& cos,
                                      const at::Tensor& sin, int64_t start, int64_t top_k, int64_t E) {
  at::Tensor res = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous().clone();
  auto [cf, sf, ids, scores] = pass_inputs(res, w, ints, floats, kvs, cos, sin, top_k, E, "moedesk.layers_decode");
  on_team([&] { run_layers(res, w, ints, floats, kvs, cf, sf, start, top_k, E, ids, scores); });
  return {res.view(x.sizes()), ids, scores};
}

// layers_decode followed by the final norm and the head, in the same call on the same team: the main
// model's whole decode or verification pass. Called apart, the norm and the head took ~100 µs of a
// ~600 µs bundled-model step, mostly PyTorch's dispatch running cold after the layers. head: norm [H] fp32,
// head (q, scale, zero); head_ints: its (format, group). Returns (final-normed x [T, H], logits [T, V],
// ids, scores).
std::vector<at::Tensor> layers_decode_logits(const at::Tensor& x, at::TensorList w, at::IntArrayRef ints,
                                             at::ArrayRef<double> floats, at::TensorList kvs, const at::Tensor& cos,
                                             const at::Tensor& sin, int64_t start, int64_t top_k, int64_t E,
                                             at::TensorList head, at::IntArrayRef head_ints, double eps) {
  TORCH_CHECK(head.size() == 4 && head_ints.size() == 2, "moedesk.layers_decode_logits: 4 head tensors and 2 ints expected");
  at::Tensor res = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous().clone();
  const int64_t T = res.size(0), H = res.size(1);
  TORCH_CHECK(head[0].numel() == H && head[0].scalar_type() == at::kFloat, "moedesk.layers_decode_logits: norm [H] fp32");
  TORCH_CHECK(T >= 1 && T <= 16, "moedesk.layers_decode_logits: 1 <= T <= 16");
  auto [cf, sf, ids, scores] = pass_inputs(res, w, ints, floats, kvs, cos, sin, top_k, E, "moedesk.layers_decode_logits");
  Lin out(head.data(), 1, head_ints[0], head_ints[1]);
  TORCH_CHECK(out.w.K == H, "moedesk.layers_decode_logits: head [V, H]");
  at::Tensor logits = at::empty({T, out.w.N}, res.options());
  on_team([&] {
    run_layers(res, w, ints, floats, kvs, cf, sf, start, top_k, E, ids, scores);
    rms_norm_rows(res.data_ptr<float>(), T, H, head[0].data_ptr<float>(), static_cast<float>(eps));
    out(res.data_ptr<float>(), T, logits.data_ptr<float>());
  });
  return {res.view(x.sizes()), logits, ids, scores};
}

// ---- one Multi-Token-Prediction depth for a few positions (drafting) --------------------------------
//
// h = layers(eh_proj([rms_norm(emb) · enorm; rms_norm(hidden) · hnorm])), logits = head(rms_norm(h[T-1])
// · head_norm): what engine/model/transformer.py's MTPModule does, in one call on one team, with its
// block's arguments laid out as layers_decode takes them. emb, hidden [T, H]; head: enorm, hnorm
// [H] fp32, eh_proj (q, scale, zero), head_norm [H] fp32, head (q, scale, zero); head_ints: (format,
// group) of eh_proj and of head; eps: the three norms'. Returns (h [T, H], logits [V], ids, scores).
std::vector<at::Tensor> mtp_decode(const at::Tensor& emb, const at::Tensor& hidden, at::TensorList head,
                                   at::IntArrayRef head_ints, double eps, at::TensorList w, at::IntArrayRef ints,
                                   at::ArrayRef<double> floats, at::TensorList kvs, const at::Tensor& cos,
                                   const at::Tensor& sin, int64_t start, int64_t top_k, int64_t E) {
  TORCH_CHECK(head.size() == 9 && head_ints.size() == 4, "moedesk.mtp_decode: 9 head tensors and 4 ints expected");
  const int64_t H = emb.size(-1);
  at::Tensor e = emb.reshape({-1, H}).to(at::kFloat).contiguous(), h = hidden.reshape({-1, H}).to(at::kFloat).contiguous();
  const int64_t T = e.size(0);
  TORCH_CHECK(h.size(0) == T && T >= 1 && T <= 16, "moedesk.mtp_decode: emb, hidden [T, H], 1 <= T <= 16");
  for (int i : {0, 1, 5})
    TORCH_CHECK(head[i].numel() == H && head[i].scalar_type() == at::kFloat, "moedesk.mtp_decode: norms [H] fp32");
  at::Tensor res = at::empty({T, H}, e.options()), logits;
  auto [cf, sf, ids, scores] = pass_inputs(res, w, ints, floats, kvs, cos, sin, top_k, E, "moedesk.mtp_decode");
  on_team([&] {
    std::vector<float> joined(T * 2 * H);
    for (int64_t i = 0; i < T; ++i) {
      std::memcpy(&joined[i * 2 * H], e.data_ptr<float>() + i * H, H * 4);
      std::memcpy(&joined[i * 2 * H + H], h.data_ptr<float>() + i * H, H * 4);
      rms_norm_rows(&joined[i * 2 * H], 1, H, head[0].data_ptr<float>(), static_cast<float>(eps));
      rms_norm_rows(&joined[i * 2 * H + H], 1, H, head[1].data_ptr<float>(), static_cast<float>(eps));
    }
    Lin eh(head.data(), 2, head_ints[0], head_ints[1]);
    TORCH_CHECK(eh.w.K == 2 * H && eh.w.N == H, "moedesk.mtp_decode: eh_proj [H, 2H]");
    eh(joined.data(), T, res.data_ptr<float>());
    run_layers(res, w, ints, floats, kvs, cf, sf, start, top_k, E, ids, scores);
    Lin out(head.data(), 6, head_ints[2], head_ints[3]);
    TORCH_CHECK(out.w.K == H, "moedesk.mtp_decode: head [V, H]");
    std::vector<float> last(res.data_ptr<float>() + (T - 1) * H, res.data_ptr<float>() + T * H);
    rms_norm_rows(last.data(), 1, H, head[5].data_ptr<float>(), static_cast<float>(eps));
    logits = at::empty({out.w.N}, e.options());
    out(last.data(), 1, logits.data_ptr<float>());
  });
  return {res, logits, ids, scores};
}

// The instruction set the kernels use from now on, at most the build's (a lower one for tests); returns
// the one in effect. -1 asks without changing it.
int64_t set_isa(int64_t level) {
  if (level >= 0) g_isa = std::min(level, BUILT_ISA);
  return g_isa;
}

// Whether passes run on a team (1) or open ATen's regions per product (0); -1 asks. Returns the setting.
int64_t set_team(int64_t on) {
  if (on >= 0) g_teams = on != 0;
  return g_teams ? 1 : 0;
}

}  // namespace

TORCH_LIBRARY(moedesk, m) {
  m.def("set_isa(int level) -> int");
  m.def("set_team(int on) -> int");
  m.def("int4_blocks_ok(int N, int K, int group) -> bool");
  m.def("linear(Tensor x, Tensor q, Tensor scale, Tensor zero, int fmt, int group) -> Tensor");
  m.def("moe_ffn(Tensor x, Tensor[] w, int[] ints, float[] floats) -> Tensor[]");
  m.def("mla_decode(Tensor x, Tensor[] w, int[] ints, float[] floats, Tensor(a!) kv, Tensor cos, Tensor sin) -> Tensor");
  m.def("layers_decode(Tensor x, Tensor[] w, int[] ints, float[] floats, Tensor(a!)[] kvs, Tensor cos, Tensor sin, "
        "int start, int top_k, int E) -> Tensor[]");
  m.def("layers_decode_logits(Tensor x, Tensor[] w, int[] ints, float[] floats, Tensor(a!)[] kvs, Tensor cos, "
        "Tensor sin, int start, int top_k, int E, Tensor[] head, int[] head_ints, float eps) -> Tensor[]");
  m.def("mtp_decode(Tensor emb, Tensor hidden, Tensor[] head, int[] head_ints, float eps, Tensor[] w, int[] ints, "
        "float[] floats, Tensor(a!)[] kvs, Tensor cos, Tensor sin, int start, int top_k, int E) -> Tensor[]");
  m.def("moe(Tensor x, Tensor ids, Tensor weights, Tensor gu_q, Tensor gu_s, Tensor gu_z, Tensor dn_q, "
        "Tensor dn_s, Tensor dn_z, int fmt, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(moedesk, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
  m.impl("mla_decode", &mla_decode);
  m.impl("moe_ffn", &moe_ffn);
  m.impl("layers_decode", &layers_decode);
  m.impl("layers_decode_logits", &layers_decode_logits);
  m.impl("mtp_decode", &mtp_decode);
}

TORCH_LIBRARY_IMPL(moedesk, CatchAll, m) { m.impl("set_isa", &set_isa);
  m.impl("set_team", &set_team);
  m.impl("int4_blocks_ok", &int4_blocks_ok);
}

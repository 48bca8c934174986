// CPU dispatcher: picks the kernel table for this machine, splits the work into fixed chunks,
// runs them on a persistent pool of helper threads and combines forward partial sums in chunk
// order.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"

#if !defined(_WIN32)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

namespace segcft {
namespace cpu {
namespace {

// Below this many logits per worker, extra threads cost more than they save.
constexpr int64_t kMinElementsPerThread = int64_t(1) << 16;

struct Isa {
  bool avx2 = false;
  bool avx512 = false;
};

Isa detect_isa() {
  Isa isa;
#if defined(SEGCFT_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  isa.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  isa.avx512 = isa.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return isa;
}

// The best table this CPU supports, lowered by SEGCFT_CPU_ISA (scalar | avx2 | avx512) if set.
KernelTable select_table(DType dtype) {
  if (dtype == DType::Float64) return scalar_kernels();
#if defined(SEGCFT_HAVE_X86_KERNELS)
  static const Isa isa = detect_isa();
  const char* env = std::getenv("SEGCFT_CPU_ISA");
  const std::string want = env ? env : "";
  if (want == "scalar") return scalar_kernels();
  if (isa.avx512 && want != "avx2") return avx512_kernels();
  if (isa.avx2) return avx2_kernels();
#endif
  return scalar_kernels();
}

struct Chunk {
  int64_t b, begin, end;
};

std::vector<Chunk> make_chunks(const Problem& p) {
  std::vector<Chunk> chunks;
  const int64_t n = p.spatial_numel();
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t s = 0; s < n; s += kChunk) chunks.push_back({b, s, std::min(n, s + kChunk)});
  return chunks;
}

int effective_threads(const Problem& p, std::size_t num_chunks, int num_threads) {
  const int64_t work = p.batch * p.channels * p.spatial_numel();
  int64_t t = std::min<int64_t>(std::max(num_threads, 1), static_cast<int64_t>(num_chunks));
  t = std::min<int64_t>(t, std::max<int64_t>(1, work / kMinElementsPerThread));
  return static_cast<int>(std::max<int64_t>(t, 1));
}

// Persistent helper threads shared by all kernel calls. The caller always works too and waits
// only for helpers that actually joined its job: a helper that is not scheduled in time (a busy
// machine) finds the job closed when it wakes and goes back to sleep, so a call never stalls on
// a thread that has no work, and no thread is created per call.
class WorkerPool {
 public:
  using Job = std::function<void(std::size_t, int)>;

  // The process-wide pool; a forked child gets a fresh one (the parent's threads do not exist
  // there and its locks may be held).
  static WorkerPool& instance() {
    static const bool registered = [] {
#if !defined(_WIN32)
      pthread_atfork(nullptr, nullptr, [] { current() = nullptr; });
#endif
      return true;
    }();
    (void)registered;
    WorkerPool*& pool = current();
    if (pool == nullptr) pool = new WorkerPool();  // never destroyed: helpers may outlive main()
    return *pool;
  }

  // Runs job(i, slot) for every i in [0, n), claiming indices dynamically, on the caller (slot 0)
  // and up to helpers other threads (slots 1..helpers).
  void run(std::size_t n, int helpers, const Job& job) {
    std::lock_guard<std::mutex> serial(run_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(threads_.size()) < helpers) threads_.emplace_back([this] { loop(); });
      if (helpers > 0) place_helpers();
      job_ = &job;
      size_ = n;
      next_.store(0);
      wanted_ = helpers;
      joined_ = 0;
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    work(job, 0);
    std::unique_lock<std::mutex> lk(mu_);
    job_ = nullptr;
    done_.wait(lk, [this] { return active_ == 0; });
  }

 private:
  WorkerPool() = default;

  static WorkerPool*& current() {
    static WorkerPool* pool = nullptr;
    return pool;
  }

  // Keeps the helpers off the caller's CPU. Some schedulers (seen on a 2-vCPU VM) wake a helper
  // on the CPU of the thread that woke it, which then time-slices the caller and the helper on
  // one CPU while the other stays idle: two threads ran no faster than one. The helpers may run
  // on every CPU the caller may use except the one it is on now; redone only when the caller
  // has moved or new helpers exist (one affinity call per helper then, none otherwise).
  void place_helpers() {
#if defined(__linux__)
    const int cpu = sched_getcpu();
    if (cpu < 0 || (cpu == placed_cpu_ && threads_.size() == placed_threads_)) return;
    cpu_set_t mask;
    CPU_ZERO(&mask);
    if (sched_getaffinity(0, sizeof mask, &mask) != 0 || cpu >= CPU_SETSIZE) return;
    CPU_CLR(cpu, &mask);
    if (CPU_COUNT(&mask) == 0) return;  // the caller may use one CPU only: leave the helpers be
    for (std::thread& t : threads_) pthread_setaffinity_np(t.native_handle(), sizeof mask, &mask);
    placed_cpu_ = cpu;
    placed_threads_ = threads_.size();
#endif
  }

  void work(const Job& job, int slot) {
    for (std::size_t i = next_.fetch_add(1); i < size_; i = next_.fetch_add(1)) job(i, slot);
  }

  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    std::uint64_t seen = generation_;
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (job_ == nullptr || joined_ >= wanted_) continue;
      const int slot = ++joined_;
      ++active_;
      const Job* job = job_;
      lk.unlock();
      work(*job, slot);
      lk.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  std::uint64_t generation_ = 0;
  const Job* job_ = nullptr;  // null once the caller has closed the job
  std::size_t size_ = 0;
  std::atomic<std::size_t> next_{0};
  int wanted_ = 0, joined_ = 0, active_ = 0;
  int placed_cpu_ = -1;
  std::size_t placed_threads_ = 0;
};

// Runs fn(chunk_index, scratch) over all chunks on `threads` workers (the caller is one of them).
template <class Fn>
void run_chunks(std::size_t num_chunks, int threads, std::size_t scratch_bytes, Fn&& fn) {
  const std::size_t stride = (scratch_bytes + 63) / 64 * 64;
  std::unique_ptr<unsigned char[]> pool(new unsigned char[stride * threads + 64]);
  unsigned char* base = pool.get() + (64 - reinterpret_cast<std::uintptr_t>(pool.get()) % 64) % 64;
  if (threads <= 1) {
    for (std::size_t i = 0; i < num_chunks; ++i) fn(i, static_cast<void*>(base));
    return;
  }
  WorkerPool::instance().run(num_chunks, threads - 1,
                             [&](std::size_t i, int slot) { fn(i, static_cast<void*>(base + stride * slot)); });
}

}  // namespace

void soft_area_forward(const Problem& p, void* out, int num_threads, int64_t* id_range) {
  const int64_t CR = p.channels * p.region_slots();
  const std::size_t total = static_cast<std::size_t>(p.batch * CR);
  std::vector<double> sums(total, 0.0);
  const std::vector<Chunk> chunks = make_chunks(p);
  int64_t id_lo = INT64_MAX, id_hi = INT64_MIN;
  if (!chunks.empty() && p.channels > 0) {
    const KernelTable table = select_table(p.dtype);
    std::vector<double> partial(chunks.size() * static_cast<std::size_t>(CR));
    std::vector<int64_t> ranges(2 * chunks.size());
    run_chunks(chunks.size(), effective_threads(p, chunks.size(), num_threads), table.scratch_bytes(p),
               [&](std::size_t i, void* scratch) {
                 table.forward_chunk(p, chunks[i].b, chunks[i].begin, chunks[i].end, &partial[i * CR],
                                     &ranges[2 * i], scratch);
               });
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      double* dst = &sums[static_cast<std::size_t>(chunks[i].b * CR)];
      const double* src = &partial[i * CR];
      for (int64_t k = 0; k < CR; ++k) dst[k] += src[k];
      id_lo = std::min(id_lo, ranges[2 * i]);
      id_hi = std::max(id_hi, ranges[2 * i + 1]);
    }
  }
  if (id_range != nullptr) {
    id_range[0] = id_lo;
    id_range[1] = id_hi;
  }
  if (p.dtype == DType::Float64) {
    std::memcpy(out, sums.data(), total * sizeof(double));
  } else {
    float* o = static_cast<float*>(out);
    for (std::size_t k = 0; k < total; ++k) o[k] = static_cast<float>(sums[k]);
  }
}

void soft_area_backward(const Problem& p, int num_threads, int64_t* id_range) {
  const std::vector<Chunk> chunks = make_chunks(p);
  int64_t id_lo = INT64_MAX, id_hi = INT64_MIN;
  if (!chunks.empty() && p.channels > 0) {
    const KernelTable table = select_table(p.dtype);
    std::vector<int64_t> ranges(2 * chunks.size());
    run_chunks(chunks.size(), effective_threads(p, chunks.size(), num_threads), table.scratch_bytes(p),
               [&](std::size_t i, void* scratch) {
                 table.backward_chunk(p, chunks[i].b, chunks[i].begin, chunks[i].end, &ranges[2 * i], scratch);
               });
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      id_lo = std::min(id_lo, ranges[2 * i]);
      id_hi = std::max(id_hi, ranges[2 * i + 1]);
    }
  }
  if (id_range != nullptr) {
    id_range[0] = id_lo;
    id_range[1] = id_hi;
  }
}

void gelu_forward(const float* x, float* y, float* dydx, int64_t n, int num_threads) {
  if (n <= 0) return;
  const auto gelu = select_table(DType::Float32).gelu_chunk;
  const std::size_t num_chunks = static_cast<std::size_t>((n + kElementChunk - 1) / kElementChunk);
  int64_t threads = std::min<int64_t>(std::max(num_threads, 1), static_cast<int64_t>(num_chunks));
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinElementsPerThread));
  run_chunks(num_chunks, static_cast<int>(threads), 0, [&](std::size_t i, void*) {
    const int64_t begin = static_cast<int64_t>(i) * kElementChunk;
    const int64_t len = std::min(kElementChunk, n - begin);
    gelu(x + begin, y + begin, dydx + begin, len);
  });
}

// dw[0..nw) and db[0..nb) += the parts' weight and bias gradients, part i at partial[i * (nw + nb)],
// summed part by part in order: the result does not depend on which thread computed which part.
static void add_parts_in_order(const std::vector<float>& partial, int64_t parts, int64_t nw, int64_t nb,
                               float* dw, float* db) {
  for (int64_t i = 0; i < parts; ++i) {
    const float* part = &partial[static_cast<std::size_t>(i * (nw + nb))];
    for (int64_t k = 0; k < nw; ++k) dw[k] += part[k];
    for (int64_t k = 0; k < nb; ++k) db[k] += part[nw + k];
  }
}

bool conv3x3_forward(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3,
                     bool channels_last, const float* x, const float* weight, const float* bias, float* y,
                     int num_threads) {
  if (!conv3x3_supported(ci, co)) return false;
  if (batch <= 0 || d <= 0 || h <= 0 || w <= 0) return true;
  const KernelTable table = select_table(DType::Float32);
  const Conv3x3 g{ci, co, d, h, w, d3, channels_last};
  const int64_t n = d * h * w;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), batch));
  run_chunks(static_cast<std::size_t>(batch), threads, conv3x3_scratch_bytes(g), [&](std::size_t b, void* scratch) {
    const int64_t i = static_cast<int64_t>(b);
    table.conv3x3_forward(g, x + i * n * ci, weight, bias, y + i * n * co, scratch);
  });
  return true;
}

bool conv3x3_backward(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3,
                      bool channels_last, const float* x, const float* weight, const float* gy, float* gx, float* dw,
                      float* db, int num_threads, const float* mult) {
  if (!conv3x3_supported(ci, co)) return false;
  const int64_t nw = co * ci * (d3 ? 27 : 9);
  std::fill(dw, dw + nw, 0.0f);
  std::fill(db, db + co, 0.0f);
  if (batch <= 0 || d <= 0 || h <= 0 || w <= 0) return true;
  const KernelTable table = select_table(DType::Float32);
  const Conv3x3 g{ci, co, d, h, w, d3, channels_last};
  const int64_t n = d * h * w;
  std::vector<float> partial(static_cast<std::size_t>(batch * (nw + co)));
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), batch));
  run_chunks(static_cast<std::size_t>(batch), threads, conv3x3_scratch_bytes(g), [&](std::size_t b, void* scratch) {
    const int64_t i = static_cast<int64_t>(b);
    float* part = &partial[b * static_cast<std::size_t>(nw + co)];
    table.conv3x3_backward(g, x + i * n * ci, weight, gy + i * n * co, gx != nullptr ? gx + i * n * ci : nullptr,
                           part, part + nw, scratch);
    if (gx != nullptr && mult != nullptr) {  // while the image's gradient is still in cache
      float* gi = gx + i * n * ci;
      const float* mi = mult + i * n * ci;
      for (int64_t k = 0; k < n * ci; ++k) gi[k] *= mi[k];
    }
  });
  add_parts_in_order(partial, batch, nw, co, dw, db);
  return true;
}

// The table for rows of n channels (or latents): with n a multiple of 8 but not of 16, the AVX2 code
// (8 lanes) fills its vectors where AVX-512's would leave half of each idle or run a scalar tail.
static KernelTable channels_table(int64_t n) {
  KernelTable table = select_table(DType::Float32);
#if defined(SEGCFT_HAVE_X86_KERNELS)
  if (n % 16 != 0 && n % 8 == 0 && std::string(table.name) == "avx512") table = avx2_kernels();
#endif
  return table;
}

// Workers for the channels-last gelu_pointwise passes over `rows` rows of C channels.
static int pointwise_threads(int64_t rows, int64_t C, int64_t num_chunks, int num_threads) {
  int64_t threads = std::min<int64_t>(std::max(num_threads, 1), num_chunks);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows * C / kMinElementsPerThread)));
}

void gelu_pointwise_forward(int64_t rows, int64_t C, int64_t O, const float* x, const float* w, const float* b,
                            float* y, float* d, float* out, int num_threads) {
  if (rows <= 0 || C <= 0 || O <= 0) return;
  const KernelTable table = channels_table(C);
  const int64_t OP = (O + 15) / 16 * 16;  // whole vectors of any table's width
  std::vector<float> wt(static_cast<std::size_t>(C * OP), 0.0f), bias(static_cast<std::size_t>(OP), 0.0f);
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t c = 0; c < C; ++c) wt[static_cast<std::size_t>(c * OP + o)] = w[o * C + c];
    if (b != nullptr) bias[static_cast<std::size_t>(o)] = b[o];
  }
  const int64_t num_chunks = (rows + kPointwiseRows - 1) / kPointwiseRows;
  run_chunks(static_cast<std::size_t>(num_chunks), pointwise_threads(rows, C, num_chunks, num_threads), 0,
             [&](std::size_t i, void*) {
               const int64_t begin = static_cast<int64_t>(i) * kPointwiseRows;
               const int64_t len = std::min(kPointwiseRows, rows - begin);
               table.gelu_chunk(x + begin * C, y + begin * C, d + begin * C, len * C);
               // the chunk's GELU(x) is still in cache
               table.pointwise_rows(y + begin * C, wt.data(), bias.data(), out + begin * O, len, C, O, OP);
             });
}

void gelu_pointwise_backward(int64_t rows, int64_t C, int64_t O, const float* g, const float* y, const float* d,
                             const float* w, float* gx, float* dw, float* db, int num_threads) {
  std::fill(dw, dw + O * C, 0.0f);
  std::fill(db, db + O, 0.0f);
  if (rows <= 0 || C <= 0 || O <= 0) return;
  const auto kernel = channels_table(C).gelu_pointwise_backward;
  const int64_t num_chunks = (rows + kPointwiseRows - 1) / kPointwiseRows;
  const int64_t stride = O * C + O;
  std::vector<float> partial(static_cast<std::size_t>(num_chunks * stride));
  run_chunks(static_cast<std::size_t>(num_chunks), pointwise_threads(rows, C, num_chunks, num_threads), 0,
             [&](std::size_t i, void*) {
               const int64_t begin = static_cast<int64_t>(i) * kPointwiseRows;
               const int64_t len = std::min(kPointwiseRows, rows - begin);
               float* part = &partial[i * static_cast<std::size_t>(stride)];
               kernel(g + begin * O, y + begin * C, d + begin * C, w, gx + begin * C, part, part + O * C, len, C, O);
             });
  add_parts_in_order(partial, num_chunks, O * C, O, dw, db);
}

void pointwise_cf_forward(int64_t batch, int64_t S, int64_t C, int64_t O, const float* y, const float* w,
                          const float* b, float* out, int num_threads) {
  if (batch <= 0 || S <= 0) return;
  const auto kernel = select_table(DType::Float32).pointwise_cf_forward;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), batch));
  run_chunks(static_cast<std::size_t>(batch), threads, 0, [&](std::size_t i, void*) {
    const int64_t b_ = static_cast<int64_t>(i);
    kernel(y + b_ * C * S, w, b, out + b_ * O * S, S, C, O);
  });
}

void gelu_pointwise_cf_backward(int64_t batch, int64_t S, int64_t C, int64_t O, const float* g, const float* y,
                                const float* d, const float* w, float* gx, float* dw, float* db, int num_threads) {
  std::fill(dw, dw + O * C, 0.0f);
  std::fill(db, db + O, 0.0f);
  if (batch <= 0 || S <= 0) return;
  const auto kernel = select_table(DType::Float32).gelu_pointwise_cf_backward;
  const int64_t stride = O * C + O;
  std::vector<float> partial(static_cast<std::size_t>(batch * stride));
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), batch));
  run_chunks(static_cast<std::size_t>(batch), threads, 0, [&](std::size_t i, void*) {
    const int64_t b_ = static_cast<int64_t>(i);
    float* part = &partial[i * static_cast<std::size_t>(stride)];
    kernel(g + b_ * O * S, y + b_ * C * S, d + b_ * C * S, w, gx + b_ * C * S, part, part + O * C, S, C, O);
  });
  add_parts_in_order(partial, batch, O * C, O, dw, db);
}

void latent_forward(int64_t batch, int64_t rows, int64_t Z, int64_t P, const float* post, const float* prior,
                    const float* eps, float* z, float* feat, float* kl, float t, int num_threads) {
  if (batch <= 0) return;
  const auto kernel = channels_table(Z).latent_forward;
  const int64_t nf = P - 2 * Z;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), batch));
  run_chunks(static_cast<std::size_t>(batch), threads, 0, [&](std::size_t b, void*) {
    const int64_t i = static_cast<int64_t>(b);
    kl[i] = static_cast<float>(kernel(post + i * rows * 2 * Z, prior + i * rows * P, eps + i * rows * Z,
                                      z + i * rows * Z, feat != nullptr ? feat + i * rows * nf : nullptr, rows, Z,
                                      P, t));
  });
}

void latent_backward(int64_t batch, int64_t rows, int64_t Z, int64_t P, const float* post, const float* prior,
                     const float* eps, const float* gz, const float* gkl, const float* gfeat, float* dpost,
                     float* dprior, float t, int num_threads) {
  if (batch <= 0) return;
  const auto kernel = channels_table(Z).latent_backward;
  const int64_t nf = P - 2 * Z;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), batch));
  run_chunks(static_cast<std::size_t>(batch), threads, 0, [&](std::size_t b, void*) {
    const int64_t i = static_cast<int64_t>(b);
    kernel(post + i * rows * 2 * Z, prior + i * rows * P, eps + i * rows * Z,
           gz != nullptr ? gz + i * rows * Z : nullptr, gkl != nullptr ? gkl[i] : 0.0f,
           gfeat != nullptr ? gfeat + i * rows * nf : nullptr, dpost + i * rows * 2 * Z, dprior + i * rows * P, rows,
           Z, P, t);
  });
}

const char* active_isa() { return select_table(DType::Float32).name; }

}  // namespace cpu
}  // namespace segcft

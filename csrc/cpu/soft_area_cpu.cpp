// CPU dispatcher: picks the kernel table for this machine, splits the work into fixed chunks,
// runs them on std::thread workers and combines forward partial sums in chunk order.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"

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

// Runs fn(chunk_index, scratch) over all chunks on `threads` workers (the caller is one of them).
template <class Fn>
void run_chunks(std::size_t num_chunks, int threads, std::size_t scratch_bytes, Fn&& fn) {
  const std::size_t stride = (scratch_bytes + 63) / 64 * 64;
  std::unique_ptr<unsigned char[]> pool(new unsigned char[stride * threads + 64]);
  unsigned char* base = pool.get() + (64 - reinterpret_cast<std::uintptr_t>(pool.get()) % 64) % 64;
  std::atomic<std::size_t> next{0};
  auto worker = [&](int t) {
    void* scratch = base + stride * t;
    for (std::size_t i = next.fetch_add(1); i < num_chunks; i = next.fetch_add(1)) fn(i, scratch);
  };
  std::vector<std::thread> pool_threads;
  pool_threads.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool_threads.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool_threads) th.join();
}

}  // namespace

void soft_area_forward(const Problem& p, void* out, int num_threads) {
  const int64_t CR = p.channels * p.region_slots();
  const std::size_t total = static_cast<std::size_t>(p.batch * CR);
  std::vector<double> sums(total, 0.0);
  const std::vector<Chunk> chunks = make_chunks(p);
  if (!chunks.empty() && p.channels > 0) {
    const KernelTable table = select_table(p.dtype);
    std::vector<double> partial(chunks.size() * static_cast<std::size_t>(CR));
    run_chunks(chunks.size(), effective_threads(p, chunks.size(), num_threads), table.scratch_bytes(p),
               [&](std::size_t i, void* scratch) {
                 table.forward_chunk(p, chunks[i].b, chunks[i].begin, chunks[i].end, &partial[i * CR], scratch);
               });
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      double* dst = &sums[static_cast<std::size_t>(chunks[i].b * CR)];
      const double* src = &partial[i * CR];
      for (int64_t k = 0; k < CR; ++k) dst[k] += src[k];
    }
  }
  if (p.dtype == DType::Float64) {
    std::memcpy(out, sums.data(), total * sizeof(double));
  } else {
    float* o = static_cast<float*>(out);
    for (std::size_t k = 0; k < total; ++k) o[k] = static_cast<float>(sums[k]);
  }
}

void soft_area_backward(const Problem& p, int num_threads) {
  const std::vector<Chunk> chunks = make_chunks(p);
  if (chunks.empty() || p.channels == 0) return;
  const KernelTable table = select_table(p.dtype);
  run_chunks(chunks.size(), effective_threads(p, chunks.size(), num_threads), table.scratch_bytes(p),
             [&](std::size_t i, void* scratch) {
               table.backward_chunk(p, chunks[i].b, chunks[i].begin, chunks[i].end, scratch);
             });
}

const char* active_isa() { return select_table(DType::Float32).name; }

}  // namespace cpu
}  // namespace segcft

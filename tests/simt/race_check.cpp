// race_check: the three families' CUDA kernels under ThreadSanitizer, without Python (TSan cannot
// be loaded into CPython). Usage: race_check {pva|blendshape|score}.
//
// For each shape, through the host functions the torch dispatch calls: the forward twice, in two
// block orders (the outputs must be bitwise equal and the arrival counter back to 0), then the
// backward. TSan reports a data race (shared memory without a barrier, a last-block reduction
// without its fences, ...) and simt a divergent barrier or warp collective; either ends the
// program with a non-zero status. Values are checked against the reference by the ASan tests.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "blendshape/blendshape_cuda.h"
#include "pva/pva_cuda.h"
#include "score/score_cuda.h"

using namespace fusedloss;

namespace {

std::mt19937 rng(7);

template <typename T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, __half>) return __double2half(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __double2bfloat16(x);
  else return static_cast<T>(x);
}

template <typename T>
std::vector<T> randn(size_t n) {
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = from_double<T>(normal(rng));
  return v;
}

template <typename T> cuda::DType dtype_of();
template <> cuda::DType dtype_of<float>() { return cuda::DType::kFloat32; }
template <> cuda::DType dtype_of<double>() { return cuda::DType::kFloat64; }
template <> cuda::DType dtype_of<__half>() { return cuda::DType::kFloat16; }
template <> cuda::DType dtype_of<__nv_bfloat16>() { return cuda::DType::kBFloat16; }

template <typename T> using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

unsigned int counter = 0;  // the arrival counter, zeroed once, as the dispatch keeps one per stream
int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what.c_str());
    ++failures;
  }
}

// forward(outputs) twice in two block orders: success, counter back to 0, equal bits.
template <typename Forward>
void forward_twice(const std::string& name, Forward&& forward, std::vector<std::vector<char>*> outputs) {
  std::vector<std::vector<char>> first;
  for (uint64_t seed : {1, 2}) {
    simt::set_seed(seed);
    for (auto* o : outputs) std::memset(o->data(), 0xFF, o->size());
    expect(forward() == cudaSuccess, name + ": forward launch");
    expect(counter == 0, name + ": arrival counter not back to 0");
    if (seed == 1)
      for (auto* o : outputs) first.push_back(*o);
  }
  for (size_t i = 0; i < outputs.size(); ++i)
    expect(first[i] == *outputs[i], name + ": forward output " + std::to_string(i) + " differs between block orders");
}

std::vector<char> bytes(size_t n) { return std::vector<char>(n ? n : 1); }

template <typename T>
void pva_case(int64_t B, int64_t L, int64_t D, bool l1) {
  using acc_t = acc_of<T>;
  const std::string name = "pva [" + std::to_string(B) + ", " + std::to_string(L) + ", " + std::to_string(D) + "]";
  auto pred = randn<T>(B * L * D), target = randn<T>(B * L * D), cond = randn<T>(B * D);
  const double table[] = {0, 0, 1.0, 0.5, 1, double(D < 40 ? D : 40), 0.7, 0.25};
  std::vector<double> dim_ws(D, 1.25);
  pva::CudaInputs in{};
  in.pred = pred.data(), in.target = target.data(), in.cond = cond.data();
  const int64_t strides[3] = {L * D, D, 1};
  for (int i = 0; i < 3; ++i) in.pred_strides[i] = in.target_strides[i] = strides[i];
  in.cond_strides[0] = D, in.cond_strides[1] = 1;
  in.table = table, in.num_parts = 2, in.dim_ws = dim_ws.data();
  in.B = B, in.L = L, in.D = D;
  in.opts = pva::Options{l1, true, true};
  in.dtype = dtype_of<T>();
  const int64_t T_ = 2 * pva::terms_per_part(in.opts);
  auto terms = bytes(T_ * sizeof(acc_t)), total = bytes(sizeof(acc_t)), ws = bytes(pva::forward_workspace_bytes(in));
  forward_twice(name, [&] { return pva::forward_cuda(in, terms.data(), total.data(), ws.data(), &counter, nullptr); },
                {&terms, &total});
  std::vector<acc_t> grad_terms(T_, acc_t(0.5));
  const acc_t grad_total = acc_t(0.3);
  std::vector<T> gp(B * L * D), gq(B * L * D), gc(B * D);
  const pva::CudaGradients out{grad_terms.data(), 1, &grad_total, gp.data(), gq.data(), gc.data()};
  expect(pva::backward_cuda(in, out, nullptr) == cudaSuccess, name + ": backward launch");
}

template <typename T>
void blendshape_case(int64_t B, int64_t T_, int64_t K, int term_mask, bool groups) {
  using acc_t = acc_of<T>;
  const std::string name = "blendshape [" + std::to_string(B) + ", " + std::to_string(T_) + ", " + std::to_string(K) + "]";
  const int64_t N = B * T_ * K, J = 3;
  auto p = randn<T>(N), q = randn<T>(N), raw = randn<T>(N), prev = randn<T>(N);
  std::vector<double> gram(K * K, 0.0), coef(K), settings = {1.0, 0.1, 0.5, 0.3, 0.2, 0.4, 0.6, 0.1};
  for (int64_t k = 0; k < K; ++k) {
    gram[k * K + k] = 1.0 + 0.1 * (k % 3);
    if (k + 1 < K) gram[k * K + k + 1] = gram[(k + 1) * K + k] = 0.2;
    coef[k] = 0.1 * (k % 5);
  }
  blendshape::CudaInputs in{};
  in.pred = p.data(), in.target = q.data(), in.raw_pred = raw.data(), in.prev_pred = prev.data();
  for (auto& s : in.strides) s[0] = T_ * K, s[1] = T_ == 1 ? 0 : K, s[2] = 1;
  in.settings = settings.data();
  in.group_coef = groups ? coef.data() : nullptr, in.group_len = groups ? K : 0;
  in.gram = gram.data();
  in.problem = blendshape::Problem{B, T_, K, J, term_mask, groups};
  in.dtype = dtype_of<T>();
  int n = 0;
  for (int t = 0; t < blendshape::kNumTerms; ++t) n += blendshape::has(term_mask, t);
  const bool cols = blendshape::has(term_mask, blendshape::kPerceptual) && !groups;
  auto out_terms = bytes(n * sizeof(acc_t)), total = bytes(sizeof(acc_t));
  auto col_stats = bytes((cols ? 2 * T_ * K : 0) * sizeof(acc_t)), ws = bytes(blendshape::forward_workspace_bytes(in));
  forward_twice(name, [&] {
    return blendshape::forward_cuda(in, out_terms.data(), total.data(), col_stats.data(), ws.data(), &counter, nullptr);
  }, {&out_terms, &total, &col_stats});
  std::vector<acc_t> grad_terms(n, acc_t(0.5));
  const acc_t grad_total = acc_t(0.3);
  std::vector<T> gp(N), gq(N), graw(N);
  const blendshape::CudaGradients out{grad_terms.data(), 1, &grad_total, col_stats.data(), gp.data(), gq.data(),
                                      graw.data()};
  expect(blendshape::backward_cuda(in, out, nullptr) == cudaSuccess, name + ": backward launch");
}

template <typename T>
void score_case(int64_t B, int term_mask) {
  using acc_t = acc_of<T>;
  const std::string name = "score B=" + std::to_string(B);
  auto scores = randn<T>(B), logits = randn<T>(2 * B);
  std::vector<T> labels(B);
  for (int64_t i = 0; i < B; ++i) labels[i] = from_double<T>((rng() % 2) ? 1.0 : 0.0);
  const double settings[] = {1.0, 0.3, 0.2, 0.5};
  score::CudaInputs in{};
  in.scores = scores.data(), in.scores_stride = 1, in.labels = labels.data(), in.labels_stride = 1;
  in.logits = logits.data(), in.logits_strides[0] = 2, in.logits_strides[1] = 1;
  in.settings = settings;
  in.problem = score::Problem{B, term_mask, false, false};
  in.dtype = dtype_of<T>();
  in.labels_dtype = in.dtype;  // labels in scores' dtype
  auto out_terms = bytes(3 * sizeof(acc_t)), total = bytes(sizeof(acc_t)), counts = bytes(B * sizeof(int32_t));
  auto scale = bytes(sizeof(double)), status = bytes(sizeof(int32_t)), ws = bytes(score::forward_workspace_bytes(in));
  const score::CudaOutputs out{out_terms.data(), total.data(), reinterpret_cast<int32_t*>(counts.data()),
                               reinterpret_cast<double*>(scale.data()), reinterpret_cast<int32_t*>(status.data())};
  forward_twice(name, [&] { return score::forward_cuda(in, out, ws.data(), &counter, nullptr); },
                {&out_terms, &total, &counts, &scale, &status});
  std::vector<acc_t> grad_terms(3, acc_t(0.5));
  const acc_t grad_total = acc_t(0.3);
  std::vector<T> gs(B), gl(2 * B);
  const score::CudaGradients g{grad_terms.data(), 1, &grad_total, out.counts, out.rank_scale, gs.data(), gl.data()};
  expect(score::backward_cuda(in, g, nullptr) == cudaSuccess, name + ": backward launch");
}

}  // namespace

// Runs case() on a device of `sms` SMs and says how long it took.
template <typename Case>
void on(int sms, const char* what, Case&& run_case) {
  simt::set_sm_count(sms);
  const auto start = std::chrono::steady_clock::now();
  run_case();
  std::printf("%-44s %2d SMs  %6.2f s\n", what, sms,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  const std::string family = argc > 1 ? argv[1] : "";
  if (family == "pva") {
    on(2, "fp32 [2, 40, 70]", [] { pva_case<float>(2, 40, 70, false); });
    on(2, "fp32 l1 [1, 2, 5]", [] { pva_case<float>(1, 2, 5, true); });
    on(1, "fp32 [9, 64, 36], grid-stride", [] { pva_case<float>(9, 64, 36, false); });
    on(16, "fp64 l1 [16, 48, 100], 24 blocks", [] { pva_case<double>(16, 48, 100, true); });
    on(2, "fp16 [3, 17, 33]", [] { pva_case<__half>(3, 17, 33, false); });
  } else if (family == "blendshape") {
    on(2, "fp32 [4, 6, 52], all terms", [] { blendshape_case<float>(4, 6, 52, 0x7f, false); });
    on(2, "fp64 [37, 5, 33], batch groups", [] { blendshape_case<double>(37, 5, 33, 0x7f, false); });
    on(2, "fp32 [50, 37], groups", [] { blendshape_case<float>(50, 1, 37, 0x77, true); });
    on(2, "fp32 [5, 7, 300]", [] { blendshape_case<float>(5, 7, 300, 0x7f, false); });
    on(8, "fp32 [1024, 64], 32 batch groups", [] { blendshape_case<float>(1024, 1, 64, 0x17, false); });
    on(2, "bf16 [20, 2048]", [] { blendshape_case<__nv_bfloat16>(20, 1, 2048, 0x07, false); });
  } else if (family == "score") {
    on(2, "fp32 B=300, all pairs", [] { score_case<float>(300, 0b111); });
    on(2, "fp64 B=2048, all pairs", [] { score_case<double>(2048, 0b111); });
    on(2, "fp32 B=4200, sorted", [] { score_case<float>(4200, 0b111); });
    on(1, "fp16 B=5000, sorted, ranking only, grid-stride", [] { score_case<__half>(5000, 0b100); });
    on(4, "fp32 B=4100, sorted, 16 blocks", [] { score_case<float>(4100, 0b111); });
    on(2, "fp32 B=1", [] { score_case<float>(1, 0b111); });
    on(1, "fp64 B=4500, sorted, vector grid-stride", [] { score_case<double>(4500, 0b111); });
  } else {
    std::fprintf(stderr, "usage: race_check {pva|blendshape|score}\n");
    return 2;
  }
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures != 0;
}

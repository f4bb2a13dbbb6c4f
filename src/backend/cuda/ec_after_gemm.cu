// The deferred EC's launches (ec_after_gemm.h): a compensated linear's whole term, B·(g ⊙ A·x), computed after its
// plain W4 launch, by the residual add + RMSNorm that follows it or by a launch of its own.
//
// Why not inside the W4 launch: there z = A·x needs every k-slice of x summed across CTAs before the gate and B can
// run, a chain of global round trips (or cluster barriers) that outlasts the GEMM's own work at decode sizes; every
// W4 CTA of the matrix then waits for it. Here the GEMM runs exactly its plain plan; the next launch already waits
// for the whole GEMM and its chain is short (ec_after_gemm.h). Measured on the H200 (bench/results/cuda-h200-ecdefer):
// cheaper than the in-kernel EC at 8 tokens, not at one.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_after_gemm.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/row_norm.cuh"
#include "core/error.h"

namespace spear::cuda {

namespace {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
constexpr int kThreads = 128;         // one 8-feature group of the output per thread
constexpr int kSlice = kThreads * 8;  // output features per CTA at most
constexpr int kMaxCluster = 8;        // portable cluster size
constexpr int kMaxGate = 64;

// The widest cluster the shapes allow (A's slice per CTA, the bytes one SM pulls in after the wait, shrinks with
// it), else the fewest CTAs that cover n and k in slices of 1024.
int cluster_of(int n, int k) {
  if (n % (8 * kMaxCluster) == 0 && k % (8 * kMaxCluster) == 0) return kMaxCluster;
  const int c = std::max((n + kSlice - 1) / kSlice, (k + kSlice - 1) / kSlice);
  return std::min(c, kMaxCluster);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 8 bf16 · 8 fp32 added to s in element order.
__device__ __forceinline__ float dot8(const uint4& a, const float* v, float s) {
  const bf162* h = reinterpret_cast<const bf162*>(&a);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    s = fmaf(f.x, v[2 * j], s);
    s = fmaf(f.y, v[2 * j + 1], s);
  }
  return s;
}

template <int kRank>
struct EcShared {
  float zpart[kRank];  // this CTA's share of z, read by the whole cluster
  float warp[kThreads / 32][kRank];
  float z[kRank], gz[kRank], h[kMaxGate];
  float par[2 * kMaxGate * kRank + kMaxGate + kRank];  // W1 [gw][r], W2 [r][gw], b1 [gw], b2 [r]
};

// One CTA's part of a compensator's term for token `row`: CTA q of C takes k-slice q of A·x and output features
// [col0, col0 + cols). Call order: prefetch (before griddepcontrol.wait), z_partial, load_b, cluster.sync(), gate,
// __syncthreads(), delta8.
template <int kRank>
struct EcCta {
  static constexpr int R8 = kRank / 8;
  const EcTermArgs& ec;
  int C, q, kc, k0, col0, cols;

  // A's k-slice and B's rows into L2 (read right after the wait: A beside x's slice, B while the partial z cross
  // the cluster), the gate's parameters into shared memory.
  __device__ void prefetch(EcShared<kRank>& s) const {
    const int a_lines = kc * 2 / 128, b_lines = cols * kRank * 2 / 128;
    const char* B0 = reinterpret_cast<const char*>(ec.B + size_t(col0) * kRank);
    for (int i = threadIdx.x; i < kRank * a_lines + b_lines; i += kThreads) {
      const char* p = i < kRank * a_lines ? reinterpret_cast<const char*>(ec.A + size_t(i / a_lines) * ec.k + k0) +
                                                size_t(i % a_lines) * 128
                                          : B0 + size_t(i - kRank * a_lines) * 128;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
    const int gw = ec.gate_width, n1 = gw * kRank, n2 = 2 * n1, n3 = n2 + gw, np = gw > 0 ? n3 + kRank : 0;
    for (int i = threadIdx.x; i < np; i += kThreads)
      s.par[i] = i < n1 ? ec.W1[i] : i < n2 ? ec.W2[i - n1] : i < n3 ? ec.b1[i - n2] : ec.b2[i - n3];
  }

  // This CTA's k-slice of A·x into s.zpart (thread t takes the 8-column groups t, t + 128, ...); ends with a
  // __syncthreads.
  __device__ void z_partial(size_t row, EcShared<kRank>& s) const {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float acc[kRank];
#pragma unroll
    for (int j = 0; j < kRank; ++j) acc[j] = 0.f;
    const bf16* xr = ec.xin + row * size_t(ec.k) + k0;
    for (int g = tid; g * 8 < kc; g += kThreads) {
      const uint4 xv = reinterpret_cast<const uint4*>(xr)[g];
      float xf[8];
      const bf162* xh = reinterpret_cast<const bf162*>(&xv);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(xh[j]);
        xf[2 * j] = f.x, xf[2 * j + 1] = f.y;
      }
#pragma unroll
      for (int j = 0; j < kRank; ++j)
        acc[j] = dot8(__ldg(reinterpret_cast<const uint4*>(ec.A + size_t(j) * ec.k + k0) + g), xf, acc[j]);
    }
#pragma unroll
    for (int j = 0; j < kRank; ++j) {
      float v = acc[j];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) s.warp[warp][j] = v;
    }
    __syncthreads();
    if (tid < kRank) {
      float v = 0.f;
#pragma unroll
      for (int i = 0; i < kThreads / 32; ++i) v += s.warp[i][tid];
      s.zpart[tid] = v;
    }
  }

  // The 8 rows of B of 8-feature group g (features col0 + 8·g ...), when this CTA has that group.
  __device__ bool load_b(uint4 (&breg)[8 * R8], int g) const {
    if (g >= cols / 8) return false;
    const uint4* Bg = reinterpret_cast<const uint4*>(ec.B) + (size_t(col0) + 8 * g) * R8;
#pragma unroll
    for (int i = 0; i < 8 * R8; ++i) breg[i] = __ldg(Bg + i);
    return true;
  }

  // After cluster.sync(): z summed in CTA order (the same bits in every CTA), then g ⊙ z into s.gz; warp 0.
  __device__ void gate(cg::cluster_group& cluster, EcShared<kRank>& s) const {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x, gw = ec.gate_width;
    for (int j = lane; j < kRank; j += 32) {
      float v = 0.f;
      for (int p = 0; p < C; ++p) v += cluster.map_shared_rank(s.zpart, p)[j];
      s.z[j] = v;
    }
    __syncwarp();
    if (gw == 0) {
      for (int j = lane; j < kRank; j += 32) s.gz[j] = s.z[j];
      return;
    }
    const int n1 = gw * kRank, n2 = 2 * n1, n3 = n2 + gw;
    const float *W1 = s.par, *W2 = s.par + n1, *b1 = s.par + n2, *b2 = s.par + n3;
    for (int u = lane; u < gw; u += 32) {
      float v = b1[u];
#pragma unroll
      for (int j = 0; j < kRank; ++j) v = fmaf(W1[u * kRank + j], s.z[j], v);
      s.h[u] = v / (1.f + expf(-v));
    }
    __syncwarp();
    for (int j = lane; j < kRank; j += 32) {
      float v = b2[j];
      for (int u = 0; u < gw; ++u) v = fmaf(W2[j * gw + u], s.h[u], v);
      s.gz[j] = (1.f + tanhf(v)) * s.z[j];
    }
  }

  // y8 := bf16(y8 + B·(g ⊙ z)) for this thread's 8 features.
  __device__ static void add_term(const uint4 (&breg)[8 * R8], const float* gz, uint4& y8) {
    bf162* yh = reinterpret_cast<bf162*>(&y8);
    float dl[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float v = 0.f;
#pragma unroll
      for (int c = 0; c < R8; ++c) v = dot8(breg[e * R8 + c], gz + 8 * c, v);
      dl[e] = v;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(yh[j]);
      yh[j] = __floats2bfloat162_rn(f.x + dl[2 * j], f.y + dl[2 * j + 1]);
    }
  }
};

template <int kRank>
__device__ __forceinline__ EcCta<kRank> ec_cta(const EcTermArgs& ec, int n, int C, int q) {
  const int kc = ec.k / C, cols = n / C;
  return EcCta<kRank>{ec, C, q, kc, q * kc, q * cols, cols};
}

template <int kRank>
__global__ void __launch_bounds__(kThreads, 3) add_rms_norm_ec_kernel(bf16* __restrict__ x, const bf16* __restrict__ y,
                                                                      EcTermArgs ec, const bf16* __restrict__ w,
                                                                      bf16* __restrict__ out, int d, float eps) {
  __shared__ EcShared<kRank> s;
  __shared__ float s_sq;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = int(cluster.num_blocks());
  const EcCta<kRank> e = ec_cta<kRank>(ec, d, C, int(cluster.block_rank()));
  const size_t row = blockIdx.y;
  const int tid = threadIdx.x;
  e.prefetch(s);
  pdl_wait();
  e.z_partial(row, s);
  uint4 breg[8 * EcCta<kRank>::R8];
  const bool has = e.load_b(breg, tid);
  uint4 a{}, b{};
  if (has) {
    a = reinterpret_cast<const uint4*>(x + row * d + e.col0)[tid];
    b = reinterpret_cast<const uint4*>(y + row * d + e.col0)[tid];
  }
  cluster.sync();
  e.gate(cluster, s);
  __syncthreads();
  float ss = 0.f;
  if (has) {
    EcCta<kRank>::add_term(breg, s.gz, b);  // y' = bf16(y + term), then x += y' (one rounding, as add_bf16)
    ss = row_norm::add8_squares(a, b, ss);
    reinterpret_cast<uint4*>(x + row * d + e.col0)[tid] = a;
  }
  const float bs = row_norm::block_sum<kThreads>(ss);
  if (tid == 0) s_sq = bs;
  cluster.sync();
  float total = 0.f;
  for (int p = 0; p < C; ++p) total += *cluster.map_shared_rank(&s_sq, p);
  const float inv = rsqrtf(total / float(d) + eps);
  if (has)
    reinterpret_cast<uint4*>(out + row * d + e.col0)[tid] =
        row_norm::scale8(a, reinterpret_cast<const uint4*>(w + e.col0)[tid], inv);
  cluster.sync();  // a CTA's shared memory stays readable until every peer is done with it
}

struct EcApplyParams {
  EcTermArgs ec[kEcApplyMax];
  __nv_bfloat16* y[kEcApplyMax];
  int n[kEcApplyMax];
};

// blockIdx.z: the compensator; blockIdx.y: the token.
template <int kRank>
__global__ void __launch_bounds__(kThreads, 3) ec_apply_kernel(EcApplyParams p) {
  __shared__ EcShared<kRank> s;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = int(cluster.num_blocks()), i = blockIdx.z, n = p.n[i];
  const EcCta<kRank> e = ec_cta<kRank>(p.ec[i], n, C, int(cluster.block_rank()));
  const size_t row = blockIdx.y;
  const int tid = threadIdx.x;
  e.prefetch(s);
  pdl_wait();
  e.z_partial(row, s);
  uint4 breg[8 * EcCta<kRank>::R8];
  const bool has = e.load_b(breg, tid);  // the first group's rows in flight while z is summed
  uint4* yr = reinterpret_cast<uint4*>(p.y[i] + row * n + e.col0);
  uint4 b{};
  if (has) b = yr[tid];
  cluster.sync();
  e.gate(cluster, s);
  __syncthreads();
  if (has) {
    EcCta<kRank>::add_term(breg, s.gz, b);
    yr[tid] = b;
  }
  for (int g = tid + kThreads; e.load_b(breg, g); g += kThreads) {  // wide outputs: more groups, from L2
    b = yr[g];
    EcCta<kRank>::add_term(breg, s.gz, b);
    yr[g] = b;
  }
  cluster.sync();
}

// A launch of clusters of C CTAs along x, with PDL where it is on.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[2];
  ClusterLaunch(dim3 grid, int C, cudaStream_t stream) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(C);
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (pdl_enabled()) {
      attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[1].val.programmaticStreamSerializationAllowed = 1;
      cfg.numAttrs = 2;
    }
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

}  // namespace

bool ec_term_takes(int n, const EcTermArgs& ec) {
  if (ec.rank != 8 && ec.rank != 16) return false;
  if (ec.gate_width < 0 || ec.gate_width > kMaxGate || n < 8 || ec.k < 8) return false;
  const int C = cluster_of(n, ec.k);
  if (n % (8 * C) != 0 || ec.k % (8 * C) != 0) return false;
  if (!ec.xin || !ec.A || !ec.B || !aligned16(ec.xin) || !aligned16(ec.A) || !aligned16(ec.B)) return false;
  return ec.gate_width == 0 || (ec.W1 && ec.b1 && ec.W2 && ec.b2);
}

bool add_rms_norm_ec_takes(int d, const EcTermArgs& ec, const void* x, const void* y, const void* w,
                           const void* out) {
  return ec_term_takes(d, ec) && d / cluster_of(d, ec.k) <= kSlice && aligned16(x) && aligned16(y) && aligned16(w) &&
         aligned16(out);
}

void add_rms_norm_ec_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, const EcTermArgs& ec, const __nv_bfloat16* w,
                          __nv_bfloat16* out, int rows, int d, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  SPEAR_CHECK(add_rms_norm_ec_takes(d, ec, x, y, w, out),
              "add_rms_norm_ec_bf16: width {} with an EC of rank {} over {} inputs and gate {} (or unaligned "
              "pointers) not taken",
              d, ec.rank, ec.k, ec.gate_width);
  const int C = cluster_of(d, ec.k);
  ClusterLaunch l(dim3(unsigned(C), unsigned(rows), 1), C, stream);
  void (*kernel)(bf16*, const bf16*, EcTermArgs, const bf16*, bf16*, int, float) =
      ec.rank == 8 ? add_rms_norm_ec_kernel<8> : add_rms_norm_ec_kernel<16>;
  SPEAR_CUDA_CHECK(cudaLaunchKernelEx(&l.cfg, kernel, x, y, ec, w, out, d, eps));
}

// One launch for all: every compensator must take the same cluster size (the launch has one).
bool ec_apply_takes(int count, const int* n, const EcTermArgs* ec, __nv_bfloat16* const* y) {
  if (count < 1 || count > kEcApplyMax) return false;
  for (int i = 0; i < count; ++i) {
    if (!ec_term_takes(n[i], ec[i]) || !aligned16(y[i]) || ec[i].rank != ec[0].rank || ec[i].k != ec[0].k ||
        ec[i].xin != ec[0].xin || cluster_of(n[i], ec[i].k) != cluster_of(n[0], ec[0].k))
      return false;
  }
  return true;
}

void ec_apply_bf16(int count, const int* n, const EcTermArgs* ec, __nv_bfloat16* const* y, int rows,
                   cudaStream_t stream) {
  if (rows == 0) return;
  SPEAR_CHECK(ec_apply_takes(count, n, ec, y), "ec_apply_bf16: {} compensators not taken in one launch", count);
  EcApplyParams p{};
  for (int i = 0; i < count; ++i) p.ec[i] = ec[i], p.y[i] = y[i], p.n[i] = n[i];
  const int C = cluster_of(n[0], ec[0].k);
  ClusterLaunch l(dim3(unsigned(C), unsigned(rows), unsigned(count)), C, stream);
  void (*kernel)(EcApplyParams) = ec[0].rank == 8 ? ec_apply_kernel<8> : ec_apply_kernel<16>;
  SPEAR_CUDA_CHECK(cudaLaunchKernelEx(&l.cfg, kernel, p));
}

}  // namespace spear::cuda

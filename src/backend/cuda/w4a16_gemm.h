#pragma once
// W4A16 GEMM on Hopper: y[M, N] = x[M, K] · dequant(W)ᵀ (+ bias), x and y bf16, W 2..4-bit codes in a 4-bit
// container with per-channel or per-group (group % 16 == 0) scales and integer zero points, fp32 accumulation
// on the tensor cores (mma.sync m16n8k16 bf16). Weights are the MMA's A operand (16 output features per
// tile) and tokens its B operand (8 tokens per tile), so decode (M = 1..16) wastes no tensor-core rows on
// padding tokens beyond 8.
//
// The codes are pre-shuffled once at load time (w4_prepare, host) into the mma fragment order: for each
// 16-row tile and each 16-column k-step, lane l of a warp holds in one 32-bit word the 8 codes its A fragment
// needs; four consecutive k-steps sit next to each other so that one 128-bit load per lane brings a whole
// 16 × 64 weight tile. Conversion to bf16 uses the magic-number trick (lop3 of the nibble into the mantissa of
// 128.0, then a subtraction of 128 + zero), which is exact.
//
// Raw pointers and a stream, nothing of the engine (backend/cuda/cuda_backend.* owns memory).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear {
struct PackedQuantWeights;
}

namespace spear::cuda {

// The GPU layout of one quantized matrix, on the host (made once at load time, then uploaded as is).
struct W4Layout {
  int n = 0, k = 0;          // logical [out_features, in_features]
  int n_pad = 0, k_pad = 0;  // n rounded up to 16, k rounded up to 64 (padding codes are zero points: 0 weight)
  int group_size = -1;       // -1: per channel; otherwise a multiple of 16
  int groups = 1;            // ceil(k / group_size), 1 when per channel
  std::vector<uint32_t> q;   // n_pad * k_pad / 8 words, shuffled (see above; w4a16_gemm.cu documents it)
  std::vector<float> scales;      // [groups][n_pad] (column-major in n so a tile reads 16 consecutive values)
  std::vector<uint16_t> zeros;    // [groups][n_pad], the integer zero point as bf16 bits of (128 + zero)
};

// True when the fast kernel takes this matrix: 4-bit container (bits 2..4) and per-channel or group % 16 == 0.
// Others (8-bit container, odd group sizes) are dequantized to bf16 by the backend and go through cuBLAS.
bool w4_supported(const PackedQuantWeights& p);
W4Layout w4_prepare(const PackedQuantWeights& p);  // throws spear::Error when !w4_supported(p)
// The exact inverse of w4_prepare's shuffle (codes, scales, zeros back to the canonical layout): for tests.
PackedQuantWeights w4_unprepare(const W4Layout& l, int bits);

// Device pointers of an uploaded W4Layout (owned by the caller).
struct W4Device {
  int n = 0, k = 0, n_pad = 0, k_pad = 0, group_size = -1, groups = 1;
  const uint32_t* q = nullptr;
  const float* scales = nullptr;
  const uint16_t* zeros = nullptr;
};

// Split-K scratch of the general kernel (m > 32): arrival counters at fixed offsets, then fp32 partial sums.
// The caller allocates it once (zeroed with cudaMemset), sized for the largest M, N, K it will run; the kernel
// leaves the counters at zero again, so the buffer can be reused by every GEMM on the same stream (whatever
// their shapes) and inside CUDA graphs. The decode kernel (m <= 32) needs none. For w4a16_gemm_grouped, size
// it with the largest n of the matrices (w4a16_workspace_bytes(max_m, max over i of w[i].n, k, sm_count); the
// sum of the n also works, it is larger): grouped launches of m > 32 run the matrices one after the other.
size_t w4a16_workspace_bytes(int max_m, int max_n, int max_k, int sm_count);

// y[m, n] = x[m, k] · dequant(W)ᵀ + bias (bias may be null; bf16 [n]). Any m >= 0 (m > 128 runs in chunks of
// 128 tokens). x rows are k elements apart, y rows n elements apart.
//
// m <= 32 runs the decode kernel (one launch, no workspace, split-K through a thread-block cluster's shared
// memory); larger m the general kernel (split-K through the workspace). On sm_90+ every launch asks for
// programmatic dependent launch (PDL, see W4GemmOptions): the kernel starts streaming its weights while the
// previous kernel of the stream still runs, and reads x / bias, writes y and touches the workspace only after
// griddepcontrol.wait. So the weights (q, scales, zeros) must not be written by the kernel just before the
// GEMM on the same stream (they are load-time constants); everything else follows normal stream order.
// Works inside CUDA graph capture (PDL becomes a programmatic graph edge).
void w4a16_gemm(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias, __nv_bfloat16* y,
                void* workspace, size_t workspace_bytes, int sm_count, cudaStream_t stream);

// Several matrices that share the same input x in one launch (q/k/v: 3, gate/up: 2): y[i][m, w[i].n] =
// x[m, k] · dequant(W_i)ᵀ + bias[i]. 1 <= count <= kW4MaxGrouped, every w[i].k equal; bias may be null (no
// biases) or hold nulls; y[i] rows are w[i].n elements apart. m <= 32 with matrices of one kind (all per channel
// or all grouped) is a single decode launch; otherwise it is count w4a16_gemm calls in order. Results equal
// separate w4a16_gemm calls up to fp32 summation order (the split of k may differ).
constexpr int kW4MaxGrouped = 4;
void w4a16_gemm_grouped(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                        const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, void* workspace,
                        size_t workspace_bytes, int sm_count, cudaStream_t stream);

// ---- P2P dual-write (tensor parallelism, DESIGN.md §5): a row-parallel GEMM also stores its partial output into
// every peer's staging of the fused tail (tp_tail.h), from the decode kernel's epilogue, so the tail kernel finds
// this rank's rows there without pushing them itself. Each pair of output columns (n, n + 1) of token t becomes
// one 8-byte store {bf16 y[t][n], bf16 y[t][n + 1], epoch} at byte 4n of the peer's slot (parity, rank, t): half
// of one of the tail's LL lines, whose epoch the tail checks per half. The epoch is epoch[t] + 1, read from this
// rank's tail epochs (the tail that follows the GEMM stores it).
constexpr int kW4MirrorMaxRanks = 8;
struct W4PeerMirror {
  unsigned char* staging[kW4MirrorMaxRanks] = {};  // every rank's tail staging as seen from this device
  const uint32_t* epoch = nullptr;                 // this rank's tail epochs [max_rows]
  int ranks = 0, rank = 0, max_rows = 0;           // ranks <= 1: no mirror
  int64_t slot_bytes = 0;                          // bytes of one [parity][source][row] slot
};
// w4a16_gemm (count 1), with the output also stored as above. Runs only when the decode kernel takes the launch
// (m <= 32 and a plan fits), n is a multiple of 8 and m <= mirror.max_rows: returns true. Otherwise launches
// nothing and returns false (the caller runs w4a16_gemm and the tail pushes the rows).
bool w4a16_gemm_mirrored(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias,
                         __nv_bfloat16* y, const W4PeerMirror& mirror, int sm_count, cudaStream_t stream);

// ---- Error compensators fused into the decode kernel (m <= 32; DESIGN.md §5, spear/compensator.h):
//   y += B·(g ⊙ z),  z = A·x,  g = 1 + tanh(W2·silu(W1·z + b1) + b2)
// in the same launch as y = x·Wᵀ. Extra CTAs of the launch each compute one k-slice of A·x and store it into
// the compensator's scratch; every CTA of that matrix prefetches its rows of B into shared memory together with its
// weights. The slices are summed in order and the gate applied either by every W4 CTA after its own reduction or
// once by the last EC CTA (the decode plan says which; every entry is its own ready flag); the W4 CTAs add B·(g ⊙ z)
// before the single rounding to bf16. Both places give the same bits.
// Deterministic; the kernel leaves its scratch as w4a16_ec_scratch_init made it (graph replays).
constexpr int kW4EcMaxRank = 64;  // rank % 8 == 0 and <= 64 (B rows are 16-byte chunks in shared memory)
constexpr int kW4EcMaxGate = 64;  // gate width <= 64 (0: static compensator, g == 1)
struct W4EcDevice {
  int rank = 0, gate_width = 0;
  const __nv_bfloat16* A = nullptr;  // [rank][k]
  const __nv_bfloat16* B = nullptr;  // [n][rank]
  const float* W1 = nullptr;         // [gate_width][rank] fp32 (null when static)
  const float* b1 = nullptr;         // [gate_width]
  const float* W2 = nullptr;         // [rank][gate_width]
  const float* b2 = nullptr;         // [rank]
  void* scratch = nullptr;           // w4a16_ec_scratch_bytes(rank) bytes, w4a16_ec_scratch_init once by the owner
};
size_t w4a16_ec_scratch_bytes(int rank);
// Prepares a compensator's scratch for the fused kernel (synchronous; once, after allocating it).
void w4a16_ec_scratch_init(void* scratch, int rank);
// Fused-EC launches that ran on the bulk-copy decode kernel so far, process-wide (tests).
uint64_t w4a16_bulk_ec_launches();
// True when w4a16_gemm_ec runs these compensators fused (ec[i] null: matrix i has none): m <= 32, one kind of
// matrix (as the grouped decode launch), k % 8 == 0, every rank % 8 == 0 and <= kW4EcMaxRank, gate width <=
// kW4EcMaxGate. x must also be 16-byte aligned (checked by w4a16_gemm_ec).
bool w4a16_ec_fusable(int m, const W4Device* w, int count, const W4EcDevice* const* ec);
// y[i] = x · dequant(W_i)ᵀ + bias[i] (+ B·(g ⊙ A·x) where ec[i] is set), one decode launch. Returns false (and
// enqueues nothing) when it cannot run this launch fused; the caller then takes another path. The scratch of
// an EC must not be used by two launches in flight at once (one stream; one launch per linear at a time).
bool w4a16_gemm_ec(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4EcDevice* const* ec,
                   const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count, cudaStream_t stream);

// The projection alone, for a row-parallel module under tensor parallelism (whose gate needs every rank's A·x):
// y = x · dequant(W)ᵀ + bias (bit-identical to w4a16_gemm under the same plan: the W4 CTAs run the plain launch's
// plan, in any number of waves) and z [m][rank] fp32 = A·x from the same launch's EC CTAs (the slices summed in
// order by the last of them). Returns false (nothing enqueued) where w4a16_ec_fusable is false or x is not 16-byte
// aligned. The scratch rules of w4a16_gemm_ec apply.
bool w4a16_gemm_ec_project(const __nv_bfloat16* x, int m, const W4Device& w, const W4EcDevice& ec,
                           const __nv_bfloat16* bias, __nv_bfloat16* y, float* z, int sm_count, cudaStream_t stream);
// The same for matrices that share x (the grouped launch, e.g. gate / up), with the gate: y[i] = x · dequant(W_i)ᵀ +
// bias[i] (the plain grouped launch's plan and sums) and, for every ec[i] set, gz[i] [m][rank] fp32 = g ⊙ z, the
// gated projection that B multiplies (swiglu_ec_bf16 adds that term after the launch). Nothing waits on the EC
// CTAs inside the launch, so their chain runs beside the weight stream. Returns false (nothing enqueued) where
// w4a16_ec_fusable is false or x is not 16-byte aligned.
bool w4a16_gemm_ec_project_group(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                                 const W4EcDevice* const* ec, const __nv_bfloat16* const* bias,
                                 __nv_bfloat16* const* y, float* const* gz, int sm_count, cudaStream_t stream);

// ---- Decode-step fusions (m <= 8): the residual add after a linear in the decode kernel's epilogue, and the
// element-wise step that follows the GEMM done inside its launch (the RMSNorm of the next linear's input by the CTA
// that finishes last; SwiGLU of a gate / up tile pair by the second of its two CTAs), so a decode layer needs no
// separate RMSNorm, SwiGLU or add launches and most W4 launches follow another W4 launch (whose early PDL trigger
// lets their weights stream meanwhile). Every piece repeats the arithmetic of the kernel it replaces
// (w4a16_fusion.cuh): results are bit-identical to the GEMM, add_bf16, rms_norm_bf16 / swiglu_bf16, under the same
// decode plan.
//   residual:   y[i] := y[i] + the product (y[i] holds the residual stream and is updated in place)
//   norm_out:   then norm_out = rms_norm(y[0]) · norm_w (count 1; n % 8 == 0; norm_out must not alias y[0])
//   swiglu_out: count 2 (gate, up of equal n, no residual): swiglu_out = silu(y[0]) ⊙ y[1]; may alias y[0]
// counters: w4a16_fusion_counter_bytes() of device memory, zeroed once by the owner; every fused launch leaves it
// at zero, so launches on one stream (and graph replays) share it; two launches must not run concurrently on it.
struct W4Fusion {
  bool residual = false;
  const __nv_bfloat16* norm_w = nullptr;  // [n]
  float eps = 0.f;
  __nv_bfloat16* norm_out = nullptr;    // [m][n]
  __nv_bfloat16* swiglu_out = nullptr;  // [m][n]
  unsigned* counters = nullptr;
};
size_t w4a16_fusion_counter_bytes();
// True when w4a16_gemm_fused takes this launch: the decode kernel takes it (one kind of matrix, one k), 1 <= m <= 8,
// the conditions above, the pointers of the norm 16-byte aligned, and counters set where a tail needs them; with ec,
// also w4a16_ec_fusable.
bool w4a16_fusable(int m, const W4Device* w, int count, const W4Fusion& f, __nv_bfloat16* const* y,
                   const W4EcDevice* const* ec = nullptr);
// y[i] = x · dequant(W_i)ᵀ + bias[i] (+ B·(g ⊙ A·x) where ec[i] is set, as w4a16_gemm_ec) (+ y[i] with residual),
// then the tails, one decode launch under the launch shape's tuned plan (w4a16_tune_decode on the plain launch, or on
// the compensated one with the same ec, tunes it): bit-identical to w4a16_gemm_ec followed by the element-wise ops.
// Returns false, having enqueued nothing, where w4a16_fusable is false, x is not 16-byte aligned with ec, or forced
// options send the launch elsewhere (SPEAR_W4_PATH=2).
bool w4a16_gemm_fused(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4Fusion& f,
                      const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count, cudaStream_t stream,
                      const W4EcDevice* const* ec = nullptr);

// Decode-kernel plan tuning (m <= 32). The kernel's plan (16-row tiles per CTA × CTAs per cluster along k) comes
// from a time model that can be 1.5-2x off the best plan on some shapes; tuning times every plan the kernel can
// run for this launch and keeps the fastest for every later launch with the same token tiles (m rounded up to
// 8, 16 or 32) and matrices (count, each n, k, grouping), process-wide. Each timed call follows a write of
// flush_bytes at flush (>= 2 × L2: every call reads its weights from DRAM, as in a decode step of a model that
// does not fit in L2; null: no flush). Synchronizes the stream: never during graph capture. y receives
// scratch results. Returns false when the decode kernel does not take this launch (m > 32, mixed per-channel
// and grouped matrices); forced plans (W4GemmOptions) still win over tuned ones. With ec (fused compensators,
// as for w4a16_gemm_ec) the plans of that fused launch are tuned, separately from the launch without them. With
// fusion (a w4a16_gemm_fused launch without a residual add, which repeated calls would apply again) every plan is
// timed with those tails, as it will run: a tail's cost depends on the plan (the SwiGLU pair tail waits for the
// partner tile's CTA), so the plain launch's fastest plan is not always the fused launch's. The plan is kept under
// the same key either way, so a fused launch and the plain one always sum in the same order. With before (it
// enqueues the W4 launch that precedes this one in the decode step, with nothing in between) every plan is also
// timed behind a replay of it (the pair is timed), and the fastest that way runs at this m: programmatic dependent
// launch starts this launch's CTAs during the predecessor's tail, so a plan's cost there depends on how its CTAs fit
// beside the predecessor's (a cluster of 7 CTAs waits longer for room than single CTAs), which a launch timed alone
// does not show. Other m of the same token tiles run the fastest register-ring plan timed alone. With a workspace (as
// w4a16_gemm_grouped takes), a plain launch of more than 16 tokens also times the general kernel, which then runs at
// this m where it wins (8B down_proj at 32 tokens).
bool w4a16_tune_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, __nv_bfloat16* const* y,
                       void* flush, size_t flush_bytes, int sm_count, cudaStream_t stream, int reps = 5,
                       const W4EcDevice* const* ec = nullptr, const W4Fusion* fusion = nullptr,
                       const std::function<void()>* before = nullptr, void* workspace = nullptr,
                       size_t workspace_bytes = 0);
// True when this launch has a tuned plan or the decode kernel does not take it (nothing to tune).
bool w4a16_decode_tuned(int m, const W4Device* w, int count, const W4EcDevice* const* ec = nullptr);
void w4a16_clear_tuning();  // forget every tuned plan (tests, benchmarks)
// The decode plan a launch of this shape runs now: {16-row tiles per CTA, CTAs per cluster}, {-1, 1} for the
// bulk-copy kernel; {0, 0} when the decode kernel does not take it (benchmark reports).
std::pair<int, int> w4a16_decode_plan(int m, const W4Device* w, int count, int sm_count);

// Process-wide knobs, for tests, benchmarks and tuning (defaults from the environment when set, read at first
// use: SPEAR_W4_PDL=0|1, SPEAR_W4_PATH=0|1|2, SPEAR_W4_DECODE_ROWS, SPEAR_W4_DECODE_SPLITS, SPEAR_W4_BULK=0|1,
// SPEAR_W4_EC_GATE=0..5). Not thread-safe
// against GEMMs being enqueued concurrently with a change; results never depend on pdl.
struct W4GemmOptions {
  bool pdl = true;        // programmatic dependent launch on sm_90+ (off: plain stream order)
  int path = 0;           // 0: auto (decode kernel for m <= 32), 1: same as auto, 2: always the general kernel
  int decode_rows = 0;    // force the decode kernel's 16-row tiles per CTA (1, 2, 4 or 8), or -1: the bulk-copy
                          // kernel where it takes the launch (m <= 8, sm_90+; fused ECs: one wave with EC CTAs, any
                          // number in clusters); 0: planner
  int decode_splits = 0;  // force the decode kernel's CTAs per cluster along k (1..8); 0: planner
  bool bulk = true;       // tuning may pick the bulk-copy kernel (off: A/B runs, SPEAR_W4_BULK=0)
  int ec_gate = 0;        // fused ECs' slice sum and gate: 0 tuned (untuned: by the launch's weight bytes), 1 in every
                          // W4 CTA after its reduction, 2 once in the last EC CTA, 3 / 4 / 5 (bulk kernel; others as
                          // 1) no EC CTAs: A·x summed in clusters of 8 / 16 / 4 W4 CTAs (SPEAR_W4_EC_GATE)
  int bulk_min_blocks = 0;  // the bulk kernel's instance for launches without compensators: 0 the one with the most
                            // CTAs per SM, 2-4 the one built for that many, 1 the compensator instance
                            // (SPEAR_W4_BULK_OCC; A/B runs)
};
void w4a16_set_options(const W4GemmOptions& options);
W4GemmOptions w4a16_get_options();

// out[n][k] (row-major, k elements apart) = bf16(scale · (code − zero)) of every weight: the weights for a cuBLAS
// BF16 GEMM when m is large (prefill; the backend picks the path by m, SPEAR_W4_DEQUANT_MIN_M). Launched with
// PDL like the other kernels; reads only load-time constants before its wait.
void w4a16_dequantize(const W4Device& w, __nv_bfloat16* out, cudaStream_t stream);

// The naive reference (one thread per output element: dequantize on the fly, fp32 sums), for tests and the
// benchmark's correctness check. Reads the same device layout.
void w4a16_gemm_reference(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias, float* y,
                          cudaStream_t stream);

}  // namespace spear::cuda

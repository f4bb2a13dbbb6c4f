// Tensor parallelism on the CUDA backend (backend.h, DESIGN.md §5): the NCCL communicator, the P2P dual-write
// reduction's buffers shared with the other ranks (CUDA IPC across processes, plain pointers between threads),
// all_reduce_sum, which picks between the two per tensor, and the fused row-parallel tail (TpReduce::Fused).
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <type_traits>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/nccl_loader.h"
#include "core/error.h"

namespace spear::cuda {

namespace {
__nv_bfloat16* bf(const Tensor& t) { return static_cast<__nv_bfloat16*>(t.data); }
}  // namespace

namespace {

// Identifies this process among the ranks (a pid alone may repeat across hosts): ranks with the same value share
// one address space and reach each other's buffers by plain pointers.
uint64_t process_nonce() {
  static const uint64_t nonce = [] {
    std::random_device rd;
    const uint64_t t = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
    return ((uint64_t(rd()) << 32) | rd()) ^ (t * 0x9e3779b97f4a7c15ull) ^ uint64_t(::getpid());
  }();
  return nonce;
}

// What each rank tells the others about its P2P buffers (ProcessGroup::all_gather moves it as bytes: the ranks
// run the same build).
struct P2pRecord {
  uint64_t process = 0;
  int32_t pid = 0;
  int32_t device = 0;  // ordinal in its own process (meaningful to ranks of the same process)
  int32_t ok = 0;      // buffers allocated (else `why` says what failed)
  int32_t ipc_ok = 0;  // `handle` is valid (only needed by ranks of other processes)
  int64_t capacity = 0;
  uint64_t bytes = 0;
  uint64_t base = 0;  // the allocation's address in its own process
  uint64_t staging_off = 0, flags_off = 0, epoch_off = 0, ll_staging_off = 0;
  char host[64] = {};
  char bus_id[32] = {};  // PCI bus id of the GPU: the same physical GPU whatever the ordinals
  cudaIpcMemHandle_t handle = {};
  char why[192] = {};  // why ok (then prefixed with the rank) or ipc_ok is 0
  // The fused tail's buffers (TpReduce::Fused; tail_bytes == 0 otherwise): one more allocation, covered by ok and
  // ipc_ok like the one above, with the geometry TpTailPeers needs.
  uint64_t tail_bytes = 0;
  uint64_t tail_base = 0;
  uint64_t tail_staging_off = 0;
  int64_t tail_slot_bytes = 0, tail_z_offset = 0;
  int32_t tail_max_rows = 0, tail_max_h = 0, tail_max_rank = 0;
  cudaIpcMemHandle_t tail_handle = {};
};
static_assert(std::is_trivially_copyable_v<P2pRecord>);

// A failure reason as a fixed-size field of a record.
template <size_t N>
void copy_reason(char (&dst)[N], const std::string& why) {
  std::memset(dst, 0, N);
  std::memcpy(dst, why.data(), std::min(why.size(), N - 1));
}

std::string cuda_reason(const char* what, cudaError_t err) {
  (void)cudaGetLastError();  // the failed call's error is the thread's last error too: clear it
  return fmt::format("{}: {}", what, cudaGetErrorString(err));
}

}  // namespace

void CudaBackend::set_tp_reduce(TpReduce r) {
  SPEAR_CHECK(tp_size() <= 1, "cuda backend: set_tp_reduce must come before set_process_group");
  tp_reduce_ = r;
}

std::string CudaBackend::tp_reduce_description() const {
  if (tp_size() <= 1) return "none";
  if (p2p_ && tail_)
    return fmt::format("p2p (≤ {} elements) + fused tail (≤ {} rows) + nccl", p2p_peers_.capacity,
                       tail_peers_.max_rows);
  if (p2p_) return fmt::format("p2p (≤ {} elements) + nccl", p2p_peers_.capacity);
  return "nccl";
}

void CudaBackend::set_process_group(std::shared_ptr<ProcessGroup> pg) {
  SPEAR_CHECK(!capturing_, "cuda backend: set_process_group inside a graph capture");
  SPEAR_CUDA_CHECK(cudaSetDevice(device_));  // the communicator and the IPC mappings bind to the current device
  teardown_tp();                             // the previous group's collectives, graphs recorded with them
  pg_ = std::move(pg);
  if (!pg_ || pg_->size() <= 1) return;
  // Agree first that every rank has NCCL: a rank that failed alone would leave the others waiting in
  // ncclCommInitRank for a peer that never comes.
  std::string why;
  float missing = nccl_available(&why) ? 0.f : 1.f;
  pg_->all_reduce_sum(&missing, 1);
  if (!why.empty()) fail("{}", why);
  if (missing > 0)
    fail("tensor parallelism on CUDA needs NCCL on every rank: {} of {} ranks could not load it (see their errors)",
         int(missing), pg_->size());
  const NcclApi& api = nccl();
  ncclUniqueId id{};
  if (pg_->rank() == 0) SPEAR_NCCL_CHECK(api.get_unique_id(&id));
  pg_->broadcast(&id, sizeof id);
  ncclComm_t comm = nullptr;
  SPEAR_NCCL_CHECK(api.comm_init_rank(&comm, pg_->size(), id, pg_->rank()));
  comm_ = comm;
  // NCCL stays for tensors larger than the P2P staging (prefills of many tokens).
  if (tp_reduce_ != TpReduce::Nccl) setup_p2p();
}

void CudaBackend::setup_p2p() {
  ProcessGroup& pg = *pg_;
  const int ranks = pg.size(), rank = pg.rank();
  P2pRecord mine;
  mine.process = process_nonce();
  mine.pid = int32_t(::getpid());
  mine.device = device_;
  ::gethostname(mine.host, sizeof mine.host - 1);
  // Local steps report failures as a reason instead of throwing: every rank must reach the collectives below, or
  // the others would wait for it forever.
  std::string why;
  if (ranks > kP2pMaxRanks) why = fmt::format("{} ranks; the P2P kernel takes at most {}", ranks, kP2pMaxRanks);
  const bool tail = tp_reduce_ == TpReduce::Fused;
  if (tail && ranks > kTpTailMaxRanks && why.empty())
    why = fmt::format("{} ranks; the fused tail kernel takes at most {}", ranks, kTpTailMaxRanks);
  // Every CTA of a call must be resident at once (a CTA spins until the same CTA of each peer has pushed its
  // slice): 4 CTAs of 256 threads per SM always fit the kernel's 40 registers a thread.
  const int64_t resident_cap = int64_t(sm_count_) * 4 * kP2pBlockElems;
  const int64_t capacity = std::min(p2p_capacity_, resident_cap);
  if (why.empty()) {
    try {
      cudaError_t err = cudaDeviceGetPCIBusId(mine.bus_id, int(sizeof mine.bus_id), device_);
      if (err != cudaSuccess) fail("{}", cuda_reason("cudaDeviceGetPCIBusId", err));
      p2p_bufs_ = p2p_alloc_rank_buffers(device_, ranks, capacity);
      char* base = static_cast<char*>(p2p_bufs_.base);
      mine.capacity = p2p_bufs_.capacity;
      mine.bytes = p2p_bufs_.bytes;
      mine.base = reinterpret_cast<uintptr_t>(base);
      mine.staging_off = uint64_t(reinterpret_cast<char*>(p2p_bufs_.staging) - base);
      mine.flags_off = uint64_t(reinterpret_cast<char*>(p2p_bufs_.flags) - base);
      mine.epoch_off = uint64_t(reinterpret_cast<char*>(p2p_bufs_.epoch) - base);
      mine.ll_staging_off = uint64_t(reinterpret_cast<char*>(p2p_bufs_.ll_staging) - base);
      if (tail) {
        tail_bufs_ = tp_tail_alloc_rank_buffers(device_, ranks, tail_max_h_, kTpTailMaxRank, kTpTailMaxRows);
        auto* tb = static_cast<unsigned char*>(tail_bufs_.base);
        mine.tail_bytes = tail_bufs_.bytes;
        mine.tail_base = reinterpret_cast<uintptr_t>(tb);
        mine.tail_staging_off = uint64_t(tail_bufs_.staging - tb);
        mine.tail_slot_bytes = tail_bufs_.slot_bytes;
        mine.tail_z_offset = tail_bufs_.z_offset;
        mine.tail_max_rows = tail_bufs_.max_rows;
        mine.tail_max_h = tail_bufs_.max_h;
        mine.tail_max_rank = tail_bufs_.max_rank;
      }
      mine.ok = 1;
      err = cudaIpcGetMemHandle(&mine.handle, p2p_bufs_.base);
      if (err == cudaSuccess && tail) {
        err = cudaIpcGetMemHandle(&mine.tail_handle, tail_bufs_.base);
        if (err != cudaSuccess) copy_reason(mine.why, cuda_reason("cudaIpcGetMemHandle (fused tail)", err));
      } else if (err != cudaSuccess) {
        copy_reason(mine.why, cuda_reason("cudaIpcGetMemHandle", err));
      }
      mine.ipc_ok = err == cudaSuccess ? 1 : 0;
    } catch (const std::exception& e) {
      why = e.what();
    }
  }
  if (!why.empty()) copy_reason(mine.why, fmt::format("rank {}: {}", rank, why));
  std::vector<P2pRecord> records(static_cast<size_t>(ranks));
  pg.all_gather(&mine, sizeof mine, records.data());

  // Map every peer's buffers into this device's address space.
  why.clear();
  for (int q = 0; q < ranks && why.empty(); ++q)
    if (!records[size_t(q)].ok) why = records[size_t(q)].why;
  P2pPeers peers;
  TpTailPeers tail_peers;
  for (int q = 0; q < ranks && why.empty(); ++q) {
    const P2pRecord& r = records[size_t(q)];
    try {
      if (q == rank) {
        peers.staging[q] = p2p_bufs_.staging;
        peers.flags[q] = p2p_bufs_.flags;
        peers.ll_staging[q] = p2p_bufs_.ll_staging;
        tail_peers.staging[q] = tail_bufs_.staging;
        continue;
      }
      if (r.capacity != mine.capacity || r.bytes != mine.bytes || r.staging_off != mine.staging_off ||
          r.flags_off != mine.flags_off || r.epoch_off != mine.epoch_off || r.ll_staging_off != mine.ll_staging_off)
        fail("rank {}'s buffers (capacity {}, {} bytes) differ from rank {}'s (capacity {}, {} bytes)", q, r.capacity,
             r.bytes, rank, mine.capacity, mine.bytes);
      // The fused tail's stores land at the offsets this rank computes: the geometry must agree (SPEAR_TP_TAIL_MAX_H
      // alike on every rank, and the tail set up on all or none).
      if (r.tail_bytes != mine.tail_bytes || r.tail_staging_off != mine.tail_staging_off ||
          r.tail_slot_bytes != mine.tail_slot_bytes || r.tail_z_offset != mine.tail_z_offset ||
          r.tail_max_rows != mine.tail_max_rows || r.tail_max_h != mine.tail_max_h ||
          r.tail_max_rank != mine.tail_max_rank)
        fail("rank {}'s fused tail buffers ({} bytes, H {}) differ from rank {}'s ({} bytes, H {})", q, r.tail_bytes,
             r.tail_max_h, rank, mine.tail_bytes, mine.tail_max_h);
      if (std::strcmp(r.bus_id, mine.bus_id) == 0) fail("ranks {} and {} share the GPU {}", q, rank, mine.bus_id);
      char* base = nullptr;
      unsigned char* tail_base = nullptr;
      int can = 0;
      if (r.process == mine.process) {
        // A rank of this process (a thread): its pointer is valid here once peer access is enabled.
        SPEAR_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device_, r.device));
        if (!can) fail("GPU {} (rank {}) cannot access GPU {} (rank {})", device_, rank, r.device, q);
        p2p_enable_peer_access_from(device_, r.device);
        base = reinterpret_cast<char*>(uintptr_t(r.base));
        tail_base = reinterpret_cast<unsigned char*>(uintptr_t(r.tail_base));
      } else {
        if (std::strncmp(r.host, mine.host, sizeof mine.host) != 0)
          fail("rank {} runs on another host ({}, this is {})", q, r.host, mine.host);
        int dev = -1;
        cudaError_t err = cudaDeviceGetByPCIBusId(&dev, r.bus_id);
        if (err != cudaSuccess)
          fail("rank {}'s GPU {} is not visible to rank {} ({})", q, r.bus_id, rank,
               cuda_reason("cudaDeviceGetByPCIBusId", err));
        SPEAR_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device_, dev));
        if (!can) fail("GPU {} (rank {}) cannot access GPU {} (rank {})", mine.bus_id, rank, r.bus_id, q);
        if (!r.ipc_ok) fail("rank {}'s buffers cannot be shared with other processes ({})", q, r.why);
        void* p = nullptr;
        err = cudaIpcOpenMemHandle(&p, r.handle, cudaIpcMemLazyEnablePeerAccess);
        if (err != cudaSuccess)
          fail("{}", cuda_reason(fmt::format("cudaIpcOpenMemHandle of rank {}'s buffers", q).c_str(), err));
        p2p_ipc_.push_back(p);
        base = static_cast<char*>(p);
        if (r.tail_bytes) {
          p = nullptr;
          err = cudaIpcOpenMemHandle(&p, r.tail_handle, cudaIpcMemLazyEnablePeerAccess);
          if (err != cudaSuccess)
            fail("{}",
                 cuda_reason(fmt::format("cudaIpcOpenMemHandle of rank {}'s fused tail buffers", q).c_str(), err));
          p2p_ipc_.push_back(p);  // closed with the P2P mappings
          tail_base = static_cast<unsigned char*>(p);
        }
      }
      peers.staging[q] = reinterpret_cast<__nv_bfloat16*>(base + r.staging_off);
      peers.flags[q] = reinterpret_cast<uint32_t*>(base + r.flags_off);
      peers.ll_staging[q] = reinterpret_cast<unsigned char*>(base + r.ll_staging_off);
      if (r.tail_bytes) {
        tail_peers.staging[q] = tail_base + r.tail_staging_off;
      }
    } catch (const std::exception& e) {
      why = fmt::format("rank {}: {}", rank, e.what());
    }
  }

  // Every rank learns every rank's outcome, so all take the same path.
  char reason[192];
  copy_reason(reason, why);
  std::vector<char> reasons(size_t(ranks) * sizeof reason);
  pg.all_gather(reason, sizeof reason, reasons.data());
  why.clear();
  for (int q = 0; q < ranks && why.empty(); ++q) why = std::string(reasons.data() + size_t(q) * sizeof reason);
  if (!why.empty()) {
    // Unmapped everywhere before any rank frees what the others mapped (release_p2p skips its own barrier: p2p_ is
    // not set).
    for (void* p : p2p_ipc_) cudaIpcCloseMemHandle(p);
    p2p_ipc_.clear();
    pg.barrier();
    release_p2p();
    if (tp_reduce_ == TpReduce::P2p || tp_reduce_ == TpReduce::Fused)
      fail("tensor parallel: P2P reduction was required ({}) but is unavailable: {}", tp_reduce_name(tp_reduce_), why);
    if (rank == 0) fmt::print(stderr, "tensor parallel: P2P reduction unavailable ({}), using NCCL\n", why);
    return;
  }
  peers.epoch = p2p_bufs_.epoch;
  peers.ranks = ranks;
  peers.capacity = p2p_bufs_.capacity;
  peers.max_blocks = p2p_bufs_.max_blocks;
  peers.ll_epoch = p2p_bufs_.ll_epoch;
  // SPEAR_P2P_LL=0 (alike on every rank) sends every call through the flag protocol, for A/B runs.
  const char* ll_env = std::getenv("SPEAR_P2P_LL");
  peers.ll_max_blocks = ll_env && ll_env[0] == '0' ? 0 : kP2pLlMaxBlocks;
  peers.timeout_ns = p2p_timeout_ns_;
  p2p_peers_ = peers;
  p2p_ = true;
  if (tail) {
    tail_peers_ = tp_tail_peers_of(tail_bufs_);
    for (int q = 0; q < ranks; ++q) tail_peers_.staging[q] = tail_peers.staging[q];
    tail_peers_.timeout_ns = p2p_timeout_ns_;
    tail_ = true;
  }
  // No rank launches the kernel before every rank's buffers are zeroed (p2p_alloc_rank_buffers) and mapped.
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  pg.barrier();
}

void CudaBackend::release_p2p() {
  if (!p2p_bufs_.base && !tail_bufs_.base && p2p_ipc_.empty()) return;
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  cudaSetDevice(device_);  // IPC mappings belong to this device's context
  // This rank's kernels have completed (the stream has drained): nothing of ours reads or writes the peers'
  // buffers any more, so their mappings go first.
  for (void* p : p2p_ipc_) cudaIpcCloseMemHandle(p);
  p2p_ipc_.clear();
  // The peers' pushes into our staging of the calls we made have landed too, but a peer that is behind (an error
  // on some rank broke the lockstep) could still write here, and a peer may still have our buffers mapped: wait
  // until every rank has come this far, unless an exception is unwinding (the group is in an unknown state then).
  if (p2p_ && pg_ && std::uncaught_exceptions() == 0) {
    try {
      pg_->barrier();
    } catch (const std::exception&) {  // a peer already gone: nobody left to use our buffers
    }
  }
  if (p2p_bufs_.base) cudaFree(p2p_bufs_.base);
  if (tail_bufs_.base) cudaFree(tail_bufs_.base);  // not tp_tail_free_rank_buffers: it throws on errors
  (void)cudaGetLastError();
  p2p_bufs_ = P2pRankBuffers{};
  p2p_peers_ = P2pPeers{};
  p2p_ = false;
  tail_bufs_ = TpTailRankBuffers{};
  tail_peers_ = TpTailPeers{};
  tail_ = false;
  if (prev >= 0) cudaSetDevice(prev);
}

void CudaBackend::teardown_tp() {
  drop_graphs();  // captured graphs hold P2P and NCCL kernels
  // Results ignored: this also runs from the destructor, where there is nobody left to report them to.
  if (stream_) cudaStreamSynchronize(stream_);
  if (ec_stream_) cudaStreamSynchronize(ec_stream_);
  release_p2p();
  destroy_comm();
}

void CudaBackend::destroy_comm() {
  if (!comm_) return;
  nccl().comm_destroy(comm_);
  comm_ = nullptr;
}

bool CudaBackend::all_reduce_uses_p2p(const Tensor& t) const {
  if (!p2p_ || t.device != Device::CUDA) return false;
  if (t.dtype == DType::BF16) return t.numel() <= p2p_max_elems(p2p_peers_, 2);
  if (t.dtype == DType::F32) return t.numel() <= p2p_max_elems(p2p_peers_, 4);
  return false;
}

void CudaBackend::all_reduce_sum(std::span<Tensor* const> ts) {
  if (tp_size() <= 1) return;
  SPEAR_CHECK(comm_, "all_reduce_sum: the process group has {} ranks but no NCCL communicator", tp_size());
  for (const Tensor* t : ts)
    SPEAR_CHECK(t->device == Device::CUDA && (t->dtype == DType::BF16 || t->dtype == DType::F32),
                "all_reduce_sum: a bf16 or fp32 GPU tensor expected, got {} [{}, {}]", dtype_name(t->dtype), t->rows,
                t->cols);
  // Shapes match across ranks, so every rank takes the same path for each tensor and makes the same sequence of
  // P2P calls (what keeps the kernel's per-CTA epochs in step).
  bool any_nccl = false;
  for (Tensor* t : ts) {
    if (t->numel() == 0) continue;
    if (!all_reduce_uses_p2p(*t)) {
      any_nccl = true;
      continue;
    }
    auto prof = prof_->scope("all_reduce.p2p");
    if (t->dtype == DType::BF16)
      p2p_allreduce_bf16(bf(*t), bf(*t), t->numel(), p2p_peers_, tp_rank(), stream_);
    else
      p2p_allreduce_f32(t->ptr<float>(), t->ptr<float>(), t->numel(), p2p_peers_, tp_rank(), stream_);
  }
  if (!any_nccl) return;
  auto prof = prof_->scope("all_reduce.nccl");
  const NcclApi& api = nccl();
  // One group: NCCL launches the reductions together, and a graph capture records them as one node.
  SPEAR_NCCL_CHECK(api.group_start());
  for (Tensor* t : ts) {
    if (t->numel() == 0 || all_reduce_uses_p2p(*t)) continue;
    const ncclDataType_t type = t->dtype == DType::BF16 ? ncclBfloat16 : ncclFloat32;
    const ncclResult_t r = api.all_reduce(t->data, t->data, size_t(t->numel()), type, ncclSum, comm_, stream_);
    if (r != ncclSuccess) {
      api.group_end();  // close the group before reporting
      SPEAR_NCCL_CHECK(r);
    }
  }
  SPEAR_NCCL_CHECK(api.group_end());
}

bool CudaBackend::row_parallel_tail(const Tensor& in, const Linear& lin, Tensor& x, const Tensor& norm_w, float eps,
                                    Tensor& h) {
  const auto& l = static_cast<const CudaLinear&>(lin);
  auto bf16_gpu = [](const Tensor& t) { return t.device == Device::CUDA && t.dtype == DType::BF16; };
  // Every rank decides alike (same mode, shapes and compensator shapes), so either all launch the kernel or none.
  if (tp_reduce_ != TpReduce::Fused || !tail_ || tp_size() <= 1) return false;
  if (!bf16_gpu(in) || !bf16_gpu(x) || !bf16_gpu(h) || !bf16_gpu(norm_w)) return false;
  if (x.rows > tail_peers_.max_rows || x.cols > tail_peers_.max_h) return false;
  if (l.ec && (l.ec->rank > tail_peers_.max_rank || l.ec->gate_width > kTpTailMaxGate)) return false;
  const int T = int(x.rows), H = int(x.cols);
  SPEAR_CHECK(in.rows == T && in.cols == l.in_features && H == l.out_features && norm_w.numel() == H && h.rows == T &&
                  h.cols == H,
              "row_parallel_tail: '{}' [{} -> {}] with input [{}, {}], x [{}, {}], norm weight {}, h [{}, {}]", l.name,
              l.in_features, l.out_features, in.rows, in.cols, x.rows, x.cols, norm_w.numel(), h.rows, h.cols);
  SPEAR_CHECK(h.data != x.data && h.data != in.data, "row_parallel_tail: h must not alias x or the input");
  if (T == 0) return true;
  Tensor y_part = alloc(T, H);
  // The P2P dual-write: the W4 decode GEMM also stores its rows into the peers' tail staging from its epilogue
  // (opt-in, SPEAR_TP_GEMM_PUSH=1: measured slower than the tail's push); where it cannot, the tail pushes them.
  bool mirrored = false;
  if (gemm_push_ && l.quantized && !w4_dequant_ready(T)) {
    __nv_bfloat16* y = bf(y_part);
    tune_w4_once(bf(in), T, &l.w4, 1, &y);
    const W4PeerMirror mirror = tp_tail_mirror(tail_peers_, tp_rank());
    auto prof = prof_->scope("linear.w4a16_dual_write");
    mirrored = w4a16_gemm_mirrored(bf(in), T, l.w4, l.bias.bytes() ? l.bias.as<__nv_bfloat16>() : nullptr, y, mirror,
                                   sm_count_, stream_);
  }
  // A compensated W4 shard at decode sizes: its partial A·x from the GEMM launch's own EC CTAs (no projection in
  // the tail kernel, no separate SGEMM).
  Tensor z;
  bool projected = false;
  if (!mirrored && l.ec && l.quantized && T <= 32 && !w4_dequant_ready(T)) {
    z = alloc_f32(T, l.ec->rank);
    __nv_bfloat16* y = bf(y_part);
    tune_w4_once(bf(in), T, &l.w4, 1, &y);  // the W4 CTAs run the plain launch's plan
    auto prof = prof_->scope("linear.w4a16_ec_project");
    projected = w4a16_gemm_ec_project(bf(in), T, l.w4, l.ec->dev, l.bias.bytes() ? l.bias.as<__nv_bfloat16>() : nullptr,
                                      y, z.ptr<float>(), sm_count_, stream_);
  }
  if (!mirrored && !projected) linear_no_ec(l, in, y_part);
  TpTailEc ec;
  if (l.ec) {
    const CudaEc& c = *l.ec;
    ec.rank = c.rank;
    ec.gate_width = c.gate_width;
    ec.in = c.in;
    ec.A = c.A16.as<__nv_bfloat16>();
    ec.B = c.B.as<float>();
    ec.B16 = c.B16.as<__nv_bfloat16>();
    if (c.gate_width > 0) {
      ec.W1 = c.W1.as<float>();
      ec.b1 = c.b1.as<float>();
      ec.W2 = c.W2.as<float>();
      ec.b2 = c.b2.as<float>();
    }
    // Each row's CTA reads all of A (rank · in bf16) when the kernel projects: cheap for narrow shards, while a wide
    // one (down_proj's intermediate columns) is cheaper as one SGEMM for all rows.
    if (projected) {
      ec.z = z.ptr<float>();
    } else if (c.in > 4096) {
      z = alloc_f32(T, c.rank);
      auto prof = prof_->scope("linear.ec_project");
      ec_project(c, in, z);
      ec.z = z.ptr<float>();
    }
  }
  auto prof = prof_->scope("row_parallel_tail");
  tp_tail_bf16(bf(y_part), bf(in), l.ec ? &ec : nullptr, bf(x), bf(norm_w), bf(h), T, H, eps, tail_peers_, tp_rank(),
               stream_, mirrored);
  return true;
}

void CudaBackend::all_gather_cols(const Tensor& part, Tensor& full) {
  const int R = tp_size();
  SPEAR_CHECK(part.dtype == full.dtype && (part.dtype == DType::F32 || part.dtype == DType::BF16),
              "all_gather_cols: fp32 or bf16 tensors of one dtype expected");
  SPEAR_CHECK(full.rows == part.rows && full.cols == part.cols * R,
              "all_gather_cols: [{}, {}] parts do not make [{}, {}] over {} ranks", part.rows, part.cols, full.rows,
              full.cols, R);
  if (R == 1) {
    SPEAR_CUDA_CHECK(cudaMemcpyAsync(full.data, part.data, part.nbytes(), cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  SPEAR_CHECK(comm_, "all_gather_cols: the process group has {} ranks but no NCCL communicator", R);
  auto prof = prof_->scope("all_gather");
  const NcclApi& api = nccl();
  const ncclDataType_t type = part.dtype == DType::F32 ? ncclFloat32 : ncclBfloat16;
  if (part.rows == 1) {  // a decode step of one sequence: rank order is already column order
    SPEAR_NCCL_CHECK(api.all_gather(part.data, full.data, size_t(part.numel()), type, comm_, stream_));
    return;
  }
  // [rank][rows][cols] from NCCL, then each rank's block into its columns (strided copies, graph-capturable).
  Tensor tmp = part.dtype == DType::F32 ? alloc_f32(R * part.rows, part.cols) : alloc(R * part.rows, part.cols);
  SPEAR_NCCL_CHECK(api.all_gather(part.data, tmp.data, size_t(part.numel()), type, comm_, stream_));
  const size_t es = dtype_size(part.dtype), w = size_t(part.cols) * es;
  for (int r = 0; r < R; ++r)
    SPEAR_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(full.data) + size_t(r) * w, size_t(full.cols) * es,
                                       static_cast<const char*>(tmp.data) + size_t(r) * size_t(part.numel()) * es, w, w,
                                       size_t(part.rows), cudaMemcpyDeviceToDevice, stream_));
}

}  // namespace spear::cuda

// Serving under tensor parallelism: rank 0 leads, the other ranks follow (model.h). A command is one message broadcast
// over the process group's TCP sockets (a few hundred bytes for a decode step); the heavy traffic, the all-reduces
// inside the forward pass, goes through the backend (NCCL on the GPU).
#include <cstring>
#include <mutex>

#include "core/error.h"
#include "model/model.h"

namespace spear {

namespace {

enum class Op : int32_t { MakeCache = 1, FreeCache, Forward, ForwardGreedy, Shutdown };

// int32 words: op, then the op's fields.
struct Message {
  std::vector<int32_t> w;
  void put(int32_t v) { w.push_back(v); }
  std::string bytes() const { return std::string(reinterpret_cast<const char*>(w.data()), w.size() * 4); }
};

struct Reader {
  const std::vector<int32_t>& w;
  size_t i = 0;
  int32_t next() {
    if (i >= w.size()) fail("tensor parallel: truncated message from rank 0");
    return w[i++];
  }
};

void put_batch(Message& m, const Batch& b) {
  m.put(int32_t(b.tokens.size()));
  for (int32_t t : b.tokens) m.put(t);
  m.put(int32_t(b.seqs.size()));
  for (const SeqSlice& s : b.seqs) m.put(s.token_begin), m.put(s.n_tokens), m.put(s.pos0), m.put(s.kv_slot);
}

Batch get_batch(Reader& r) {
  Batch b;
  b.tokens.resize(size_t(r.next()));
  for (int32_t& t : b.tokens) t = r.next();
  b.seqs.resize(size_t(r.next()));
  for (SeqSlice& s : b.seqs) s.token_begin = r.next(), s.n_tokens = r.next(), s.pos0 = r.next(), s.kv_slot = r.next();
  return b;
}

}  // namespace

// The leader's channel; KV caches hold it weakly so that one destroyed after its model sends nothing.
struct TpLead {
  ProcessGroup* pg = nullptr;
  std::mutex mu;  // one command at a time, and a forward pass's collectives in the same order on every rank
  int next_cache_id = 1;
  bool open = true;
  void send(const Message& m) {
    std::string b = m.bytes();
    pg->broadcast(b);
  }
};

namespace {

// A leader's KV cache: its own shard's cache plus the id the followers know theirs by.
class LeaderKvCache : public KvCache {
 public:
  LeaderKvCache(std::unique_ptr<KvCache> local, int id, std::weak_ptr<TpLead> lead)
      : local_(std::move(local)), id_(id), lead_(std::move(lead)) {}
  ~LeaderKvCache() override {
    if (auto l = lead_.lock()) {
      std::lock_guard<std::mutex> g(l->mu);
      if (!l->open) return;
      Message m;
      m.put(int32_t(Op::FreeCache));
      m.put(id_);
      try {
        l->send(m);
      } catch (const Error&) {  // a follower already gone; the next command reports it
      }
    }
  }
  int num_slots() const override { return local_->num_slots(); }
  int max_tokens() const override { return local_->max_tokens(); }
  size_t bytes() const override { return local_->bytes(); }
  KvCache& local() { return *local_; }
  int id() const { return id_; }

 private:
  std::unique_ptr<KvCache> local_;
  int id_;
  std::weak_ptr<TpLead> lead_;
};

LeaderKvCache& leader_cache(KvCache& c) {
  auto* l = dynamic_cast<LeaderKvCache*>(&c);
  if (!l) fail("tensor parallel: this KV cache was made before Model::lead()");
  return *l;
}

}  // namespace

void Model::lead() {
  if (shard_.size == 1 || shard_.rank != 0) fail("Model::lead: only rank 0 of a tensor-parallel group leads");
  lead_ = std::make_shared<TpLead>();
  lead_->pg = backend_.process_group();
}

Model::~Model() {
  if (!lead_) return;
  std::lock_guard<std::mutex> g(lead_->mu);
  lead_->open = false;
  Message m;
  m.put(int32_t(Op::Shutdown));
  try {
    lead_->send(m);
  } catch (const Error&) {  // followers already gone: nothing left to stop
  }
}

std::unique_ptr<KvCache> Model::make_kv_cache(int n_slots, int max_tokens) {
  if (!lead_) return make_local_kv_cache(n_slots, max_tokens);
  std::lock_guard<std::mutex> g(lead_->mu);
  const int id = lead_->next_cache_id++;
  Message m;
  for (int32_t v : {int32_t(Op::MakeCache), int32_t(id), int32_t(n_slots), int32_t(max_tokens)}) m.put(v);
  lead_->send(m);
  return std::make_unique<LeaderKvCache>(make_local_kv_cache(n_slots, max_tokens), id, lead_);
}

std::vector<float> Model::forward(const Batch& batch, KvCache& cache, LogitsMode mode, const TapFn* taps) {
  if (!lead_) return forward_local(batch, cache, mode, taps);
  if (taps) require_single_rank("observing activations");
  LeaderKvCache& c = leader_cache(cache);
  check_batch(batch, c.local());  // before sending: a bad batch must not reach the followers
  std::lock_guard<std::mutex> g(lead_->mu);
  Message m;
  m.put(int32_t(Op::Forward));
  m.put(c.id());
  m.put(int32_t(mode));
  put_batch(m, batch);
  lead_->send(m);
  return forward_local(batch, c.local(), mode, nullptr);
}

std::vector<int32_t> Model::forward_greedy(const Batch& batch, KvCache& cache) {
  if (!lead_) return forward_greedy_local(batch, cache);
  LeaderKvCache& c = leader_cache(cache);
  check_batch(batch, c.local());
  std::lock_guard<std::mutex> g(lead_->mu);
  Message m;
  m.put(int32_t(Op::ForwardGreedy));
  m.put(c.id());
  put_batch(m, batch);
  lead_->send(m);
  return forward_greedy_local(batch, c.local());
}

void Model::follow() {
  if (shard_.size == 1 || shard_.rank == 0) fail("Model::follow: only ranks > 0 of a tensor-parallel group follow");
  ProcessGroup& pg = *backend_.process_group();
  std::map<int32_t, std::unique_ptr<KvCache>> caches;
  auto cache = [&](int32_t id) -> KvCache& {
    auto it = caches.find(id);
    if (it == caches.end()) fail("tensor parallel: rank 0 refers to an unknown KV cache {}", id);
    return *it->second;
  };
  for (;;) {
    std::string bytes;
    pg.broadcast(bytes);
    if (bytes.size() % 4 != 0) fail("tensor parallel: malformed message from rank 0 ({} bytes)", bytes.size());
    std::vector<int32_t> words(bytes.size() / 4);
    std::memcpy(words.data(), bytes.data(), bytes.size());
    Reader r{words};
    switch (Op(r.next())) {
      case Op::MakeCache: {
        const int32_t id = r.next(), slots = r.next(), max_tokens = r.next();
        caches[id] = make_local_kv_cache(slots, max_tokens);
        break;
      }
      case Op::FreeCache:
        caches.erase(r.next());
        break;
      case Op::Forward: {
        KvCache& c = cache(r.next());
        const auto mode = LogitsMode(r.next());
        forward_local(get_batch(r), c, mode, nullptr);
        break;
      }
      case Op::ForwardGreedy: {
        KvCache& c = cache(r.next());
        forward_greedy_local(get_batch(r), c);
        break;
      }
      case Op::Shutdown:
        return;
      default:
        fail("tensor parallel: unknown command from rank 0");
    }
  }
}

}  // namespace spear

#include "page_model.h"

#include <cstdio>
#include <thread>

#include "cvmconf/fault.h"

namespace cvm::suites {

// --- page content --------------------------------------------------------------------------------

WordKind classify_word(uint64_t p, uint64_t v, uint64_t gen_now) {
  if (v == 0) return WordKind::Zero;
  if ((v & (0xffull << 56)) != PageModel::kMark) return WordKind::Garbage;
  if (((v >> 32) & 0xffffff) != p) return WordKind::Foreign;
  const uint64_t g = v & 0xffffffffu, now = gen_now & 0xffffffffu;
  if (g == 0 || g > now) return WordKind::Future;
  return g == now ? WordKind::Current : WordKind::Older;
}

std::string describe_word(uint64_t p, uint64_t v, uint64_t gen_now) {
  const uint64_t g = v & 0xffffffffu;
  switch (classify_word(p, v, gen_now)) {
    case WordKind::Zero:
      return "0";
    case WordKind::Current:
      return hex(v) + " (its current pattern)";
    case WordKind::Older:
      return hex(v) + " (its own pattern of generation " + std::to_string(g) +
             ", older than the current " + std::to_string(gen_now) + ": stale data)";
    case WordKind::Future:
      return hex(v) + " (generation " + std::to_string(g) +
             ", which was never written; current " + std::to_string(gen_now) + ")";
    case WordKind::Foreign:
      return "foreign data " + hex(v) + " (the pattern of page " +
             std::to_string((v >> 32) & 0xffffff) + ")";
    case WordKind::Garbage:
      return "garbage " + hex(v) + " (never written by this test)";
  }
  return hex(v);
}

bool readback_ok(uint64_t p, uint64_t v, uint64_t gen, const ReadbackRules& r) {
  switch (classify_word(p, v, gen)) {
    case WordKind::Current:
      return true;
    case WordKind::Zero:
      return r.punched || r.conversion_may_change;
    case WordKind::Older:
      return r.conversion_may_change;
    default:
      return false;
  }
}

void read_words(const uint8_t* addr, uint64_t n, uint64_t* out) {
  const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(addr);
  for (uint64_t i = 0; i < n; i++) out[i] = w[i];
}

void fill_words(uint8_t* addr, uint64_t n, uint64_t v) {
  volatile uint64_t* w = reinterpret_cast<volatile uint64_t*>(addr);
  for (uint64_t i = 0; i < n; i++) w[i] = v;
}

FaultResult probe_read_words(const uint8_t* addr, uint64_t n, uint64_t* out) {
  return probe_call([addr, n, out] { read_words(addr, n, out); });
}

// --- the model -----------------------------------------------------------------------------------

PageModel::PageModel(Race& race, uint64_t pages, int writers, std::string registered)
    : race_(race), pages_(pages), writers_(writers < 1 ? 1 : writers),
      registered_(std::move(registered)), words_(page_size() / sizeof(uint64_t)),
      st_(new PageState[pages]) {}

uint64_t PageModel::pick_owned(std::mt19937_64& g, int w) const {
  uint64_t owned = (pages_ - static_cast<uint64_t>(w) + static_cast<uint64_t>(writers_) - 1) /
                   static_cast<uint64_t>(writers_);
  if (owned == 0) return static_cast<uint64_t>(w);
  return static_cast<uint64_t>(w) + Race::pick(g, 0, owned - 1) * static_cast<uint64_t>(writers_);
}

std::string PageModel::domain_error(uint64_t p, uint64_t v, uint64_t gen_now) {
  switch (classify_word(p, v, gen_now)) {
    case WordKind::Zero:
    case WordKind::Current:
    case WordKind::Older:
      return "";
    default:  // never written: a future generation, foreign data, garbage
      return describe_word(p, v, gen_now);
  }
}

bool PageModel::enter(uint64_t p) {
  PageState& s = st_[p];
  if (s.frozen.load()) return false;
  s.in_write.fetch_add(1);
  if (s.frozen.load()) {
    s.in_write.fetch_sub(1);
    return false;
  }
  return true;
}

void PageModel::leave(uint64_t p) { st_[p].in_write.fetch_sub(1); }

bool PageModel::write_page(uint8_t* page_addr, uint64_t p, const std::string& actor,
                           uint64_t it) {
  if (!enter(p)) return false;
  const PageState& s = st_[p];
  const uint64_t end0 = s.punch_end.load();
  const uint64_t gen = next_gen(p);
  const uint64_t want = tag(p, gen);
  std::vector<uint64_t> back(words_);
  const uint64_t n = words_;
  uint64_t* out = back.data();
  FaultResult f = probe_call([page_addr, n, want, out] {
    fill_words(page_addr, n, want);
    read_words(page_addr, n, out);
  });
  const uint64_t begin1 = s.punch_begin.load();
  leave(p);
  if (f.faulted()) {
    race_.violation(it, actor, "writing page " + std::to_string(p) + " of the mapping: " + f.describe());
    return true;
  }
  ReadbackRules rules;
  rules.punched = begin1 > end0;
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t v = back[i];
    if (readback_ok(p, v, gen, rules)) continue;
    std::string what = "page " + std::to_string(p) + " word " + std::to_string(i) +
                       ": read back " + hex(v) + " right after writing " + hex(want);
    switch (classify_word(p, v, gen)) {
      case WordKind::Zero:
        what += " (the write was lost, no punch overlapped it)";
        break;
      case WordKind::Older:
        what += " (stale data of an older generation)";
        break;
      default:
        what += ": " + describe_word(p, v, gen);
    }
    race_.violation(it, actor, what);
    return true;
  }
  return true;
}

void PageModel::read_page(const uint8_t* page_addr, uint64_t p, const std::string& actor,
                          uint64_t it) {
  PageState& s = st_[p];
  const uint64_t z0 = s.zero_epoch.load();
  std::vector<uint64_t> buf(words_);
  const uint64_t n = words_;
  FaultResult f = probe_read_words(page_addr, n, buf.data());
  const uint64_t gen_now = s.gen.load();
  const uint64_t z1 = s.zero_epoch.load();
  if (f.faulted()) {
    race_.violation(it, actor, "reading page " + std::to_string(p) + " of the mapping: " + f.describe());
    return;
  }
  const bool must_be_zero = z0 != 0 && z0 == z1;
  if (must_be_zero) reader_zero_checks_.fetch_add(1, std::memory_order_relaxed);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t v = buf[i];
    if (must_be_zero && v != 0) {
      race_.violation(it, actor,
                      "page " + std::to_string(p) + " word " + std::to_string(i) + " reads " +
                          hex(v) + " after a completed punch with no writer since (stale data)");
      return;
    }
    if (auto e = domain_error(p, v, gen_now); !e.empty()) {
      race_.violation(it, actor, "page " + std::to_string(p) + " word " + std::to_string(i) + ": " + e);
      return;
    }
  }
}

bool PageModel::punch(const GuestMemfd& gmem, uint64_t first, uint64_t n,
                      const std::string& actor, uint64_t it) {
  const uint64_t ps = page_size();
  punch_started(first, n);
  auto r = gmem.punch_hole(first * ps, n * ps);
  punch_finished(first, n);
  punches_.fetch_add(1, std::memory_order_relaxed);
  if (!r) {
    race_.violation(it, actor, "punching pages [" + std::to_string(first) + ", " +
                                   std::to_string(first + n) + "): " + r.error().message());
    return false;
  }
  return true;
}

void PageModel::punch_started(uint64_t first, uint64_t n) {
  for (uint64_t p = first; p < first + n && p < pages_; p++) st_[p].punch_begin.fetch_add(1);
}

void PageModel::punch_finished(uint64_t first, uint64_t n) {
  for (uint64_t p = first; p < first + n && p < pages_; p++) st_[p].punch_end.fetch_add(1);
}

bool PageModel::allocate(const GuestMemfd& gmem, uint64_t first, uint64_t n,
                         const std::string& actor, uint64_t it) {
  const uint64_t ps = page_size();
  auto r = gmem.allocate(first * ps, n * ps);   // retries EINTR itself
  if (r) return true;
  race_.violation(it, actor, "allocating pages [" + std::to_string(first) + ", " +
                                 std::to_string(first + n) + "): " + r.error().message());
  return false;
}

bool PageModel::freeze(uint64_t first, uint64_t n, const std::string& actor, uint64_t it) {
  for (uint64_t p = first; p < first + n; p++) st_[p].frozen.store(true);
  // Writers that got in before the freeze finish their page (a few microseconds).
  auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (uint64_t p = first; p < first + n; p++) {
    while (st_[p].in_write.load() != 0) {
      if (std::chrono::steady_clock::now() > limit) {
        race_.violation(it, actor, registered_ + " did not leave page " + std::to_string(p) +
                                       " within 5 s (harness stall)");
        unfreeze(first, n);
        return false;
      }
      std::this_thread::yield();
    }
  }
  return true;
}

void PageModel::unfreeze(uint64_t first, uint64_t n) {
  for (uint64_t p = first; p < first + n; p++) {
    st_[p].zero_epoch.store(0);
    st_[p].frozen.store(false);
  }
}

bool PageModel::verify_zero(const uint8_t* view, uint64_t p, const char* view_name,
                            const std::string& actor, uint64_t it) {
  const uint64_t ps = page_size();
  std::vector<uint64_t> buf(words_);
  const uint64_t n = words_;
  FaultResult f = probe_read_words(view + p * ps, n, buf.data());
  if (f.faulted()) {
    race_.violation(it, actor, std::string("reading punched page ") + std::to_string(p) +
                                   " through " + view_name + ": " + f.describe());
    return false;
  }
  // What a stale view would show: the last pattern written before the punch.
  const uint64_t stale = tag(p, st_[p].gen.load() ? st_[p].gen.load() : 1);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t v = race_.observe(buf[i], stale, it);
    if (v != 0) {
      race_.violation(it, actor, "page " + std::to_string(p) + " word " + std::to_string(i) +
                                     " reads " + hex(v) + " through " + view_name +
                                     " after the punch returned (expected 0: stale data)");
      return false;
    }
  }
  return true;
}

void PageModel::publish_zero(uint64_t first, uint64_t n, uint64_t hold_us) {
  const uint64_t e = epoch_.fetch_add(1) + 1;
  for (uint64_t p = first; p < first + n; p++) st_[p].zero_epoch.store(e);
  if (hold_us) {
    auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(hold_us);
    while (std::chrono::steady_clock::now() < until) std::this_thread::yield();
  }
}

bool PageModel::checked_punch(const GuestMemfd& gmem, uint64_t first, uint64_t n,
                              const std::vector<const uint8_t*>& views, uint64_t hold_us,
                              const std::string& actor, uint64_t it) {
  if (!freeze(first, n, actor, it)) return false;
  bool ok = punch(gmem, first, n, actor, it);
  checked_.fetch_add(1, std::memory_order_relaxed);
  for (size_t v = 0; ok && v < views.size(); v++) {
    if (!views[v]) continue;
    const char* name = v == 0 ? "the racing mapping" : "a second mapping";
    for (uint64_t p = first; ok && p < first + n; p++) ok = verify_zero(views[v], p, name, actor, it);
  }
  if (ok) publish_zero(first, n, hold_us);
  unfreeze(first, n);
  return ok;
}

}  // namespace cvm::suites

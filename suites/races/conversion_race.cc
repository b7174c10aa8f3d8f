#include "conversion_race.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <thread>

#include "cvmconf/fault.h"
#include "guest_race.h"
#include "page_model.h"

namespace cvm::suites {
namespace {

using namespace std::chrono_literals;

const char* state_name(PageState s) { return s == PageState::Shared ? "shared" : "private"; }
const char* yes_no(bool b) { return b ? "yes" : "no"; }

constexpr uint8_t kGuestPrivateFill = 0xa5;

}  // namespace

ConversionEnvOptions ConversionRaceDriver::env_options(bool guest) {
  ConversionEnvOptions o;
  o.init_shared = true;
  o.guest = guest;
  o.vcpus = guest ? 1 + kGuestVcpus : 1;
  o.pages = guest ? kHostPages * (1 + kGuestVcpus) : kHostPages;
  return o;
}

ConversionRaceDriver::ConversionRaceDriver(Race& race, ConversionEnv& env, ConversionRaceOptions o)
    : race_(race),
      env_(env),
      o_(o),
      pages_(env.pages()),
      words_(page_size() / sizeof(uint64_t)),
      model_(env.pages(), PageState::Shared),
      host_(race, kHostPages, o.writers, "a host thread") {}

ConversionRaceDriver::~ConversionRaceDriver() { race_.join(); }

std::string ConversionRaceDriver::pages_text(uint64_t first, uint64_t n) const {
  return n == 1 ? "page " + std::to_string(first)
                : "pages [" + std::to_string(first) + ", " + std::to_string(first + n) + ")";
}

// --- accesses ------------------------------------------------------------------------------------

ConversionRaceDriver::Observed ConversionRaceDriver::access(uint64_t p, const std::function<void()>& body) {
  Observed x;
  x.before = model_.snapshot(p);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  x.fault = probe_call(body);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  x.after = model_.snapshot(p);
  x.window = state_window(x.before, x.after);
  return x;
}

ConversionRaceDriver::Observed ConversionRaceDriver::access_read(uint64_t p, const uint8_t* addr,
                                                     std::vector<uint64_t>& out) {
  out.assign(words_, 0);
  const uint64_t n = words_;
  uint64_t* o = out.data();
  return access(p, [addr, n, o] { read_words(addr, n, o); });
}

bool ConversionRaceDriver::judge(const Observed& x, uint64_t p, const char* op, const std::string& actor,
                           uint64_t it) {
  const std::string page = "page " + std::to_string(p);
  if (!in_place()) {
    // The per-VM back-end: shared memory is separate host memory that no conversion touches.
    if (!x.fault.faulted()) {
      stats_.separate_accesses.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    race_.violation(it, actor,
                    std::string(op) + " " + page +
                        " of the separate shared memory: " + x.fault.describe() +
                        " (the per-vm-attributes back-end never takes it from the host)");
    return false;
  }
  const std::string when = x.converted_during()
                               ? "a conversion of it was in flight during the access"
                               : "no conversion of it was in flight; last set " +
                                     std::string(state_name(x.before.state));
  if (x.fault.faulted()) {
    if (x.fault.sigbus() && x.window.priv) {
      (x.window.definitive() ? stats_.definitive_private : stats_.window_sigbus).fetch_add(1);
      return false;
    }
    if (x.fault.sigbus())
      race_.violation(it, actor,
                      "SIGBUS " + std::string(op) + " " + page +
                          " through the guest_memfd mapping although it was shared at "
                          "that moment (" +
                          when + "): spurious SIGBUS");
    else
      race_.violation(it, actor,
                      std::string(op) + " " + page + ": " + x.fault.describe() +
                          " (only SIGBUS, on a private page, is expected)");
    return false;
  }
  if (!x.window.shared) {
    race_.violation(it, actor,
                    std::string(op) + " " + page +
                        " through the guest_memfd mapping completed without SIGBUS "
                        "although the page was private at that moment (" +
                        when + "): the host reached private memory");
    return false;
  }
  (x.window.definitive() ? stats_.definitive_shared : stats_.window_completed).fetch_add(1);
  return true;
}

bool ConversionRaceDriver::write_page(uint64_t p, const std::string& actor, uint64_t it,
                                bool owner_while_frozen) {
  if (!owner_while_frozen && !host_.enter(p)) return false;
  const uint64_t pe0 = host_.punch_end(p);
  const uint64_t gen = host_.next_gen(p);
  const uint64_t want = PageModel::tag(p, gen);
  std::vector<uint64_t> back(words_);
  uint8_t* a = env_.shared_hva(p);
  const uint64_t n = words_;
  uint64_t* out = back.data();
  Observed x = access(p, [a, n, want, out] {
    fill_words(a, n, want);
    read_words(a, n, out);
  });
  const uint64_t pb1 = host_.punch_begin(p);
  if (!owner_while_frozen) host_.leave(p);
  stats_.writes.fetch_add(1, std::memory_order_relaxed);
  if (!judge(x, p, "writing", actor, it)) return false;
  // The separate shared memory of the per-VM back-end is touched by nobody else: exact.
  ReadbackRules rules;
  rules.punched = in_place() && pb1 > pe0;
  rules.conversion_may_change = in_place() && !o_.contents_preserved && x.converted_during();
  for (uint64_t i = 0; i < n; i++) {
    if (readback_ok(p, back[i], gen, rules)) continue;
    race_.violation(it, actor,
                    "page " + std::to_string(p) + " word " + std::to_string(i) + ": read back " +
                        describe_word(p, back[i], gen) + " right after writing " + hex(want) +
                        (back[i] == 0 ? " (a lost write)" : "") +
                        " (a punch overlapped: " + yes_no(rules.punched) +
                        "; a conversion overlapped: " + yes_no(x.converted_during()) +
                        "; contents kept across conversion: " +
                        yes_no(!in_place() || o_.contents_preserved) + ")");
    return false;
  }
  return true;
}

void ConversionRaceDriver::read_page(uint64_t p, const std::string& actor, uint64_t it) {
  const bool host = is_host_page(p);
  // Per-VM: the driver's state observer writes a marker into frozen pages' shared memory, so
  // readers keep out of frozen pages (and register, so freezing waits for them).
  const bool registered = host && !in_place();
  if (registered && !host_.enter(p)) return;
  const uint64_t z0 = host ? host_.zero_epoch(p) : 0;
  std::vector<uint64_t> buf;
  Observed x = access_read(p, env_.shared_hva(p), buf);
  const uint64_t gen_now = host ? host_.gen(p) : 0;
  const uint64_t z1 = host ? host_.zero_epoch(p) : 0;
  if (registered) host_.leave(p);
  stats_.reads.fetch_add(1, std::memory_order_relaxed);
  if (!judge(x, p, "reading", actor, it)) return;
  const std::string where = "page " + std::to_string(p) + " word ";
  if (!host) {
    // A guest page: 0 or its owner vCPU's pattern for it.
    const uint64_t owner = p / kHostPages;
    for (uint64_t i = 0; i < words_; i++) {
      const uint64_t v = buf[i];
      if (guest_word_ok(v, owner, p)) continue;
      race_.violation(it, actor,
                      where + std::to_string(i) + " reads " + hex(v) +
                          " through the host's view: not 0 and not vCPU " + std::to_string(owner) +
                          "'s pattern for it");
      return;
    }
    return;
  }
  const bool must_be_zero = z0 != 0 && z0 == z1;
  if (must_be_zero) stats_.reader_zero_checks.fetch_add(1, std::memory_order_relaxed);
  for (uint64_t i = 0; i < words_; i++) {
    if (read_value_ok(p, buf[i], gen_now, must_be_zero)) continue;
    race_.violation(it, actor,
                    where + std::to_string(i) + " reads " + describe_word(p, buf[i], gen_now) +
                        (must_be_zero ? " after it was punched while converting and made shared "
                                        "again, with no write since (expected 0: stale data)"
                                      : ""));
    return;
  }
}

bool ConversionRaceDriver::read_whole(uint64_t p, std::vector<uint64_t>& out, const std::string& actor,
                                uint64_t it) {
  return judge(access_read(p, env_.shared_hva(p), out), p, "reading", actor, it);
}

bool ConversionRaceDriver::punch(uint64_t first, uint64_t n, const std::string& actor, uint64_t it) {
  const uint64_t ps = page_size();
  host_.punch_started(first, n);  // guest pages have no host bookkeeping
  auto r = guest_visible_punch(ctl_, [&] { return env_.gmem().punch_hole(first * ps, n * ps); });
  host_.punch_finished(first, n);
  stats_.punches.fetch_add(1, std::memory_order_relaxed);
  if (!r) {
    race_.violation(it, actor, "punching " + pages_text(first, n) + ": " + r.error().message());
    return false;
  }
  return true;
}

// --- the driver ----------------------------------------------------------------------------------

ConversionResult ConversionRaceDriver::convert(uint64_t first, uint64_t n, PageState to, uint64_t it,
                                         const std::string& why) {
  // The guest tolerates 0 or its own older patterns around conversions that may change what
  // it reads (race.h); where contents must be kept its check stays exact.
  const bool tell_guest = ctl_ && (!in_place() || !o_.contents_preserved);
  model_.begin(first, n, to);
  if (tell_guest) vstore(ctl_->conv_begin, vload(ctl_->conv_begin) + 1);
  conv_started_.fetch_add(1);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const ConversionRequest req{env_.range(first, n), to == PageState::Private};
  ConversionResult r;
  for (int tries = 0;; tries++) {
    r = env_.apply(req);
    if (r.err == EINTR && tries < 100) {
      stats_.eintr_retries.fetch_add(1);
      continue;
    }
    break;
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);
  conv_finished_.fetch_add(1);
  if (tell_guest) vstore(ctl_->conv_end, vload(ctl_->conv_end) + 1);
  model_.end(first, n, r.ok());
  stats_.conversions.fetch_add(1);
  (to == PageState::Private ? stats_.to_private : stats_.to_shared).fetch_add(1);
  if (!r.ok()) {
    stats_.failures.fetch_add(1);
    std::string what = why + ": converting " + pages_text(first, n) + " to " + state_name(to) +
                       " failed: " + r.describe();
    if (r.err == EAGAIN)
      what +=
          " (EAGAIN although this race holds no pin: a transient reference taken by a racing "
          "fault or punch made the conversion fail, and conversion must work while the pages "
          "are being faulted)";
    else if (r.err == EINTR)
      what += " (EINTR on 100 attempts in a row)";
    else
      what += " (not an error a conversion of valid, bound pages may return)";
    race_.violation(it, "converter", what);
  }
  return r;
}

bool ConversionRaceDriver::bring(uint64_t first, uint64_t n, PageState to, uint64_t it,
                           const std::string& why) {
  if (model_.all(first, n, to)) return true;
  return convert(first, n, to, it, why).ok();
}

bool ConversionRaceDriver::check_states(uint64_t first, uint64_t n, uint64_t it,
                                  const std::string& when) {
  bool ok = true;
  for (uint64_t p = first; p < first + n; p++) {
    auto st = env_.state(p);
    stats_.state_checks.fetch_add(1, std::memory_order_relaxed);
    if (!st) {
      race_.violation(it, "converter",
                      "observing the state of page " + std::to_string(p) + " " + when + ": " +
                          st.error().message());
      ok = false;
      continue;
    }
    if (st.value() != model_.state(p)) {
      race_.violation(it, "converter",
                      "page " + std::to_string(p) + " is " + state_name(st.value()) + " " + when +
                          ", but it was last set " + state_name(model_.state(p)) + " (observed " +
                          (in_place() ? "by a host access through the guest_memfd mapping"
                                      : "by the guest reading a marker in the shared memory") +
                          ")");
      ok = false;
    }
  }
  return ok;
}

bool ConversionRaceDriver::punch_on_puncher(uint64_t first, uint64_t n, std::mt19937_64& rng, uint64_t it,
                                      PageState to) {
  req_first_.store(first);
  req_n_.store(n);
  const uint64_t req = punch_req_.fetch_add(1) + 1;
  Race::jitter(rng, 30);
  const uint64_t k = conv_started_.load() + 1;  // the number the conversion below gets
  convert(first, n, to, it, "converting while the range is punched");
  const auto limit = std::chrono::steady_clock::now() + 5s;
  while (punch_done_.load() != req) {
    if (race_.stopping()) return false;  // the puncher may have left
    if (std::chrono::steady_clock::now() > limit) {
      race_.violation(
          it, "converter",
          "the puncher did not punch " + pages_text(first, n) + " within 5 s (harness stall)");
      return false;
    }
    std::this_thread::yield();
  }
  // The punch overlapped the conversion iff the conversion began before the punch returned
  // and had not finished when the punch began.
  if (done_conv_finished_before_.load() < k && k <= done_conv_started_after_.load())
    stats_.overlapped_punches.fetch_add(1);
  return true;
}

void ConversionRaceDriver::hot_conversion(std::mt19937_64& rng, uint64_t it) {
  const Race::Range r = pick_range(rng, 0, pages_);
  const PageState to = Race::chance(rng, 1, 2) ? PageState::Private : PageState::Shared;
  Race::jitter(rng, 50);
  convert(r.first, r.n, to, it, "hot conversion");
  stats_.hot_conversions.fetch_add(1);
  // Definitive: nobody else converts. (Per-VM: the observer needs frozen pages; see the end.)
  if (in_place()) check_states(r.first, r.n, it, "after the conversion returned");
}

void ConversionRaceDriver::round_trip(std::mt19937_64& rng, uint64_t it) {
  const Race::Range r = pick_range(rng, 0, kHostPages);
  if (!host_.freeze(r.first, r.n, "converter", it)) return;
  bool ok = bring(r.first, r.n, PageState::Shared, it, "round trip: making the range shared") &&
            check_states(r.first, r.n, it, "before the round trip");
  // A fresh pattern in every page, so that the comparison after the trip means something.
  for (uint64_t p = r.first; ok && p < r.first + r.n; p++)
    ok = write_page(p, "converter", it, true);
  std::vector<std::vector<uint64_t>> before(r.n);
  std::vector<uint64_t> pe0(r.n);
  for (uint64_t i = 0; ok && i < r.n; i++) {
    pe0[i] = host_.punch_end(r.first + i);
    ok = read_whole(r.first + i, before[i], "converter", it);
  }
  if (ok) {
    const bool to_private =
        convert(r.first, r.n, PageState::Private, it, "round trip: converting to private").ok();
    check_states(r.first, r.n, it, "after the round trip's conversion to private");
    Race::jitter(rng, 100);
    if (to_private)
      ok = convert(r.first, r.n, PageState::Shared, it, "round trip: converting back to shared")
               .ok() &&
           check_states(r.first, r.n, it, "after the round trip");
    else
      ok = model_.all(r.first, r.n, PageState::Shared);  // the failure left it shared
  }
  for (uint64_t i = 0; ok && i < r.n; i++) {
    const uint64_t p = r.first + i;
    std::vector<uint64_t> after;
    if (!read_whole(p, after, "converter", it)) continue;
    RoundTripRules rules;
    rules.punched = in_place() && host_.punch_begin(p) > pe0[i];
    rules.contents_preserved = !in_place() || o_.contents_preserved;
    bool zeroed = false;
    for (uint64_t w = 0; w < words_; w++) {
      if (!round_trip_ok(before[i][w], after[w], rules)) {
        race_.violation(
            it, "converter",
            "page " + std::to_string(p) + " word " + std::to_string(w) + " read " +
                hex(before[i][w]) + " before a round trip through private and " +
                describe_word(p, after[w], host_.gen(p)) +
                " after it (a punch overlapped: " + yes_no(rules.punched) +
                "; contents kept across conversion: " + yes_no(rules.contents_preserved) +
                (in_place() ? "" : "; the per-VM back-end's shared memory is separate") + ")");
        break;
      }
      zeroed = zeroed || after[w] != before[i][w];
    }
    if (zeroed) stats_.zeroed_by_round_trip.fetch_add(1);
  }
  if (ok) stats_.round_trips.fetch_add(1);
  host_.unfreeze(r.first, r.n);
}

bool ConversionRaceDriver::convert_while_punched(const Race::Range& r, PageState to,
                                                 PageState home, std::mt19937_64& rng,
                                                 uint64_t it) {
  const PageState away = home == PageState::Shared ? PageState::Private : PageState::Shared;
  if (to == home && !bring(r.first, r.n, away, it,
                           std::string("checked punch: making the range ") + state_name(away)))
    return false;
  const bool punched = punch_on_puncher(r.first, r.n, rng, it, to);
  check_states(r.first, r.n, it, "after converting while the range was punched");
  return punched && bring(r.first, r.n, home, it,
                          std::string("checked punch: making the range ") + state_name(home) +
                              " again");
}

void ConversionRaceDriver::punch_while_converting_in_place(std::mt19937_64& rng, uint64_t it) {
  const Race::Range r = pick_range(rng, 0, kHostPages);
  if (!host_.freeze(r.first, r.n, "converter", it)) return;
  // A pattern in every page first, so that reading zeroes afterwards means something.
  bool ok = bring(r.first, r.n, PageState::Shared, it, "checked punch: making the range shared");
  for (uint64_t p = r.first; ok && p < r.first + r.n; p++)
    ok = write_page(p, "converter", it, true);
  const PageState to = Race::chance(rng, 1, 2) ? PageState::Private : PageState::Shared;
  ok = ok && convert_while_punched(r, to, PageState::Shared, rng, it);
  for (uint64_t p = r.first; ok && p < r.first + r.n; p++) {
    const std::pair<const uint8_t*, const char*> views[] = {
        {env_.shared_hva(p), "the racing mapping"},
        {second_view_.valid() ? second_view_.data() + p * page_size() : nullptr,
         "a second mapping"}};
    for (const auto& [addr, name] : views) {
      if (!addr || !ok) continue;
      std::vector<uint64_t> buf;
      if (!judge(access_read(p, addr, buf), p, "reading", "converter", it)) {
        ok = false;
        break;
      }
      // What a stale view would show: the pattern written before the punch.
      const uint64_t stale = PageModel::tag(p, host_.gen(p));
      for (uint64_t i = 0; i < words_; i++) {
        const uint64_t v = race_.observe(buf[i], stale, it);
        if (v == 0) continue;
        race_.violation(it, "converter",
                        "page " + std::to_string(p) + " word " + std::to_string(i) + " reads " +
                            hex(v) + " through " + name +
                            " after it was punched while converting to " + state_name(to) +
                            " and made shared again (expected 0: stale data)");
        ok = false;
        break;
      }
    }
  }
  if (ok) {
    // Readers check the zeroes for a while too.
    host_.publish_zero(r.first, r.n, Race::pick(rng, 0, 200));
    stats_.checked_punches.fetch_add(1);
  }
  host_.unfreeze(r.first, r.n);
}

void ConversionRaceDriver::punch_while_converting_per_vm(std::mt19937_64& rng, uint64_t it) {
  const Race::Range r = pick_range(rng, 0, kHostPages);
  if (!host_.freeze(r.first, r.n, "converter", it)) return;
  // The host's separate shared memory, which neither punches nor conversions may change.
  std::vector<std::vector<uint64_t>> host_before(r.n);
  bool ok = true;
  for (uint64_t i = 0; ok && i < r.n; i++)
    ok = read_whole(r.first + i, host_before[i], "converter", it);
  ok = ok &&
       bring(r.first, r.n, PageState::Private, it, "checked punch: making the range private") &&
       check_states(r.first, r.n, it, "before the checked punch");
  // Data in the private copies first, so that reading zeroes afterwards means something. The
  // free-running puncher does not keep out of frozen pages: a page it punched between the fill
  // and the check reads zeroes, which is no violation (this checked punch is then abandoned).
  for (uint64_t p = r.first; ok && p < r.first + r.n; p++) {
    const uint64_t begun = host_.punch_begin(p), ended = host_.punch_end(p);
    std::string e = env_.guest_fill(p, kGuestPrivateFill);
    if (e.empty()) e = env_.guest_check(p, kGuestPrivateFill);
    if (e.empty()) continue;
    ok = false;
    const bool punched = host_.punch_begin(p) != begun || ended != begun;  // since, or in flight
    if (punched && env_.guest_check(p, 0).empty()) {
      stats_.fills_punched.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    race_.violation(it, "converter",
                    "the guest cannot use its private page " + std::to_string(p) + ": " + e);
  }
  const PageState to = Race::chance(rng, 1, 2) ? PageState::Private : PageState::Shared;
  ok = ok && convert_while_punched(r, to, PageState::Private, rng, it);
  for (uint64_t p = r.first; ok && p < r.first + r.n; p++) {
    const std::string e = env_.guest_check(p, 0);
    if (!e.empty())
      race_.violation(it, "converter",
                      "page " + std::to_string(p) + " was punched while converting to " +
                          state_name(to) + ", but once private again " + e +
                          " (expected 0: stale private data)");
  }
  for (uint64_t i = 0; ok && i < r.n; i++) {
    std::vector<uint64_t> now;
    if (!read_whole(r.first + i, now, "converter", it)) continue;
    for (uint64_t w = 0; w < words_; w++) {
      if (now[w] == host_before[i][w]) continue;
      race_.violation(it, "converter",
                      "the host's separate shared memory of page " + std::to_string(r.first + i) +
                          " changed across the punch and conversions: word " + std::to_string(w) +
                          " was " + hex(host_before[i][w]) + ", now " + hex(now[w]));
      break;
    }
  }
  if (ok) stats_.checked_punches.fetch_add(1);
  host_.unfreeze(r.first, r.n);
}

// --- guest ---------------------------------------------------------------------------------------

void ConversionRaceDriver::start_guest() {
  GuestVm* vm = env_.guest();
  if (!vm || env_.options().vcpus < 1 + kGuestVcpus || pages_ < kHostPages * (1 + kGuestVcpus)) {
    no_guest_ = vm ? "the environment has no vCPUs for punch_race" : "the environment has no guest";
    return;
  }
  cvm_race_ctl* ctl = reset_race_ctl(*vm);
  for (int v = 1; v <= kGuestVcpus; v++) {
    vstore(ctl->vcpu[v].req, static_cast<uint64_t>(CVM_RACE_REQ(0, CVM_RACE_MODE_RUN)));
    auto r = vm->start(v, "punch_race",
                       {CVM_TEST_MEM_GPA, kHostPages, CVM_SCRATCH_GPA, o_.guest_stride});
    if (!r) {
      race_.violation(
          0, "setup",
          "starting punch_race on vCPU " + std::to_string(v) + ": " + r.error().message());
      no_guest_ = "punch_race did not start";
      return;
    }
  }
  ctl_ = ctl;
  guest_vcpus_ = kGuestVcpus;
  // The driver is the only converter: a fault racing its conversion is re-entered.
  reenter_conversion_memory_faults(*vm, env_.gpa(0), env_.gpa(0) + pages_ * page_size(),
                                   stats_.memory_fault_exits);
  race_.on_stop([ctl] { vstore(ctl->stop, uint64_t{1}); });
  const auto timeout = guest_run_timeout(race_);
  for (int v = 1; v <= kGuestVcpus; v++)
    spawn_guest_runner(race_, *vm, v, timeout, kHostPages, guest_exited_[v],
                       stats_.guest_passes[v]);
}

void ConversionRaceDriver::wait_for_guest_passes() {
  if (!ctl_) return;
  const auto limit = std::chrono::steady_clock::now() + 10s;
  for (int v = 1; v <= kGuestVcpus; v++)
    while (vload(ctl_->vcpu[v].passes) == 0 && !guest_exited_[v] && !race_.stopping() &&
           std::chrono::steady_clock::now() < limit)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
}

void ConversionRaceDriver::collect_guest_results() {
  if (!ctl_) return;
  // (This race never asks for a zero pass, so CVM_RACE_NOT_ZERO does not occur.)
  report_guest_violations(race_, *ctl_, 1, kGuestVcpus,
                          "just written; no punch, and no conversion that may change contents, "
                          "overlapped the write");
}

void ConversionRaceDriver::final_checks() {
  const uint64_t it = race_.iteration();
  // Nothing races any more: every observation is definitive.
  check_states(0, pages_, it, "at the end of the race");
  if (bring(0, pages_, PageState::Shared, it, "at the end: making every page shared"))
    check_states(0, pages_, it, "after every page was made shared at the end");
  for (uint64_t p = 0; p < pages_; p++) read_page(p, "final check", it);
}

// --- the race ------------------------------------------------------------------------------------

void ConversionRaceDriver::run() {
  map_second_view();
  start_guest();
  const int workers = spawn_host_workers();
  wait_for_host_workers(workers);
  wait_for_guest_passes();
  drive();
  race_.join();
  collect_guest_results();
  final_checks();
}

void ConversionRaceDriver::map_second_view() {
  if (!in_place()) return;
  auto m = env_.gmem().map(env_.gmem().size());
  if (m)
    second_view_ = std::move(m.value());
  else
    race_.violation(0, "setup", "a second mapping of the guest_memfd: " + m.error().message());
}

int ConversionRaceDriver::spawn_host_workers() {
  const int writers = std::max(1, o_.writers);
  for (int w = 0; w < writers; w++)
    race_.spawn("writer " + std::to_string(w), [this, w](RaceWorker& me) {
      workers_started_.fetch_add(1);
      while (!race_.stopping()) {
        const uint64_t it = race_.iteration();
        const uint64_t p = host_.pick_owned(me.rng(), w);
        if (write_page(p, me.name(), it, false)) me.ops();
        Race::jitter(me.rng(), 20);
      }
    });
  for (int r = 0; r < o_.readers; r++)
    race_.spawn("reader " + std::to_string(r), [this](RaceWorker& me) {
      workers_started_.fetch_add(1);
      while (!race_.stopping()) {
        const uint64_t it = race_.iteration();
        read_page(Race::pick(me.rng(), 0, pages_ - 1), me.name(), it);
        me.ops();
      }
    });
  if (o_.punch) race_.spawn("puncher", [this](RaceWorker& me) { punch_hot_and_on_request(me); });
  return writers + o_.readers + (o_.punch ? 1 : 0);
}

void ConversionRaceDriver::punch_hot_and_on_request(RaceWorker& me) {
  workers_started_.fetch_add(1);
  uint64_t handled = 0;
  while (!race_.stopping()) {
    const uint64_t it = race_.iteration();
    const uint64_t req = punch_req_.load();
    if (req != handled) {
      const uint64_t finished_before = conv_finished_.load();
      punch(req_first_.load(), req_n_.load(), me.name(), it);
      done_conv_finished_before_.store(finished_before);
      done_conv_started_after_.store(conv_started_.load());
      handled = req;
      punch_done_.store(req);
      me.ops();
      continue;
    }
    const Race::Range x = pick_range(me.rng(), 0, pages_);
    punch(x.first, x.n, me.name(), it);
    me.ops();
    // Short pauses, watching for the driver's requests.
    for (int i = 0; i < 8 && punch_req_.load() == handled && !race_.stopping(); i++)
      Race::jitter(me.rng(), 25);
  }
}

void ConversionRaceDriver::wait_for_host_workers(int expected) {
  // The driver races only once every host thread runs (and the guest made a pass).
  const auto limit = std::chrono::steady_clock::now() + 10s;
  while (workers_started_.load() < expected && !race_.stopping() &&
         std::chrono::steady_clock::now() < limit)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  if (workers_started_.load() < expected && !race_.stopping())
    race_.violation(0, "setup",
                    "only " + std::to_string(workers_started_.load()) + " of " +
                        std::to_string(expected) + " host threads started within 10 s");
}

void ConversionRaceDriver::drive() {
  auto rng = race_.rng(0);
  while (race_.next_iteration()) {
    const uint64_t it = race_.iteration();
    if (ctl_) vstore(ctl_->iteration, it);
    // Two draws per iteration whatever happens in it (an iteration cut short by a violation
    // draws less from its own generator), so a replay makes the same choices in every
    // iteration.
    const uint64_t draw = Race::pick(rng, 0, 3);
    std::mt19937_64 g(rng());
    switch (iteration_kind(draw, it)) {
      case Kind::HotConversion:
        hot_conversion(g, it);
        break;
      case Kind::RoundTrip:
        round_trip(g, it);
        break;
      case Kind::PunchWhileConverting:
        if (in_place())
          punch_while_converting_in_place(g, it);
        else
          punch_while_converting_per_vm(g, it);
    }
    race_.ops();
  }
}

ConversionRaceDriver::Kind ConversionRaceDriver::iteration_kind(uint64_t draw, uint64_t it) const {
  // The first iterations make sure each checked kind runs at least once.
  if (o_.punch) {
    if (it == 0) return Kind::PunchWhileConverting;
    if (it == 1) return Kind::RoundTrip;
    return static_cast<Kind>(std::max<uint64_t>(draw, 1) - 1);
  }
  return it == 0 || draw == 0 ? Kind::RoundTrip : Kind::HotConversion;
}

void ConversionRaceDriver::record() const {
  ::testing::Test::RecordProperty("conversion_backend", env_.backend().name());
  ::testing::Test::RecordProperty("contents_preserved_expected", yes_no(o_.contents_preserved));
  ::testing::Test::RecordProperty(
      "guest", guest_vcpus_ ? "punch_race on vCPUs 1.." + std::to_string(guest_vcpus_)
                            : "none: " + no_guest_);
  // The counters, each recorded when the race has what it counts.
  enum When { kAlways, kPerVm, kPuncher };
  static const struct {
    const char* key;
    std::atomic<uint64_t> Stats::*counter;
    When when;
  } kCounters[] = {
      {"conversions", &Stats::conversions, kAlways},
      {"conversions_to_private", &Stats::to_private, kAlways},
      {"conversions_to_shared", &Stats::to_shared, kAlways},
      {"conversion_failures", &Stats::failures, kAlways},
      {"conversion_eintr_retries", &Stats::eintr_retries, kAlways},
      {"hot_conversions", &Stats::hot_conversions, kAlways},
      {"state_checks", &Stats::state_checks, kAlways},
      {"host_reads", &Stats::reads, kAlways},
      {"host_writes", &Stats::writes, kAlways},
      {"accesses_definitely_shared", &Stats::definitive_shared, kAlways},
      {"sigbus_definitely_private", &Stats::definitive_private, kAlways},
      {"accesses_during_conversion", &Stats::window_completed, kAlways},
      {"sigbus_during_conversion", &Stats::window_sigbus, kAlways},
      {"accesses_to_separate_shared_memory", &Stats::separate_accesses, kPerVm},
      {"round_trips", &Stats::round_trips, kAlways},
      {"pages_zeroed_by_round_trip", &Stats::zeroed_by_round_trip, kAlways},
      {"punches", &Stats::punches, kPuncher},
      {"punches_while_converting", &Stats::checked_punches, kPuncher},
      {"checked_punches_abandoned", &Stats::fills_punched, kPuncher},
      {"punches_overlapping_the_conversion", &Stats::overlapped_punches, kPuncher},
      {"reader_zero_checks", &Stats::reader_zero_checks, kPuncher},
  };
  for (const auto& c : kCounters) {
    if ((c.when == kPerVm && in_place()) || (c.when == kPuncher && !o_.punch)) continue;
    ::testing::Test::RecordProperty(c.key, std::to_string((stats_.*c.counter).load()));
  }
  for (int v = 1; v <= guest_vcpus_; v++)
    ::testing::Test::RecordProperty("guest_passes_vcpu" + std::to_string(v),
                                    std::to_string(stats_.guest_passes[v]));
  if (guest_vcpus_ > 0)
    ::testing::Test::RecordProperty("memory_fault_exits_reentered",
                                    std::to_string(stats_.memory_fault_exits->load()));
}

}  // namespace cvm::suites

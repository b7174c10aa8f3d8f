// Punch hole racing guest accesses (RACE-002). vCPUs run the punch_race payload
// (guests/include/cvmconf_guest/race.h): each passes over its own pages of a guest_memfd memslot
// again and again, checking that every word is 0 or its own pattern, writing its pattern and
// reading it back. The host punches seeded ranges meanwhile ("hot" punches), and in "checked"
// iterations makes one vCPU hold still (read only), punches part of its pages, checks through
// its mapping that they read zeroes, and has the vCPU check that it sees zeroes too (a guest
// that still sees its old pattern after the punch returned has a stale mapping). A host reader
// faults the same pages through the mapping concurrently. Any foreign, garbage, stale or lost
// value the guest sees is reported with the host iteration it happened in.
#include "guest_race.h"
#include "race_fixture.h"

namespace cvm::suites {
namespace {

constexpr int kVcpus = 2;
constexpr uint64_t kPagesPerVcpu = 8;
constexpr uint64_t kPages = kVcpus * kPagesPerVcpu;
constexpr uint32_t kTestSlot = 1;
// The guest checks and writes every kStride-th word of a page: guest memory accesses cost
// microseconds on some hosts (PVM), and a sample keeps the passes, and so the race, fast.
constexpr uint64_t kStride = 31;

const volatile uint64_t* page_words(const Mapping& map, uint64_t p) {
  return reinterpret_cast<const volatile uint64_t*>(map.data() + p * page_size());
}

// Starts punch_race on every vCPU, each over its own kPagesPerVcpu pages.
void start_punch_race(GuestVm& vm, cvm_race_ctl* ctl) {
  for (int v = 0; v < kVcpus; v++) {
    vstore(ctl->vcpu[v].req, CVM_RACE_REQ(0, CVM_RACE_MODE_RUN));
    auto started = vm.start(v, "punch_race", {CVM_TEST_MEM_GPA, kPagesPerVcpu, CVM_SCRATCH_GPA, kStride});
    ASSERT_TRUE(started.ok()) << testing::harness_error("starting vCPU " + std::to_string(v), started);
  }
}

// The host's side of the race: the vCPU runners, a host reader, and the driver's punches.
class GuestAccessRace {
 public:
  GuestAccessRace(Race& race, GuestVm& vm, cvm_race_ctl* ctl, const GuestMemfd& g, const Mapping& map)
      : race_(race), vm_(vm), ctl_(ctl), g_(g), map_(map) {
    race_.on_stop([ctl] { vstore(ctl->stop, uint64_t{1}); });
  }

  void spawn_workers() {
    const auto vcpu_timeout = guest_run_timeout(race_);
    for (int v = 0; v < kVcpus; v++)
      spawn_guest_runner(race_, vm_, v, vcpu_timeout, kPagesPerVcpu, exited_[v], final_passes_[v]);
    race_.spawn("host reader", [this](RaceWorker& me) { read_pages(me); });
  }

  // Punches until the race's budget is used up: half the iterations (and always the first) a
  // checked punch, the others a hot one.
  void drive() {
    auto rng = race_.rng(0);
    while (race_.next_iteration()) {
      const uint64_t it = race_.iteration();
      vstore(ctl_->iteration, it);
      if (it == 0 || Race::chance(rng, 1, 2)) {
        if (!checked_punch(rng, it)) break;
      } else {
        hot_punch(rng, it);
      }
      race_.ops();
    }
  }

  uint64_t checked() const { return checked_; }
  uint64_t hot() const { return hot_; }
  uint64_t final_passes(int v) const { return final_passes_[v]; }

 private:
  // Reads seeded pages through the mapping: every word is 0 or its owner vCPU's pattern.
  void read_pages(RaceWorker& me) {
    const uint64_t words = page_size() / sizeof(uint64_t);
    std::vector<uint64_t> buf(words);
    while (!race_.stopping()) {
      const uint64_t it = race_.iteration();
      const uint64_t p = Race::pick(me.rng(), 0, kPages - 1);
      const volatile uint64_t* w = page_words(map_, p);
      for (uint64_t i = 0; i < words; i++) buf[i] = w[i];
      me.ops();
      for (uint64_t i = 0; i < words; i++) {
        uint64_t x = buf[i];
        if (guest_word_ok(x, p / kPagesPerVcpu, p)) continue;
        race_.violation(it, me.name(), "page " + std::to_string(p) + " word " + std::to_string(i) +
                                           " reads " + hex(x) + " through the mapping: not 0 and not vCPU " +
                                           std::to_string(p / kPagesPerVcpu) + "'s pattern for it");
        break;
      }
    }
  }

  // Waits (bounded) until cond holds or vCPU v has left its loop.
  bool wait_for(int v, const std::function<bool()>& cond) {
    auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!cond()) {
      if (exited_[v] || std::chrono::steady_clock::now() > limit) return false;
      std::this_thread::yield();
    }
    return true;
  }

  bool punch(uint64_t first, uint64_t n, uint64_t it) {
    const uint64_t ps = page_size();
    auto r = guest_visible_punch(ctl_, [&] { return g_.punch_hole(first * ps, n * ps); });
    if (!r) race_.violation(it, "puncher", "punching pages [" + std::to_string(first) + ", " +
                                               std::to_string(first + n) + "): " + r.error().message());
    return r.ok();
  }

  void hot_punch(std::mt19937_64& rng, uint64_t it) {
    const Race::Range r = Race::pick_range(rng, 0, kPages, 4);
    Race::jitter(rng, 100);
    punch(r.first, r.n, it);
    hot_++;
  }

  // vCPU v holds still, part of its pages is punched, and first the host, then the vCPU must
  // read zeroes there. False when the vCPU did not answer (the race stops).
  bool checked_punch(std::mt19937_64& rng, uint64_t it) {
    const int v = static_cast<int>(Race::pick(rng, 0, kVcpus - 1));
    const auto [zf, zn] = Race::pick_range(rng, 0, kPagesPerVcpu, 3);
    cvm_race_vcpu& vc = ctl_->vcpu[v];
    const uint64_t hold = CVM_RACE_REQ(epoch_++, CVM_RACE_MODE_HOLD);
    vstore(vc.req, hold);
    if (!wait_for(v, [&] { return vload(vc.ack) == hold; })) {
      race_.violation(it, "puncher", "vCPU " + std::to_string(v) + " did not hold still within 5 s");
      return false;
    }
    const uint64_t first = static_cast<uint64_t>(v) * kPagesPerVcpu + zf;
    const bool ok = punch(first, zn, it) && host_reads_zeroes(v, first, zn, it);
    // Then the guest's: a full pass in which the punched pages must read zeroes.
    vstore(vc.zero_first, zf);
    vstore(vc.zero_npages, zn);
    const uint64_t zero = CVM_RACE_REQ(epoch_++, CVM_RACE_MODE_ZERO);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    vstore(vc.req, ok ? zero : CVM_RACE_REQ(epoch_++, CVM_RACE_MODE_RUN));
    if (ok && !wait_for(v, [&] { return vload(vc.done) == zero; })) {
      race_.violation(it, "puncher", "vCPU " + std::to_string(v) + " did not finish its check pass within 5 s");
      return false;
    }
    vstore(vc.req, CVM_RACE_REQ(epoch_++, CVM_RACE_MODE_RUN));
    checked_++;
    return true;
  }

  // The host's view of a checked punch of vCPU v's pages [first, first+n): they read zeroes.
  bool host_reads_zeroes(int v, uint64_t first, uint64_t n, uint64_t it) {
    for (uint64_t p = first; p < first + n; p++) {
      const volatile uint64_t* w = page_words(map_, p);
      const uint64_t stale = cvm_race_tag(static_cast<uint64_t>(v), p, 1);
      for (uint64_t i = 0; i < page_size() / sizeof(uint64_t); i++) {
        uint64_t x = race_.observe(w[i], stale, it);
        if (x != 0) {
          race_.violation(it, "puncher", "page " + std::to_string(p) + " word " + std::to_string(i) +
                                             " reads " + hex(x) + " through the mapping after the punch returned");
          return false;
        }
      }
    }
    return true;
  }

  Race& race_;
  GuestVm& vm_;
  cvm_race_ctl* ctl_;
  const GuestMemfd& g_;
  const Mapping& map_;
  std::atomic<bool> exited_[kVcpus] = {};
  uint64_t final_passes_[kVcpus] = {};
  uint64_t epoch_ = 1, checked_ = 0, hot_ = 0;
};

CVM_TEST_P(PunchRace, GuestAccesses, "RACE-002") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  CVM_SKIP_IF(payloads_unsupported());
  if (platform().confidential())
    GTEST_SKIP() << testing::kNotImplemented << "the guest race reads its control block and "
                 << "pages from the host; a " << platform().id() << " guest would have to share "
                 << "them back first, which the race payload does not do";
  GuestVmOptions o;
  o.platform = &platform();
  o.vcpus = kVcpus;
  auto gv = GuestVm::create(kvm(), o);
  ASSERT_TRUE(gv.ok()) << testing::harness_error("GuestVm::create", gv.error());
  GuestVm& vm = *gv.value();
  CVM_ASSIGN_OR_FAIL(GuestMemfd g, vm.vm().create_guest_memfd(kPages * page_size(), kSharedGmem));
  Mapping map = map_whole(g);
  ASSERT_TRUE(map.valid());
  // This host needs the guest_memfd's mapping as the slot's userspace_addr.
  ASSERT_TRUE(ok(vm.vm().bind_gmem(kTestSlot, CVM_TEST_MEM_GPA, g, 0, kPages * page_size(), map.data())));
  cvm_race_ctl* ctl = reset_race_ctl(vm);
  ASSERT_NO_FATAL_FAILURE(start_punch_race(vm, ctl));

  Race race(defaults());
  GuestAccessRace gr(race, vm, ctl, g, map);
  gr.spawn_workers();
  gr.drive();
  race.join();  // sets ctl->stop; the vCPUs report their last pass
  report_guest_violations(race, *ctl, 0, kVcpus - 1, "just written");

  RaceSummary s = race.finish();
  record("checked_punches", gr.checked());
  record("hot_punches", gr.hot());
  for (int v = 0; v < kVcpus; v++)
    record(("guest_passes_vcpu" + std::to_string(v)).c_str(), gr.final_passes(v));
  EXPECT_GT(s.iterations, 0u);
  EXPECT_GT(gr.checked(), 0u) << "no checked punch ran";
  if (coverage_expected(s, 4)) {
    for (int v = 0; v < kVcpus; v++)
      EXPECT_GT(gr.final_passes(v), 0u) << "vCPU " << v << " made no pass over its memory";
  }
}

}  // namespace
}  // namespace cvm::suites

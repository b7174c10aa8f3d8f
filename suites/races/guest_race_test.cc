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
#include "punch_race.h"

namespace cvm::suites {
namespace {

constexpr int kVcpus = 2;
constexpr uint64_t kPagesPerVcpu = 8;
constexpr uint64_t kPages = kVcpus * kPagesPerVcpu;
constexpr uint32_t kTestSlot = 1;
// The guest checks and writes every kStride-th word of a page: guest memory accesses cost
// microseconds on some hosts (PVM), and a sample keeps the passes, and so the race, fast.
constexpr uint64_t kStride = 31;

CVM_TEST_P(PunchRace, GuestAccesses, "RACE-002") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  CVM_SKIP_IF(payloads_unsupported());
  if (platform().confidential())
    GTEST_SKIP() << testing::kNotImplemented << "the guest race reads its control block and "
                 << "pages from the host; a " << platform().id() << " guest would have to share "
                 << "them back first, which the race payload does not do";
  const uint64_t ps = page_size();
  GuestVmOptions o;
  o.platform = &platform();
  o.vcpus = kVcpus;
  auto gv = GuestVm::create(kvm(), o);
  ASSERT_TRUE(gv.ok()) << testing::harness_error("GuestVm::create", gv.error());
  GuestVm& vm = *gv.value();
  auto gm = vm.vm().create_guest_memfd(kPages * ps, kSharedGmem);
  ASSERT_TRUE(gm.ok()) << gm.error();
  GuestMemfd& g = gm.value();
  Mapping map = map_whole(g);
  ASSERT_TRUE(map.valid());
  MemslotSpec slot;
  slot.slot = kTestSlot;
  slot.flags = uapi::kMemGuestMemfd;
  slot.gpa = CVM_TEST_MEM_GPA;
  slot.size = kPages * ps;
  slot.hva = reinterpret_cast<uint64_t>(map.data());  // this host needs the gmem mapping here
  slot.gmem_fd = g.fd();
  ASSERT_TRUE(vm.vm().set_memslot(slot).ok());

  cvm_race_ctl* ctl = reset_race_ctl(vm);
  for (int v = 0; v < kVcpus; v++) {
    vstore(ctl->vcpu[v].req, CVM_RACE_REQ(0, CVM_RACE_MODE_RUN));
    auto started = vm.start(v, "punch_race", {CVM_TEST_MEM_GPA, kPagesPerVcpu, CVM_SCRATCH_GPA, kStride});
    ASSERT_TRUE(started.ok()) << testing::harness_error("starting vCPU " + std::to_string(v), started);
  }

  Race race(defaults());
  race.on_stop([ctl] { vstore(ctl->stop, uint64_t{1}); });
  const auto vcpu_timeout = guest_run_timeout(race);
  std::atomic<bool> exited[kVcpus] = {};
  uint64_t final_passes[kVcpus] = {};
  for (int v = 0; v < kVcpus; v++)
    spawn_guest_runner(race, vm, v, vcpu_timeout, kPagesPerVcpu, exited[v], final_passes[v]);
  race.spawn("host reader", [&](RaceWorker& me) {
    const uint64_t words = ps / sizeof(uint64_t);
    std::vector<uint64_t> buf(words);
    while (!race.stopping()) {
      const uint64_t it = race.iteration();
      const uint64_t p = Race::pick(me.rng(), 0, kPages - 1);
      const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(map.data() + p * ps);
      for (uint64_t i = 0; i < words; i++) buf[i] = w[i];
      me.ops();
      for (uint64_t i = 0; i < words; i++) {
        uint64_t x = buf[i];
        if (guest_word_ok(x, p / kPagesPerVcpu, p)) continue;
        race.violation(it, me.name(), "page " + std::to_string(p) + " word " + std::to_string(i) +
                                          " reads " + hex(x) + " through the mapping: not 0 and not vCPU " +
                                          std::to_string(p / kPagesPerVcpu) + "'s pattern for it");
        break;
      }
    }
  });

  // Waits (bounded) until cond holds or vCPU v has left its loop.
  auto wait_for = [&](int v, const std::function<bool()>& cond) {
    auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!cond()) {
      if (exited[v] || std::chrono::steady_clock::now() > limit) return false;
      std::this_thread::yield();
    }
    return true;
  };
  auto punch = [&](uint64_t first, uint64_t n, uint64_t it) {
    auto r = guest_visible_punch(ctl, [&] { return g.punch_hole(first * ps, n * ps); });
    if (!r) race.violation(it, "puncher", "punching pages [" + std::to_string(first) + ", " +
                                              std::to_string(first + n) + "): " + r.error().message());
    return r.ok();
  };

  uint64_t epoch = 1, checked = 0, hot = 0;
  auto rng = race.rng(0);
  while (race.next_iteration()) {
    const uint64_t it = race.iteration();
    vstore(ctl->iteration, it);
    if (it == 0 || Race::chance(rng, 1, 2)) {  // the first punch is always a checked one
      const int v = static_cast<int>(Race::pick(rng, 0, kVcpus - 1));
      const auto [zf, zn] = Race::pick_range(rng, 0, kPagesPerVcpu, 3);
      cvm_race_vcpu& vc = ctl->vcpu[v];
      const uint64_t hold = CVM_RACE_REQ(epoch++, CVM_RACE_MODE_HOLD);
      vstore(vc.req, hold);
      if (!wait_for(v, [&] { return vload(vc.ack) == hold; })) {
        race.violation(it, "puncher", "vCPU " + std::to_string(v) + " did not hold still within 5 s");
        break;
      }
      const uint64_t first = static_cast<uint64_t>(v) * kPagesPerVcpu + zf;
      bool ok = punch(first, zn, it);
      // The host's view first: the punched pages read zeroes.
      for (uint64_t p = first; ok && p < first + zn; p++) {
        const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(map.data() + p * ps);
        const uint64_t stale = cvm_race_tag(static_cast<uint64_t>(v), p, 1);
        for (uint64_t i = 0; i < ps / sizeof(uint64_t); i++) {
          uint64_t x = race.observe(w[i], stale, it);
          if (x != 0) {
            race.violation(it, "puncher", "page " + std::to_string(p) + " word " + std::to_string(i) +
                                              " reads " + hex(x) + " through the mapping after the punch returned");
            ok = false;
            break;
          }
        }
      }
      // Then the guest's: a full pass in which the punched pages must read zeroes.
      vstore(vc.zero_first, zf);
      vstore(vc.zero_npages, zn);
      const uint64_t zero = CVM_RACE_REQ(epoch++, CVM_RACE_MODE_ZERO);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      vstore(vc.req, ok ? zero : CVM_RACE_REQ(epoch++, CVM_RACE_MODE_RUN));
      if (ok && !wait_for(v, [&] { return vload(vc.done) == zero; })) {
        race.violation(it, "puncher", "vCPU " + std::to_string(v) + " did not finish its check pass within 5 s");
        break;
      }
      vstore(vc.req, CVM_RACE_REQ(epoch++, CVM_RACE_MODE_RUN));
      checked++;
    } else {
      const Race::Range r = Race::pick_range(rng, 0, kPages, 4);
      Race::jitter(rng, 100);
      punch(r.first, r.n, it);
      hot++;
    }
    race.ops();
  }
  race.join();  // sets ctl->stop; the vCPUs report their last pass
  report_guest_violations(race, *ctl, 0, kVcpus - 1, "just written");
  RaceSummary s = race.finish();
  record("checked_punches", checked);
  record("hot_punches", hot);
  for (int v = 0; v < kVcpus; v++)
    record(("guest_passes_vcpu" + std::to_string(v)).c_str(), final_passes[v]);
  EXPECT_GT(s.iterations, 0u);
  EXPECT_GT(checked, 0u) << "no checked punch ran";
  if (coverage_expected(s, 4)) {
    for (int v = 0; v < kVcpus; v++)
      EXPECT_GT(final_passes[v], 0u) << "vCPU " << v << " made no pass over its memory";
  }
}

}  // namespace
}  // namespace cvm::suites

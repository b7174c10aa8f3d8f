// GuestVm on the real kernel: booting payloads, ucalls, watchdog, guest faults, command loop.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "cvmconf/guest_vm.h"
#include "cvmconf/probe.h"

namespace cvm {
namespace {

using Kind = UcallEvent::Kind;
using namespace std::chrono_literals;

class GuestVmTest : public ::testing::TestWithParam<BootMemory> {
 protected:
  void SetUp() override {
    auto k = Kvm::open();
    if (!k) GTEST_SKIP() << "capability absent: " << k.error();
    kvm.emplace(std::move(k.value()));
    if (auto why = default_platform().cannot_run_payloads()) GTEST_SKIP() << *why;
    if (GetParam() == BootMemory::GuestMemfd) {
      const auto& c = cached_capabilities();
      const auto* d = c.vm(default_platform().vm_type());
      if (!d || d->guest_memfd_flags < 3)
        GTEST_SKIP() << "capability absent: GUEST_MEMFD_FLAG_MMAP|INIT_SHARED for the default VM";
    }
  }
  std::unique_ptr<GuestVm> make(int vcpus = 1) {
    GuestVmOptions o;
    o.vcpus = vcpus;
    o.boot_memory = GetParam();
    o.default_timeout = 10s;
    auto g = GuestVm::create(*kvm, o);
    EXPECT_TRUE(g.ok()) << g.error();
    return g.ok() ? std::move(g.value()) : nullptr;
  }
  std::optional<Kvm> kvm;
};

TEST_P(GuestVmTest, HelloPrintsSyncsWithValuesAndReturns) {
  auto g = make();
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(0, "hello", {0xabc}).ok());
  UcallEvent e = g->run(0);
  ASSERT_EQ(e.kind, Kind::Sync) << e.describe();
  EXPECT_EQ(e.stage(), 1u);
  ASSERT_EQ(e.args.size(), 3u);
  EXPECT_EQ(e.args[1], 0x1111u);
  EXPECT_EQ(e.args[2], 0xabcu);
  g->reply(0, {41});
  e = g->run(0);
  ASSERT_EQ(e.kind, Kind::Sync) << e.describe();
  EXPECT_EQ(e.stage(), 2u);
  EXPECT_EQ(e.args.at(1), 42u) << "the guest must see the host's reply";
  e = g->run(0);
  EXPECT_EQ(e.kind, Kind::Done) << e.describe();
  auto prints = g->prints(0);
  ASSERT_EQ(prints.size(), 1u);
  EXPECT_EQ(prints[0], "hello from vcpu 0 of 1");
}

TEST_P(GuestVmTest, GuestAssertionCarriesFileLineAndValues) {
  auto g = make();
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(0, "assert_fail", {7}).ok());
  UcallEvent e = g->run(0);
  ASSERT_EQ(e.kind, Kind::Assert) << e.describe();
  EXPECT_EQ(e.file, "guests/common/payloads/selftest.c");
  EXPECT_GT(e.line, 0u);
  EXPECT_EQ(e.text, "x == 42");
  EXPECT_EQ(e.args, (std::vector<uint64_t>{7, 42}));
}

TEST_P(GuestVmTest, GuestPageFaultIsReportedAsException) {
  auto g = make();
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(0, "page_fault").ok());
  UcallEvent e = g->run(0);
  ASSERT_EQ(e.kind, Kind::Exception) << e.describe();
  ASSERT_EQ(e.args.size(), 4u);
#if defined(__aarch64__)
  EXPECT_EQ(e.args[0], 4u) << "vector: synchronous, current EL with SP_EL1";
  EXPECT_EQ(e.args[1] >> 26, 0x25u) << "ESR_EL1.EC: data abort without a change in EL";
  EXPECT_EQ(e.args[3], 0x8u) << "FAR_EL1 is the faulting address";
#else
  EXPECT_EQ(e.args[0], 14u) << "vector #PF";
  EXPECT_EQ(e.args[3], 0x8u) << "CR2 is the faulting address";
#endif
}

TEST_P(GuestVmTest, WatchdogTurnsAStuckVcpuIntoATimeout) {
  auto g = make();
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(0, "spin").ok());
  auto t0 = std::chrono::steady_clock::now();
  UcallEvent e = g->run(0, 300ms);
  auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_EQ(e.kind, Kind::Timeout) << e.describe();
  EXPECT_NE(e.text.find("made no exit within 300 ms"), std::string::npos) << e.text;
  EXPECT_NE(e.text.find("stuck at "), std::string::npos) << e.text;
  EXPECT_LT(took, 5s);
}

TEST_P(GuestVmTest, KickStopsARunningVcpuFromAnotherThread) {
  auto g = make();
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(0, "spin").ok());
  std::thread kicker([&] {
    std::this_thread::sleep_for(100ms);
    g->vcpu(0).kick();
  });
  UcallEvent e = g->run(0, 20s);
  kicker.join();
  ASSERT_EQ(e.kind, Kind::Exit) << e.describe();
  EXPECT_EQ(e.exit.kind, ExitKind::Interrupted);
}

TEST_P(GuestVmTest, CommandLoopReadsAndWritesGuestMemory) {
  auto g = make();
  ASSERT_TRUE(g);
  auto c = GuestCmd::start(*g, 0);
  ASSERT_TRUE(c.ok()) << c.error();
  const uint64_t gpa = CVM_SCRATCH_GPA;
  std::memset(g->boot_hva(gpa), 0x5a, 64);
  auto r = c->read8(gpa + 3);
  ASSERT_TRUE(r.ok) << r.event.describe();
  EXPECT_EQ(r.value, 0x5au);
  ASSERT_TRUE(c->fill8(gpa, 64, 0xa5).ok);
  EXPECT_EQ(g->boot_hva(gpa)[63], 0xa5);
  auto chk = c->check8(gpa, 64, 0xa5);
  ASSERT_TRUE(chk.ok);
  EXPECT_EQ(chk.value, UINT64_MAX);
  g->boot_hva(gpa)[10] = 0;
  chk = c->check8(gpa, 64, 0xa5);
  EXPECT_EQ(chk.value, 10u);
  EXPECT_TRUE(c->exit().ok);
}

TEST_P(GuestVmTest, SeveralVcpusRunInParallel) {
  auto g = make(4);
  ASSERT_TRUE(g);
  std::vector<std::thread> ts;
  std::atomic<int> ok{0};
  for (int i = 0; i < 4; i++) {
    ASSERT_TRUE(g->start(i, "hello", {static_cast<uint64_t>(i)}).ok());
    ts.emplace_back([&, i] {
      UcallEvent e = g->run(i);
      if (e.kind == Kind::Sync && e.args.at(2) == static_cast<uint64_t>(i)) ok++;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(ok.load(), 4);
}

#if defined(__aarch64__)
// PSCI CPU_ON: vCPU 1 is powered off; vCPU 0 starts it, and it runs the payload the host put in
// its boot info after setting up its own MMU (it entered with the MMU off).
TEST_P(GuestVmTest, PsciCpuOnStartsAPoweredOffVcpu) {
  auto g = make(2);
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(1, "hello", {0x77}).ok());
  kvm_mp_state off{KVM_MP_STATE_STOPPED};
  ASSERT_TRUE(g->vcpu(1).ioctl(KVM_SET_MP_STATE, &off, "KVM_SET_MP_STATE").ok());
  UcallEvent e1;
  std::thread second([&] { e1 = g->run(1, 20s); });
  auto started = g->start(0, "psci_cpu_on", {1});
  UcallEvent e0;
  if (started.ok()) e0 = g->run(0);
  if (!started.ok() || e0.kind != Kind::Sync) g->vcpu(1).kick();
  second.join();
  ASSERT_TRUE(started.ok()) << started.error();
  ASSERT_EQ(e0.kind, Kind::Sync) << e0.describe();
  EXPECT_EQ(e0.args.at(1), 0u) << "PSCI CPU_ON must return SUCCESS";
  ASSERT_EQ(e1.kind, Kind::Sync) << e1.describe();
  EXPECT_EQ(e1.args.at(2), 0x77u);
  auto prints = g->prints(1);
  ASSERT_EQ(prints.size(), 1u);
  EXPECT_EQ(prints[0], "hello from vcpu 1 of 2");
}
#endif

TEST_P(GuestVmTest, UnknownPayloadIsAnError) {
  auto g = make();
  ASSERT_TRUE(g);
  auto r = g->start(0, "no_such_payload");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.err(), ENOENT);
}

// A guest hypercall must never hang the harness: the guest either gets KVM's answer (the exit
// was not enabled, so KVM answers -KVM_ENOSYS) or, on kernels where the vmcall never completes
// (e.g. this host's PVM backend), the watchdog reports a timeout within its budget.
TEST_P(GuestVmTest, HypercallIsAnsweredOrTimesOut) {
  auto g = make();
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->start(0, "map_gpa_range", {CVM_TEST_MEM_GPA, 1, 0}).ok());
  UcallEvent e = g->run(0, 2s);
  if (e.kind == Kind::Sync) {
#if defined(__aarch64__)
    // An unknown SMCCC function: KVM answers SMCCC_RET_NOT_SUPPORTED.
    EXPECT_EQ(e.args.at(1), static_cast<uint64_t>(-1)) << "NOT_SUPPORTED expected";
#else
    EXPECT_EQ(e.args.at(1), static_cast<uint64_t>(-1000)) << "-KVM_ENOSYS expected";
#endif
  } else {
    EXPECT_EQ(e.kind, Kind::Timeout) << e.describe();
  }
}

INSTANTIATE_TEST_SUITE_P(Boot, GuestVmTest,
                         ::testing::Values(BootMemory::Anonymous, BootMemory::GuestMemfd),
                         [](const auto& pinfo) {
                           return pinfo.param == BootMemory::Anonymous ? "anon" : "gmem";
                         });

}  // namespace
}  // namespace cvm

// Punch hole racing shared <-> private conversion, and conversion racing faults (RACE-006).
//
// Both races use the VM type's conversion back-end, chosen by the capability probe exactly as
// the conversion suite chooses it (probed_conversion_selection, conversion_env.h), in the same
// environment (in place: the guest_memfd mapping is the host's view and the memslot's host
// mapping, and SIGBUS means private; per-VM attributes: shared memory is separate host memory and
// the guest observes the state). Without a back-end they SKIP with the probe's exact reason.
// What they race and which invariants they check: conversion_race.h.
#include "conversion_race.h"

#include "race_fixture.h"

namespace cvm::suites {
namespace {

// The conversion races on the VM type's conversion back-end. SetUp builds the environment, or
// SKIPs with the probe's reason when there is no back-end. The property conversion_backend is
// recorded there only for a race that does not run (ConversionRaceDriver::record records it for
// one that does).
class ConversionRace : public RaceTest {
 protected:
  void SetUp() override {
    RaceTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    const ConversionSelection sel = probed_conversion_selection(platform());
    if (auto why = conversion_unavailable(platform().id(), sel)) {
      RecordProperty("conversion_backend", "none: " + sel.reason);
      GTEST_SKIP() << *why;
    }
    const ConversionAbi abi = *sel.backend;
    const std::optional<std::string> no_payloads = payloads_unsupported();
    const ConversionEnvOptions o =
        ConversionRaceDriver::env_options(!no_payloads || conversion_env_needs_guest(abi));
    make_conversion_env(env_, kvm(), platform(), vm_caps(), abi, o);
    if (!env_) RecordProperty("conversion_backend", conversion_abi_name(abi));
    if (IsSkipped()) return;  // the environment's reason
    ASSERT_NE(env_, nullptr) << "no environment to race in (the harness error above says why)";
    if (!o.guest) RecordProperty("guest_checks", "skipped: " + no_payloads.value_or("no guest"));
  }

  // Races conversions (with the puncher, or without) for the race's budget, records the
  // counters and checks what every conversion race must have done: raced at all, and (when it
  // ran long enough, see coverage_) exercised each of its checks.
  RaceSummary run_race(bool punch) {
    ConversionRaceOptions o;
    o.punch = punch;
    o.contents_preserved = content_preserved_expected(env_->abi(), platform());
    race_.emplace(defaults());
    driver_.emplace(*race_, *env_, o);
    driver_->run();
    RaceSummary s = race_->finish();
    driver_->record();
    coverage_ = coverage_expected(s);
    expect_raced(s);
    return s;
  }

  const ConversionRaceDriver::Stats& stats() const { return driver_->stats(); }

  std::unique_ptr<ConversionEnv> env_;
  std::optional<Race> race_;
  std::optional<ConversionRaceDriver> driver_;  // joins the race's workers: after race_
  bool coverage_ = false;

 private:
  void expect_raced(const RaceSummary& s) {
    const auto& st = stats();
    const uint64_t judged = st.definitive_shared.load() + st.definitive_private.load() +
                            st.window_completed.load() + st.window_sigbus.load() +
                            st.separate_accesses.load();
    EXPECT_GT(s.iterations, 0u);
    EXPECT_GT(st.conversions.load(), 0u) << "no conversion ran: nothing was raced";
    EXPECT_GT(judged, 0u) << "no host access was checked";
    if (coverage_) expect_every_check_exercised(s);
  }

  void expect_every_check_exercised(const RaceSummary& s) {
    const auto& st = stats();
    EXPECT_GT(st.to_private.load(), 0u) << "no conversion to private ran";
    EXPECT_GT(st.to_shared.load(), 0u) << "no conversion to shared ran";
    EXPECT_GT(st.reads.load(), 0u) << "no host reader ran";
    EXPECT_GT(st.writes.load(), 0u) << "no host writer ran";
    EXPECT_GT(st.state_checks.load(), 0u) << "no page state was checked";
    if (s.violations == 0) {
      EXPECT_GT(st.round_trips.load(), 0u) << "no round trip through private completed";
    }
    if (env_->in_place()) {
      EXPECT_GT(st.definitive_private.load(), 0u)
          << "no host access hit a page that was surely private: the SIGBUS rule was not exercised";
      EXPECT_GT(st.definitive_shared.load(), 0u)
          << "no host access hit a page that was surely shared";
    }
    if (driver_->has_guest()) {
      for (int v = 1; v <= ConversionRaceDriver::kGuestVcpus; v++)
        EXPECT_GT(st.guest_passes[v], 0u) << "vCPU " << v << " made no pass over its pages";
    }
  }
};

CVM_TEST_P(ConversionRace, VsPunch, "RACE-006") {
  const RaceSummary s = run_race(/*punch=*/true);
  // A punch lands inside a conversion only now and then: with a few iterations (a short
  // --duration, a slow TCG guest) none may, which says nothing about the kernel. Like every
  // coverage check, it needs enough iterations (coverage_checks says when it was skipped).
  if (coverage_ && s.violations == 0) {
    EXPECT_GT(stats().checked_punches.load(), 0u) << "no range was punched while converting";
  }
  if (coverage_) {
    EXPECT_GT(stats().punches.load(), stats().checked_punches.load())
        << "the puncher made no hot punch";
  }
}

CVM_TEST_P(ConversionRace, VsFaults, "RACE-006") {
  run_race(/*punch=*/false);
  if (coverage_) {
    EXPECT_GT(stats().hot_conversions.load(), 0u) << "no conversion raced the faults";
  }
}

CVM_INSTANTIATE_FOR_PLATFORMS(ConversionRace);

}  // namespace
}  // namespace cvm::suites

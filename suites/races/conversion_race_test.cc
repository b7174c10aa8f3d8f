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

// The back-end of p's VM type and an environment for the conversion races in env; leaves env
// empty after a SKIP (no back-end: the probe's reason) or a failure. The property
// conversion_backend is recorded here only for a race that does not run (ConversionRace::record
// records it for one that does).
void make_race_env(const Kvm& kvm, const Platform& p, const VmTypeCaps& caps,
                   std::unique_ptr<ConversionEnv>& env) {
  env.reset();
  const ConversionSelection sel = probed_conversion_selection(p);
  if (auto why = conversion_unavailable(p.id(), sel)) {
    ::testing::Test::RecordProperty("conversion_backend", "none: " + sel.reason);
    GTEST_SKIP() << *why;
  }
  const ConversionAbi abi = *sel.backend;
  const std::optional<std::string> no_payloads = payloads_unsupported(p);
  const ConversionEnvOptions o =
      ConversionRace::env_options(!no_payloads || conversion_env_needs_guest(abi));
  make_conversion_env(env, kvm, p, caps, abi, o);
  if (!env) {
    ::testing::Test::RecordProperty("conversion_backend", conversion_abi_name(abi));
    return;
  }
  if (!o.guest)
    ::testing::Test::RecordProperty("guest_checks", "skipped: " + no_payloads.value_or("no guest"));
}

// What every conversion race must have done before it may pass: raced at all, and (when it ran
// long enough) exercised each of its checks.
void expect_raced(const ConversionRace& cr, const RaceSummary& s, bool in_place, bool coverage) {
  const auto& st = cr.stats();
  const uint64_t judged = st.definitive_shared.load() + st.definitive_private.load() +
                          st.window_completed.load() + st.window_sigbus.load() +
                          st.separate_accesses.load();
  EXPECT_GT(s.iterations, 0u);
  EXPECT_GT(st.conversions.load(), 0u) << "no conversion ran: nothing was raced";
  EXPECT_GT(judged, 0u) << "no host access was checked";
  if (!coverage) return;
  EXPECT_GT(st.to_private.load(), 0u) << "no conversion to private ran";
  EXPECT_GT(st.to_shared.load(), 0u) << "no conversion to shared ran";
  EXPECT_GT(st.reads.load(), 0u) << "no host reader ran";
  EXPECT_GT(st.writes.load(), 0u) << "no host writer ran";
  EXPECT_GT(st.state_checks.load(), 0u) << "no page state was checked";
  if (s.violations == 0) {
    EXPECT_GT(st.round_trips.load(), 0u) << "no round trip through private completed";
  }
  if (in_place) {
    EXPECT_GT(st.definitive_private.load(), 0u)
        << "no host access hit a page that was surely private: the SIGBUS rule was not exercised";
    EXPECT_GT(st.definitive_shared.load(), 0u)
        << "no host access hit a page that was surely shared";
  }
  if (cr.has_guest()) {
    for (int v = 1; v <= ConversionRace::kGuestVcpus; v++)
      EXPECT_GT(st.guest_passes[v], 0u) << "vCPU " << v << " made no pass over its pages";
  }
}

CVM_TEST_P(PunchRace, ConversionVsPunch, "RACE-006") {
  std::unique_ptr<ConversionEnv> env;
  make_race_env(kvm(), platform(), vm_caps(), env);
  if (!env) return;
  ConversionRaceOptions o;
  o.punch = true;
  o.contents_preserved = content_preserved_expected(env->abi(), platform());
  Race race(defaults());
  ConversionRace cr(race, *env, o);
  cr.run();
  RaceSummary s = race.finish();
  cr.record();
  const bool coverage = coverage_expected(s);
  expect_raced(cr, s, env->in_place(), coverage);
  if (s.violations == 0) {
    EXPECT_GT(cr.stats().checked_punches.load(), 0u) << "no range was punched while converting";
  }
  if (coverage) {
    EXPECT_GT(cr.stats().punches.load(), cr.stats().checked_punches.load())
        << "the puncher made no hot punch";
  }
}

CVM_TEST_P(PunchRace, ConversionVsFaults, "RACE-006") {
  std::unique_ptr<ConversionEnv> env;
  make_race_env(kvm(), platform(), vm_caps(), env);
  if (!env) return;
  ConversionRaceOptions o;
  o.punch = false;
  o.contents_preserved = content_preserved_expected(env->abi(), platform());
  Race race(defaults());
  ConversionRace cr(race, *env, o);
  cr.run();
  RaceSummary s = race.finish();
  cr.record();
  const bool coverage = coverage_expected(s);
  expect_raced(cr, s, env->in_place(), coverage);
  if (coverage) {
    EXPECT_GT(cr.stats().hot_conversions.load(), 0u) << "no conversion raced the faults";
  }
}

}  // namespace
}  // namespace cvm::suites

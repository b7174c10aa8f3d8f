// /dev/kmsg record parsing and splat classification.
#include <gtest/gtest.h>

#include "cvmconf/kmsg.h"

namespace cvm {
namespace {

TEST(KmsgParse, ParsesHeaderAndText) {
  auto r = parse_kmsg_record("4,2310,123456789,-;WARNING: CPU: 1 PID: 5 at mm/gup.c:10 f+0x1/0x2\n");
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->priority, 4);
  EXPECT_EQ(r->facility, 0);
  EXPECT_EQ(r->seq, 2310u);
  EXPECT_EQ(r->usec, 123456789u);
  EXPECT_EQ(r->text, "WARNING: CPU: 1 PID: 5 at mm/gup.c:10 f+0x1/0x2");
  EXPECT_EQ(r->splat, "WARNING");
}

TEST(KmsgParse, UserFacilityAndContinuationLines) {
  auto r = parse_kmsg_record("12,7,99,-,caller=T1;hello\n SUBSYSTEM=kvm\n DEVICE=x\n");
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->facility, 1);
  EXPECT_EQ(r->priority, 4);
  EXPECT_EQ(r->text, "hello");
}

TEST(KmsgParse, UnescapesHexSequences) {
  auto r = parse_kmsg_record("6,1,1,-;a\\x09b\\x5cc\n");
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->text, "a\tb\\c");
}

TEST(KmsgParse, RejectsMalformedRecords) {
  EXPECT_FALSE(parse_kmsg_record("").has_value());
  EXPECT_FALSE(parse_kmsg_record("no separator").has_value());
  EXPECT_FALSE(parse_kmsg_record("x,1,2,-;text").has_value());
  EXPECT_FALSE(parse_kmsg_record("6,1;text").has_value());
  EXPECT_FALSE(parse_kmsg_record("6,-1,2,-;text").has_value());
}

struct SplatCase {
  const char* line;
  const char* kind;
};

class SplatClassify : public ::testing::TestWithParam<SplatCase> {};

TEST_P(SplatClassify, Kind) { EXPECT_EQ(classify_splat(GetParam().line), GetParam().kind); }

INSTANTIATE_TEST_SUITE_P(
    KernelLines, SplatClassify,
    ::testing::Values(
        SplatCase{"WARNING: CPU: 0 PID: 1 at virt/kvm/guest_memfd.c:100 kvm_gmem_x+0x10/0x20",
                  "WARNING"},
        SplatCase{"WARNING: possible circular locking dependency detected", "lockdep"},
        SplatCase{"WARNING: suspicious RCU usage", "lockdep"},
        SplatCase{"BUG: KASAN: slab-use-after-free in kvm_gmem_release+0x1/0x2", "KASAN"},
        SplatCase{"UBSAN: array-index-out-of-bounds in mm/gup.c:12:3", "UBSAN"},
        SplatCase{"watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [a:1]", "soft lockup"},
        SplatCase{"Watchdog detected hard LOCKUP on cpu 1", "hard lockup"},
        SplatCase{"rcu: INFO: rcu_preempt self-detected stall on CPU", "RCU stall"},
        SplatCase{"rcu: INFO: rcu_sched detected stalls on CPUs/tasks:", "RCU stall"},
        SplatCase{"INFO: task kworker/0:1:12 blocked for more than 120 seconds.", "hung task"},
        SplatCase{"general protection fault, probably for non-canonical address 0xdead: 0000",
                  "general protection"},
        SplatCase{"Oops: general protection fault, probably for non-canonical address",
                  "general protection"},
        SplatCase{"BUG: unable to handle page fault for address: ffff", "BUG"},
        SplatCase{"kernel BUG at mm/filemap.c:1234!", "BUG"},
        SplatCase{"Oops: 0000 [#1] PREEMPT SMP", "Oops"},
        SplatCase{"Kernel panic - not syncing: Fatal exception", "panic"},
        // Not splats:
        SplatCase{"Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc", ""},
        SplatCase{"PCI: Using host bridge windows from ACPI; report a bug", ""},
        SplatCase{"kvm: a WARNING: inside a line", ""},
        SplatCase{"DEBUG_BUG: not a bug", ""}));

}  // namespace
}  // namespace cvm

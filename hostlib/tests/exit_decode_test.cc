// decode_exit() turns a struct kvm_run into ExitInfo; checked on synthetic kvm_run contents.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "cvmconf/kvm.h"

namespace cvm {
namespace {

struct RunBuf {
  std::vector<uint8_t> bytes = std::vector<uint8_t>(4096 * 3, 0);
  kvm_run& run() { return *reinterpret_cast<kvm_run*>(bytes.data()); }
};

TEST(ExitDecode, PortIoOut) {
  RunBuf b;
  b.run().exit_reason = KVM_EXIT_IO;
  b.run().io.direction = KVM_EXIT_IO_OUT;
  b.run().io.port = 0x7c0;
  b.run().io.size = 4;
  b.run().io.count = 1;
  b.run().io.data_offset = 4096;
  uint32_t v = 0xdeadbeef;
  std::memcpy(b.bytes.data() + 4096, &v, 4);
  ExitInfo e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::Io);
  EXPECT_TRUE(e.io.out);
  EXPECT_EQ(e.io.port, 0x7c0);
  EXPECT_EQ(e.io.size, 4);
  EXPECT_EQ(e.io.value, 0xdeadbeefu);
  EXPECT_NE(e.describe().find("port 0x7c0 out"), std::string::npos) << e.describe();
}

TEST(ExitDecode, Mmio) {
  RunBuf b;
  b.run().exit_reason = KVM_EXIT_MMIO;
  b.run().mmio.phys_addr = 0xfe000000;
  b.run().mmio.is_write = 1;
  b.run().mmio.len = 8;
  uint64_t v = 0x60000;
  std::memcpy(b.run().mmio.data, &v, 8);
  ExitInfo e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::Mmio);
  EXPECT_EQ(e.mmio.gpa, 0xfe000000u);
  EXPECT_TRUE(e.mmio.write);
  EXPECT_EQ(e.mmio.value, 0x60000u);
}

TEST(ExitDecode, Hypercall) {
  RunBuf b;
  b.run().exit_reason = KVM_EXIT_HYPERCALL;
  b.run().hypercall.nr = 12;
  b.run().hypercall.args[0] = 0x100000000;
  b.run().hypercall.args[1] = 4;
  b.run().hypercall.args[2] = 0x10;
  b.run().hypercall.longmode = 1;
  ExitInfo e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::Hypercall);
  EXPECT_EQ(e.hypercall.nr, 12u);
  EXPECT_EQ(e.hypercall.args[0], 0x100000000u);
  EXPECT_EQ(e.hypercall.args[1], 4u);
  EXPECT_EQ(e.hypercall.args[2], 0x10u);
  EXPECT_EQ(e.hypercall.flags & uapi::kExitHypercallLongMode, uapi::kExitHypercallLongMode);
}

// KVM reports memory faults as KVM_RUN = -1/EFAULT with exit_reason MEMORY_FAULT
// (api.rst KVM_EXIT_MEMORY_FAULT; x86/private_mem_kvm_exits_test.c).
TEST(ExitDecode, MemoryFaultViaEfault) {
  RunBuf b;
  b.run().exit_reason = uapi::kExitMemoryFault;
  uapi::kvm_run_memory_fault mf{uapi::kMemoryExitFlagPrivate, 0xc0000000, 4096};
  std::memcpy(b.bytes.data() + uapi::kKvmRunExitUnionOffset, &mf, sizeof mf);
  ExitInfo e = decode_exit(b.run(), -1, EFAULT);
  EXPECT_EQ(e.kind, ExitKind::MemoryFault);
  EXPECT_EQ(e.run_errno, EFAULT);
  EXPECT_EQ(e.memory_fault.flags, uapi::kMemoryExitFlagPrivate);
  EXPECT_EQ(e.memory_fault.gpa, 0xc0000000u);
  EXPECT_EQ(e.memory_fault.size, 4096u);
}

TEST(ExitDecode, EfaultWithoutMemoryFaultIsRunError) {
  RunBuf b;
  b.run().exit_reason = KVM_EXIT_IO;  // stale reason from a previous exit
  ExitInfo e = decode_exit(b.run(), -1, EFAULT);
  EXPECT_EQ(e.kind, ExitKind::RunError);
  EXPECT_EQ(e.run_errno, EFAULT);
}

TEST(ExitDecode, Interrupted) {
  RunBuf b;
  EXPECT_EQ(decode_exit(b.run(), -1, EINTR).kind, ExitKind::Interrupted);
  b.run().exit_reason = KVM_EXIT_INTR;
  EXPECT_EQ(decode_exit(b.run(), 0, 0).kind, ExitKind::Interrupted);
}

TEST(ExitDecode, ShutdownInternalFailEntrySystemEvent) {
  RunBuf b;
  b.run().exit_reason = KVM_EXIT_SHUTDOWN;
  EXPECT_EQ(decode_exit(b.run(), 0, 0).kind, ExitKind::Shutdown);

  b.run().exit_reason = KVM_EXIT_INTERNAL_ERROR;
  b.run().internal.suberror = 1;
  b.run().internal.ndata = 2;
  b.run().internal.data[0] = 0xaa;
  b.run().internal.data[1] = 0xbb;
  ExitInfo e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::InternalError);
  EXPECT_EQ(e.internal.suberror, 1u);
  EXPECT_EQ(e.internal.ndata, 2u);
  EXPECT_EQ(e.internal.data[1], 0xbbu);

  b.run().exit_reason = KVM_EXIT_FAIL_ENTRY;
  b.run().fail_entry.hardware_entry_failure_reason = 0x80000021;
  b.run().fail_entry.cpu = 3;
  e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::FailEntry);
  EXPECT_EQ(e.fail_entry.reason, 0x80000021u);
  EXPECT_EQ(e.fail_entry.cpu, 3u);

  b.run().exit_reason = KVM_EXIT_SYSTEM_EVENT;
  b.run().system_event.type = 6;  // KVM_SYSTEM_EVENT_SEV_TERM
  b.run().system_event.ndata = 1;
  b.run().system_event.data[0] = 0x100;
  e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::SystemEvent);
  EXPECT_EQ(e.system_event.type, 6u);
  EXPECT_EQ(e.system_event.data[0], 0x100u);
}

TEST(ExitDecode, HltAndUnknown) {
  RunBuf b;
  b.run().exit_reason = KVM_EXIT_HLT;
  EXPECT_EQ(decode_exit(b.run(), 0, 0).kind, ExitKind::Hlt);
  b.run().exit_reason = 9999;
  ExitInfo e = decode_exit(b.run(), 0, 0);
  EXPECT_EQ(e.kind, ExitKind::Other);
  EXPECT_EQ(e.reason, 9999u);
}

}  // namespace
}  // namespace cvm

// Fault probes and child processes.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include "cvmconf/fault.h"
#include "cvmconf/fd.h"

namespace cvm {
namespace {

TEST(FaultProbe, PlainMemoryDoesNotFault) {
  auto m = Mapping::anonymous(2 * page_size());
  ASSERT_TRUE(m.ok()) << m.error();
  auto w = probe_write(m->data(), 0x5a, m->size());
  EXPECT_FALSE(w.faulted()) << w.describe();
  EXPECT_EQ(w.bytes_done, m->size());
  uint8_t out[4];
  auto r = probe_read(m->data(), 4, out);
  EXPECT_FALSE(r.faulted());
  EXPECT_EQ(out[3], 0x5a);
}

TEST(FaultProbe, ProtNoneRaisesSigsegv) {
  auto m = Mapping::map(page_size(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_TRUE(m.ok());
  auto r = probe_read(m->data());
  EXPECT_TRUE(r.sigsegv()) << r.describe();
  EXPECT_EQ(r.fault_addr, reinterpret_cast<uintptr_t>(m->data()));
  EXPECT_EQ(r.bytes_done, 0u);
}

TEST(FaultProbe, BeyondEndOfFileRaisesSigbusAndCountsProgress) {
  FILE* f = tmpfile();
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(ftruncate(fileno(f), static_cast<off_t>(page_size())), 0);
  auto m = Mapping::map(2 * page_size(), PROT_READ | PROT_WRITE, MAP_SHARED, fileno(f), 0);
  ASSERT_TRUE(m.ok());
  auto r = probe_pages(m->data(), m->size(), Access::Write, 1);
  EXPECT_TRUE(r.sigbus()) << r.describe();
  EXPECT_EQ(r.fault_addr, reinterpret_cast<uintptr_t>(m->data() + page_size()));
  EXPECT_EQ(r.bytes_done, page_size());
  fclose(f);
}

TEST(FaultProbe, ThreadSafeUnderConcurrentFaults) {
  auto bad = Mapping::map(page_size(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  auto good = Mapping::anonymous(page_size());
  ASSERT_TRUE(bad.ok() && good.ok());
  std::atomic<int> wrong{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; t++)
    ts.emplace_back([&, t] {
      for (int i = 0; i < 500; i++) {
        if (t % 2) {
          if (!probe_read(bad->data()).sigsegv()) wrong++;
        } else {
          if (probe_write(good->data() + t, 1).faulted()) wrong++;
        }
      }
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(FaultProbe, ProbeCallCatchesFaultsInsideFunctions) {
  auto bad = Mapping::map(page_size(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_TRUE(bad.ok());
  auto r = probe_call([&] { std::memset(bad->data(), 1, 16); });
  EXPECT_TRUE(r.sigsegv()) << r.describe();
}

TEST(ChildProcess, ReportsExitStatusAndOutput) {
  auto o = run_in_child([](const ChildReport& rep) {
    rep.write("hello from child");
    return 7;
  });
  EXPECT_TRUE(o.exited_with(7)) << o.describe();
  EXPECT_EQ(o.output, "hello from child");
}

TEST(ChildProcess, ReportsTheKillingSignal) {
  auto o = run_in_child([](const ChildReport&) {
    auto m = Mapping::map(page_size(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    *static_cast<volatile uint8_t*>(m->data()) = 1;
    return 0;
  });
  EXPECT_TRUE(o.killed_by(SIGSEGV)) << o.describe();
}

TEST(ChildProcess, TimesOutAndKills) {
  auto o = run_in_child(
      [](const ChildReport&) {
        for (;;) pause();
        return 0;
      },
      std::chrono::milliseconds(200));
  EXPECT_EQ(o.kind, ChildOutcome::TimedOut) << o.describe();
}

TEST(ChildProcess, RepeatedWaitReturnsTheSameOutcome) {
  ChildProcess c = ChildProcess::spawn([](const ChildReport& rep) {
    rep.write("once");
    return 5;
  });
  ASSERT_GT(c.pid(), 0);
  ChildOutcome first = c.wait();
  EXPECT_TRUE(first.exited_with(5)) << first.describe();
  EXPECT_EQ(first.output, "once");
  ChildOutcome again = c.wait();
  EXPECT_TRUE(again.exited_with(5)) << "a second wait(): " << again.describe();
  EXPECT_EQ(again.output, "once");
  ChildProcess moved(std::move(c));
  ChildOutcome after_move = moved.wait();
  EXPECT_TRUE(after_move.exited_with(5)) << "wait() after a move: " << after_move.describe();
  EXPECT_EQ(after_move.output, "once");
  EXPECT_EQ(c.wait().kind, ChildOutcome::ForkFailed) << "the moved-from object has no child";
}

TEST(ChildProcess, DestroyingARunningChildKillsIt) {
  pid_t pid = -1;
  {
    ChildProcess c = ChildProcess::spawn([](const ChildReport&) {
      for (;;) pause();
      return 0;
    });
    pid = c.pid();
    ASSERT_GT(pid, 0);
    EXPECT_EQ(kill(pid, 0), 0) << "the child runs: " << strerror(errno);
  }
  // The destructor killed and reaped it: the pid names no process any more.
  errno = 0;
  EXPECT_EQ(kill(pid, 0), -1);
  EXPECT_EQ(errno, ESRCH) << strerror(errno);
}

}  // namespace
}  // namespace cvm

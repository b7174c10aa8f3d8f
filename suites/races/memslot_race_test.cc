// Memslot deletion racing the last close of its guest_memfd and hole punching (RACE-005): the
// shape of syzbot's KASAN slab-use-after-free in kvm_gmem_release (close -> kvm_gmem_release
// wrote into a memslot that memslot deletion had freed; fixed by "KVM: guest_memfd:
// Remove bindings on memslot deletion when gmem is dying", 2025-11).
//
// Each iteration the driver creates a guest_memfd (seeded size, with or without MMAP, some pages
// allocated or written), binds it to a seeded memslot (userspace_addr an anonymous area, or the
// file's own mapping, which then has to be unmapped for the close to be the last reference),
// and releases three threads at once, each after a seeded delay: one deletes the memslot, one
// closes the fd (and unmaps the file), one punches holes through the same fd number. A vCPU of
// the same VM runs a guest loop all the time. Invariants:
//  - every operation returns what it must: deletion, close and munmap succeed, a punch succeeds
//    or fails with EBADF (the fd was already closed), binding the next file to the slot works;
//  - no kernel splat (the kmsg listener fails the test on KASAN, WARN, BUG, ...);
//  - the VM stays usable: the vCPU kept running, and afterwards a new guest_memfd memslot can be
//    created and a guest reads and writes it (and sees zeroes after a punch). On a platform
//    that cannot run payloads the race runs without the vCPU and the guest check.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "busy_vcpu.h"
#include "punch_race.h"

namespace cvm::suites {
namespace {

// arm64 binds only guest_memfds created with GUEST_MEMFD_FLAG_MMAP to memslots (7.2
// kvm_arch_prepare_memory_region: a guest_memfd slot that is not "gmem only" is EINVAL; arm64
// has no private guest_memfd memory), so there every round's file is mappable.
#if defined(__aarch64__)
constexpr bool kGmemSlotsNeedMmap = true;
#else
constexpr bool kGmemSlotsNeedMmap = false;
#endif
constexpr uint32_t kFirstSlot = 1;
constexpr uint32_t kSlots = 4;
constexpr uint64_t kMaxPages = 16;

uint64_t slot_gpa(uint32_t slot) { return CVM_TEST_MEM_GPA + slot * kMaxPages * page_size(); }

// What the driver hands to the three racers for one iteration.
struct Round {
  uint32_t slot = 0;
  int fd = -1;
  uint64_t pages = 0;
  uint8_t* map = nullptr;  // the file's mapping, when the slot uses it (unmapped by the closer)
  uint64_t map_len = 0;
  bool unmap_first = false;
  // Results (errno, 0 = success); punch_errs holds one entry per punch.
  int delete_err = 0, close_err = 0, munmap_err = 0;
  std::vector<int> punch_errs;
};

CVM_TEST_P(PunchRace, MemslotDeleteClose, "RACE-005") {
  const uint64_t ps = page_size();
  std::optional<std::string> no_guest = payloads_unsupported();
  // A VM whose memslots are fixed once it ran cannot race deletion against its vCPUs: the race
  // then runs on the fixture's VM, which never runs.
  if (!no_guest) no_guest = platform().memslots_fixed_after_run();
  const bool can_map = !gmem_flags_unsupported(kSharedGmem);
  if (kGmemSlotsNeedMmap) CVM_SKIP_IF(gmem_flags_unsupported(kSharedGmem));
  // The VM under test: a payload VM when the platform runs payloads, else the fixture's VM.
  std::unique_ptr<GuestVm> gvm;
  if (!no_guest) {
    GuestVmOptions o;
    o.platform = &platform();
    auto gv = GuestVm::create(kvm(), o);
    ASSERT_TRUE(gv.ok()) << testing::harness_error("GuestVm::create", gv.error());
    gvm = std::move(gv.value());
  } else {
    RecordProperty("guest_checks", "skipped: " + *no_guest);
  }
  Vm& kvm_vm = gvm ? gvm->vm() : vm();
  auto anon = Mapping::anonymous(kMaxPages * ps);
  ASSERT_TRUE(anon.ok()) << anon.error();

  Race race(defaults());
  std::unique_ptr<BusyVcpu> busy;
  if (gvm) {
    auto b = BusyVcpu::start(*gvm, 0,
                             std::chrono::duration_cast<std::chrono::milliseconds>(
                                 race.deadline() - std::chrono::steady_clock::now()) +
                                 std::chrono::seconds(30));
    ASSERT_TRUE(b.ok()) << testing::harness_error("booting the busy-loop payload", b.error());
    busy = std::move(b.value());
    ASSERT_TRUE(busy->running()) << "the guest loop did not start";
  }
  Round round;
  std::atomic<uint64_t> go{0};
  std::atomic<int> finished{0};
  // Each racer waits for the next round, waits a seeded moment, does its part and reports.
  auto racer = [&](std::function<void(RaceWorker&)> part) {
    return [&, part](RaceWorker& me) {
      uint64_t seen = 0;
      while (!race.stopping()) {
        uint64_t g = go.load(std::memory_order_acquire);
        if (g == seen) {
          std::this_thread::yield();
          continue;
        }
        seen = g;
        Race::jitter(me.rng(), 60);
        part(me);
        me.ops();
        finished.fetch_add(1, std::memory_order_acq_rel);
      }
    };
  };
  race.spawn("deleter", racer([&](RaceWorker&) {
               auto r = kvm_vm.delete_memslot(round.slot);
               round.delete_err = r.err();
             }));
  race.spawn("closer", racer([&](RaceWorker&) {
               auto unmap = [&] {
                 if (round.map && ::munmap(round.map, round.map_len) != 0) round.munmap_err = errno;
               };
               if (round.unmap_first) unmap();
               if (::close(round.fd) != 0) round.close_err = errno;
               if (!round.unmap_first) unmap();
             }));
  race.spawn("puncher", racer([&](RaceWorker& me) {
               const uint64_t n = Race::pick(me.rng(), 1, 4);
               for (uint64_t k = 0; k < n; k++) {
                 uint64_t first = Race::pick(me.rng(), 0, round.pages - 1);
                 uint64_t len = Race::pick(me.rng(), 1, round.pages - first);
                 int rc = ::fallocate(round.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                      static_cast<off_t>(first * ps), static_cast<off_t>(len * ps));
                 round.punch_errs.push_back(rc == 0 ? 0 : errno);
                 Race::jitter(me.rng(), 20);
               }
             }));

  uint64_t mapped_slots = 0, rounds = 0;
  auto rng = race.rng(0);
  while (race.next_iteration()) {
    const uint64_t it = race.iteration();
    round = Round();
    round.slot = kFirstSlot + static_cast<uint32_t>(Race::pick(rng, 0, kSlots - 1));
    round.pages = Race::pick(rng, 1, kMaxPages);
    const bool mmap_flag = can_map && (kGmemSlotsNeedMmap || Race::chance(rng, 2, 3));
    auto gm = kvm_vm.create_guest_memfd(round.pages * ps, mmap_flag ? kSharedGmem : 0);
    if (!gm) {
      race.violation(it, "driver", "creating a guest_memfd: " + gm.error().message());
      break;
    }
    // Some pages hold data or are allocated, so the punches and the release have work to do.
    const uint64_t af = Race::pick(rng, 0, round.pages - 1);
    const uint64_t an = Race::pick(rng, 1, round.pages - af);
    if (auto r = gm->allocate(af * ps, an * ps); !r)
      race.violation(it, "driver", "allocating pages of the new file: " + r.error().message());
    Mapping fmap;
    if (mmap_flag) {
      auto m = gm->map(round.pages * ps);
      if (!m) {
        race.violation(it, "driver", "mapping the new file: " + m.error().message());
        break;
      }
      fmap = std::move(m.value());
      std::memset(fmap.data(), 0x6b, round.pages * ps);
    }
    const bool slot_uses_map = mmap_flag && Race::chance(rng, 1, 2);
    MemslotSpec s;
    s.slot = round.slot;
    s.flags = uapi::kMemGuestMemfd;
    s.gpa = slot_gpa(round.slot);
    s.size = round.pages * ps;
    s.hva = reinterpret_cast<uint64_t>(slot_uses_map ? fmap.data() : anon->data());
    s.gmem_fd = gm->fd();
    if (auto r = kvm_vm.set_memslot(s); !r) {
      race.violation(it, "driver", "binding the new guest_memfd to slot " + std::to_string(round.slot) +
                                       ": " + r.error().message());
      break;
    }
    mapped_slots += slot_uses_map;
    // The closer owns the fd and the mapping from here on: the close is the last reference.
    round.fd = gm->take_fd().release();
    if (mmap_flag) {
      round.map = fmap.data();
      round.map_len = fmap.size();
      fmap.release();
    }
    round.unmap_first = Race::chance(rng, 1, 2);
    finished.store(0, std::memory_order_release);
    go.fetch_add(1, std::memory_order_acq_rel);
    auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (finished.load(std::memory_order_acquire) < 3 && std::chrono::steady_clock::now() < limit)
      std::this_thread::yield();
    if (finished.load() < 3) {
      race.violation(it, "driver", "the racers did not finish within 10 s (stuck in the kernel?)");
      break;
    }
    rounds++;
    race.ops();
    if (round.delete_err)
      race.violation(it, "deleter", "deleting slot " + std::to_string(round.slot) + " failed with " +
                                        errno_name(round.delete_err));
    if (round.close_err)
      race.violation(it, "closer", std::string("close(guest_memfd) failed with ") + errno_name(round.close_err));
    if (round.munmap_err)
      race.violation(it, "closer", std::string("munmap(guest_memfd mapping) failed with ") +
                                       errno_name(round.munmap_err));
    for (int e : round.punch_errs)
      if (e != 0 && e != EBADF)
        race.violation(it, "puncher", std::string("punching the file while its memslot goes away failed with ") +
                                          errno_name(e) + " (expected success, or EBADF once closed)");
  }
  race.join();
  // The VM is still usable: its vCPU kept running through all of this, ...
  if (busy) {
    UcallEvent ev = busy->stop();
    CVM_EXPECT_SYNC(ev, 1);
    EXPECT_GT(ev.args.size() > 1 ? ev.args[1] : 0, 0u) << "the vCPU made no progress";
  }
  RaceSummary sum = race.finish();
  record("rounds", rounds);
  record("slots_using_the_file_mapping", mapped_slots);
  EXPECT_GT(sum.iterations, 0u);
  EXPECT_GT(rounds, 0u);

  // ... and a new guest_memfd memslot works for a guest.
  const uint64_t flags = can_map ? kSharedGmem : 0;
  auto gm = kvm_vm.create_guest_memfd(4 * ps, flags);
  ASSERT_TRUE(gm.ok()) << gm.error();
  Mapping m;
  if (can_map) {
    auto mm = gm->map(4 * ps);
    ASSERT_TRUE(mm.ok()) << mm.error();
    m = std::move(mm.value());
  }
  MemslotSpec s;
  s.slot = kFirstSlot;
  s.flags = uapi::kMemGuestMemfd;
  s.gpa = slot_gpa(kFirstSlot);
  s.size = 4 * ps;
  s.hva = reinterpret_cast<uint64_t>(can_map ? m.data() : anon->data());
  s.gmem_fd = gm->fd();
  ASSERT_TRUE(kvm_vm.set_memslot(s).ok()) << "binding a new guest_memfd after the race";
  if (!gvm) return;   // guest_checks says why
  if (!can_map) {     // a guest needs a host-mapped slot on this kind of host
    RecordProperty("guest_checks", "skipped: the new guest_memfd cannot be mmap'ed (no "
                                   "GUEST_MEMFD_FLAG_MMAP|INIT_SHARED here)");
    return;
  }
  auto cmd = GuestCmd::start(*gvm, 0);
  ASSERT_TRUE(cmd.ok()) << testing::harness_error("booting the cmd_loop payload", cmd.error());
  CVM_ASSERT_CMD(cmd->fill8(s.gpa, 4 * ps, 0x42));
  EXPECT_EQ(m.data()[3 * ps + 7], 0x42) << "the host does not see the guest's write";
  ASSERT_TRUE(gm->punch_hole(ps, ps).ok());
  auto z = cmd->check8(s.gpa + ps, ps, 0);
  CVM_ASSERT_CMD(z);
  EXPECT_EQ(z.value, UINT64_MAX) << "the guest sees stale data in a punched page at offset " << z.value;
  CVM_ASSERT_CMD(cmd->exit());
}

}  // namespace
}  // namespace cvm::suites

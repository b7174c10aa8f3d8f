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
#include "guest_race.h"
#include "race_fixture.h"

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
constexpr int kRacers = 3;

uint64_t slot_gpa(uint32_t slot) { return CVM_TEST_MEM_GPA + slot * kMaxPages * page_size(); }

// What the driver hands to the three racers for one round.
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

// The rounds of the race on one VM: the driver prepares a round (a new guest_memfd bound to a
// seeded slot), releases the deleter, the closer and the puncher at once, and checks what each
// of them got back.
class DeleteCloseRounds {
 public:
  DeleteCloseRounds(Race& race, Vm& vm, const Mapping& anon, bool can_map)
      : race_(race), vm_(vm), anon_(anon), can_map_(can_map) {}

  void spawn_racers() {
    spawn_racer("deleter", [this](RaceWorker&) { delete_slot(); });
    spawn_racer("closer", [this](RaceWorker&) { close_file(); });
    spawn_racer("puncher", [this](RaceWorker& me) { punch_file(me); });
  }

  // Runs rounds until the race's budget is used up (or a round cannot be set up).
  void drive() {
    auto rng = race_.rng(0);
    while (race_.next_iteration()) {
      const uint64_t it = race_.iteration();
      if (!prepare(rng, it) || !release(it)) break;
      rounds_++;
      race_.ops();
      check_results(it);
    }
  }

  uint64_t rounds() const { return rounds_; }
  uint64_t slots_using_the_file_mapping() const { return mapped_slots_; }

 private:
  // Each racer waits for the next round, waits a seeded moment, does its part and reports.
  void spawn_racer(const char* name, std::function<void(RaceWorker&)> part) {
    race_.spawn(name, [this, part](RaceWorker& me) {
      uint64_t seen = 0;
      while (!race_.stopping()) {
        uint64_t g = go_.load(std::memory_order_acquire);
        if (g == seen) {
          std::this_thread::yield();
          continue;
        }
        seen = g;
        Race::jitter(me.rng(), 60);
        part(me);
        me.ops();
        finished_.fetch_add(1, std::memory_order_acq_rel);
      }
    });
  }

  void delete_slot() { round_.delete_err = vm_.delete_memslot(round_.slot).err(); }

  void close_file() {
    auto unmap = [this] {
      if (round_.map && ::munmap(round_.map, round_.map_len) != 0) round_.munmap_err = errno;
    };
    if (round_.unmap_first) unmap();
    if (::close(round_.fd) != 0) round_.close_err = errno;
    if (!round_.unmap_first) unmap();
  }

  void punch_file(RaceWorker& me) {
    const uint64_t ps = page_size();
    const uint64_t n = Race::pick(me.rng(), 1, 4);
    for (uint64_t k = 0; k < n; k++) {
      uint64_t first = Race::pick(me.rng(), 0, round_.pages - 1);
      uint64_t len = Race::pick(me.rng(), 1, round_.pages - first);
      int rc = ::fallocate(round_.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                           static_cast<off_t>(first * ps), static_cast<off_t>(len * ps));
      round_.punch_errs.push_back(rc == 0 ? 0 : errno);
      Race::jitter(me.rng(), 20);
    }
  }

  // A new guest_memfd (some pages allocated, written when mapped) bound to a seeded slot, its
  // fd and mapping handed to the closer. False after a violation that ends the race.
  bool prepare(std::mt19937_64& rng, uint64_t it) {
    const uint64_t ps = page_size();
    round_ = Round();
    round_.slot = kFirstSlot + static_cast<uint32_t>(Race::pick(rng, 0, kSlots - 1));
    round_.pages = Race::pick(rng, 1, kMaxPages);
    const bool mmap_flag = can_map_ && (kGmemSlotsNeedMmap || Race::chance(rng, 2, 3));
    auto gm = vm_.create_guest_memfd(round_.pages * ps, mmap_flag ? kSharedGmem : 0);
    if (!gm) {
      race_.violation(it, "driver", "creating a guest_memfd: " + gm.error().message());
      return false;
    }
    // Some pages hold data or are allocated, so the punches and the release have work to do.
    const uint64_t af = Race::pick(rng, 0, round_.pages - 1);
    const uint64_t an = Race::pick(rng, 1, round_.pages - af);
    if (auto r = gm->allocate(af * ps, an * ps); !r)
      race_.violation(it, "driver", "allocating pages of the new file: " + r.error().message());
    Mapping fmap;
    if (mmap_flag) {
      auto m = gm->map(round_.pages * ps);
      if (!m) {
        race_.violation(it, "driver", "mapping the new file: " + m.error().message());
        return false;
      }
      fmap = std::move(m.value());
      std::memset(fmap.data(), 0x6b, round_.pages * ps);
    }
    const bool slot_uses_map = mmap_flag && Race::chance(rng, 1, 2);
    const uint8_t* hva = slot_uses_map ? fmap.data() : anon_.data();
    if (auto r = vm_.bind_gmem(round_.slot, slot_gpa(round_.slot), *gm, 0, round_.pages * ps, hva);
        !r) {
      race_.violation(it, "driver", "binding the new guest_memfd to slot " +
                                        std::to_string(round_.slot) + ": " + r.error().message());
      return false;
    }
    mapped_slots_ += slot_uses_map;
    // The closer owns the fd and the mapping from here on: the close is the last reference.
    round_.fd = gm->take_fd().release();
    if (mmap_flag) {
      round_.map = fmap.data();
      round_.map_len = fmap.size();
      fmap.release();
    }
    round_.unmap_first = Race::chance(rng, 1, 2);
    return true;
  }

  // Releases the racers on the prepared round and waits (bounded) until all of them are done.
  bool release(uint64_t it) {
    finished_.store(0, std::memory_order_release);
    go_.fetch_add(1, std::memory_order_acq_rel);
    auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (finished_.load(std::memory_order_acquire) < kRacers && std::chrono::steady_clock::now() < limit)
      std::this_thread::yield();
    if (finished_.load() < kRacers) {
      race_.violation(it, "driver", "the racers did not finish within 10 s (stuck in the kernel?)");
      return false;
    }
    return true;
  }

  void check_results(uint64_t it) {
    if (round_.delete_err)
      race_.violation(it, "deleter", "deleting slot " + std::to_string(round_.slot) + " failed with " +
                                         errno_name(round_.delete_err));
    if (round_.close_err)
      race_.violation(it, "closer", std::string("close(guest_memfd) failed with ") + errno_name(round_.close_err));
    if (round_.munmap_err)
      race_.violation(it, "closer", std::string("munmap(guest_memfd mapping) failed with ") +
                                        errno_name(round_.munmap_err));
    for (int e : round_.punch_errs)
      if (e != 0 && e != EBADF)
        race_.violation(it, "puncher", std::string("punching the file while its memslot goes away failed with ") +
                                           errno_name(e) + " (expected success, or EBADF once closed)");
  }

  Race& race_;
  Vm& vm_;
  const Mapping& anon_;
  const bool can_map_;
  Round round_;
  std::atomic<uint64_t> go_{0};
  std::atomic<int> finished_{0};
  uint64_t rounds_ = 0, mapped_slots_ = 0;
};

// Memslot deletion and the last close of the slot's guest_memfd, on a payload VM when the
// platform runs payloads (a vCPU keeps running through the race), else on the fixture's VM.
class MemslotRace : public RaceTest {
 protected:
  void SetUp() override {
    RaceTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    std::optional<std::string> no_guest = payloads_unsupported();
    // A VM whose memslots are fixed once it ran cannot race deletion against its vCPUs: the
    // race then runs on the fixture's VM, which never runs.
    if (!no_guest) no_guest = platform().memslots_fixed_after_run();
    can_map_ = !gmem_flags_unsupported(kSharedGmem);
    if (kGmemSlotsNeedMmap) CVM_SKIP_IF(gmem_flags_unsupported(kSharedGmem));
    if (!no_guest) {
      GuestVmOptions o;
      o.platform = &platform();
      auto gv = GuestVm::create(kvm(), o);
      ASSERT_TRUE(gv.ok()) << testing::harness_error("GuestVm::create", gv.error());
      gvm_ = std::move(gv.value());
    } else {
      RecordProperty("guest_checks", "skipped: " + *no_guest);
    }
    CVM_ASSIGN_OR_FAIL(anon_, Mapping::anonymous(kMaxPages * page_size()));
  }

  // The VM under test.
  Vm& race_vm() { return gvm_ ? gvm_->vm() : vm(); }

  // A vCPU of the VM under test running a guest loop until the race's deadline has long passed.
  void start_busy_vcpu(const Race& race) {
    auto b = BusyVcpu::start(*gvm_, 0, guest_run_timeout(race));
    ASSERT_TRUE(b.ok()) << testing::harness_error("booting the busy-loop payload", b.error());
    busy_ = std::move(b.value());
    ASSERT_TRUE(busy_->running()) << "the guest loop did not start";
  }

  void expect_vcpu_kept_running() {
    UcallEvent ev = busy_->stop();
    CVM_EXPECT_SYNC(ev, 1);
    EXPECT_GT(ev.args.size() > 1 ? ev.args[1] : 0, 0u) << "the vCPU made no progress";
  }

  // A new guest_memfd memslot works after the race: binding it succeeds, and a guest (where
  // one runs) writes it, sees the host's view agree, and reads zeroes after a punch.
  void check_a_new_slot_works() {
    const uint64_t ps = page_size();
    CVM_ASSIGN_OR_FAIL(GuestMemfd gm, race_vm().create_guest_memfd(4 * ps, can_map_ ? kSharedGmem : 0));
    Mapping m;
    if (can_map_) {
      CVM_ASSIGN_OR_FAIL(m, gm.map(4 * ps));
    }
    const uint64_t gpa = slot_gpa(kFirstSlot);
    ASSERT_TRUE(ok(race_vm().bind_gmem(kFirstSlot, gpa, gm, 0, 4 * ps, can_map_ ? m.data() : anon_.data())))
        << "binding a new guest_memfd after the race";
    if (!gvm_) return;  // guest_checks says why
    if (!can_map_) {    // a guest needs a host-mapped slot on this kind of host
      RecordProperty("guest_checks", "skipped: the new guest_memfd cannot be mmap'ed (no "
                                     "GUEST_MEMFD_FLAG_MMAP|INIT_SHARED here)");
      return;
    }
    auto cmd = GuestCmd::start(*gvm_, 0);
    ASSERT_TRUE(cmd.ok()) << testing::harness_error("booting the cmd_loop payload", cmd.error());
    CVM_ASSERT_CMD(cmd->fill8(gpa, 4 * ps, 0x42));
    EXPECT_EQ(m.data()[3 * ps + 7], 0x42) << "the host does not see the guest's write";
    ASSERT_TRUE(ok(gm.punch_hole(ps, ps)));
    auto z = cmd->check8(gpa + ps, ps, 0);
    CVM_ASSERT_CMD(z);
    EXPECT_EQ(z.value, UINT64_MAX) << "the guest sees stale data in a punched page at offset " << z.value;
    CVM_ASSERT_CMD(cmd->exit());
  }

  std::unique_ptr<GuestVm> gvm_;  // null: the race runs on the fixture's VM (guest_checks says why)
  std::unique_ptr<BusyVcpu> busy_;
  Mapping anon_;  // the userspace_addr of slots that do not use the file's mapping
  bool can_map_ = false;
};

CVM_TEST_P(MemslotRace, DeleteVsClose, "RACE-005") {
  Race race(defaults());
  if (gvm_) {
    ASSERT_NO_FATAL_FAILURE(start_busy_vcpu(race));
  }
  DeleteCloseRounds rounds(race, race_vm(), anon_, can_map_);
  rounds.spawn_racers();
  rounds.drive();
  race.join();

  // The VM is still usable: its vCPU kept running through all of this, ...
  if (busy_) expect_vcpu_kept_running();
  RaceSummary sum = race.finish();
  record("rounds", rounds.rounds());
  record("slots_using_the_file_mapping", rounds.slots_using_the_file_mapping());
  EXPECT_GT(sum.iterations, 0u);
  EXPECT_GT(rounds.rounds(), 0u);
  // ... and a new guest_memfd memslot works for a guest.
  check_a_new_slot_works();
}

CVM_INSTANTIATE_FOR_PLATFORMS(MemslotRace);

}  // namespace
}  // namespace cvm::suites

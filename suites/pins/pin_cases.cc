#include "pin_cases.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace cvm::suites::pins {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
using testing::kCapabilityAbsent;

// The region of `len` bytes inside `raw` that starts at an `align` boundary.
uint8_t* align_up(uint8_t* p, size_t align) {
  uintptr_t a = (reinterpret_cast<uintptr_t>(p) + align - 1) & ~(uintptr_t{align} - 1);
  return reinterpret_cast<uint8_t*>(a);
}

// Records how the backing was confirmed.
void set_verified(CowRegion& r, const std::string& how) {
  r.verified = how;
  ::testing::Test::RecordProperty("backing_verified", how);
}

void verify_identity(CowRegion& r, bool expect_zero, bool expect_huge_zero, bool expect_anon) {
  if (auto why = page_identity_unavailable()) {
    set_verified(r, "not verified: " + *why);
    return;
  }
  CVM_ASSIGN_OR_FAIL(PageIdentity id, page_identity(r.data));
  ASSERT_TRUE(id.present) << "the prepared page is not mapped";
  if (expect_zero) {
    ASSERT_TRUE(id.zero_page) << "a read fault on private anonymous memory did not map the shared "
                                 "zeropage (pfn " << id.pfn << ")";
    set_verified(r, "pagemap/kpageflags: shared zeropage");
  } else if (expect_huge_zero) {
    set_verified(r, "pagemap/kpageflags: huge zeropage");
  } else if (expect_anon) {
    ASSERT_TRUE(id.anon && id.exclusive) << "the written page is not an exclusive anonymous page";
    set_verified(r, "pagemap/kpageflags: exclusive anonymous page");
  } else {
    ASSERT_FALSE(id.anon) << "a read fault on a private file mapping mapped an anonymous page";
    ASSERT_FALSE(id.zero_page);
    set_verified(r, "pagemap/kpageflags: page-cache page mapped R/O");
  }
}

void prepare_shared_zeropage(CowRegion& r) {
  r.size = page_size();
  r.initial = 0;
  CVM_ASSIGN_OR_FAIL(r.raw, Mapping::anonymous(r.size));
  r.data = r.raw.data();
  madvise(r.data, r.size, MADV_NOHUGEPAGE);
  auto f = probe_read(r.data, 1);
  ASSERT_FALSE(f.faulted()) << f.describe();
  verify_identity(r, true, false, false);
}

void prepare_huge_zeropage(CowRegion& r) {
  ThpSettings s = thp_settings();
  if (auto why = anon_thp_unavailable(s)) GTEST_SKIP() << kCapabilityAbsent << *why;
  if (!s.use_zero_page)
    GTEST_SKIP() << kCapabilityAbsent << "the huge zeropage is disabled (" << kThpSysfs
                 << "/use_zero_page = 0)";
  r.size = s.pmd_size;
  r.initial = 0;
  CVM_ASSIGN_OR_FAIL(r.raw, Mapping::anonymous(2 * s.pmd_size));
  r.data = align_up(r.raw.data(), s.pmd_size);
  ASSERT_EQ(madvise(r.data, r.size, MADV_HUGEPAGE), 0) << strerror(errno);
  auto f = probe_read(r.data, 1);
  ASSERT_FALSE(f.faulted()) << f.describe();
  if (!page_identity_unavailable()) {
    CVM_ASSIGN_OR_FAIL(PageIdentity id, page_identity(r.data));
    if (!id.huge_zero_page)
      GTEST_SKIP() << kCapabilityAbsent << "a read fault in a MADV_HUGEPAGE region did not map "
                   << "the huge zeropage (pfn " << id.pfn
                   << (id.zero_page ? ", the small zeropage" : "") << ")";
  }
  verify_identity(r, false, true, false);
}

// A file (memfd, tmpfile or hugetlb memfd) filled through a shared mapping, mapped privately.
void prepare_file(const FileBacking& file, CowRegion& r) {
  r.size = file.kind == FileKind::MemfdHugetlb ? file.huge : page_size();
  r.initial = 0xa5;
  // hugetlb: two pages, the page-cache page and the anonymous copy a write (or unsharing) creates.
  TestFile f = open_test_file(file, 2, r.pool);
  if (f.absent) GTEST_SKIP() << *f.absent;
  ASSERT_TRUE(f.fd.valid()) << "creating the " << file.name() << " file: " << strerror(f.err);
  r.fd = std::move(f.fd);
  auto fs = fs_type_of_fd(r.fd.get());
  r.fs = fs ? *fs : "unknown";
  auto sized = size_file(r.fd.get(), r.size);
  ASSERT_TRUE(sized.ok()) << testing::harness_error("sizing the " + r.fs + " file", sized);
  CVM_ASSIGN_OR_FAIL(Mapping shared,
                     Mapping::map(r.size, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd.get(), 0));
  std::memset(shared.data(), r.initial, r.size);
  shared.reset();

  CVM_ASSIGN_OR_FAIL(r.raw,
                     Mapping::map(r.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, r.fd.get(), 0));
  r.data = r.raw.data();
  // Read-fault every page: the page table maps the page-cache pages R/O.
  auto faulted = probe_pages(r.data, r.size, Access::Read);
  ASSERT_FALSE(faulted.faulted()) << faulted.describe();
  ASSERT_EQ(check_bytes(r.data, r.size, r.initial, "the private mapping"), "");
  verify_identity(r, false, false, false);
}

}  // namespace

std::vector<size_t> hugetlb_sizes_to_test() {
#if defined(__x86_64__)
  std::vector<size_t> v = {2 * kMiB, 1024 * kMiB};
#elif defined(__aarch64__)
  std::vector<size_t> v = {64 << 10, 2 * kMiB, 32 * kMiB, 1024 * kMiB};
#else
  std::vector<size_t> v;
#endif
  for (size_t s : hugetlb_sizes())
    if (std::find(v.begin(), v.end(), s) == v.end()) v.push_back(s);
  std::sort(v.begin(), v.end());
  return v;
}

int unnamed_file_in(const std::string& dir) {
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) return fd;
  std::string path = dir + "/cvmconf-pin-XXXXXX";
  fd = mkstemp(path.data());
  if (fd >= 0) unlink(path.c_str());
  return fd;
}

std::string FileBacking::name() const {
  switch (kind) {
    case FileKind::Memfd: return "memfd";
    case FileKind::Tmpfile: return "tmpfile";
    case FileKind::Ext4: return "ext4_file";
    case FileKind::Xfs: return "xfs_file";
    case FileKind::Btrfs: return "btrfs_file";
    case FileKind::MemfdHugetlb: return "memfd_hugetlb_" + hugetlb_size_name(huge);
  }
  return "?";
}

namespace {

// Why no hugetlb memfd of huge page size `huge` can be backed by `pages` free pages here (the
// kernel does not offer the size, or the pool cannot grow), after reserving them in `pool`.
std::optional<std::string> reserve_huge_pages(size_t huge, size_t pages,
                                              std::optional<HugetlbPool>& pool) {
  auto sizes = hugetlb_sizes();
  if (std::find(sizes.begin(), sizes.end(), huge) == sizes.end())
    return std::string(kCapabilityAbsent) + "hugetlb " + hugetlb_size_name(huge) +
           " pages: not offered by this kernel (" + kHugepagesSysfs + ")";
  auto reserved = HugetlbPool::reserve(huge, static_cast<long>(pages));
  if (!reserved) return kCapabilityAbsent + reserved.error().message();
  pool.emplace(std::move(reserved.value()));
  return std::nullopt;
}

// A writable directory on a disk file system, or why there is none.
std::optional<std::string> dir_on(const std::string& fs, std::string& dir) {
  auto found = writable_dir_on_fs(fs);
  if (!found)
    return kCapabilityAbsent + ("no writable " + fs + " file system mounted (looked at $TMPDIR, "
                                "/var/tmp, /tmp, the current directory and every " + fs +
                                " mount)");
  dir = *found;
  return std::nullopt;
}

}  // namespace

TestFile open_test_file(const FileBacking& b, size_t huge_pages, std::optional<HugetlbPool>& pool) {
  TestFile f;
  int fd = -1;
  switch (b.kind) {
    case FileKind::Memfd:
      fd = memfd_create("cvmconf-pin-memfd", MFD_CLOEXEC);
      break;
    case FileKind::Tmpfile:
      fd = unnamed_file_in("/tmp");
      break;
    case FileKind::Ext4:
    case FileKind::Xfs:
    case FileKind::Btrfs:
      f.absent = dir_on(b.kind == FileKind::Ext4 ? "ext4" : b.kind == FileKind::Xfs ? "xfs" : "btrfs",
                        f.dir);
      if (!f.absent) fd = unnamed_file_in(f.dir);
      break;
    case FileKind::MemfdHugetlb:
      f.absent = reserve_huge_pages(b.huge, huge_pages, pool);
      if (!f.absent)
        fd = memfd_create("cvmconf-pin-hugetlb", MFD_CLOEXEC | memfd_hugetlb_flags(b.huge));
      break;
  }
  f.err = errno;
  f.fd.reset(fd);
  return f;
}

Result<void> size_file(int fd, size_t size) {
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) return last_error("ftruncate");
  // hugetlbfs's fallocate stops with EINTR whenever signal_pending(), which io_uring's task
  // work (TIF_NOTIFY_SIGNAL) makes true for a moment: the allocation is simply retried.
  int r = -1;
  for (int i = 0; i < 100; i++) {
    r = fallocate(fd, 0, 0, static_cast<off_t>(size));
    if (r == 0 || errno != EINTR) break;
  }
  if (r != 0 && errno != EOPNOTSUPP) return last_error("fallocate");
  return {};
}

std::string NonAnonBacking::name() const {
  switch (kind) {
    case NonAnon::SharedZeropage: return "shared_zeropage";
    case NonAnon::HugeZeropage: return "huge_zeropage";
    case NonAnon::File: return file.name();
  }
  return "?";
}

std::ostream& operator<<(std::ostream& os, const NonAnonBacking& b) { return os << b.name(); }

std::vector<NonAnonBacking> non_anon_backings() {
  std::vector<NonAnonBacking> v = {{NonAnon::SharedZeropage},
                                   {NonAnon::File, {FileKind::Memfd}},
                                   {NonAnon::File, {FileKind::Tmpfile}},
                                   {NonAnon::HugeZeropage}};
  for (size_t s : hugetlb_sizes_to_test()) v.push_back({NonAnon::File, {FileKind::MemfdHugetlb, s}});
  return v;
}

std::vector<NonAnonBacking> zeropage_backings() {
  return {{NonAnon::SharedZeropage}, {NonAnon::HugeZeropage}};
}

const char* anon_state_name(AnonState s) {
  switch (s) {
    case AnonState::Exclusive: return "exclusive";
    case AnonState::SharedAfterFork: return "shared_after_fork";
    case AnonState::PreviouslyShared: return "previously_shared";
    case AnonState::ForkedWhilePinned: return "forked_while_pinned";
  }
  return "?";
}

const char* anon_size_name(AnonSize s) { return s == AnonSize::Base ? "base_page" : "thp"; }

std::string AnonBacking::name() const {
  return std::string(anon_state_name(state)) + "_" + anon_size_name(size);
}

std::vector<AnonBacking> anon_backings(const std::vector<AnonState>& states) {
  std::vector<AnonBacking> v;
  for (AnonSize size : {AnonSize::Base, AnonSize::Thp})
    for (AnonState state : states) v.push_back({state, size});
  return v;
}

void prepare_non_anon(const NonAnonBacking& b, CowRegion& r) {
  switch (b.kind) {
    case NonAnon::SharedZeropage: prepare_shared_zeropage(r); return;
    case NonAnon::HugeZeropage: prepare_huge_zeropage(r); return;
    case NonAnon::File: prepare_file(b.file, r); return;
  }
}

void prepare_anon(AnonSize s, CowRegion& r) {
  r.initial = 0xa5;
  if (s == AnonSize::Base) {
    r.size = page_size();
    CVM_ASSIGN_OR_FAIL(r.raw, Mapping::anonymous(r.size));
    r.data = r.raw.data();
    madvise(r.data, r.size, MADV_NOHUGEPAGE);
    std::memset(r.data, r.initial, r.size);
    verify_identity(r, false, false, true);
    return;
  }
  ThpSettings t = thp_settings();
  if (auto why = anon_thp_unavailable(t)) GTEST_SKIP() << kCapabilityAbsent << *why;
  r.size = t.pmd_size;
  CVM_ASSIGN_OR_FAIL(r.raw, Mapping::anonymous(2 * t.pmd_size));
  r.data = align_up(r.raw.data(), t.pmd_size);
  ASSERT_EQ(madvise(r.data, r.size, MADV_HUGEPAGE), 0) << strerror(errno);
  std::memset(r.data, r.initial, r.size);
  CVM_ASSIGN_OR_FAIL(auto fields, smaps_fields(r.data));
  long thp_kb = fields["AnonHugePages"];
  if (thp_kb < static_cast<long>(r.size / 1024))
    GTEST_SKIP() << kCapabilityAbsent << "no THP obtained: AnonHugePages = " << thp_kb
                 << " kB after MADV_HUGEPAGE and writing " << r.size / 1024
                 << " kB (THP enabled: " << t.enabled << "; memory fragmented?)";
  set_verified(r, "smaps: AnonHugePages = " + std::to_string(thp_kb) + " kB");
}

Sharer Sharer::fork_child(const CowRegion& r, uint8_t expect, bool previously_shared) {
  Sharer s;
  if (previously_shared) {
    ChildOutcome o = run_in_child([](const ChildReport&) { return 0; });
    if (!o.exited_with(0)) s.early_ = "the sharing child failed: " + o.describe();
    return s;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) {
    s.early_ = std::string("pipe2: ") + strerror(errno);
    return s;
  }
  int rd = p[0], wr = p[1];
  const uint8_t* data = r.data;
  size_t size = r.size;
  s.child_.emplace(ChildProcess::spawn([=](const ChildReport& rep) {
    close(wr);
    char c;
    if (read(rd, &c, 1) != 1) return 0;  // parent gone: nothing to check
    std::string bad = check_bytes(data, size, expect, "the child's view");
    if (!bad.empty()) {
      rep.write(bad);
      return 1;
    }
    return 0;
  }));
  close(rd);
  s.go_.reset(wr);
  return s;
}

std::string Sharer::finish() {
  if (!child_) return early_;
  char c = 1;
  if (write(go_.get(), &c, 1) != 1) return std::string("signalling the child: ") + strerror(errno);
  ChildOutcome o = child_->wait(std::chrono::seconds(30));
  child_.reset();
  go_.reset();
  if (o.exited_with(0)) return "";
  return "the child that shares the page: " + o.describe() +
         (o.output.empty() ? "" : ": " + o.output);
}

Sharer::~Sharer() { go_.reset(); }

std::vector<std::pair<size_t, size_t>> sample_ranges(size_t size) {
  constexpr size_t kWhole = 4 * kMiB, kSample = 64 << 10;
  if (size <= kWhole) return {{0, size}};
  return {{0, kSample}, {size / 2 - kSample / 2, kSample}, {size - kSample, kSample}};
}

std::string check_bytes(const uint8_t* p, size_t len, uint8_t v, const char* where) {
  for (size_t i = 0; i < len; i++)
    if (p[i] != v) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s holds 0x%02x at offset %zu, expected 0x%02x", where, p[i],
                    i, v);
      return buf;
    }
  return "";
}

std::string check_through_pin(Pin& pin, size_t size, uint8_t expect) {
  // A provider whose every read copies the whole pinned range (gup_test) is read once; under
  // TCG three copies of a 1 GiB hugetlb page were most of a minute.
  std::vector<uint8_t> whole;
  if (pin.reads_whole_range()) {
    auto all = pin.read_through(0, size);
    if (!all) return "reading through the pin failed: " + all.error().message();
    if (all->size() != size) return "reading through the pin returned a short buffer";
    whole = std::move(all.value());
  }
  for (auto [off, len] : sample_ranges(size)) {
    const uint8_t* data = whole.empty() ? nullptr : whole.data() + off;
    std::vector<uint8_t> part;
    if (!data) {
      auto d = pin.read_through(off, len);
      if (!d) return "reading through the pin failed: " + d.error().message();
      if (d->size() != len) return "reading through the pin returned a short buffer";
      part = std::move(d.value());
      data = part.data();
    }
    std::string bad = check_bytes(data, len, expect, "the pinned page");
    if (!bad.empty()) return bad + " (range at " + std::to_string(off) + ")";
  }
  return "";
}

void record_case(const PinProvider* provider, const std::string& backing) {
  ::testing::Test::RecordProperty("provider", provider->name());
  PinKind k = provider->kind();
  ::testing::Test::RecordProperty("pin_kind", k.describe());
  ::testing::Test::RecordProperty("gup", gup_flavour_name(k.flavour));
  ::testing::Test::RecordProperty("backing", backing);
}

void record_wanted(const PinRequest& req, const std::string& backing) {
  ::testing::Test::RecordProperty("provider", "none");
  ::testing::Test::RecordProperty("pin_kind", req.describe());
  ::testing::Test::RecordProperty("gup", req.flavour ? gup_flavour_name(*req.flavour) : "any");
  ::testing::Test::RecordProperty("backing", backing);
}

PinRequest ro_longterm_request(GupFlavour flavour) {
  PinRequest r;
  r.write = false;
  r.longterm = true;
  r.foll_pin = true;
  r.flavour = flavour;
  r.reads_through = true;
  return r;
}

PinRequest rw_longterm_request() {
  PinRequest r;
  r.write = true;
  r.longterm = true;
  r.foll_pin = true;
  r.reads_through = true;
  return r;
}

std::vector<const PinProvider*> rw_longterm_providers() {
  const PinRequest req = rw_longterm_request();
  std::vector<const PinProvider*> v;
  for (const PinProvider* p : pin_providers())
    if (req.matches(p->kind())) v.push_back(p);
  return v;
}

std::string param_safe(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

void restore_pool_or_fail(std::optional<HugetlbPool>& pool) {
  if (!pool) return;
  auto r = pool->restore();
  EXPECT_TRUE(ok(r)) << "the hugetlb pool was not put back";
  pool.reset();
}

void CowRegion::reset() {
  raw.reset();
  fd.reset();
  restore_pool_or_fail(pool);
}

std::optional<std::string> pin_unsupported(const PinProvider& p,
                                           const Result<std::unique_ptr<Pin>>& pin) {
  if (pin.ok() || !p.is_unsupported(pin.err())) return std::nullopt;
  std::ostringstream os;
  os << kCapabilityAbsent << p.name() << " cannot take this pin: " << pin.error();
  return os.str();
}

std::string PinChoice::tag() const {
  if (provider) return provider->name();
  return flavour == GupFlavour::Fast ? "gup_fast" : "gup";
}

std::string PinChoice::describe() const {
  return provider ? provider->name() : gup_flavour_name(flavour);
}

std::vector<PinChoice> ro_longterm_choices() {
  return {{nullptr, GupFlavour::Slow}, {nullptr, GupFlavour::Fast}};
}

std::vector<PinChoice> rw_longterm_choices() {
  std::vector<PinChoice> v;
  for (const PinProvider* p : rw_longterm_providers()) v.push_back({p});
  return v;
}

ChosenProvider choose_provider(const PinChoice& pin, const std::string& backing) {
  if (pin.provider) {
    record_case(pin.provider, backing);
    if (auto why = pin.provider->unavailable()) return {nullptr, *why};
    return {pin.provider, ""};
  }
  PinRequest req = ro_longterm_request(pin.flavour);
  auto found = find_pin_provider(req);
  if (!found.ok()) {
    record_wanted(req, backing);
    return {nullptr, found.error().message()};
  }
  record_case(found.value(), backing);
  return {found.value(), ""};
}

void AnonPinTest::SetUp() {
  PinCaseTest::SetUp();
  if (IsSkipped() || HasFatalFailure()) return;
  const AnonBacking& b = GetParam().backing;
  if (b.shared_before_pin())
    sharer_.emplace(Sharer::fork_child(region_, region_.initial,
                                       b.state == AnonState::PreviouslyShared));
}

void AnonPinTest::TearDown() {
  sharer_.reset();
  PinCaseTest::TearDown();
}

std::string AnonPinTest::finish_sharer() { return sharer_ ? sharer_->finish() : ""; }

void ZeropagePinTest::SetUp() {
  const PinCase<NonAnonBacking>& c = GetParam();
  ChosenProvider chosen = choose_provider(c.pin, c.backing.recorded());
  if (!chosen.provider) GTEST_SKIP() << chosen.absent;
  provider_ = chosen.provider;
  if (auto why = page_identity_unavailable())
    GTEST_SKIP() << kCapabilityAbsent << "cannot tell which page is mapped: " << *why;
  prepare_non_anon(c.backing, region_);
}

}  // namespace cvm::suites::pins

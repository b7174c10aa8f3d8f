// The embedded guest image and its validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cvmconf/guest.h"

namespace cvm {
namespace {

uint32_t native_arch() {
#if defined(__x86_64__)
  return CVM_ARCH_X86_64;
#else
  return CVM_ARCH_AARCH64;
#endif
}

TEST(GuestImage, EmbeddedImageHasThePayloads) {
  auto img = GuestImage::embedded();
  if (!img.ok() && img.error().message().find("no guest runtime") != std::string::npos)
    GTEST_SKIP() << "not implemented: " << img.error();
  ASSERT_TRUE(img.ok()) << img.error();
  auto names = img->payload_names();
  for (const char* n : {"hello", "assert_fail", "spin", "cmd_loop", "page_fault"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  EXPECT_FALSE(img->payload("no_such_payload").has_value());
  EXPECT_EQ(img->header().load_addr, CVM_IMAGE_GPA);
  EXPECT_LE(img->header().image_end - img->header().load_addr, CVM_IMAGE_MAX);
}

class CorruptImage : public ::testing::Test {
 protected:
  void SetUp() override {
    auto img = GuestImage::embedded();
    if (!img.ok()) GTEST_SKIP() << "not implemented: " << img.error();
    bytes.assign(img->bytes().begin(), img->bytes().end());
  }
  cvm_image_header& hdr() { return *reinterpret_cast<cvm_image_header*>(bytes.data()); }
  Result<GuestImage> parse() { return GuestImage::parse(bytes, native_arch()); }
  std::vector<uint8_t> bytes;
};

TEST_F(CorruptImage, Truncated) {
  bytes.resize(10);
  auto r = parse();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("truncated"), std::string::npos) << r.error();
}
TEST_F(CorruptImage, BadMagic) {
  hdr().magic ^= 1;
  EXPECT_FALSE(parse().ok());
}
TEST_F(CorruptImage, WrongAbiVersion) {
  hdr().abi_version += 1;
  auto r = parse();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("ABI version"), std::string::npos);
}
TEST_F(CorruptImage, WrongArch) {
  EXPECT_FALSE(GuestImage::parse(bytes, native_arch() + 7).ok());
}
TEST_F(CorruptImage, PayloadTableOutOfBounds) {
  hdr().payloads_end = hdr().load_addr + bytes.size() + 64;
  EXPECT_FALSE(parse().ok());
}
TEST_F(CorruptImage, PayloadEntryOutOfBounds) {
  uint64_t off = hdr().payloads_start - hdr().load_addr;
  auto* d = reinterpret_cast<cvm_payload_desc*>(bytes.data() + off);
  d->entry = 0x10;
  EXPECT_FALSE(parse().ok());
}

TEST(UcallDecode, DecodesEveryCommand) {
  cvm_ucall u{};
  u.magic = CVM_UCALL_MAGIC;
  u.cmd = CVM_UCALL_ASSERT;
  u.nargs = 2;
  u.args[0] = 1;
  u.args[1] = 2;
  u.line = 42;
  std::strcpy(u.file, "guests/x86_64/payloads/x.c");
  std::strcpy(u.text, "a == b");
  UcallEvent e = decode_ucall(u);
  EXPECT_EQ(e.kind, UcallEvent::Kind::Assert);
  EXPECT_EQ(e.file, "guests/x86_64/payloads/x.c");
  EXPECT_EQ(e.line, 42u);
  EXPECT_EQ(e.args, (std::vector<uint64_t>{1, 2}));
  EXPECT_NE(e.describe().find("x.c:42: a == b"), std::string::npos) << e.describe();

  u.cmd = CVM_UCALL_SYNC;
  EXPECT_EQ(decode_ucall(u).kind, UcallEvent::Kind::Sync);
  u.cmd = CVM_UCALL_DONE;
  EXPECT_EQ(decode_ucall(u).kind, UcallEvent::Kind::Done);
  u.cmd = 77;
  EXPECT_EQ(decode_ucall(u).kind, UcallEvent::Kind::Error);
}

TEST(UcallDecode, RejectsMissingMagicAndBoundsStrings) {
  cvm_ucall u{};
  EXPECT_EQ(decode_ucall(u).kind, UcallEvent::Kind::Error);
  u.magic = CVM_UCALL_MAGIC;
  u.cmd = CVM_UCALL_PRINT;
  std::memset(u.text, 'x', sizeof u.text);  // no terminator
  u.nargs = 99;                             // more than fits
  UcallEvent e = decode_ucall(u);
  EXPECT_EQ(e.kind, UcallEvent::Kind::Print);
  EXPECT_EQ(e.text.size(), static_cast<size_t>(CVM_UCALL_TEXT_MAX));
  EXPECT_EQ(e.args.size(), static_cast<size_t>(CVM_UCALL_ARGS));
}

}  // namespace
}  // namespace cvm

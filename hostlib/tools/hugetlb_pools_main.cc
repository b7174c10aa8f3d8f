// cvm-hugetlb-pools: records the hugetlb pool sizes (nr_hugepages of every size) and checks
// later that they are back. ctest runs "snapshot" before the pin suite and "check" after it.
// Both read under the system lock "hugetlb", so a cvmconf process that holds a grown pool at
// that moment is waited for. Exit codes: 0 same sizes, 1 differ, 2 usage/environment error.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <string>

#include "cvmconf/mm.h"

namespace {

int fail(const std::string& msg, int code) {
  std::cerr << "cvm-hugetlb-pools: " << msg << "\n";
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[1]) != "snapshot" && std::string(argv[1]) != "check"))
    return fail("usage: cvm-hugetlb-pools snapshot|check FILE", 2);
  const std::string cmd = argv[1], file = argv[2];
  auto lock = cvm::SystemLock::acquire("hugetlb", std::chrono::seconds(600));
  if (!lock) return fail(lock.error().message(), 2);
  auto now = cvm::hugetlb_pool_sizes();
  if (!now) return fail(now.error().message(), 2);
  if (cmd == "snapshot") {
    std::ofstream out(file);
    for (auto [size, nr] : *now) out << size << " " << nr << "\n";
    if (!out) return fail("cannot write " + file, 2);
    std::cout << "hugetlb pools:";
    for (auto [size, nr] : *now) std::cout << " " << cvm::hugetlb_size_name(size) << "=" << nr;
    std::cout << "\n";
    return 0;
  }
  std::ifstream in(file);
  if (!in) return fail("no snapshot at " + file + " (run the snapshot first)", 2);
  std::map<size_t, long> before;
  size_t size;
  long nr;
  while (in >> size >> nr) before[size] = nr;
  if (!in.eof()) return fail("malformed snapshot " + file, 2);
  int rc = 0;
  for (auto [s, n] : before) {
    auto it = now->find(s);
    long cur = it == now->end() ? -1 : it->second;
    std::cout << "hugetlb " << cvm::hugetlb_size_name(s) << ": nr_hugepages " << n << " before, "
              << cur << " now" << (cur == n ? "" : "  <-- NOT RESTORED") << "\n";
    if (cur != n) rc = 1;
  }
  return rc;
}

#include "conversion_model.h"

namespace cvm::suites {

std::string StateWindow::describe() const {
  if (shared && priv) return "shared or private";
  if (shared) return "shared";
  if (priv) return "private";
  return "no state";
}

StateWindow state_window(const StateSnapshot& before, const StateSnapshot& after) {
  StateWindow w;
  auto add = [&w](PageState s) { (s == PageState::Shared ? w.shared : w.priv) = true; };
  if (after.seq < before.seq) {  // not a snapshot pair of one page: claim nothing
    w.shared = w.priv = true;
    return w;
  }
  const uint64_t d = after.seq - before.seq;
  // Conversions that began and ended entirely inside the access. One of them is harmless: it
  // is the last to complete, so its outcome is after.state. Two or more hide an outcome.
  const uint64_t inside = before.in_flight() ? (d >= 1 ? (d - 1) / 2 : 0) : d / 2;
  if (inside > 1) {
    w.shared = w.priv = true;
    return w;
  }
  add(before.state);
  if (before.in_flight()) add(before.target);
  add(after.state);
  if (after.in_flight()) add(after.target);
  return w;
}

ConversionModel::ConversionModel(uint64_t pages, PageState initial)
    : pages_(pages), st_(new Page[pages]) {
  for (uint64_t p = 0; p < pages; p++) {
    st_[p].state.store(static_cast<int>(initial));
    st_[p].target.store(static_cast<int>(initial));
  }
}

void ConversionModel::begin(uint64_t first, uint64_t n, PageState to) {
  for (uint64_t p = first; p < first + n && p < pages_; p++) {
    // The target first: a reader that sees the odd sequence number sees this target.
    st_[p].target.store(static_cast<int>(to));
    st_[p].seq.fetch_add(1);
  }
}

void ConversionModel::end(uint64_t first, uint64_t n, bool ok) {
  for (uint64_t p = first; p < first + n && p < pages_; p++) {
    if (ok) st_[p].state.store(st_[p].target.load());
    st_[p].seq.fetch_add(1);
  }
}

StateSnapshot ConversionModel::snapshot(uint64_t p) const {
  const Page& s = st_[p];
  for (;;) {
    StateSnapshot x;
    x.seq = s.seq.load();
    x.state = static_cast<PageState>(s.state.load());
    x.target = static_cast<PageState>(s.target.load());
    if (s.seq.load() != x.seq) continue;
    if (!x.in_flight()) x.target = x.state;
    return x;
  }
}

PageState ConversionModel::state(uint64_t p) const {
  return static_cast<PageState>(st_[p].state.load());
}

bool ConversionModel::all(uint64_t first, uint64_t n, PageState s) const {
  for (uint64_t p = first; p < first + n; p++)
    if (state(p) != s) return false;
  return true;
}

// --- content -------------------------------------------------------------------------------------

bool read_value_ok(uint64_t p, uint64_t v, uint64_t gen_now, bool must_be_zero) {
  if (must_be_zero) return v == 0;
  const WordKind k = classify_word(p, v, gen_now);
  return k == WordKind::Zero || k == WordKind::Current || k == WordKind::Older;
}

bool round_trip_ok(uint64_t before, uint64_t after, const RoundTripRules& r) {
  if (after == before) return true;
  return after == 0 && (r.punched || !r.contents_preserved);
}

}  // namespace cvm::suites

// The did-you-mean ranking and join of src/detail/text.h.
#include "detail/text.h"

#include <algorithm>
#include <cctype>

namespace mola::detail {
namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

size_t common_subsequence(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1, 0);
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = 0;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = a[i - 1] == b[j - 1] ? diag + 1 : std::max(row[j], row[j - 1]);
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  // One row of the classic dynamic programme: row[j] = distance(a[:i], b[:j]).
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::vector<std::string> names_nearest_first(const std::string& word, const std::vector<std::string>& candidates) {
  const std::string w = lower(word);
  struct Scored {
    double similarity;
    size_t distance, index;
  };
  std::vector<Scored> scored;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const std::string c = lower(candidates[i]);
    const size_t total = w.size() + c.size();
    const double sim = total == 0 ? 1.0 : 2.0 * static_cast<double>(common_subsequence(w, c)) / total;
    scored.push_back({sim, edit_distance(w, c), i});
  }
  std::sort(scored.begin(), scored.end(), [](const Scored& a, const Scored& b) {
    if (a.similarity != b.similarity) return a.similarity > b.similarity;
    if (a.distance != b.distance) return a.distance < b.distance;
    return a.index < b.index;
  });
  std::vector<std::string> out;
  for (const auto& s : scored) out.push_back(candidates[s.index]);
  return out;
}

std::string nearest_name(const std::string& word, const std::vector<std::string>& candidates) {
  const auto ordered = names_nearest_first(word, candidates);
  return ordered.empty() ? std::string() : ordered.front();
}

}  // namespace mola::detail

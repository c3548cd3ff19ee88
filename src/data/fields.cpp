// load_field (mola/data/dataset.h): one column of a JSON Lines file, read
// apart from load_rows so that the row conversion stays per task and any
// column can split a data set (continual learning over ScienceQA topics).
#include "mola/data/dataset.h"

#include "detail/text.h"

#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <fstream>

namespace mola::data {

using mola::detail::cat;

std::vector<std::string> load_field(const std::string& path, const std::string& field) {
  struct stat st {};
  std::ifstream in(path, std::ios::binary);
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || !in)
    throw DataFileNotFoundError(cat("load_field: data file '", path, "' not found; give a JSON Lines file (a ",
                                    "directory or a missing path is not one)"));
  std::vector<std::string> values;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (n == 1 && line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);  // as load_rows
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {  // parse_error, or out_of_range for 1e999
      throw DataError(cat(path, ":", n, ": malformed JSON; each line must be one JSON object"));
    }
    const auto it = j.is_object() ? j.find(field) : j.end();
    if (it == j.end())
      throw DataError(cat(path, ":", n, ": no field \"", field, "\" to split the data by; name another field"));
    if (it->is_string()) values.push_back(it->get<std::string>());
    else if (it->is_number()) values.push_back(it->dump());
    else
      throw DataError(cat(path, ":", n, ": field \"", field, "\" is a ", it->type_name(),
                          "; splitting needs a string or a number"));
  }
  return values;
}

}  // namespace mola::data

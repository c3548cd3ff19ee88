// The safetensors reader and writer (mola/io/safetensors.h). Validation lives
// entirely in parse_safetensors_header (safetensors_header.cpp), which open()
// runs on the map: once a header has passed, every entry's bytes are known to
// lie inside the map, so get() needs no checks beyond the name. The writer
// goes through a temporary file and rename() for crash safety (docs/design.md, The adapter files).
//
// No <filesystem>: the PyPI libtorch exports its own statically linked copies
// of std::filesystem (pytorch/pytorch#133437) that win symbol lookup and crash
// (remove_all). POSIX open/fstat/mmap/rename does all we need.
#include "mola/io/safetensors.h"

#include "detail/text.h"  // quote, edit_distance

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

// The format is little-endian and we copy its bytes as they are.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "mola::io::safetensors assumes a little-endian host");

namespace mola::io {
namespace {

using nlohmann::json;

using mola::detail::quote;

template <class... Parts>
[[noreturn]] void fail(const std::string& path, const Parts&... parts) {
  mola::detail::raise<SafetensorsError>("safetensors: ", path, ": ", parts...);
}

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
// The spec's names; F8 included because torch reads them natively.
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble},  {"F32", at::kFloat},  {"F16", at::kHalf},   {"BF16", at::kBFloat16},
    {"I64", at::kLong},    {"I32", at::kInt},    {"I16", at::kShort},  {"I8", at::kChar},
    {"U8", at::kByte},     {"BOOL", at::kBool},  {"F8_E4M3", at::kFloat8_e4m3fn},
    {"F8_E5M2", at::kFloat8_e5m2},
};

std::string dtype_list() {
  std::string s;
  for (const auto& d : kDtypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

// The ATen type of a dtype name that parse_safetensors_header accepted.
at::ScalarType scalar_type_of(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw SafetensorsError("safetensors: dtype '" + name + "' has no ATen type; add it to kDtypes in src/io/safetensors.cpp");
}

std::string errno_text() { return std::strerror(errno); }

// Up to 5 names nearest to `name`, for the missing-tensor message.
std::string nearest_names(const std::string& name, const std::vector<std::string>& names) {
  if (names.empty()) return "the file holds no tensors";
  std::vector<std::pair<size_t, std::string>> scored;
  for (const auto& n : names) scored.emplace_back(mola::detail::edit_distance(name, n), n);
  std::sort(scored.begin(), scored.end());
  std::string s = "nearest names: ";
  for (size_t i = 0; i < scored.size() && i < 5; ++i) s += (i ? ", " : "") + quote(scored[i].second);
  return s;
}

}  // namespace

// The mapped file, unmapped when the last of the file and its views lets go.
struct SafetensorsFile::Mapping {
  void* ptr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (ptr != nullptr) ::munmap(ptr, size);
  }
};

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: ", errno_text(), "; check the path and its permissions");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file; give the path of a .safetensors file");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail(path, "file is ", size, " bytes, shorter than the 8-byte header length; it is truncated or not a safetensors file");
  }
  // Private and writable: copy-on-write pages, so a view load() hands out may
  // be changed in place without ever changing the file.
  void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file alive
  if (m == MAP_FAILED) fail(path, "mmap of ", size, " bytes failed: ", errno_text());
  f.mapping_ = std::make_shared<Mapping>();
  f.mapping_->ptr = m;
  f.mapping_->size = size;
  f.map_ = static_cast<const uint8_t*>(m);
  f.map_size_ = size;

  SafetensorsHeader header = parse_safetensors_header(path, f.map_, size);
  f.data_start_ = header.data_start;
  f.metadata_ = std::move(header.metadata);
  for (auto& [name, e] : header.entries) {
    TensorInfo info;
    info.dtype = e.dtype;
    info.scalar_type = scalar_type_of(e.dtype);
    info.shape = std::move(e.shape);
    info.begin = e.begin;
    info.end = e.end;
    f.entries_.emplace(name, std::move(info));
  }
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      mapping_(std::move(o.mapping_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)),
      data_start_(o.data_start_),
      entries_(std::move(o.entries_)),
      metadata_(std::move(o.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    mapping_ = std::move(o.mapping_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    data_start_ = o.data_start_;
    entries_ = std::move(o.entries_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() { release(); }

void SafetensorsFile::release() noexcept {
  mapping_.reset();  // unmapped once no view of it is left
  map_ = nullptr;
  map_size_ = 0;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end())
    fail(path_, "no tensor named ", quote(name), "; ", nearest_names(name, names()),
         "; check the name (checkpoints use Hugging Face module paths)");
  return it->second;
}

at::Tensor SafetensorsFile::mapped(const std::string& name, const TensorInfo& ti) const {
  const uint8_t* bytes = map_ + data_start_ + ti.begin;
  const size_t nbytes = ti.end - ti.begin;
  // A bool byte other than 0 or 1 is undefined behaviour in torch's kernels.
  if (ti.scalar_type == at::kBool)
    for (size_t i = 0; i < nbytes; ++i)
      if (bytes[i] > 1)
        fail(path_, "tensor ", quote(name), ": BOOL byte ", i, " is ", int(bytes[i]),
             ", not 0 or 1; the data is corrupt: re-download or re-save the file");
  const auto cpu = at::TensorOptions().dtype(ti.scalar_type);
  // from_blob needs element alignment; a writer that did not pad its header
  // leaves the data misaligned, and then we copy the bytes out first.
  if (nbytes == 0) return at::empty(ti.shape, cpu);
  if (reinterpret_cast<uintptr_t>(bytes) % at::elementSize(ti.scalar_type) != 0) {
    at::Tensor t = at::empty(ti.shape, cpu);
    std::memcpy(t.data_ptr(), bytes, nbytes);
    return t;
  }
  // The view holds the mapping: it stays mapped while any view lives.
  std::shared_ptr<Mapping> keep = mapping_;
  return at::from_blob(const_cast<uint8_t*>(bytes), ti.shape, [keep](void*) mutable { keep.reset(); }, cpu);
}

void SafetensorsFile::release_pages(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(map_ + data_start_ + ti.begin);
  const auto end = reinterpret_cast<uintptr_t>(map_ + data_start_ + ti.end);
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;  // whole pages inside
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

at::Tensor SafetensorsFile::get(const std::string& name, std::optional<at::ScalarType> dtype, at::Device device) const {
  const TensorInfo& ti = info(name);
  // copy=true: the result never aliases the map.
  return mapped(name, ti).to(device, dtype.value_or(ti.scalar_type), /*non_blocking=*/false, /*copy=*/true);
}

at::Tensor SafetensorsFile::load(const std::string& name, at::ScalarType dtype, at::Device device) const {
  const TensorInfo& ti = info(name);
  at::Tensor t = mapped(name, ti);
  if (device.is_cpu() && ti.scalar_type == dtype) return t;  // the mapped bytes themselves (or their aligned copy)
  return t.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path, std::optional<at::ScalarType> dtype) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& name : f.names()) out.emplace(name, f.get(name, dtype));
  return out;
}

namespace {

// Writes all of [data, data+n), retrying short writes and EINTR.
void write_all(const std::string& path, int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail(path, "write failed: ", errno_text(), "; check free disk space and permissions");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

std::string dir_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<const std::string*, at::Tensor>> cpu;  // in header (name) order
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name.empty() || name == "__metadata__")
      fail(path, "tensor name ", quote(name), " is reserved or empty; rename the tensor");
    if (!t.defined()) fail(path, "tensor ", quote(name), " is undefined; pass a real tensor or leave it out");
    if (t.layout() != at::kStrided)
      fail(path, "tensor ", quote(name), " has layout ", t.layout(), "; convert it with .to_dense() first");
    const auto* d = std::find_if(std::begin(kDtypes), std::end(kDtypes), [&](const DtypeName& x) { return t.scalar_type() == x.type; });
    if (d == std::end(kDtypes))
      fail(path, "tensor ", quote(name), " has dtype ", t.scalar_type(), ", which safetensors in mola does not write; cast it to one of ",
           dtype_list());
    at::Tensor c = t.detach().to(at::kCPU).resolve_conj().resolve_neg().contiguous();
    const uint64_t nbytes = c.nbytes();
    header[name] = {{"dtype", d->name}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    cpu.emplace_back(&name, std::move(c));
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;

  // Spaces pad the header so the data buffer starts 8-byte aligned, which lets
  // readers (ours included) view the bytes in place.
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t n = text.size();

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp, "cannot create: ", errno_text(), "; check that the directory exists and is writable");
  try {
    write_all(tmp, fd, &n, 8);
    write_all(tmp, fd, text.data(), text.size());
    for (const auto& [name, c] : cpu) write_all(tmp, fd, c.data_ptr(), c.nbytes());
    if (::fsync(fd) != 0) fail(tmp, "fsync failed: ", errno_text(), "; check the disk");
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    fail(tmp, "close failed: ", errno_text(), "; check free disk space");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    fail(path, "cannot rename ", tmp, " over it: ", why, "; check that the directory is writable");
  }
  // Persist the rename itself; best effort, as some filesystems refuse to
  // fsync a directory and the file is already complete either way.
  const int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::vector<CheckpointShard> checkpoint_shards(const std::string& dir_or_index) {
  struct stat st {};
  if (::stat(dir_or_index.c_str(), &st) != 0)
    fail(dir_or_index, "cannot open: ", errno_text(), "; give a checkpoint directory, an index .json or a .safetensors file");
  std::string index = dir_or_index;
  if (S_ISDIR(st.st_mode)) {
    const std::string idx = dir_or_index + "/model.safetensors.index.json";
    const std::string single = dir_or_index + "/model.safetensors";
    struct stat s2 {};
    if (::stat(idx.c_str(), &s2) == 0) {
      index = idx;
    } else if (::stat(single.c_str(), &s2) == 0) {
      return {{single, {}}};
    } else {
      fail(dir_or_index, "directory has neither model.safetensors.index.json nor model.safetensors; "
                         "give the directory of a Hugging Face safetensors checkpoint");
    }
  } else if (index.size() < 5 || index.compare(index.size() - 5, 5, ".json") != 0) {
    return {{index, {}}};
  }

  std::ifstream in(index);
  if (!in) fail(index, "cannot open: ", errno_text(), "; check the path and its permissions");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::parse_error& e) {
    fail(index, "index is not valid JSON at byte ", e.byte, ": ", e.what(), "; re-download the checkpoint's index");
  } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
    fail(index, "index holds a number out of range (", e.what(), "); re-download the checkpoint's index");
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail(index, "index has no 'weight_map' object ({\"weight_map\": {tensor name: shard file}}); re-download it");

  std::map<std::string, std::vector<std::string>> by_shard;  // shard file -> tensor names
  for (const auto& [name, shard] : j["weight_map"].items()) {
    if (!shard.is_string()) fail(index, "'weight_map' entry ", quote(name), " is ", shard.dump(), ", not a shard file name");
    by_shard[shard.get<std::string>()].push_back(name);
  }
  const std::string dir = dir_of(index);
  std::vector<CheckpointShard> out;
  for (auto& [shard, names] : by_shard) {
    const std::string path = shard.size() && shard[0] == '/' ? shard : dir + "/" + shard;
    struct stat s3 {};
    if (::stat(path.c_str(), &s3) != 0)
      fail(path, "cannot open: ", errno_text(), "; ", index, " lists it as a shard: re-download the checkpoint");
    out.push_back({path, std::move(names)});
  }
  return out;
}

std::map<std::string, at::Tensor> load_sharded(const std::string& dir_or_index, std::optional<at::ScalarType> dtype) {
  std::map<std::string, at::Tensor> out;
  for (const auto& shard : checkpoint_shards(dir_or_index)) {
    const SafetensorsFile f = SafetensorsFile::open(shard.path);
    for (const auto& name : shard.names.empty() ? f.names() : shard.names) {
      if (!f.contains(name))
        fail(f.path(), "tensor ", quote(name), " is listed in the index but missing from this shard; ",
             nearest_names(name, f.names()), "; the index and shards are from different checkpoints: re-download them");
      out.emplace(name, f.get(name, dtype));
    }
  }
  return out;
}

}  // namespace mola::io

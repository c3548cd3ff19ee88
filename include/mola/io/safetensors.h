// mola/io/safetensors.h: reading and writing the safetensors format (Hugging
// Face's model and adapter files, docs/design.md, The adapter files), single files and sharded
// checkpoints with a model.safetensors.index.json.
//
// Why a reader of our own rather than a binding: the format is an 8-byte
// length, a JSON header and raw little-endian bytes, so a reader is small, and
// owning it lets every malformed file become an error that names the file, the
// tensor, what is wrong and the fix (docs/design.md, Reliability), never a crash or a read
// past the end. Files are memory-mapped, so opening a 14 GB checkpoint reads
// only its header; get() copies one tensor out, so the tensors outlive the
// file; load() may instead hand out a view of the mapped bytes (a frozen base
// model's weights: no copy, and pages are read only when used).
//
// Loading never executes code: there is no pickle here, only bytes and JSON.
#pragma once

#include <mola/io/safetensors_header.h>

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace mola::io {

// One header entry, validated: the bytes [begin, end) of the data buffer
// (which starts right after the header) hold numel(shape) elements of dtype.
struct TensorInfo {
  std::string dtype;              // as written in the file: "F32", "BF16", ...
  at::ScalarType scalar_type;     // the matching ATen type
  std::vector<int64_t> shape;     // [] for a 0-d tensor
  uint64_t begin = 0;             // byte offsets relative to the data buffer
  uint64_t end = 0;
};

// A memory map of one safetensors file with its parsed header. open()
// validates the whole header up front (offsets, sizes, overlaps), so every
// later get() or load() reads only bytes that are inside the file. The map is
// private and copy-on-write: a view handed out by load() may be written to
// (PiSSA adjusts base weights in place), which copies the touched pages into
// the process and never changes the file.
//
// A file truncated by another process while it is mapped raises SIGBUS on
// access; that is the price of mmap and cannot be checked for.
class SafetensorsFile {
 public:
  // Maps `path` and validates its header; throws SafetensorsError.
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // Throws SafetensorsError naming the nearest names when `name` is missing.
  const TensorInfo& info(const std::string& name) const;
  // A copy of tensor `name` (never a view of the map), cast to `dtype` when
  // given and placed on `device`.
  at::Tensor get(const std::string& name, std::optional<at::ScalarType> dtype = std::nullopt,
                 at::Device device = at::kCPU) const;
  // Tensor `name` in `dtype` on `device`: a view of the mapped bytes when they
  // already are that (CPU, same dtype, aligned), which keeps the map alive as
  // long as the tensor lives and reads its pages only when used; else a copy,
  // as get(). viewed() says which one the last call gave.
  at::Tensor load(const std::string& name, at::ScalarType dtype, at::Device device = at::kCPU) const;
  // Tells the kernel this process is done with tensor `name`'s pages of the
  // map (madvise DONTNEED, whole pages inside its bytes only): they leave the
  // resident set, and are read from the file again if touched. For a tensor
  // that was copied out (get) and will not be viewed; views load() handed out
  // stay valid, since the map is private and unwritten pages come from the file.
  void release_pages(const std::string& name) const;
  // The optional "__metadata__" object (string -> string); empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Mapping;
  SafetensorsFile() = default;
  void release() noexcept;
  // The tensor's bytes as a CPU tensor of its file dtype, viewing the map (no copy) when aligned.
  at::Tensor mapped(const std::string& name, const TensorInfo& ti) const;

  std::string path_;
  std::shared_ptr<Mapping> mapping_;  // shared with the views load() hands out
  const uint8_t* map_ = nullptr;  // the whole file, mapped copy-on-write
  size_t map_size_ = 0;
  size_t data_start_ = 0;          // 8 + header length
  std::map<std::string, TensorInfo> entries_;
  std::map<std::string, std::string> metadata_;
};

// Every tensor of one file, each cast to `dtype` when given.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path,
                                                   std::optional<at::ScalarType> dtype = std::nullopt);

// Writes `tensors` (made contiguous and moved to the CPU) and `metadata` to
// `path`. Dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3,
// F8_E5M2. Written to `path.tmp.<pid>`, fsynced, then renamed over `path`, so
// a crash leaves either the old file or the new one, never half of one.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// The safetensors files of a Hugging Face checkpoint and the tensors each
// holds, in file order: `dir_or_index` as load_sharded takes it. Reads the
// index (when there is one) and checks every shard file exists; opens none.
struct CheckpointShard {
  std::string path;
  std::vector<std::string> names;  // the weight map's tensors in this file; empty: all of them
};
std::vector<CheckpointShard> checkpoint_shards(const std::string& dir_or_index);

// A Hugging Face checkpoint: `dir_or_index` is a directory holding
// model.safetensors.index.json ({"weight_map": {name: shard file}}) or a single
// model.safetensors, or the path of an index .json or of a .safetensors file.
// Shard paths are relative to the index's directory. Only the tensors the
// weight map lists are loaded; each must be in the shard it names.
std::map<std::string, at::Tensor> load_sharded(const std::string& dir_or_index,
                                               std::optional<at::ScalarType> dtype = std::nullopt);

}  // namespace mola::io

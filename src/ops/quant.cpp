// Quantized frozen base weights: int8 per output channel and NF4 with
// double-quantized block scales (mola/quant.h, docs/quantization.md).
#include <mola/config.h>
#include <mola/quant.h>

#include "detail/text.h"
#include "ops/cpu/low_precision.h"

#include <quant_codes.h>  // kernels/, on the include path

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>

namespace mola::quant {

static_assert(kNF4BlockSize == kernels::kNF4Block && kNF4ScaleBlockSize == kernels::kNF4ScaleBlock,
              "mola/quant.h and kernels/quant_codes.h must agree on NF4's block sizes");

#ifdef MOLA_WITH_CUDA
// src/ops/cuda/quant.cpp: the weight of a CUDA QuantizedWeight, [out, in] in dtype, on its device.
at::Tensor dequantize_cuda(const QuantizedWeight& q, at::ScalarType dtype);
#endif

namespace {

using detail::require;

// Midpoints between neighbouring NF4 values: index = how many lie below x.
const std::array<float, 15>& nf4_midpoints() {
  static const std::array<float, 15> mids = [] {
    std::array<float, 15> m{};
    const auto& v = nf4_values();
    for (size_t i = 0; i < m.size(); ++i) m[i] = 0.5f * (v[i] + v[i + 1]);
    return m;
  }();
  return mids;
}

constexpr uint8_t kNF4Zero = 7;  // nf4_values()[7] == 0

void require_kind(const QuantizedWeight& q) {
  require(q.kind == Kind::kInt8 || q.kind == Kind::kNF4,
                  "quantized weight: kind must be int8 or nf4; this one holds no quantized weight");
  require(q.data.defined() && q.scale.defined(), "quantized weight: \"data\" and \"scale\" are both needed");
  const std::pair<const char*, const at::Tensor*> parts[] = {
      {"scale", &q.scale}, {"scale_scale", &q.scale_scale}, {"scale_offset", &q.scale_offset}};
  for (const auto& [name, t] : parts)
    require(!t->defined() || t->device() == q.data.device(), "quantized weight: \"", name, "\" is on ",
            t->defined() ? t->device().str() : std::string(), " but \"data\" on ", q.data.device().str(),
            "; keep the stored tensors together (QuantizedWeight.to(device))");
}

// The absmaxes of NF4's blocks as stored (kernels/quant_codes.h reads them).
kernels::NF4Scales scales_of(const QuantizedWeight& q) {
  kernels::NF4Scales s;
  if (q.scale.scalar_type() == at::kFloat) {
    s.absmax = q.scale.const_data_ptr<float>();
  } else {
    s.code = q.scale.const_data_ptr<int8_t>();
    s.scale_scale = q.scale_scale.const_data_ptr<float>();
    s.offset = q.scale_offset.const_data_ptr<float>();
  }
  return s;
}

// Rows [start, start + n) of the dequantized weight into `block` ([n, in], fp32 or fp64).
template <typename T>
void nf4_rows(const QuantizedWeight& q, int64_t start, int64_t n, T* out) {
  const int64_t in = q.in_features;
  const uint8_t* data = q.data.const_data_ptr<uint8_t>();
  const kernels::NF4Scales scales = scales_of(q);
  const float* values = nf4_values().data();
  const int64_t first = start * in, count = n * in;
  // One task per run of whole blocks: each element's block absmax is read once per block.
  const int64_t first_block = first / kNF4BlockSize, last_block = (first + count - 1) / kNF4BlockSize;
  at::parallel_for(first_block, last_block + 1, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float absmax = kernels::nf4_absmax(scales, b);
      const int64_t lo = std::max(first, b * kNF4BlockSize);
      const int64_t hi = std::min(first + count, (b + 1) * kNF4BlockSize);
      for (int64_t f = lo; f < hi; ++f) out[f - first] = static_cast<T>(values[kernels::nf4_index(data, f)] * absmax);
    }
  });
}

detail::RowBlockFill rows_of(const QuantizedWeight& q) {
  return [q](int64_t start, int64_t n, at::Tensor& block) {
    if (q.kind == Kind::kInt8) {
      block.copy_(q.data.narrow(0, start, n));
      block.mul_(q.scale.narrow(0, start, n).unsqueeze(1));
    } else if (block.scalar_type() == at::kDouble) {
      nf4_rows(q, start, n, block.data_ptr<double>());
    } else {
      nf4_rows(q, start, n, block.data_ptr<float>());
    }
  };
}

QuantizedWeight unpack(const torch::autograd::AutogradContext* ctx) {
  QuantizedWeight q;
  const auto& d = ctx->saved_data;
  q.kind = static_cast<Kind>(d.at("kind").toInt());
  q.out_features = d.at("out").toInt();
  q.in_features = d.at("in").toInt();
  q.data = d.at("data").toTensor();
  q.scale = d.at("scale").toTensor();
  if (d.count("scale_scale") != 0) {
    q.scale_scale = d.at("scale_scale").toTensor();
    q.scale_offset = d.at("scale_offset").toTensor();
  }
  return q;
}

at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// On a GPU the weight is dequantized whole, in x's dtype, by one kernel, and
// multiplied by cuBLAS; it lives only for the product (one layer's weight at
// a time), forward and backward alike.
at::Tensor cuda_dequantize(const QuantizedWeight& q, at::ScalarType dtype) {
#ifdef MOLA_WITH_CUDA
  return dequantize_cuda(q, dtype);
#else
  (void)q, (void)dtype;
  TORCH_INTERNAL_ASSERT(false, "quant: a CUDA weight reached a build without CUDA kernels");
#endif
}

// Names the fix where a CUDA tensor meets a build of mola without kernels.
void require_cuda_build(const char* what, const at::Device& device) {
#ifndef MOLA_WITH_CUDA
  require(false, what, ": the tensors are on ", device.str(), " but this build of mola has no CUDA kernels (it was "
          "compiled without nvcc); use the CPU, or rebuild mola where the CUDA toolkit is installed");
#else
  (void)what, (void)device;
#endif
}

at::Tensor cuda_linear(const at::Tensor& x, const QuantizedWeight& q, const std::optional<at::Tensor>& bias) {
  const at::Tensor w = cuda_dequantize(q, x.scalar_type());
  return at::linear(x, w, bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt);
}

at::Tensor cuda_input_grad(const at::Tensor& dy, const QuantizedWeight& q) {
  return at::matmul(dy, cuda_dequantize(q, dy.scalar_type()));
}

// y = x W^T + b through the blocks (on the CPU); dx = dy W the same way.
struct QuantizedLinear : public torch::autograd::Function<QuantizedLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::shared_ptr<const QuantizedWeight>& q, const std::optional<at::Tensor>& bias) {
    auto& d = ctx->saved_data;
    d["kind"] = static_cast<int64_t>(q->kind);
    d["out"] = q->out_features;
    d["in"] = q->in_features;
    d["data"] = q->data;
    d["scale"] = q->scale;
    if (q->scale_scale.defined()) {
      d["scale_scale"] = q->scale_scale;
      d["scale_offset"] = q->scale_offset;
    }
    if (x.is_cuda()) return cuda_linear(x, *q, bias);
    const at::Tensor flat = x.reshape({-1, q->in_features}).to(compute_type(x)).contiguous();
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = q->out_features;
    return detail::linear_by_blocks(flat, q->out_features, rows_of(*q), bias).to(x.scalar_type()).view(shape);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const QuantizedWeight q = unpack(ctx);
    const at::Tensor& dy = grads[0];
    if (dy.is_cuda()) return {cuda_input_grad(dy, q), at::Tensor(), at::Tensor()};
    const at::Tensor flat = dy.reshape({-1, q.out_features}).to(compute_type(dy)).contiguous();
    at::Tensor dx = at::zeros({flat.size(0), q.in_features}, flat.options());
    detail::addmm_by_blocks_(dx, flat, rows_of(q));
    std::vector<int64_t> shape = dy.sizes().vec();
    shape.back() = q.in_features;
    return {dx.to(dy.scalar_type()).view(shape), at::Tensor(), at::Tensor()};
  }
};

// Row absmax, scale and round(w * (127 / absmax)) per row (as bitsandbytes
// computes it, so the two agree to the bit), reading w in its own dtype.
template <typename T>
void int8_rows(const T* w, int64_t rows, int64_t in, float* scale, int8_t* data) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = w + r * in;
      float m = 0.0f;
      for (int64_t c = 0; c < in; ++c) m = std::max(m, std::abs(static_cast<float>(row[c])));
      scale[r] = m > 0.0f ? m / 127.0f : 1.0f;
      const float inverse = m > 0.0f ? (1.0f / m) * 127.0f : 0.0f;
      int8_t* out = data + r * in;
      for (int64_t c = 0; c < in; ++c)
        out[c] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<float>(row[c]) * inverse), -127.0f, 127.0f));
    }
  });
}

// The absmax of each block of 64 (a short last block takes what is left).
template <typename T>
void nf4_block_absmax(const T* w, int64_t numel, float* absmax) {
  const int64_t blocks = (numel + kNF4BlockSize - 1) / kNF4BlockSize;
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kNF4BlockSize, hi = std::min(numel, lo + kNF4BlockSize);
      float m = 0.0f;
      for (int64_t f = lo; f < hi; ++f) m = std::max(m, std::abs(static_cast<float>(w[f])));
      absmax[b] = m;
    }
  });
}

// The 4-bit index of every weight against its block's absmax as stored: how
// many midpoints lie strictly below w / absmax (ties go to the lower value),
// counted without branches; two indices per byte, the earlier in the high nibble.
template <typename T>
void nf4_pack(const T* w, int64_t numel, const kernels::NF4Scales& scales, uint8_t* data) {
  const auto& mids = nf4_midpoints();
  const int64_t blocks = (numel + kNF4BlockSize - 1) / kNF4BlockSize;
  at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
    float x[kNF4BlockSize];
    uint8_t idx[kNF4BlockSize];
    for (int64_t b = b0; b < b1; ++b) {
      const float a = kernels::nf4_absmax(scales, b);
      const int64_t lo = b * kNF4BlockSize, n = std::min(numel - lo, kNF4BlockSize);
      if (a > 0.0f) {
        for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(w[lo + i]) / a;
        std::fill(idx, idx + n, uint8_t{0});
        for (const float m : mids)
          for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<uint8_t>(idx[i] + (x[i] > m));
      } else {
        std::fill(idx, idx + n, kNF4Zero);
      }
      // Blocks start at even elements (64 b), so a byte never straddles two blocks.
      for (int64_t i = 0; i < n; i += 2)
        data[(lo + i) >> 1] = static_cast<uint8_t>((idx[i] << 4) | (i + 1 < n ? idx[i + 1] : 0));
    }
  });
}

QuantizedWeight quantize_int8(const at::Tensor& w) {
  QuantizedWeight q;
  q.kind = Kind::kInt8;
  const int64_t rows = w.size(0), in = w.size(1);
  q.scale = at::empty({rows}, at::TensorOptions().dtype(at::kFloat));
  q.data = at::empty({rows, in}, at::TensorOptions().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "quantize_int8", [&] {
    int8_rows(w.const_data_ptr<scalar_t>(), rows, in, q.scale.data_ptr<float>(), q.data.data_ptr<int8_t>());
  });
  return q;
}

QuantizedWeight quantize_nf4(const at::Tensor& w, bool double_quant) {
  QuantizedWeight q;
  q.kind = Kind::kNF4;
  const int64_t numel = w.numel();
  const int64_t blocks = (numel + kNF4BlockSize - 1) / kNF4BlockSize;
  // First level: one absmax per 64 weights, read in the weight's own dtype (no wide copy).
  at::Tensor absmax = at::empty({blocks}, at::TensorOptions().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "nf4_absmax", [&] {
    nf4_block_absmax(w.const_data_ptr<scalar_t>(), numel, absmax.data_ptr<float>());
  });
  if (double_quant) {
    // Second level: absmax - mean as int8, one fp32 scale per 256 blocks.
    const int64_t groups = (blocks + kNF4ScaleBlockSize - 1) / kNF4ScaleBlockSize;
    q.scale_offset = absmax.mean().reshape({1}).contiguous();
    at::Tensor centred = at::constant_pad_nd(absmax - q.scale_offset, {0, groups * kNF4ScaleBlockSize - blocks}, 0.0)
                             .view({groups, kNF4ScaleBlockSize});
    const at::Tensor group_max = centred.abs().amax(1);  // [groups]
    q.scale_scale = at::where(group_max > 0, group_max / 127.0, at::ones_like(group_max)).contiguous();
    q.scale = (centred / q.scale_scale.unsqueeze(1)).round_().clamp_(-127, 127).to(at::kChar)
                  .view({-1}).narrow(0, 0, blocks).contiguous();
  } else {
    q.scale = absmax;
  }
  // The 4-bit indices, against the absmax as it will be read back.
  q.data = at::empty({(numel + 1) / 2}, at::TensorOptions().dtype(at::kByte));
  const kernels::NF4Scales scales = scales_of(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "nf4_pack", [&] {
    nf4_pack(w.const_data_ptr<scalar_t>(), numel, scales, q.data.data_ptr<uint8_t>());
  });
  return q;
}

}  // namespace

Kind parse_kind(const std::string& name) {
  if (name.empty() || name == "none") return Kind::kNone;
  if (name == "int8") return Kind::kInt8;
  if (name == "nf4") return Kind::kNF4;
  detail::raise<ConfigError>("quantize: got \"", name, "\"; it must be \"nf4\" (4-bit NormalFloat), \"int8\" "
                             "(8-bit per output channel) or \"none\"; did you mean \"",
                             detail::nearest_name(name, {"nf4", "int8", "none"}), "\"?");
}

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kInt8: return "int8";
    case Kind::kNF4: return "nf4";
    default: return "none";
  }
}

const std::array<float, 16>& nf4_values() {
  static const std::array<float, 16> values = MOLA_NF4_VALUES;  // kernels/quant_codes.h
  return values;
}

int64_t QuantizedWeight::nbytes() const {
  int64_t n = 0;
  for (const at::Tensor* t : {&data, &scale, &scale_scale, &scale_offset})
    if (t->defined()) n += t->nbytes();
  return n;
}

std::map<std::string, at::Tensor> QuantizedWeight::tensors() const {
  std::map<std::string, at::Tensor> out = {{"data", data}, {"scale", scale}};
  if (scale_scale.defined()) {
    out["scale_scale"] = scale_scale;
    out["scale_offset"] = scale_offset;
  }
  return out;
}

QuantizedWeight QuantizedWeight::to(const at::Device& device) const {
  QuantizedWeight q = *this;
  for (at::Tensor* t : {&q.data, &q.scale, &q.scale_scale, &q.scale_offset})
    if (t->defined()) *t = t->to(device);
  return q;
}

QuantizedWeight quantize(const at::Tensor& weight, Kind kind, bool double_quant) {
  require(weight.dim() == 2, "quantize: the weight must be [out, in]; got shape ", detail::shape_str(weight.sizes()));
  require(at::isFloatingType(weight.scalar_type()), "quantize: the weight must be floating point; got ",
                  weight.scalar_type());
  // A weight on a GPU is quantized on the CPU (one tensor's copy there) and the result placed back beside it.
  if (!weight.device().is_cpu()) return quantize(weight.cpu(), kind, double_quant).to(weight.device());
  require(kind == Kind::kInt8 || kind == Kind::kNF4, "quantize: kind must be int8 or nf4, got ",
                  kind_name(kind));
  const at::Tensor w = weight.contiguous();  // a mapped checkpoint tensor is read in place
  QuantizedWeight q = kind == Kind::kInt8 ? quantize_int8(w) : quantize_nf4(w, double_quant);
  q.out_features = weight.size(0);
  q.in_features = weight.size(1);
  return q;
}

at::Tensor nf4_absmax(const QuantizedWeight& q) {
  require(q.kind == Kind::kNF4, "nf4_absmax: the weight is ", kind_name(q.kind), ", not nf4");
  if (!q.scale_scale.defined()) return q.scale;
  const int64_t blocks = q.scale.numel();
  const at::Tensor group = at::arange(blocks, q.scale.options().dtype(at::kLong)).div(kNF4ScaleBlockSize, "floor");
  return q.scale.to(at::kFloat) * q.scale_scale.index_select(0, group) + q.scale_offset;
}

at::Tensor dequantize(const QuantizedWeight& q, at::ScalarType dtype) {
  require_kind(q);
  require(at::isFloatingType(dtype), "dequantize: dtype must be floating point; got ", dtype);
  if (q.data.is_cuda()) {
    require_cuda_build("dequantize", q.data.device());
    return cuda_dequantize(q, dtype);
  }
  const auto ct = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w = at::empty({q.out_features, q.in_features}, at::TensorOptions().dtype(ct));
  rows_of(q)(0, q.out_features, w);
  return w.to(dtype);
}

at::Tensor linear(const at::Tensor& x, std::shared_ptr<const QuantizedWeight> q, const std::optional<at::Tensor>& bias) {
  require(q != nullptr, "quant::linear: no quantized weight given");
  require_kind(*q);
  require(x.size(-1) == q->in_features, "quant::linear: x has ", x.size(-1), " features but the weight takes ",
                  q->in_features);
  require(at::isFloatingType(x.scalar_type()), "quant::linear: x must be floating point; got ", x.scalar_type());
  if (x.is_cuda()) require_cuda_build("quant::linear", x.device());
  require(x.device() == q->data.device(), "quant::linear: x is on ", x.device().str(), " but the quantized weight on ",
          q->data.device().str(), "; move the model (model.to(\"", x.device().str(), "\")) or the input");
  return QuantizedLinear::apply(x, q, bias);
}

}  // namespace mola::quant

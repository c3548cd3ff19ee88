// A quantized weight dequantized on its GPU (mola/quant.h): the host glue of
// kernels/dequant.cu. quant::linear and quant::dequantize call it for CUDA
// tensors; the product that follows is cuBLAS's (through ATen).
#include <mola/quant.h>

#include <dequant.h>  // kernels/, on the include path

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace mola::quant {

at::Tensor dequantize_cuda(const QuantizedWeight& q, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(q.data.device());
  TORCH_CHECK(q.data.is_contiguous() && q.scale.is_contiguous(), "dequantize (CUDA): the stored tensors must be "
              "contiguous");
  at::Tensor out = at::empty({q.out_features, q.in_features}, q.data.options().dtype(dtype));
  namespace k = mola::kernels;
  k::DequantParams p;
  p.nf4 = q.kind == Kind::kNF4;
  p.data = q.data.const_data_ptr();
  if (p.nf4) {
    if (q.scale.scalar_type() == at::kFloat) {
      p.scales.absmax = q.scale.const_data_ptr<float>();
    } else {
      p.scales.code = q.scale.const_data_ptr<int8_t>();
      p.scales.scale_scale = q.scale_scale.const_data_ptr<float>();
      p.scales.offset = q.scale_offset.const_data_ptr<float>();
    }
  } else {
    p.row_scale = q.scale.const_data_ptr<float>();
  }
  p.in_features = q.in_features;
  p.first = 0;
  p.count = out.numel();
  p.out = out.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kDouble: err = k::launch_dequantize<double>(p, stream); break;
    case at::kFloat: err = k::launch_dequantize<float>(p, stream); break;
    case at::kHalf: err = k::launch_dequantize<__half>(p, stream); break;
    case at::kBFloat16: err = k::launch_dequantize<__nv_bfloat16>(p, stream); break;
    default: TORCH_CHECK(false, "dequantize (CUDA): dtype must be float64, float32, float16 or bfloat16; got ", dtype);
  }
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace mola::quant

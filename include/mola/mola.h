// The umbrella header of mola's C++ API: `#include <mola/mola.h>`.
#pragma once

#include <mola/config.h>
#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/models/config.h>
#include <mola/models/decoder.h>
#include <mola/nn/moe_lora_linear.h>
#include <mola/ops.h>

namespace mola {
// The causal LM at the top of the namespace, as the C++ API is spelled (design 6.2).
using models::CausalLM;
using models::ModelConfig;
}  // namespace mola

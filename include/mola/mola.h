// The umbrella header of mola's C++ API: `#include <mola/mola.h>`.
#pragma once

#include <mola/config.h>
#include <mola/data/batch.h>
#include <mola/data/dataset.h>
#include <mola/data/tokenizer.h>
#include <mola/io/llama2c.h>
#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/models/config.h>
#include <mola/models/decoder.h>
#include <mola/nn/moe_lora_linear.h>
#include <mola/ops.h>
#include <mola/train/evaluate.h>
#include <mola/train/options.h>
#include <mola/train/recipe.h>
#include <mola/train/run.h>
#include <mola/train/trainer.h>

namespace mola {
// The causal LM at the top of the namespace, as the C++ API is spelled (docs/cpp.md).
using models::CausalLM;
using models::ModelConfig;
using train::TrainOptions;
using train::Trainer;
}  // namespace mola

// The umbrella header of mola's C++ API: `#include <mola/mola.h>`.
#pragma once

#include <mola/config.h>
#include <mola/io/safetensors.h>
#include <mola/nn/moe_lora_linear.h>
#include <mola/ops.h>

// Precompiled header for the host C++ of mola and its tests: the LibTorch headers
// every translation unit pays for. Kept to what the sources really include, so a
// change here is rare (a change rebuilds everything).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

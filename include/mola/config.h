// mola/config.h: the adapter configuration (AdapterConfig), MoLA's layer-wise
// expert-allocation presets (docs/design.md, The MoLA layer), JSON in and out, and the
// trainable-parameter count as the MoLA papers report it.
//
// No torch header here or in src/config.cpp, on purpose: the command, the
// recipe loader, the Python bindings and the tests all parse configs, and with
// only the standard library and nlohmann/json this compiles in seconds.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace mola {

// Every user error in an adapter config: a bad value, an unknown key, an
// unreadable file. Derived from std::invalid_argument so that pybind11 raises
// it in Python as ValueError with the same message.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A per-layer count (experts, top_k or rank) kept as the user wrote it:
//   int                    the same count in every layer,
//   list                   4 group counts, or one count per layer,
//   string (experts only)  a preset: "triangle", "2468", "10-2-2-2", "2,4,6,8".
// It stays unexpanded so that a config written back to JSON reads the way its
// author wrote it (a preset name stays a name); resolve() expands it once the
// number of layers is known.
struct PerLayerSpec {
  std::variant<int64_t, std::vector<int64_t>, std::string> value;

  PerLayerSpec() : value(int64_t{1}) {}
  PerLayerSpec(int v) : value(int64_t{v}) {}
  PerLayerSpec(int64_t v) : value(v) {}
  PerLayerSpec(std::vector<int64_t> v) : value(std::move(v)) {}
  PerLayerSpec(std::string v) : value(std::move(v)) {}
  PerLayerSpec(const char* v) : value(std::string(v)) {}

  bool is_int() const { return std::holds_alternative<int64_t>(value); }
  bool is_list() const { return std::holds_alternative<std::vector<int64_t>>(value); }
  bool is_preset() const { return std::holds_alternative<std::string>(value); }

  // Checks what needs no layer count: every count >= 1, a well-formed preset
  // string, and strings only where allow_preset (experts). `field` names the
  // setting in messages.
  void validate(const std::string& field, bool allow_preset) const;
  // One count per layer, num_layers of them. A list of 4 is read as group
  // counts unless num_layers == 4 (then per layer; the result is the same).
  std::vector<int64_t> resolve(const std::string& field, int64_t num_layers,
                               bool allow_preset) const;

  // Accepts a JSON integer, a list of integers or a string; anything else
  // (floats, bools, objects) is a ConfigError naming `field`.
  static PerLayerSpec from_json(const nlohmann::json& j, const std::string& field);
  nlohmann::json to_json() const;

  friend bool operator==(const PerLayerSpec& a, const PerLayerSpec& b) { return a.value == b.value; }
  friend bool operator!=(const PerLayerSpec& a, const PerLayerSpec& b) { return !(a == b); }
};

// The size of one adapted linear layer, by its Hugging Face module name
// (the last component: "q_proj", "down_proj").
struct LinearShape {
  std::string name;
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// An AdapterConfig with every per-layer setting expanded for one model: what
// the modules are built from and what adapter_config.json holds.
struct ResolvedAdapter {
  std::string method;
  int64_t num_layers = 0;
  std::vector<int64_t> experts;  // [num_layers]
  std::vector<int64_t> top_k;    // [num_layers]
  std::vector<int64_t> rank;     // [num_layers]
  std::vector<double> scaling;   // [num_layers], alpha / rank[l] (LoRA, Hu et al. 2021)
  double alpha = 16.0;
  double dropout = 0.05;
  std::string dropout_masks = "per_expert";  // AdapterConfig::dropout_masks
  std::vector<std::string> targets;
  double aux_loss_coef = 0.001;
  std::string compute = "auto";
  std::string init = "kaiming";  // AdapterConfig::init; PiSSA also changes the base weights
  // Set by whoever saves the adapter (docs/design.md, The adapter files); resolve() leaves it "".
  std::string base_model_name;
  // MoLEx (method "molex"; see AdapterConfig): the per-layer experts, top_k
  // and rank above are the base method's. to_json() writes these keys only
  // for method "molex", so lora and mola adapter files keep their keys.
  std::string base_method = "lora";
  std::string molex_pool = "mean";
  double molex_alpha = 0.5;
  bool molex_alpha_learned = false;
  std::string molex_gate_grad = "straight_through";
  bool molex_exclude_self = false;
  double molex_aux_loss_coef = 0.0;

  bool is_molex() const { return method == "molex"; }

  // Keys: the field names above; experts, top_k, rank, scaling as lists;
  // base_model_name only when it is not empty, init only when it is not
  // "kaiming" (so adapters written before init existed read the same);
  // dropout_masks always (a file without it reads as "per_expert").
  nlohmann::json to_json() const;
  // Reads what to_json() wrote (no other keys; "scaling", "base_model_name"
  // and "init" are optional, and scaling, when present, must equal alpha / rank).
  // Re-validates everything.
  static ResolvedAdapter from_json(const nlohmann::json& j);
  // sum over layers l of E_l * sum over targets t of (r_l * (in_t + out_t) + in_t):
  // the LoRA A and B of every expert plus one router row per expert, as the
  // MoLA papers count trainable parameters. Every target needs a shape.
  int64_t num_parameters(const std::vector<LinearShape>& shapes) const;
};

struct AdapterConfig {
  // One of methods(): "mola" (routed LoRA experts) or "lora" (a plain LoRA:
  // the same layer with experts = top_k = 1, which are then its defaults and
  // the only values allowed).
  std::string method = "mola";
  PerLayerSpec experts = 8;     // LoRA experts per layer
  PerLayerSpec top_k = 2;       // experts each token is routed to
  PerLayerSpec rank = 8;        // LoRA rank r
  double alpha = 16.0;          // scaling = alpha / rank of that layer
  double dropout = 0.05;        // on the LoRA input, 0 <= p < 1
  // Dropout masks, one of dropout_masks_modes(): "per_expert" (each routed
  // expert of a token draws its own mask over the token's features, as the
  // MoLA authors' code calls dropout inside its per-expert loop) or "shared"
  // (one mask per token for all its experts: one masked copy of x, faster; a
  // deviation from the authors).
  std::string dropout_masks = "per_expert";
  std::vector<std::string> targets = default_targets();
  double aux_loss_coef = 0.001;  // load-balancing loss weight, >= 0 (0: off)
  std::string compute = "auto";  // one of compute_modes()
  // How the experts start (docs/recipes.md), one of inits():
  //   "kaiming"  A Kaiming-uniform (a = sqrt(5)), B zero: LoRA's and the MoLA
  //              authors' init; the adapted model starts as the base model.
  //   "gaussian" A ~ N(0, (1/r)^2) (std 1/r, as PEFT's init_lora_weights=
  //              "gaussian"), B zero.
  //   "pissa"    PiSSA (Meng et al. 2024): from the top-r SVD W = U S V^T,
  //              A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s) with s =
  //              alpha / r, the same in every expert, and the base weight
  //              becomes W - s B A = W - U_r S_r V_r^T. The routing weights
  //              of a token sum to 1, so the mixture adds back exactly s B A
  //              and the model's output is unchanged at the start.
  // The router is Kaiming-uniform in all three.
  std::string init = "kaiming";

  // ---- MoLEx (docs/design.md, MoLEx): method "molex" only; any other method rejects
  // these keys. Layer t's output is alpha * u_t(z_t) + (1 - alpha) * u_j(z_t),
  // j picked by a gate over the model's layers. Marked "ours" where the paper
  // is silent (docs/design.md, MoLEx).
  std::string base_method = "lora";  // the adapter inside each block: one of molex_base_methods()
  std::string molex_pool = "mean";   // gate input (ours): mean over tokens, "last" token, or per-"token"
  double molex_alpha = 0.5;          // weight of the layer's own block (ours: 0.5)
  bool molex_alpha_learned = false;  // ours: a per-layer sigmoid(parameter), starting at molex_alpha
  std::string molex_gate_grad = "straight_through";  // ours: straight_through, prob or none
  bool molex_exclude_self = false;   // ours: j may equal t
  double molex_aux_loss_coef = 0.0;  // balance loss over the gates' choices, >= 0 (0: off)

  // The defaults for `method`: the struct's, with experts = top_k = 1 for "lora"
  // (and for "molex" over base_method "lora"). Not validated (an unknown
  // method fails in validate()).
  static AdapterConfig for_method(const std::string& method, const std::string& base_method = "lora");

  // Missing keys keep their method's defaults (for_method); unknown keys and bad values throw
  // ConfigError. The result is validated.
  static AdapterConfig from_json(const nlohmann::json& j);
  static AdapterConfig from_json_string(const std::string& text);
  static AdapterConfig from_json_file(const std::string& path);
  // Keys are exactly keys(); per-layer specs keep their spelling.
  nlohmann::json to_json() const;

  // Everything that can be checked without the number of layers (top_k <=
  // experts only when both are plain ints; resolve() checks every layer).
  void validate() const;
  // The MoLEx part of validate(): for method "molex" the values, for any
  // other method that the MoLEx fields keep their defaults.
  void validate_molex() const;
  // Expands every per-layer setting for a model with num_layers layers and
  // checks top_k <= experts in each layer.
  ResolvedAdapter resolve(int64_t num_layers) const;
  // resolve(num_layers).num_parameters(shapes); shapes whose name is not a
  // target are ignored.
  int64_t num_parameters(const std::vector<LinearShape>& shapes, int64_t num_layers) const;

  // q_proj k_proj v_proj o_proj gate_proj up_proj down_proj: all seven, as in
  // the authors' scripts.
  static std::vector<std::string> default_targets();
  static const std::vector<std::string>& keys();           // the JSON keys, in field order
  static const std::vector<std::string>& methods();        // supported adapter methods
  // The names of the op's `compute` codes, in code order: "auto" (0), "dense" (1),
  // "grouped" (2). The one mapping: mola::ops::parse_compute, compute_name and
  // Python's mola.ops.COMPUTE read it.
  static const std::vector<std::string>& compute_modes();
  static const std::vector<std::string>& inits();          // kaiming, gaussian, pissa
  static const std::vector<std::string>& dropout_masks_modes();  // per_expert, shared
  static const std::vector<std::string>& molex_keys();          // base_method and the molex_* keys
  static const std::vector<std::string>& molex_base_methods();  // lora, mola
  static const std::vector<std::string>& molex_pools();         // mean, last, token
  static const std::vector<std::string>& molex_gate_grads();    // straight_through, prob, none
};

bool operator==(const AdapterConfig& a, const AdapterConfig& b);
inline bool operator!=(const AdapterConfig& a, const AdapterConfig& b) { return !(a == b); }

// Hooks so nlohmann's `j.get<mola::AdapterConfig>()` and `json j = cfg;` work
// (e.g. for the "adapter" section of a recipe).
inline void to_json(nlohmann::json& j, const AdapterConfig& c) { j = c.to_json(); }
inline void from_json(const nlohmann::json& j, AdapterConfig& c) { c = AdapterConfig::from_json(j); }

// Experts per layer for a preset string: a name (rectangle 5555, triangle
// 8642, inverted 2468, hourglass 8228, diamond 2882), 4 digits ("6532"), or 4
// counts separated by '-' or ',' ("10-2-2-2", "2, 4, 6, 8"). The layers split
// into 4 contiguous groups of L / 4; the first L mod 4 groups get one more.
std::vector<int64_t> expand_preset(const std::string& spec, int64_t num_layers);
// The named presets, in the papers' order.
std::vector<std::string> preset_names();

namespace detail {
// A preset string's 4 group counts, bottom group first; `field` names the
// setting in messages.
std::array<int64_t, 4> parse_group_spec(const std::string& field, const std::string& spec);
// Spreads 4 group counts over num_layers layers (see expand_preset).
std::vector<int64_t> expand_groups(const std::array<int64_t, 4>& groups, int64_t num_layers);
}  // namespace detail

}  // namespace mola

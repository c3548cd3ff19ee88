// mola._C.run_command and mola._C.train_recipe / eval_recipe: the `mola`
// command and its recipe runs (mola/train/run.h), for `python -m mola` and
// mola.recipes.train(recipe, overrides). The GIL is released while they run.
#include <mola/train/run.h>

#include <torch/python.h>

#include <pybind11/stl.h>

#include "json.h"
#include "process_group.h"

namespace py = pybind11;

namespace {

using mola_bindings::to_python;

std::vector<std::string> override_list(const py::object& overrides) {
  std::vector<std::string> out;
  if (overrides.is_none()) return out;
  if (py::isinstance<py::dict>(overrides)) {
    auto json = py::module_::import("json");
    for (const auto& [key, value] : overrides.cast<py::dict>()) {
      // Strings stay strings; everything else travels as JSON.
      const std::string v = py::isinstance<py::str>(value) ? value.cast<std::string>()
                                                             : json.attr("dumps")(value).cast<std::string>();
      out.push_back(py::str(key).cast<std::string>() + "=" + v);
    }
    return out;
  }
  return overrides.cast<std::vector<std::string>>();
}

}  // namespace

void mola_bind_run(py::module_& m) {
  m.def(
      "run_command",
      [](const std::vector<std::string>& args, const py::object& process_group) {
        const auto group = mola_bindings::to_process_group(process_group);
        py::gil_scoped_release no_gil;
        return mola::train::run_command(args, group);
      },
      py::arg("args"), py::arg("process_group") = py::none(),
      "The `mola` command line (without the program name); returns its exit status (2: a user error). "
      "process_group: the torch.distributed group `train` joins (python -m mola passes group.WORLD under torchrun).");
  m.def(
      "command_verbs",
      [] {
        py::list out;
        for (const auto& v : mola::cli::verbs()) {
          py::dict d;
          d["name"] = v.name;
          d["synopsis"] = v.synopsis;
          d["summary"] = v.summary;
          d["options"] = v.options;
          d["example"] = v.example;
          d["python_only"] = v.python_only;
          out.append(d);
        }
        return out;
      },
      "The `mola` command's table of verbs (mola/cli.h), in order: name, synopsis, summary, options, example, "
      "python_only. python -m mola builds its argparse subcommands from it.");
  m.def(
      "command_verb_of",
      [](const std::vector<std::string>& args) -> py::object {
        const auto* v = mola::cli::verb_of(args);
        return v == nullptr ? py::object(py::none()) : py::object(py::str(v->name));
      },
      py::arg("args"), "The verb args name (\"convert mola-authors\" takes two words), or None.");
  m.def(
      "command_help", [](const std::string& verb) { return verb.empty() ? mola::train::usage() : mola::train::help(verb); },
      py::arg("verb") = "",
      "The `mola --help` text (verb empty), or `mola VERB --help`'s: usage, options and an example, from the "
      "command's table of verbs (ValueError for no such verb).");
  m.def(
      "train_recipe",
      [](const std::string& recipe, const py::object& overrides, const py::object& process_group) {
        const auto list = override_list(overrides);
        const auto group = mola_bindings::to_process_group(process_group);
        nlohmann::json summary;
        {
          py::gil_scoped_release no_gil;
          summary = mola::train::run_train(mola::train::Recipe::from_file(recipe, list), group);
        }
        return to_python(summary);
      },
      py::arg("recipe"), py::arg("overrides") = py::none(), py::arg("process_group") = py::none());
  m.def(
      "eval_recipe",
      [](const std::string& recipe, const std::string& adapter, const std::string& split, const py::object& overrides) {
        const auto list = override_list(overrides);
        nlohmann::json out;
        {
          py::gil_scoped_release no_gil;
          out = mola::train::run_eval(mola::train::Recipe::from_file(recipe, list), adapter, split);
        }
        return to_python(out);
      },
      py::arg("recipe"), py::arg("adapter") = "", py::arg("split") = "test", py::arg("overrides") = py::none());
  m.def(
      "continual_metrics",
      [](const std::vector<std::vector<double>>& accuracy) {
        const auto m = mola::train::continual_metrics(accuracy);
        return std::make_pair(m.op, m.pd);
      },
      py::arg("accuracy"),
      "(OP, PD) of a T x T accuracy matrix R[t][i] (accuracy on domain i after training through domain t), as the "
      "MoLA paper's continual-learning tables.");
  m.def(
      "load_recipe",
      [](const std::string& recipe, const py::object& overrides) {
        return to_python(mola::train::Recipe::from_file(recipe, override_list(overrides)).json);
      },
      py::arg("recipe"), py::arg("overrides") = py::none(),
      "Reads and validates a recipe (every section); returns its JSON after the overrides. Raises ValueError.");
  m.def(
      "recipe_inputs",
      [](const std::string& recipe) {
        const auto r = mola::train::Recipe::from_file(recipe);
        nlohmann::json j{{"model_path", r.model.path.empty() ? "" : r.resolve_path(r.model.path)},
                         {"dtype", r.model.dtype},
                         {"device", r.model.device},
                         {"template", r.template_path()},
                         {"task", r.data.task},
                         {"cutoff_len", r.data.options.cutoff_len},
                         {"train_on_inputs", r.data.options.train_on_inputs},
                         {"add_eos_token", r.data.options.add_eos_token}};
        j["tokenizer"] = r.model.path.empty() && r.tokenizer.empty() ? "" : r.tokenizer_path();
        const auto file = [&](const std::string& f) { return f.empty() ? f : r.resolve_path(f); };
        j["train"] = file(r.data.train);
        j["validation"] = file(r.data.validation);
        j["test"] = file(r.data.test);
        return to_python(j);
      },
      py::arg("recipe"),
      "What a recipe's run reads, its paths resolved as the run resolves them: model_path, dtype, device, "
      "tokenizer, template ('' for raw), task, cutoff_len, train_on_inputs, add_eos_token and the train / "
      "validation / test files ('' when absent). Raises ValueError for a bad recipe.");
}

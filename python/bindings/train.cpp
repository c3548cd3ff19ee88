// pybind11 bindings for mola/train and mola/data/batch.h, registered into
// mola._C by module.cpp through mola_bind_train(m):
//   TrainOptions(dict=None, **kwargs), .to_dict(), one attribute per option
//   Trainer(model, options, output_dir, process_group=None), .fit(train, validation=None, on_eval=None) -> dict,
//       .evaluate(examples) -> float
//   NonFiniteLossError (a FloatingPointError), lr_multiplier, list_checkpoints,
//   collate, group_by_length, BatchSampler (the batching the trainer uses, for tests and tools)
// Examples are lists of (input_ids, labels) pairs, dicts with "input_ids" (and
// "labels", default: input_ids) or objects with those attributes; ids are
// lists of ints or 1-d tensors.
//
// fit releases the GIL for the whole run and takes it back only around the
// Python on_eval callback, so other Python threads run while it trains.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <memory>
#include <string>

#include "mola/data/batch.h"
#include "mola/train/trainer.h"
#include "json.h"
#include "process_group.h"

namespace py = pybind11;
using mola::data::Example;
using mola::train::Trainer;
using mola::train::TrainOptions;

namespace {

using mola_bindings::to_json;
using mola_bindings::to_python;

std::vector<int64_t> to_ids(const py::handle& obj, const char* what, size_t index) {
  py::object seq = py::reinterpret_borrow<py::object>(obj);
  if (py::hasattr(seq, "tolist")) seq = seq.attr("tolist")();
  try {
    return seq.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw py::type_error("example " + std::to_string(index) + ": " + what +
                         " must be a list of ints or a 1-d integer tensor; got " + py::repr(obj).cast<std::string>());
  }
}

std::vector<Example> to_examples(const py::object& items, const char* which) {
  std::vector<Example> out;
  if (items.is_none()) return out;
  size_t i = 0;
  for (const py::handle item : items) {
    Example e;
    if (py::isinstance<py::dict>(item)) {
      const auto d = py::reinterpret_borrow<py::dict>(item);
      if (!d.contains("input_ids"))
        throw py::value_error(std::string(which) + " example " + std::to_string(i) +
                              " is a dict without \"input_ids\"; give {\"input_ids\": [...], \"labels\": [...]}");
      e.input_ids = to_ids(d["input_ids"], "input_ids", i);
      e.labels = d.contains("labels") ? to_ids(d["labels"], "labels", i) : e.input_ids;
    } else if (py::hasattr(item, "input_ids")) {
      e.input_ids = to_ids(item.attr("input_ids"), "input_ids", i);
      e.labels = py::hasattr(item, "labels") ? to_ids(item.attr("labels"), "labels", i) : e.input_ids;
    } else if ((py::isinstance<py::tuple>(item) || py::isinstance<py::list>(item)) && py::len(item) == 2) {
      e.input_ids = to_ids(item[py::int_(0)], "input_ids", i);
      e.labels = to_ids(item[py::int_(1)], "labels", i);
    } else {
      throw py::type_error(std::string(which) + " example " + std::to_string(i) +
                           " must be an (input_ids, labels) pair or a dict with input_ids and labels; got " +
                           py::repr(item).cast<std::string>());
    }
    out.push_back(std::move(e));
    ++i;
  }
  return out;
}

TrainOptions to_options(const py::object& obj) {
  if (obj.is_none()) return TrainOptions{};
  if (py::isinstance<TrainOptions>(obj)) return obj.cast<TrainOptions>();
  if (py::isinstance<py::dict>(obj)) return TrainOptions::from_json(to_json(obj));
  throw py::type_error("options must be a mola TrainOptions or a dict; got " + py::repr(obj).cast<std::string>());
}

py::dict batch_to_dict(const mola::data::Batch& b) {
  py::dict d;
  d["input_ids"] = b.input_ids;
  d["attention_mask"] = b.attention_mask;
  d["labels"] = b.labels;
  d["num_tokens"] = b.num_tokens;
  return d;
}

}  // namespace

void mola_bind_train(py::module_& m) {
  py::register_exception<mola::train::NonFiniteLossError>(m, "NonFiniteLossError", PyExc_FloatingPointError);

  py::class_<TrainOptions> opts(m, "TrainOptions",
                                "The trainer's settings (a recipe's \"train\" section). TrainOptions(dict) or "
                                "TrainOptions(lr=1e-3, ...); unknown keys and bad values raise ValueError.");
  opts.def(py::init([](const py::object& d, const py::kwargs& kwargs) {
             nlohmann::json j = nlohmann::json::object();
             if (!d.is_none()) {
               if (!py::isinstance<py::dict>(d))
                 throw py::type_error("TrainOptions: give a dict of settings or keyword arguments; got " +
                                      py::repr(d).cast<std::string>());
               j = to_json(d);
             }
             const nlohmann::json extra = to_json(kwargs);
             for (const auto& [k, v] : extra.items()) j[k] = v;
             return TrainOptions::from_json(j);
           }),
           py::arg("options") = py::none())
      .def("to_dict", [](const TrainOptions& o) { return to_python(o.to_json()); })
      .def_static("from_dict", [](const py::dict& d) { return TrainOptions::from_json(to_json(d)); })
      .def("validate", &TrainOptions::validate)
      .def_property_readonly_static("keys", [](const py::object&) { return TrainOptions::keys(); })
      .def("__eq__", [](const TrainOptions& a, const TrainOptions& b) { return a == b; })
      .def("__repr__", [](const TrainOptions& o) { return "TrainOptions(" + o.to_json().dump() + ")"; })
      .def_readwrite("epochs", &TrainOptions::epochs)
      .def_readwrite("max_steps", &TrainOptions::max_steps)
      .def_readwrite("batch_size", &TrainOptions::batch_size)
      .def_readwrite("micro_batch_size", &TrainOptions::micro_batch_size)
      .def_readwrite("lr", &TrainOptions::lr)
      .def_readwrite("warmup_steps", &TrainOptions::warmup_steps)
      .def_readwrite("schedule", &TrainOptions::schedule)
      .def_readwrite("weight_decay", &TrainOptions::weight_decay)
      .def_readwrite("max_grad_norm", &TrainOptions::max_grad_norm)
      .def_readwrite("adam_beta1", &TrainOptions::adam_beta1)
      .def_readwrite("adam_beta2", &TrainOptions::adam_beta2)
      .def_readwrite("adam_epsilon", &TrainOptions::adam_epsilon)
      .def_readwrite("seed", &TrainOptions::seed)
      .def_readwrite("group_by_length", &TrainOptions::group_by_length)
      .def_readwrite("log_every", &TrainOptions::log_every)
      .def_readwrite("eval_every", &TrainOptions::eval_every)
      .def_readwrite("save_every", &TrainOptions::save_every)
      .def_readwrite("save_total_limit", &TrainOptions::save_total_limit)
      .def_readwrite("resume", &TrainOptions::resume)
      .def_readwrite("init_adapter", &TrainOptions::init_adapter)
      .def_readwrite("trainable", &TrainOptions::trainable);

  py::class_<Trainer, std::shared_ptr<Trainer>>(
      m, "Trainer",
      "Trainer(model: mola.CausalLM, options: TrainOptions | dict | None, output_dir): fine-tunes the model's "
      "adapter, writing output_dir/metrics.jsonl and output_dir/checkpoints/step-<N>/.")
      .def(py::init([](std::shared_ptr<mola::models::CausalLMImpl> model, const py::object& options,
                       const std::string& output_dir, const py::object& process_group) {
             auto trainer = std::make_shared<Trainer>(std::move(model), to_options(options), output_dir);
             trainer->set_process_group(mola_bindings::to_process_group(process_group));
             return trainer;
           }),
           py::arg("model"), py::arg("options"), py::arg("output_dir"), py::arg("process_group") = py::none(),
           "process_group: a torch.distributed ProcessGroup (group.WORLD after init_process_group) to train as one "
           "of its ranks: every rank calls fit() together, gradients are summed over the ranks' micro-batches of "
           "each global batch, rank 0 alone writes metrics, checkpoints and runs on_eval (docs/distributed.md).")
      .def(
          "fit",
          [](Trainer& self, const py::object& train, const py::object& validation, const py::object& on_eval) {
            const auto train_ex = to_examples(train, "training");
            const auto valid_ex = to_examples(validation, "validation");
            Trainer::EvalCallback callback;
            if (!on_eval.is_none()) {
              // Held through a shared_ptr whose deleter takes the GIL, so copies
              // of the std::function never touch a Python refcount unlocked.
              std::shared_ptr<py::object> fn(new py::object(on_eval), [](py::object* o) {
                py::gil_scoped_acquire gil;
                delete o;
              });
              callback = [fn](int64_t step) -> nlohmann::json {
                py::gil_scoped_acquire gil;
                const py::object r = (*fn)(step);
                if (r.is_none()) return nullptr;
                return to_json(r);
              };
            }
            self.set_eval_callback(std::move(callback));
            mola::train::TrainResult result;
            {
              py::gil_scoped_release no_gil;
              result = self.fit(train_ex, valid_ex);
            }
            self.set_eval_callback(nullptr);
            return to_python(result.to_json());
          },
          py::arg("train"), py::arg("validation") = py::none(), py::arg("on_eval") = py::none(),
          "Trains; returns {steps, train_loss, eval_loss, checkpoint, tokens, wall_s}. on_eval(step) -> dict|None "
          "is called at each evaluation (model in eval mode, no grad); its dict joins that metrics line. Raises "
          "NonFiniteLossError (a FloatingPointError) when the loss or gradient norm is NaN/inf.")
      .def(
          "evaluate",
          [](Trainer& self, const py::object& examples) {
            const auto ex = to_examples(examples, "validation");
            py::gil_scoped_release no_gil;
            return self.evaluate(ex);
          },
          py::arg("examples"), "The mean token loss over the examples (labels -100 excluded), without gradients.")
      .def_property_readonly("options", &Trainer::options)
      .def_property_readonly("output_dir", &Trainer::output_dir);

  m.def("lr_multiplier", &mola::train::lr_multiplier, py::arg("schedule"), py::arg("step"), py::arg("warmup_steps"),
        py::arg("total_steps"),
        "The learning-rate multiplier after `step` optimizer steps (transformers' linear / cosine / constant "
        "schedules with warmup).");
  m.def("list_checkpoints", &mola::train::list_checkpoints, py::arg("output_dir"),
        "[(step, path)] of the complete checkpoints in output_dir/checkpoints, oldest first.");

  m.def(
      "collate",
      [](const py::object& examples, int64_t pad_id, int64_t pad_to_multiple_of) {
        return batch_to_dict(mola::data::collate(to_examples(examples, "batch"), pad_id, pad_to_multiple_of));
      },
      py::arg("examples"), py::arg("pad_id") = 0, py::arg("pad_to_multiple_of") = 8,
      "Right-pads examples into {input_ids, attention_mask, labels, num_tokens} (labels -100 on padding).");
  m.def("group_by_length", &mola::data::group_by_length, py::arg("permutation"), py::arg("lengths"),
        py::arg("batch_size"), "transformers' get_length_grouped_indices applied to a given permutation.");
  py::class_<mola::data::BatchSampler>(m, "BatchSampler",
                                       "The trainer's data order: a seeded permutation per epoch, cut into batches "
                                       "of micro-batches.")
      .def(py::init<std::vector<int64_t>, int64_t, int64_t, uint64_t, bool>(), py::arg("lengths"),
           py::arg("batch_size"), py::arg("micro_batch_size"), py::arg("seed"), py::arg("group_by_length") = false)
      .def("epoch_order", &mola::data::BatchSampler::epoch_order, py::arg("epoch"))
      .def("next", &mola::data::BatchSampler::next)
      .def_property_readonly("batches_per_epoch", &mola::data::BatchSampler::batches_per_epoch)
      .def_property(
          "position",
          [](const mola::data::BatchSampler& s) { return py::make_tuple(s.position().epoch, s.position().step); },
          [](mola::data::BatchSampler& s, const std::pair<int64_t, int64_t>& p) {
            s.set_position({p.first, p.second});
          });
}

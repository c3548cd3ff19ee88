"""Accuracy on multiple-choice and classification rows (docs/recipes.md), as bound
from C++ in python/bindings/evaluate.cpp (mola/train/evaluate.h). Re-exported
here so that the package's public names live in Python modules.

    result = mola.evaluation.evaluate(model, "tokenizer.model", "templates/alpaca.json", rows,
                           mola.evaluation.EvalOptions(batch_size=8, max_new_tokens=128))
    result["generate_accuracy"], result["generate_failed"], result["loglik_accuracy"]
    result["majority_answer"], result["majority_accuracy"]

By generation: the authors' protocol (left-padded greedy batches, the text
after "### Response:" matched with ``The answer is ([A-Z]).``, exactly one
match, else FAILED). By log-likelihood: the option letter whose
"Answer: The answer is L." scores highest after the prompt.
``parse_answer(text)`` is the regex step alone; rows are ``mola._C.Row``
objects or dicts with instruction, input, answer and options.
"""
from ._C import EvalOptions, evaluate, majority_baseline, parse_answer

__all__ = ["EvalOptions", "evaluate", "majority_baseline", "parse_answer"]

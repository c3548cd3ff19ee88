"""mola.Trainer and mola.TrainOptions: the C++ trainer (src/train/, docs/design.md
6.2, 8, 10) as bound in python/bindings/train.cpp, re-exported so the public
names live in a Python module like the rest of mola's API.

    model = mola.CausalLM.from_pretrained("path/to/checkpoint")
    model.attach(mola.MoLAConfig(experts="triangle"))
    trainer = mola.Trainer(model, mola.TrainOptions(lr=3e-4, batch_size=128, micro_batch_size=8), "out/")
    result = trainer.fit(train, validation, on_eval=lambda step: {"acc": ...})
    # train / validation: [(input_ids, labels)] or [{"input_ids": ..., "labels": ...}]
    # out/metrics.jsonl, out/checkpoints/step-<N>/; TrainOptions(resume=True) continues the run

A NaN or infinite loss raises mola.NonFiniteLossError, a FloatingPointError
whose message names the step, the last good checkpoint and the likely cause.
"""
from ._C import (BatchSampler, NonFiniteLossError, Trainer, TrainOptions, collate, group_by_length,
                 list_checkpoints, lr_multiplier)

__all__ = ["Trainer", "TrainOptions", "NonFiniteLossError", "lr_multiplier", "list_checkpoints", "collate",
           "group_by_length", "BatchSampler"]

NonFiniteLossError.__doc__ = (
    "Raised by Trainer.fit when the loss or the gradient norm is NaN or infinite (a FloatingPointError); "
    "the message names the step, the last good checkpoint and the likely cause.")

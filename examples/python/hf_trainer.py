"""Fine-tune the bundled tiny llama with MoLA through the Hugging Face Trainer.

    python examples/python/hf_trainer.py --output out/hf-trainer [--steps 30]

The transformers model gets MoLA adapters from mola.inject; mola.data turns the
bundled ScienceQA rows into tokenised examples; mola.integrations.MoLATrainer
adds the balance loss, logs it with the expert load, and writes the adapter
into every checkpoint (checkpoint-N/mola_adapter) and into OUTPUT/mola_adapter.
It prints the loss on a fixed batch of 16 training examples before and after.
"""
import argparse
import json
from pathlib import Path

import torch
import transformers

import mola
from mola.integrations import ExampleCollator, MoLATrainer

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "data/models/stories260K"))
    p.add_argument("--data", default=str(ROOT / "data/tasks/scienceqa/train.jsonl"))
    p.add_argument("--template", default=str(ROOT / "data/templates/alpaca.json"))
    p.add_argument("--output", default="out/hf-trainer")
    p.add_argument("--experts", default="inverted", help="a MoLA preset or group counts, e.g. 2,4,6,8")
    p.add_argument("--examples", type=int, default=64, help="training rows used (the first N)")
    p.add_argument("--cutoff", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="per-device micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_examples(args):
    tok = mola.data.Tokenizer.from_file(args.checkpoint)
    template = mola.data.PromptTemplate.from_json_file(args.template)
    rows = mola.data.load_rows(args.data)[:args.examples]
    return mola.data.tokenize_rows(rows, template, tok, mola.data.DataOptions(cutoff_len=args.cutoff))


class StepPrinter(transformers.TrainerCallback):
    """One line per training log: step, loss, aux loss."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            print(f"step {state.global_step}: loss {logs['loss']:.4f}, aux_loss {logs['aux_loss']:.5f}", flush=True)


def eval_loss(model, batch):
    """The LM loss on a fixed batch, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was_training)
    return loss


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    mola.inject(model, mola.MoLAConfig(experts=args.experts, top_k=2, rank=8, alpha=16, dropout=args.dropout))
    examples = load_examples(args)
    collator = ExampleCollator()
    probe = collator(examples[:16])
    before = eval_loss(model, probe)

    training_args = transformers.TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, save_steps=args.save_steps, save_strategy="steps",
        report_to=[], use_cpu=True, seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)
    trainer = MoLATrainer(model=model, args=training_args, train_dataset=list(examples), data_collator=collator)
    trainer.remove_callback(transformers.PrinterCallback)  # it prints every log key (one per expert here)
    trainer.add_callback(StepPrinter())
    trainer.train()

    after = eval_loss(model, probe)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logs[-1]
    load = {k.split("/")[1]: round(v, 2) for k, v in last.items() if k.endswith("/imbalance")}
    print(f"eval loss {before:.4f} -> {after:.4f}")
    print(f"last logged step {last['step']}: loss {last['loss']:.4f}, aux_loss {last['aux_loss']:.5f}")
    print(f"expert load imbalance (busiest share x E, 1 = even): {json.dumps(load)}")
    print(f"adapter: {Path(args.output) / 'mola_adapter'}")
    return {"loss_before": before, "loss_after": after, "trainer": trainer, "probe": probe}


if __name__ == "__main__":
    main()

"""mola with the Hugging Face Trainer: ``MoLATrainer``, a ``transformers.Trainer``
that trains a model injected by ``mola.inject``.

    from mola.integrations import MoLATrainer, ExampleCollator
    trainer = MoLATrainer(model=model, args=transformers.TrainingArguments(...),
                          train_dataset=examples, data_collator=ExampleCollator())
    trainer.train()          # out/checkpoint-N/mola_adapter/, out/mola_adapter/

On top of the Trainer it
- adds ``mola.aux_loss`` (the balance loss of docs/design.md, The balance loss, padding left out) to
  the loss of each micro-batch, scaled like the Trainer scales the LM loss
  under gradient accumulation, so a step's loss is the mean over micro-batches;
- logs ``aux_loss`` (its mean since the last log) and the expert load: per
  decoder layer and expert, the share of the top-k selections made on the
  non-padding tokens since the last log (``expert_load/layer_L/expert_E``), and
  ``expert_load/layer_L/imbalance`` (the busiest expert's share times E; 1 is
  uniform), counted as src/train/expert_load.cpp counts them for ``mola train``;
- saves the adapter, not the model: every checkpoint directory holds
  ``checkpoint-N/mola_adapter`` (``mola.save_adapter``) beside the Trainer's
  own training state (optimizer, scheduler, RNG, trainer_state.json), never a
  copy of the frozen base; so does any ``save_model`` directory, and
  ``output_dir/mola_adapter`` when ``train`` returns. ``resume_from_checkpoint``
  and ``load_best_model_at_end`` read the adapter back from there.

Importing this module imports transformers (which needs accelerate for the
Trainer); ``import mola`` does not.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import transformers
from torch import nn

from .adapter import load_adapter, save_adapter
from .injection import mola_modules
from .lifecycle import ADAPTER_DIRNAME  # the adapter's folder inside a checkpoint or output directory
from .nn import DEFAULT_AUX_LOSS_COEF, aux_loss
from .ops import moe_lora_route

__all__ = ["MoLATrainer", "ExampleCollator", "expert_load_counts", "ADAPTER_DIRNAME"]


def expert_load_counts(model: nn.Module, attention_mask: Optional[torch.Tensor] = None
                       ) -> "OrderedDict[int, torch.Tensor]":
    """Top-k selections per expert in the last forward, summed over each layer's MoLALinear modules.

    Routes the router logits each module kept with the op's own routing
    (``mola.ops.moe_lora_route``), so the counts are the op's choices.
    ``attention_mask`` (``[batch, seq]``, 0 = padding) leaves padding out.
    Returns ``{layer_index: int64 counts [E]}`` in layer order.
    """
    keep = None
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).ne(0)
    counts: Dict[int, torch.Tensor] = {}
    for path, m in mola_modules(model):
        logits = m.router_logits
        if logits is None:
            continue
        logits = logits.detach()
        if keep is not None:
            if logits.shape[0] != keep.numel():
                raise ValueError(f"expert_load_counts: {path} routed {logits.shape[0]} tokens but the "
                                 f"attention_mask has {keep.numel()}; pass the mask of the batch the model ran")
            logits = logits[keep.to(logits.device)]
        chosen = moe_lora_route(logits, m.top_k)[1].reshape(-1)
        c = torch.bincount(chosen.cpu(), minlength=m.num_experts)
        layer = -1 if m.layer_index is None else m.layer_index
        counts[layer] = counts[layer] + c if layer in counts else c
    return OrderedDict(sorted(counts.items()))


class ExampleCollator:
    """Right-pads examples into a batch for the Trainer: ``input_ids``,
    ``attention_mask`` and ``labels`` (-100 on padding), to a multiple of
    ``pad_to_multiple_of``, as mola's own trainer batches them (pad id 0).

    Examples are ``mola.data.Example`` objects (from ``mola.data.tokenize_rows``)
    or mappings with ``input_ids`` and optional ``labels`` (default: the ids).
    """

    def __init__(self, pad_id: int = 0, pad_to_multiple_of: int = 8):
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be at least 1")
        self.pad_id, self.pad_to_multiple_of = int(pad_id), int(pad_to_multiple_of)

    def __call__(self, examples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ExampleCollator: got an empty list of examples")
        rows = [self._fields(e) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), -100, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.as_tensor(row_ids, dtype=torch.int64)
            labels[i, :len(row_labels)] = torch.as_tensor(row_labels, dtype=torch.int64)
            mask[i, :len(row_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def _fields(example):
        if isinstance(example, Mapping):
            ids = list(example["input_ids"])
            labels = list(example.get("labels", ids))
        else:
            ids, labels = list(example.input_ids), list(example.labels)
        if not ids:
            raise ValueError("ExampleCollator: an example has no input_ids")
        if len(labels) != len(ids):
            raise ValueError(f"ExampleCollator: an example has {len(ids)} input_ids but {len(labels)} labels; "
                             "they must align token for token")
        return ids, labels


class MoLATrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for models injected with ``mola.inject``: adds
    the balance loss, logs it and the expert load, saves the mola adapter at
    every checkpoint and at the end (see the module docstring).

    Args (beyond the Trainer's):
        aux_loss_coef: the balance loss coefficient; None takes the model's
            ``mola_config["aux_loss_coef"]`` (0.001 by default); 0 turns it off.
        mask_padding: leave padding tokens (``attention_mask == 0``) out of the
            balance loss, as ``mola train`` does (True); False includes them
            as the authors' code does.
        log_expert_load: add the per-layer expert shares to the training logs.
    """

    def __init__(self, *args, aux_loss_coef: Optional[float] = None, mask_padding: bool = True,
                 log_expert_load: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._mola_model()
        if not mola_modules(model):
            raise ValueError("MoLATrainer: the model has no MoLALinear modules; call mola.inject(model, cfg) "
                             "(or mola.load_adapter) before making the trainer")
        if aux_loss_coef is None:
            aux_loss_coef = (getattr(model, "mola_config", None) or {}).get("aux_loss_coef", DEFAULT_AUX_LOSS_COEF)
        if not (isinstance(aux_loss_coef, (int, float)) and math.isfinite(aux_loss_coef) and aux_loss_coef >= 0):
            raise ValueError(f"MoLATrainer: aux_loss_coef={aux_loss_coef!r} must be a finite number >= 0")
        self.aux_loss_coef = float(aux_loss_coef)
        self.mask_padding = bool(mask_padding)
        self.log_expert_load = bool(log_expert_load)
        self._reset_accumulators()

    def _mola_model(self) -> nn.Module:
        model = self.model
        while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and similar wrappers
            model = model.module
        return model

    def _reset_accumulators(self) -> None:
        self._aux_sum, self._aux_count = 0.0, 0
        self._load: Dict[int, torch.Tensor] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss plus ``aux_loss_coef * aux`` of the MoLA layers' last forward."""
        mask = inputs.get("attention_mask") if self.mask_padding else None
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if self.aux_loss_coef == 0.0:
            return (loss, outputs) if return_outputs else loss
        inner = self._mola_model()
        aux = aux_loss(inner, coef=self.aux_loss_coef, mask=mask)
        if model.training:
            self._aux_sum += float(aux.detach())
            self._aux_count += 1
            if self.log_expert_load:
                for layer, c in expert_load_counts(inner, inputs.get("attention_mask")).items():
                    self._load[layer] = self._load[layer] + c if layer in self._load else c
            if self._lm_loss_scaled_for_ga(num_items_in_batch):
                # The LM loss is already a share of the accumulated batch and the
                # Trainer will not divide it; give the aux loss its share too.
                aux = aux / self.current_gradient_accumulation_steps
        loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _lm_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        # training_step's own rule for whether it divides the loss by the accumulation steps.
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def expert_load(self) -> Dict[str, float]:
        """The log entries for the selections counted since the last log: per layer
        ``expert_load/layer_L/expert_E`` shares (summing to 1) and ``.../imbalance``."""
        out: Dict[str, float] = {}
        for layer, counts in sorted(self._load.items()):
            total = int(counts.sum())
            if total == 0:
                continue
            share = counts.double() / total
            for e, s in enumerate(share.tolist()):
                out[f"expert_load/layer_{layer}/expert_{e}"] = s
            out[f"expert_load/layer_{layer}/imbalance"] = float(share.max()) * len(share)
        return out

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, with ``aux_loss`` and the expert load added to training logs."""
        if "loss" in logs and self._aux_count:
            logs = dict(logs)
            logs["aux_loss"] = self._aux_sum / self._aux_count
            logs.update(self.expert_load())
            self._reset_accumulators()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """What ``save_model`` and every checkpoint write: ``output_dir/mola_adapter``, the
        tokenizer and the training arguments; not the base model's weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self._mola_model(), os.path.join(output_dir, ADAPTER_DIRNAME), state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """``train(resume_from_checkpoint=...)``: the adapter from ``checkpoint-N/mola_adapter``."""
        self._load_adapter_from(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the adapter of the best checkpoint."""
        self._load_adapter_from(self.state.best_model_checkpoint, None)

    def _load_adapter_from(self, checkpoint: str, model: Optional[nn.Module]) -> None:
        directory = os.path.join(checkpoint, ADAPTER_DIRNAME)
        if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
            raise ValueError(f"MoLATrainer: {checkpoint!r} has no {ADAPTER_DIRNAME}/adapter_config.json; resume from "
                             "a checkpoint directory MoLATrainer wrote (checkpoint-N)")
        target = model if model is not None else self._mola_model()
        while hasattr(target, "module") and isinstance(target.module, nn.Module):
            target = target.module
        load_adapter(target, directory, is_trainable=True)

    def train(self, *args, **kwargs):
        """The Trainer's train; then the final adapter goes to ``output_dir/mola_adapter``."""
        result = super().train(*args, **kwargs)
        if self.args.should_save:
            save_adapter(self._mola_model(), os.path.join(self.args.output_dir, ADAPTER_DIRNAME))
        return result

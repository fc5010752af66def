"""BillaLM: the LightningModule around ``transformers.LlamaForCausalLM`` used by every stage."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from billa.model.builders import build_causal_lm

IGNORE_INDEX = -100


class BillaLM(L.LightningModule):
    """Full-parameter causal-LM training (no LoRA) of a LLaMA model.

    Args:
        model: ``model`` config: ``architecture`` and ``pretrained_path``.
        vocab_size: tokenizer size.
        optimizer: partial optimizer config (``_target_`` + ``_partial_: true``), completed with parameter groups.
        scheduler: partial scheduler config, completed with the optimizer and ``total_steps``.
        total_steps: optimizer steps of the run (``trainer.max_steps``), the cosine schedule's length.
        init_from: HF directory that overrides ``model.pretrained_path`` (the previous stage's export).
        gradient_checkpointing: recompute activations in the backward pass.
        validate_at_start: compute and log ``val/loss`` at step 0 as the baseline.
        tokenizer_dir: the tokenizer directory trained with (exported beside the weights; read by convert.py).
    """

    def __init__(
        self,
        model: Mapping,
        vocab_size: int,
        optimizer: Mapping,
        scheduler: Mapping,
        total_steps: int,
        init_from: str | None = None,
        gradient_checkpointing: bool = False,
        validate_at_start: bool = True,
        tokenizer_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # loggers get the whole config from build_logger, redacted
        self.model = None
        self.val_loss_start: float | None = None

    def configure_model(self) -> None:
        """Build the model once (idempotent); under ZeRO-3 this runs inside the partitioning context."""
        if self.model is not None:
            return
        spec = self.hparams.model
        path = self.hparams.init_from or spec.get("pretrained_path")
        key = "init_from" if self.hparams.init_from else "model.pretrained_path"
        with self._zero3_pretrained_loading(path):
            self.model = build_causal_lm(spec["architecture"], self.hparams.vocab_size, path, key)
        self.model.train()  # from_pretrained returns eval mode
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False

    @contextlib.contextmanager
    def _zero3_pretrained_loading(self, path: str | None):
        """Under ZeRO-3, let transformers load pretrained weights straight into the partitioned parameters.

        A plain ``from_pretrained`` inside the partitioning context sees every parameter as size 0 (DESIGN.md §8);
        transformers' DeepSpeed integration partitions and loads shard by shard while an ``HfDeepSpeedConfig``
        is alive, so a 7B model never materialises whole on one rank.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        config = getattr(strategy, "config", None)
        stage = ((config or {}).get("zero_optimization") or {}).get("stage", 0)
        if path is None or stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weak reference
        try:
            yield
        finally:
            del keep_alive

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the label tokens of the batch (labels -100 carry no loss).

        The same loss as ``LlamaForCausalLM(..., labels=...)``, but lm_head runs only on positions that carry a
        label: prompts, the part before a conditional-generation cut and padding never become (B, T, V) logits.
        With BiLLa's 46,943-piece vocabulary that saves the logits' memory and lm_head FLOPs of every masked token.
        """
        hidden = self.model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],  # (B, T) padding mask, or (B, 1, T, T) for packed rows
            position_ids=batch.get("position_ids"),  # restarts per sample in packed rows
        ).last_hidden_state  # (B, T, H)
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = labels != IGNORE_INDEX  # (B, T-1)
        logits = self.model.lm_head(hidden[:, :-1][keep])  # (N, V): only where there is a label
        if logits.shape[0] == 0:
            return logits.sum() * 0.0  # a batch without targets: zero loss, graph intact
        return F.cross_entropy(logits.float(), labels[keep])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model_step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss.float().clamp(max=30)), sync_dist=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    @torch.no_grad()
    def evaluate_loss(self, dataloader) -> float:
        """Token-weighted mean loss of ``dataloader`` (used for the step-0 baseline)."""
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        for batch in dataloader:
            batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with self.trainer.precision_plugin.forward_context():
                loss = self.model_step(batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, tokens = total + float(loss) * n, tokens + n
        self.model.train(was_training)
        return total / max(tokens, 1)

    def on_train_start(self) -> None:
        if not (self.hparams.validate_at_start and self.global_step == 0 and self.trainer.datamodule is not None):
            return
        loader = self.trainer.datamodule.val_dataloader()
        if len(loader) == 0:
            return
        self.val_loss_start = self.evaluate_loss(loader)
        for logger in self.loggers:
            logger.log_metrics(
                {"val/loss": self.val_loss_start, "val/ppl": math.exp(min(self.val_loss_start, 30))}, step=0
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """RNG state travels with the checkpoint (tensors and plain types, so ``weights_only`` loading works).

        billa's data randomness is stateless (seed + record identity); this covers anything else drawing random
        numbers (dropout, if a model config enables it). Under ZeRO-3 the client state is rank 0's.
        """
        kind, key, pos, has_gauss, cached = np.random.get_state()
        checkpoint["billa_rng"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "key": torch.from_numpy(key.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("billa_rng")
        if not state:
            return
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["key"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached"],
            )
        )

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            # weight decay on matrices only, not on norms (DeepSpeed ZeRO-3 params report ds_shape)
            shape = getattr(param, "ds_shape", param.shape)
            (decay if len(shape) >= 2 else no_decay).append(param)
        optimizer_cfg = OmegaConf.create(dict(self.hparams.optimizer))
        groups = [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = instantiate(optimizer_cfg, groups, _partial_=False)
        scheduler = instantiate(
            OmegaConf.create(dict(self.hparams.scheduler)),
            optimizer,
            total_steps=self.hparams.total_steps,
            _partial_=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""BillaLM: the LightningModule around ``transformers.LlamaForCausalLM`` used by every stage."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from billa.data.packing import feed_packed, packed_layout
from billa.distributed.memory import partition_report, track_materialised
from billa.model.builders import (
    add_residual_dropout,
    apply_liger_kernels,
    build_causal_lm,
    compile_decoder_layers,
)
from billa.model.kernels import check_compile, liger_importable, select_kernels
from billa.model.loss import HeadNLL, labelled_token_nll
from billa.utils.errors import ConfigError
from billa.utils.logging import get_logger

log = get_logger(__name__)

LOSS_NORMALIZATIONS = ("step_token_mean", "rank_token_mean")


class BillaLM(L.LightningModule):
    """Full-parameter causal-LM training (no LoRA) of a LLaMA model.

    Args:
        model: ``model`` config: ``architecture``, ``pretrained_path``, ``kernels`` (``kernels.select_kernels``).
        vocab_size: tokenizer size.
        optimizer: partial optimizer config (``_target_`` + ``_partial_: true``), completed with parameter groups.
        scheduler: partial scheduler config, completed with the optimizer and ``total_steps``.
        total_steps: optimizer steps of the run (``trainer.max_steps``), the cosine schedule's length.
        init_from: HF directory that overrides ``model.pretrained_path`` (the previous stage's export).
        gradient_checkpointing: recompute activations in the backward pass.
        validate_at_start: compute and log ``val/loss`` at step 0 as the baseline.
        tokenizer_dir: the tokenizer directory trained with (exported beside the weights; read by convert.py).
        loss_chunk_tokens: label tokens per lm_head + cross-entropy chunk (``billa.model.loss``); 0 = one piece.
        clip_grad_norm: clip the gradient norm here, before the optimizer step (used under bf16-mixed without
            DeepSpeed, where Lightning refuses to clip for a fused optimizer although bf16 needs no unscaling).
        compile: ``torch.compile`` each decoder layer (``compile_decoder_layers``); not under DeepSpeed.
        loss_normalization: ``loss.normalization``: ``step_token_mean`` (the token mean over the whole optimizer
            step) or ``rank_token_mean`` (BiLLa: the mean over the step's loss groups of each group's token mean).
        loss_groups: loss groups per optimizer step under ``rank_token_mean`` (global batch / ``loss.rank_batch_size``).
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
        loss_chunk_tokens: int = 2048,
        clip_grad_norm: float | None = None,
        compile: bool = False,
        loss_normalization: str = "step_token_mean",
        loss_groups: int = 1,
    ):
        super().__init__()
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ConfigError(
                f"loss.normalization={loss_normalization!r}: expected one of {', '.join(LOSS_NORMALIZATIONS)}"
            )
        self.save_hyperparameters(logger=False)  # loggers get the whole config from build_logger, redacted
        self.model = None
        self.head_nll = HeadNLL()  # lm_head + loss as one module call: one ZeRO-3 gather per pass (billa.model.loss)
        self.val_loss_start: float | None = None
        self.kernels: str | None = None  # the layers' RMSNorm, rotary, SwiGLU kernels once built: liger or torch
        self.build_report: dict | None = None  # what this rank held right after building (PartitionReport)
        self._step_sums: torch.Tensor | None = None  # (NLL sum, label tokens, objective) of the optimizer step
        self._grad_norm: float | None = None

    def configure_model(self) -> None:
        """Build the model once (idempotent); under ZeRO-3 this runs inside the partitioning context."""
        if self.model is not None:
            return
        spec = self.hparams.model
        path = self.hparams.init_from or spec.get("pretrained_path")
        key = "init_from" if self.hparams.init_from else "model.pretrained_path"
        with self._zero3_pretrained_loading(path), track_materialised() as peak:
            self.model = build_causal_lm(spec["architecture"], self.hparams.vocab_size, path, key)
        self.build_report = {**partition_report(self.model), "peak_materialised_numel": peak.numel}
        self.head_nll.share(self.model.get_output_embeddings())
        add_residual_dropout(self.model, float(spec.get("residual_dropout") or 0.0))
        self.model.train()  # from_pretrained returns eval mode
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        compile_layers = bool(self.hparams.get("compile"))
        self.kernels = select_kernels(spec.get("kernels", "auto"), self._on_cuda(), liger_importable(), compile_layers)
        if self.kernels == "liger":
            apply_liger_kernels(self.model)
            log.info("model.kernels: Liger Kernel's fused RMSNorm, rotary and SwiGLU in every decoder layer")
        if compile_layers:
            check_compile(True, deepspeed=isinstance(self._strategy(), DeepSpeedStrategy))
            compile_decoder_layers(self.model)

    @contextlib.contextmanager
    def _zero3_pretrained_loading(self, path: str | None):
        """Under ZeRO-3, let transformers load pretrained weights straight into the partitioned parameters.

        A plain ``from_pretrained`` inside the partitioning context sees every parameter as size 0
        (docs/recipe.md, "Traps");
        transformers' DeepSpeed integration partitions and loads shard by shard while an ``HfDeepSpeedConfig``
        is alive, so a 7B model never materialises whole on one rank.
        """
        config = getattr(self._strategy(), "config", None)
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

    def token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (nats) of every label token, and the batch row each belongs to: shapes (N,), (N,).

        lm_head runs only on positions that carry a label: prompts, the part before a conditional-generation cut and
        padding never become (B, T, V) logits. With BiLLa's 46,943-piece vocabulary that saves the logits' memory and
        lm_head FLOPs of every masked token; the rest run in chunks of ``loss_chunk_tokens`` (``lm_head_nll``) so the
        (N, V) logits never exist whole. A batch without targets gives N = 0 with the graph intact. Packed rows on a
        GPU with SDPA or flash-attention go by their position ids, not a T x T mask (``data/packing.py``).
        """
        impl = getattr(self.model.config, "_attn_implementation", None)
        batch = feed_packed(batch, packed_layout(batch["input_ids"].device.type, impl))  # GPU: no T x T mask
        chunk = self.hparams.get("loss_chunk_tokens", 2048)
        return labelled_token_nll(self.model, batch, chunk, self.head_nll)  # ZeRO-3: one gather per pass, any chunks

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the label tokens of the batch (labels -100 carry no loss); 0 without targets.

        The same loss as ``LlamaForCausalLM(..., labels=...)`` (see ``token_nll``).
        """
        nll, _ = self.token_nll(batch)
        return nll.mean() if nll.numel() else nll.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The micro batch's share of the optimizer step's loss, in Lightning's units.

        ``loss.normalization=step_token_mean``: the objective of an optimizer step is the summed NLL of all its label
        tokens (every micro batch, every rank) divided by their number ``N`` (``batch["step_label_tokens"]``, known
        from the data stream), as if the whole global batch were one batch. ``rank_token_mean`` (BiLLa's): the step's
        samples fall into ``loss_groups`` groups of consecutive samples (``batch["label_group_tokens"]``: each token's
        group total), the objective is the mean over groups of each group's token mean. Lightning divides what this
        returns by the accumulation count and data-parallel strategies average gradients over ranks, so each micro
        batch returns its part of the objective x ranks x accumulation (the billa DeepSpeed strategies stop
        DeepSpeed from dividing by the accumulation count a second time). Without the totals (another datamodule)
        the micro batch's own token mean is used.
        """
        nll, _ = self.token_nll(batch)
        nll_sum = nll.sum()
        step_tokens = batch.get("step_label_tokens")
        objective = self._step_objective(batch, nll, step_tokens)
        if self._step_sums is None:
            self._step_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # (NLL, tokens, objective)
        count = nll.new_tensor(nll.numel(), dtype=torch.float64)
        self._step_sums += torch.stack([nll_sum.detach().double(), count, objective.detach().double()])
        if not self.trainer.fit_loop._should_accumulate():  # the optimizer step's last micro batch
            self._log_step_loss(step_tokens)
        if step_tokens is None:
            return objective
        return objective * (self.trainer.world_size * self.trainer.accumulate_grad_batches)

    def _step_objective(self, batch: dict, nll: torch.Tensor, step_tokens) -> torch.Tensor:
        """This micro batch's part of the optimizer step's loss (``loss.normalization``); (N,) token NLL in."""
        if step_tokens is None:  # no step totals: the micro batch's own token mean
            return nll.sum() / max(nll.numel(), 1)
        if self.hparams.get("loss_normalization", "step_token_mean") == "step_token_mean":
            return nll.sum() / max(int(step_tokens), 1)
        labels = batch["labels"][:, 1:]  # the positions token_nll scored, in its row-major order
        group_tokens = batch["label_group_tokens"][:, 1:][labels != -100].to(nll)  # (N,)
        return (nll / (group_tokens.clamp(min=1) * self.hparams.loss_groups)).sum()

    def _log_step_loss(self, step_tokens: int | None) -> None:
        """Log ``train/loss``: the optimizer step's objective (all micro batches, all ranks; ``loss.normalization``).

        ``step_token_mean``: the token mean of the step; ``rank_token_mean``: the mean of the groups' token means.
        """
        nll_sum, tokens, objective = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum").tolist()
        self._step_sums.zero_()
        if step_tokens is not None and int(tokens) != int(step_tokens):
            raise RuntimeError(
                f"step {self.global_step}: the ranks' micro batches hold {int(tokens)} label tokens but the data "
                f"stream says the step has {int(step_tokens)}: ranks do not read disjoint shares of the global batch"
            )
        grouped = step_tokens is not None and self.hparams.get("loss_normalization") == "rank_token_mean"
        loss = objective if grouped else nll_sum / max(tokens, 1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient norm of the optimizer step, before clipping (DeepSpeed reports its own after the step).

        With ``clip_grad_norm`` the gradients are clipped here to that norm, the same rule as Lightning's
        ``gradient_clip_val`` (which the trainer then leaves unset).
        """
        if self._deepspeed_engine() is None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
            self._grad_norm = float(norm) if norm is not None else 0.0
            if self.hparams.get("clip_grad_norm") and params:  # bf16-mixed + fused AdamW: Lightning will not clip
                torch.nn.utils.clip_grads_with_norm_(params, self.hparams.clip_grad_norm, norm, foreach=True)

    def _strategy(self):
        return self._trainer.strategy if self._trainer is not None else None

    def _on_cuda(self) -> bool:
        """The module trains on a CUDA device (a module built outside a Trainer stays on the CPU)."""
        strategy = self._strategy()
        return strategy is not None and strategy.root_device.type == "cuda"

    def _deepspeed_engine(self):
        strategy = self._strategy()
        return strategy.deepspeed_engine if isinstance(strategy, DeepSpeedStrategy) else None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self.trainer.fit_loop._should_accumulate():
            return
        engine = self._deepspeed_engine()
        norm = engine.get_global_grad_norm() if engine is not None else self._grad_norm
        if norm is not None:  # the true gradient of the step, what gradient clipping compares with
            self.log("train/grad_norm", float(norm), on_step=True, on_epoch=False)

    def _val_sums(self) -> torch.Tensor:
        return torch.zeros(len(self._val_source_names()), 3, dtype=torch.float64, device=self.device)

    def _val_source_names(self) -> list[str]:
        datamodule = self.trainer.datamodule
        return list(getattr(datamodule, "val_sources", None) or sorted({e["source"] for e in datamodule.val_set}))

    def _accumulate_val(self, batch: dict, sums: torch.Tensor) -> None:
        """Add each row's (NLL sum, label tokens, label characters) to its source's row of ``sums`` (S, 3)."""
        nll, rows = self.token_nll(batch)
        n_rows = batch["input_ids"].shape[0]
        per_row = torch.zeros(n_rows, 3, dtype=torch.float64, device=sums.device)  # (B, 3)
        per_row[:, 0].index_add_(0, rows.to(sums.device), nll.double().to(sums.device))
        per_row[:, 1] = torch.bincount(rows, minlength=n_rows).double().to(sums.device)
        chars = batch.get("label_chars")
        if chars is not None:
            per_row[:, 2] = chars.double().to(sums.device)
        names = self._val_source_names()
        index = torch.tensor([names.index(s) for s in batch["source"]], device=sums.device)
        sums.index_add_(0, index, per_row)

    def _val_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """Token-weighted ``val/loss``, ``val/ppl``, ``val/loss/<source>`` and ``val/bpc/<source>`` from summed counts.

        Sums over every validation example of every rank, so the values depend neither on the micro batch nor on the
        number of ranks. Bits per character = NLL (nats) / ln 2 / characters of the labelled text: comparable across
        tokenizers and between Chinese and English, where one token covers very different amounts of text.
        """
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum").cpu()
        nll, tokens, chars = sums.sum(0).tolist()
        if tokens == 0:
            return {}
        loss = nll / tokens
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 30.0))}
        names = self._val_source_names()
        for name, (source_nll, source_tokens, source_chars) in zip(names, sums.tolist(), strict=True):
            if source_tokens:
                metrics[f"val/loss/{name}"] = source_nll / source_tokens
            if source_chars:
                metrics[f"val/bpc/{name}"] = source_nll / math.log(2) / source_chars
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._val_totals = self._val_sums()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate_val(batch, self._val_totals)

    def on_validation_epoch_end(self) -> None:
        metrics = self._val_metrics(self._val_totals)
        for key, value in metrics.items():  # identical on every rank (summed above); sync_dist=True only averages it
            self.log(key, value, prog_bar=key == "val/loss", sync_dist=True)

    @torch.no_grad()
    def evaluate(self, dataloader) -> dict[str, float]:
        """The validation metrics of ``dataloader`` (this rank's share; collective: call on every rank)."""
        was_training = self.model.training
        self.model.eval()
        sums = self._val_sums()
        for batch in dataloader:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with self.trainer.precision_plugin.forward_context():
                self._accumulate_val(batch, sums)
        self.model.train(was_training)
        return self._val_metrics(sums)

    def evaluate_loss(self, dataloader) -> float:
        """Token-weighted mean loss of ``dataloader`` over all ranks (the step-0 baseline's ``val/loss``)."""
        return self.evaluate(dataloader).get("val/loss", float("nan"))

    def on_train_start(self) -> None:
        if not (self.hparams.validate_at_start and self.global_step == 0 and self.trainer.datamodule is not None):
            return
        loader = self.trainer.datamodule.val_dataloader()
        if len(loader) == 0:
            return
        metrics = self.evaluate(loader)  # the same metrics as every later validation, logged at step 0
        self.val_loss_start = metrics.get("val/loss")
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

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
        from hydra.utils import instantiate  # here, not at the top: the module loads without Hydra (GPU benchmarks)
        from omegaconf import OmegaConf

        optimizer_spec = dict(self.hparams.optimizer)
        # optimizer.weight_decay_on: all (BiLLa: decay on every parameter) | matrices (not on norms); see docs/recipe.md
        decay_on = optimizer_spec.pop("weight_decay_on", "all")
        if decay_on not in ("all", "matrices"):
            raise ConfigError(
                f"optimizer.weight_decay_on={decay_on!r}: expected all (BiLLa) or matrices (not on norms)"
            )
        decay, no_decay = [], []
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            shape = getattr(param, "ds_shape", param.shape)  # DeepSpeed ZeRO-3 params report their full shape there
            (decay if decay_on == "all" or len(shape) >= 2 else no_decay).append(param)
        optimizer_cfg = OmegaConf.create(optimizer_spec)
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        optimizer = instantiate(optimizer_cfg, groups, _partial_=False)
        scheduler = instantiate(
            OmegaConf.create(dict(self.hparams.scheduler)),
            optimizer,
            total_steps=self.hparams.total_steps,
            _partial_=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

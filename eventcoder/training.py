"""The training loop: read it top to bottom.

One encoder, one head per task, AdamW with linear warmup/decay, bf16 autocast where the hardware
has it, validation every epoch, early stopping on the main metric, the best checkpoint kept and a
resumable checkpoint after every epoch. Under torchrun every rank trains on its own batches and
only rank 0 logs and writes.
"""

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from eventcoder.batching import label_arrays, pad_batch, tokenize, training_batches
from eventcoder.config import Config
from eventcoder.dropout import use_fast_dropout
from eventcoder.encoder import resolve_encoder
from eventcoder.errors import ConfigError
from eventcoder.inference import decide, predict_probabilities
from eventcoder.metrics import all_metrics, headline
from eventcoder.model_dir import save_model_dir
from eventcoder.modeling import MultiTaskLoss, MultiTaskModel
from eventcoder.runtime import Runtime, seed_everything
from eventcoder.schema import LabelSchema
from eventcoder.tables import read_jsonl

log = logging.getLogger(__name__)

MetricLogger = Callable[[dict[str, float], int], None]


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights and optimizer."""

    epoch: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None


@dataclass
class TrainResult:
    model_dir: Path
    best_metrics: dict[str, Any]
    state: TrainState
    train_samples_per_second: float


def main_metric_key(config: Config, schema: LabelSchema) -> str:
    key = config.train.main_metric
    return key if "/" in key else f"{schema.main_task}/{key}"


def class_weight_tensors(config: Config, schema: LabelSchema, labels: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse-frequency weights ('balanced', or its square root, which is gentler on rare noise)."""
    if config.train.class_weights == "none":
        return {}
    weights = {}
    for task in schema.tasks:
        if task.kind == "multi_label":
            positives = labels[task.name].sum(axis=0)
            counts = np.maximum(positives, 1.0)
            ratio = (len(labels[task.name]) - positives) / counts
        else:
            counts = np.maximum(np.bincount(labels[task.name], minlength=task.num_labels), 1)
            ratio = counts.sum() / (task.num_labels * counts)
        if config.train.class_weights == "sqrt_balanced":
            ratio = np.sqrt(ratio)
        weights[task.name] = torch.tensor(ratio, dtype=torch.float32)
    return weights


def freeze_word_embeddings(model: MultiTaskModel) -> None:
    """Keep the encoder's token embedding table fixed.

    In MiniLM it is half the parameters (30,522 x 384), yet one batch touches a few hundred of its
    rows; training it costs a dense gradient and an AdamW update of the whole table every step
    (about a fifth of the step time on CPU) for rows the batch never used."""
    model.encoder.get_input_embeddings().weight.requires_grad_(False)


def build_model(config: Config, schema: LabelSchema, runtime: Runtime) -> MultiTaskModel:
    """The model a training run starts from: the encoder plus fresh heads, with the configured
    speed-ups (frozen word embeddings, fast CPU dropout), on the run's device."""
    model = MultiTaskModel.from_encoder(
        resolve_encoder(config.model.encoder), schema, config.model.pooling, config.model.dropout
    )
    if config.train.freeze_word_embeddings:
        freeze_word_embeddings(model)
    if config.train.fast_dropout and runtime.device.type == "cpu":
        use_fast_dropout(model)
    return model.to(runtime.device)


def build_optimizer(model: torch.nn.Module, config: Config, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and norms, optional separate learning rate for the heads."""
    train = config.train
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith(("heads.", "module.heads."))
        no_decay = param.ndim < 2
        groups.setdefault((is_head, no_decay), []).append(param)
    param_groups = [
        {
            "params": params,
            "lr": (train.head_learning_rate or train.learning_rate) if is_head else train.learning_rate,
            "weight_decay": 0.0 if no_decay else train.weight_decay,
        }
        for (is_head, no_decay), params in groups.items()
    ]
    # The fused kernel does the whole update in one pass over memory; it exists for CPU and CUDA.
    try:
        return torch.optim.AdamW(param_groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, foreach=runtime.device.type == "cuda")


def load_split(config: Config, split: str) -> list[dict[str, Any]]:
    path = Path(config.data.prepared_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `eventcoder prepare` first")
    return read_jsonl(path)


def train(
    config: Config,
    schema: LabelSchema,
    runtime: Runtime,
    resume: bool = False,
    log_metrics: MetricLogger | None = None,
    on_state: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    tcfg = config.train
    seed_everything(config.seed)
    train_rows, validation_rows = load_split(config, "train"), load_split(config, "validation")
    if not train_rows or not validation_rows:
        raise ConfigError(f"{config.data.prepared_dir}: train and validation splits must both have rows")

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(config.model.encoder))
    model = build_model(config, schema, runtime)

    train_ids = tokenize([r["text"] for r in train_rows], tokenizer, config.model.max_length)
    validation_ids = tokenize([r["text"] for r in validation_rows], tokenizer, config.model.max_length)
    train_labels = label_arrays(train_rows, schema)
    validation_labels = label_arrays(validation_rows, schema)
    loss_fn = MultiTaskLoss(schema, tcfg.task_weights, class_weight_tensors(config, schema, train_labels))

    steps_per_epoch = math.ceil(len(train_ids) / tcfg.batch_size) // runtime.world_size
    total_steps = tcfg.max_steps or steps_per_epoch * tcfg.epochs
    optimizer = build_optimizer(model, config, runtime)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * tcfg.warmup_ratio), total_steps)

    state = TrainState()
    checkpoint_dir = Path(tcfg.checkpoint_dir)
    last_checkpoint = checkpoint_dir / "last.pt"
    if resume:
        if not last_checkpoint.is_file():
            raise ConfigError(f"--resume: no checkpoint at {last_checkpoint}")
        state = _load_checkpoint(last_checkpoint, model, optimizer, scheduler)
        log.info("resumed from %s after epoch %d (step %d)", last_checkpoint, state.epoch, state.global_step)
    if on_state:
        on_state(state)

    trainable: torch.nn.Module = model
    if runtime.distributed:
        trainable = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )

    metric_key = main_metric_key(config, schema)
    pad_id = tokenizer.pad_token_id
    samples_seen, train_seconds = 0, 0.0
    while state.epoch < tcfg.epochs and state.global_step < total_steps:
        epoch = state.epoch + 1
        # Seeded per epoch, so a resumed run sees the same batches it would have seen.
        batches = training_batches(
            [len(ids) for ids in train_ids],
            tcfg.batch_size,
            random.Random(config.seed * 1000 + epoch),
            tcfg.length_bucketing,
        )
        usable = len(batches) // runtime.world_size * runtime.world_size
        batches = batches[runtime.rank : usable : runtime.world_size]
        trainable.train()
        progress = tqdm(
            batches,
            desc=f"epoch {epoch}/{tcfg.epochs}",
            unit="batch",
            disable=not (tcfg.progress and runtime.is_main),
            dynamic_ncols=True,
        )
        epoch_loss, started = 0.0, time.perf_counter()
        for step_in_epoch, batch in enumerate(progress, 1):
            inputs = {k: v.to(runtime.device) for k, v in pad_batch([train_ids[i] for i in batch], pad_id).items()}
            targets = {
                name: torch.from_numpy(values[batch]).to(runtime.device) for name, values in train_labels.items()
            }
            with runtime.autocast():
                logits = trainable(**inputs)
            loss, _ = loss_fn(logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            samples_seen += len(batch)
            epoch_loss += loss.item()
            elapsed = time.perf_counter() - started
            progress.set_postfix(
                loss=f"{epoch_loss / step_in_epoch:.4f}",
                samples_s=f"{samples_seen / max(train_seconds + elapsed, 1e-9):.1f}",
            )
            if state.global_step >= total_steps:
                break
        train_seconds += time.perf_counter() - started
        progress.close()

        # Every rank evaluates the same validation set, so they reach the same stop decision.
        probs = predict_probabilities(model, validation_ids, pad_id, tcfg.eval_batch_size, runtime)
        metrics = all_metrics(schema, validation_labels, decide(schema, probs))
        flat = {f"validation/{k}": v for k, v in headline(metrics).items()}
        flat["train/loss"] = epoch_loss / max(len(batches), 1)
        flat["train/samples_per_second"] = samples_seen / max(train_seconds, 1e-9)
        score = flat[f"validation/{metric_key}"]
        state.epoch = epoch
        state.history.append({"epoch": epoch, **flat})
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
        else:
            state.bad_epochs += 1
        if runtime.is_main:
            log.info(
                "epoch %d: %s=%.4f (best %.4f at epoch %d)",
                epoch,
                metric_key,
                score,
                state.best_score,
                state.best_epoch,
            )
            if log_metrics:
                log_metrics(flat, epoch)
            if improved:
                best_metrics = {
                    "epoch": epoch,
                    "split": "validation",
                    "main_metric": metric_key,
                    "main_metric_value": score,
                    "headline": headline(metrics),
                    "tasks": metrics,
                }
                save_model_dir(
                    checkpoint_dir / "best", model, tokenizer, config.to_dict(), best_metrics, config.model.max_length
                )
            _save_checkpoint(last_checkpoint, model, optimizer, scheduler, state)
        if runtime.distributed:
            torch.distributed.barrier()
        if state.bad_epochs >= tcfg.early_stopping_patience:
            log.info("early stopping: no gain in %s for %d epochs", metric_key, state.bad_epochs)
            break

    output_dir = Path(tcfg.output_dir)
    if runtime.is_main:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        shutil.copytree(checkpoint_dir / "best", output_dir)
    best = _read_json(checkpoint_dir / "best" / "metrics.json") if runtime.is_main else {}
    return TrainResult(output_dir, best, state, samples_seen / max(train_seconds, 1e-9))


def _save_checkpoint(
    path: Path, model: MultiTaskModel, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state.__dict__,
        },
        tmp,
    )
    tmp.replace(path)  # a crash mid-save must not destroy the previous checkpoint


def _load_checkpoint(path: Path, model: MultiTaskModel, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return TrainState(**checkpoint["state"])


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)

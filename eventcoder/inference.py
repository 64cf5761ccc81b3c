"""Turn texts into per-task probabilities and labels with a trained multi-task model."""

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import PreTrainedTokenizerBase

from eventcoder.batching import inference_batches, pad_batch, tokenize
from eventcoder.cpu_kernels import amx_available, load_kernel
from eventcoder.errors import ConfigError
from eventcoder.model_dir import load_model_dir
from eventcoder.modeling import MultiTaskModel
from eventcoder.packed_encoder import (
    TOKENS_PER_BATCH,
    PackedMultiTaskModel,
    pack,
    packing_support,
    token_budget_batches,
)
from eventcoder.runtime import Runtime, init_runtime
from eventcoder.schema import LabelSchema

log = logging.getLogger(__name__)

# Batch shapes are kept to a few: widths are rounded up to a multiple of 8 tokens and row counts
# to a multiple of 16. oneDNN builds (JIT-compiles) its bf16 matmul kernels per input shape and
# keeps a bounded cache of them; with every batch a new shape, a long job rebuilds kernels all the
# time and ran at about half its warm speed in our exploratory runs (issue 6 notes).
WIDTH_MULTIPLE = 8
ROW_MULTIPLE = 16
# A call this large amortises torch.compile's one-off cost (20-40 s on two cores) many times over.
COMPILE_MIN_TEXTS = 1024


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    runtime: Runtime,
) -> dict[str, np.ndarray]:
    """Probabilities per task in input order (softmax or sigmoid by task kind). `model` is a
    MultiTaskModel or its torch.compile wrapper."""
    model.eval()
    kinds = {task.name: task.kind for task in model.schema.tasks}
    out = _empty_probabilities(model.schema, len(token_ids))
    for batch in inference_batches([len(ids) for ids in token_ids], batch_size, ROW_MULTIPLE):
        padded = pad_batch([token_ids[i] for i in batch], pad_id, WIDTH_MULTIPLE)
        inputs = {k: v.to(runtime.device) for k, v in padded.items()}
        with runtime.autocast():
            logits = model(**inputs)
        for name, values in logits.items():
            out[name][batch] = _probabilities(values, kinds[name])
    return out


@torch.inference_mode()
def predict_probabilities_packed(
    model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, tokens_per_batch: int, schema: LabelSchema
) -> dict[str, np.ndarray]:
    """predict_probabilities for a PackedMultiTaskModel (or its torch.compile wrapper): batches of
    `tokens_per_batch` tokens, sentences in input order, no padding."""
    model.eval()
    kinds = {task.name: task.kind for task in schema.tasks}
    out = _empty_probabilities(schema, len(token_ids))
    for batch in token_budget_batches([len(ids) for ids in token_ids], tokens_per_batch):
        logits = model(*pack([token_ids[i] for i in batch], tokens_per_batch, pad_id))
        rows = slice(batch[0], batch[-1] + 1)  # budget batches are runs of consecutive rows
        for name, values in logits.items():
            out[name][rows] = _probabilities(values[: len(batch)], kinds[name])  # the last row scores the filler
    return out


def _empty_probabilities(schema: LabelSchema, rows: int) -> dict[str, np.ndarray]:
    return {task.name: np.zeros((rows, task.num_labels), dtype=np.float32) for task in schema.tasks}


def _probabilities(logits: torch.Tensor, kind: str) -> np.ndarray:
    """Sigmoid for multi-label tasks, softmax otherwise, in fp32 whatever the model's dtype."""
    values = logits.float()
    return (torch.sigmoid(values) if kind == "multi_label" else torch.softmax(values, dim=-1)).cpu().numpy()


def decide(schema: LabelSchema, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Predicted ids (single-label: argmax) or 0/1 rows (multi-label: per-label thresholds)."""
    decided = {}
    for task in schema.tasks:
        if task.kind == "multi_label":
            thresholds = np.array([task.threshold_for(label) for label in task.labels], dtype=np.float32)
            decided[task.name] = (probs[task.name] >= thresholds).astype(np.float32)
        else:
            decided[task.name] = probs[task.name].argmax(axis=1)
    return decided


def int8_activation_bits() -> int:
    """8 on CPUs with AVX-512 VNNI, else 7.

    Without VNNI, fbgemm multiplies u8 activations by s8 weights in pairs summed into int16, which
    overflows for full-range activations; torch's default recipe therefore uses 7-bit activations
    everywhere ("reduce range"). With VNNI the products sum into int32 and all 8 bits are safe."""
    has_vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    return 8 if has_vnni else 7


class _EightBitDynamicLinear(DynamicInt8Linear):
    """fbgemm's dynamic int8 linear with all 8 bits for activations: torch's module always asks
    for 7 (reduce_range=True), whatever its qconfig says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)


def quantize_int8(model: MultiTaskModel) -> MultiTaskModel:
    """Every nn.Linear with int8 weights, one scale per output channel (symmetric, -127..127), and
    activations quantised per batch with int8_activation_bits() bits.

    On session 2's model torch's default dynamic recipe (one scale per weight tensor, 7-bit
    activations) lost 1.8 points of validation macro-F1 and 3.4 on the held-out set; this one lost
    0.6 on validation and gained 1.0 on the held-out set (issue 6 notes). The int8 quality check
    records the activation bits it ran with."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, per_channel_weight_observer_range_neg_127_to_127

    qconfig = per_channel_dynamic_qconfig._replace(weight=per_channel_weight_observer_range_neg_127_to_127)
    linear = _EightBitDynamicLinear if int8_activation_bits() == 8 else DynamicInt8Linear
    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, which is not a dependency.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: qconfig}, mapping={torch.nn.Linear: linear}
        )


def compile_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with frozen weights (inductor pre-packs them for oneDNN and folds constants)
    and dynamic shapes, so batches of every width share one compiled graph.

    Freezing is set in inductor's process-wide config: passed as `options={"freezing": True}` to
    torch.compile it does not take effect (the linears stay aten::addmm, measured with
    `benchmarks/profile_phases.py --operators`). Nothing else in eventcoder compiles."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, dynamic=True)


@dataclasses.dataclass(frozen=True)
class PredictorSpec:
    """Predictor.load's arguments, picklable: worker processes load the same predictor. Only the
    options given are kept, so Predictor.load's defaults stay the only ones."""

    model_dir: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load(self) -> "Predictor":
        return Predictor.load(self.model_dir, **self.options)


class Predictor:
    """A loaded model plus everything needed to code raw text."""

    def __init__(
        self,
        model: MultiTaskModel,
        tokenizer: PreTrainedTokenizerBase,
        schema: LabelSchema,
        max_length: int,
        runtime: Runtime,
        batch_size: int = 128,
        compile: bool | None = False,
        packing: bool | None = None,
        tokens_per_batch: int = TOKENS_PER_BATCH,
    ):
        """`compile`: torch.compile the model (True), never (False), or on the first call with at
        least COMPILE_MIN_TEXTS texts (None), so batch jobs get it and small requests do not pay.
        `packing`: run the padding-free forward (eventcoder.packed_encoder) in batches of
        `tokens_per_batch` tokens: always (True; an error where it cannot run), never (False, padded
        batches of `batch_size` rows), or on CPUs whenever the encoder and kernel allow it (None)."""
        self.model = model.to(runtime.device).eval()
        if runtime.bf16:
            # bf16 weights rather than autocast alone: autocast re-casts every weight on every
            # forward pass; the heads stay fp32 (cheap, and scores keep full precision).
            self.model.to(torch.bfloat16)
            self.model.heads.float()
            # With bf16 weights autocast has nothing left to do but insert casts (and, compiled,
            # it cost about a third of the speed in our exploratory runs: issue 6 notes).
            runtime = dataclasses.replace(runtime, bf16=False)
        self.tokenizer = tokenizer
        self.schema = schema
        self.max_length = max_length
        self.runtime = runtime
        self.batch_size = batch_size
        self.compile = compile
        self.tokens_per_batch = tokens_per_batch
        self.packed = self._packed_model(packing)
        self._compiled: torch.nn.Module | None = None

    def _packed_model(self, packing: bool | None) -> PackedMultiTaskModel | None:
        if packing is False:
            return None
        device = self.runtime.device
        reason = (
            packing_support(self.model)
            or (None if device.type == "cpu" else f"the packed path runs on CPUs, not {device}")
            or load_kernel()
        )
        if reason is None:
            # The encoder's weights are bf16 by now wherever the runtime chose bf16.
            bf16 = next(self.model.encoder.parameters()).dtype == torch.bfloat16
            where = "on the AMX tile unit" if bf16 and amx_available() else "in vector code"
            packed = PackedMultiTaskModel(self.model)
            fused = "fused with GELU on the AMX tile unit" if packed.up_projections is not None else "then GELU"
            log.info(
                "packed batches of %d tokens, attention %s, up-projections %s", self.tokens_per_batch, where, fused
            )
            return packed
        if packing:
            raise ConfigError(f"--packing: {reason}")
        log.info("padded batches: %s", reason)
        return None

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        precision: str = "auto",
        batch_size: int = 128,
        num_threads: int | None = None,
        quantize: bool = False,
        compile: bool | None = None,
        packing: bool | None = None,
        tokens_per_batch: int = TOKENS_PER_BATCH,
    ) -> "Predictor":
        """`quantize`: int8 dynamic quantisation of every linear layer (CPU only; see int8_check).
        `compile`, `packing`: see __init__; quantised models always run eagerly."""
        model, tokenizer, schema, meta = load_model_dir(model_dir)
        runtime = init_runtime("fp32" if quantize else precision, num_threads)
        if quantize:
            model = quantize_int8(model)
        compile = False if quantize else compile
        return cls(
            model, tokenizer, schema, meta["max_length"], runtime, batch_size, compile, packing, tokens_per_batch
        )

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return tokenize(texts, self.tokenizer, self.max_length)

    def probabilities(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self.probabilities_from_ids(self.tokenize(texts))

    def probabilities_from_ids(self, token_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        wants_compile = self.compile or (self.compile is None and len(token_ids) >= COMPILE_MIN_TEXTS)
        if wants_compile and self._compiled is None:
            self._compiled = compile_for_inference(self.packed or self.model)
        if self._compiled is not None:
            try:
                return self._probabilities_with(self._compiled, token_ids)
            except Exception as error:  # any compiler failure must fall back, not stop the job
                if self.compile is True:
                    raise
                # torch.compile builds C++ at the first call; without a working compiler it fails
                # here, and eager mode gives the same answers, only slower.
                log.warning("torch.compile failed (%s); running eagerly", str(error).splitlines()[0])
                self.compile = False
                self._compiled = None
        return self._probabilities_with(self.packed or self.model, token_ids)

    def _probabilities_with(self, model: torch.nn.Module, token_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        pad_id = self.tokenizer.pad_token_id
        if self.packed is not None:
            return predict_probabilities_packed(model, token_ids, pad_id, self.tokens_per_batch, self.schema)
        return predict_probabilities(model, token_ids, pad_id, self.batch_size, self.runtime)

    def predict(self, texts: Sequence[str], all_scores: bool = False) -> list[dict[str, Any]]:
        """One dict per text: every task's label and score, derived tasks, optionally all scores."""
        if not texts:
            return []
        probs = self.probabilities(texts)
        return self.label_rows(probs, all_scores)

    def label_rows(self, probs: dict[str, np.ndarray], all_scores: bool = False) -> list[dict[str, Any]]:
        decided = decide(self.schema, probs)
        n = len(next(iter(probs.values())))
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        for task in self.schema.tasks:
            task_probs, task_pred = probs[task.name], decided[task.name]
            for i, row in enumerate(rows):
                if task.kind == "multi_label":
                    chosen = np.flatnonzero(task_pred[i])
                    row[task.name] = [task.labels[j] for j in chosen]
                    row[f"{task.name}_score"] = [round(float(task_probs[i, j]), 6) for j in chosen]
                else:
                    row[task.name] = task.labels[task_pred[i]]
                    row[f"{task.name}_score"] = round(float(task_probs[i, task_pred[i]]), 6)
                if all_scores:
                    row[f"{task.name}_scores"] = {
                        label: round(float(p), 6) for label, p in zip(task.labels, task_probs[i], strict=True)
                    }
        for derived in self.schema.derived:
            for row in rows:
                row[derived.name] = derived.mapping[row[derived.source]]
        return rows

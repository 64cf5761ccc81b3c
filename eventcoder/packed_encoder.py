"""Padding-free CPU inference for BERT encoders: sentences packed end to end.

A padded batch spends its linear layers on pad tokens (19% of the tokens of a length-sorted batch of
MiniLM inputs) and its attention on masked-out pairs, in torch's flash attention kernel, whose
per-block overheads dominate at news-sentence lengths. Here a batch is a fixed budget of tokens:
sentences are laid end to end in input order, every linear layer runs on one [tokens, hidden]
matrix of the same shape batch after batch (oneDNN builds its kernels once), and attention runs per
sentence in `eventcoder::varlen_attention` (kernels/varlen_attention.cpp). Queries, keys and values
come from one product; with bf16 weights on a CPU with AMX, each feed-forward up-projection and its
GELU run as one kernel (`eventcoder::linear_gelu`, kernels/linear_gelu.cpp). The modules and
weights are the MultiTaskModel's own; only the forward pass differs, and it computes the same
function (tests/test_packed.py compares the two).
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertModel

from eventcoder.cpu_kernels import HEAD_SIZES, amx_available, linear_gelu, pack_linear_weight, varlen_attention
from eventcoder.modeling import MultiTaskModel

# Tokens per forward pass. 2,048 and 4,096 ran alike on two cores (2,048 a little faster); 8,192 was
# 20% slower, its activations no longer fitting the caches (issue 6 notes).
TOKENS_PER_BATCH = 2048
# Unused slots at the end of a batch are filled with pad tokens in dummy sentences this long: each
# attends only to itself, so filling costs little.
FILLER_SENTENCE = 16


def packing_support(model: MultiTaskModel) -> str | None:
    """None when the packed forward computes this model, else why it cannot."""
    encoder = model.encoder
    if not isinstance(encoder, BertModel):
        return f"the packed path covers BERT encoders, not {type(encoder).__name__}"
    config = encoder.config
    if config.is_decoder or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return "the packed path needs a bidirectional BERT with absolute positions"
    head_size = config.hidden_size // config.num_attention_heads
    if head_size not in HEAD_SIZES:
        return f"the packed attention kernel has no head size {head_size} (it has {HEAD_SIZES})"
    return None


class PackedBatch(NamedTuple):
    input_ids: torch.Tensor  # [tokens]
    position_ids: torch.Tensor  # [tokens]: each token's position within its sentence
    sentence_index: torch.Tensor  # [tokens]: the row each token pools into; filler pools into the last
    cu_seqlens: torch.Tensor  # [sentences + filler sentences + 1], int32: where each sentence starts
    lengths: torch.Tensor  # [sentences + 1], float: tokens per pooled row


def token_budget_batches(lengths: Sequence[int], tokens_per_batch: int) -> Iterator[list[int]]:
    """Consecutive indices whose lengths fit the budget (a longer sentence goes alone)."""
    batch: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if batch and used + length > tokens_per_batch:
            yield batch
            batch, used = [], 0
        batch.append(index)
        used += length
    if batch:
        yield batch


def pack(token_ids: Sequence[Sequence[int]], tokens_per_batch: int, pad_id: int) -> PackedBatch:
    """Lay the sentences end to end and fill up to `tokens_per_batch` (or, past it, to a multiple
    of 64) with pad-token filler sentences."""
    lengths = [len(ids) for ids in token_ids]
    used = sum(lengths)
    width = tokens_per_batch if used <= tokens_per_batch else -(-used // 64) * 64
    filler = width - used
    whole, rest = divmod(filler, FILLER_SENTENCE)
    filler_lengths = [FILLER_SENTENCE] * whole + ([rest] if rest else [])
    flat = [token for ids in token_ids for token in ids]
    positions = [position for length in lengths for position in range(length)]
    owners = [row for row, length in enumerate(lengths) for _ in range(length)]
    starts = [0]
    for length in lengths + filler_lengths:
        starts.append(starts[-1] + length)
    return PackedBatch(
        input_ids=torch.tensor(flat + [pad_id] * filler, dtype=torch.long),
        position_ids=torch.tensor(positions + [0] * filler, dtype=torch.long),
        sentence_index=torch.tensor(owners + [len(lengths)] * filler, dtype=torch.long),
        cu_seqlens=torch.tensor(starts, dtype=torch.int32),
        lengths=torch.tensor([*lengths, filler], dtype=torch.float32),
    )


def fused_up_projection_support(model: MultiTaskModel) -> str | None:
    """None when the feed-forward up-projections can run with their GELU in one AMX kernel
    (cpu_kernels.linear_gelu), else why not. Call load_kernel() first."""
    config = model.encoder.config
    if any(type(layer.intermediate.dense) is not nn.Linear for layer in model.encoder.encoder.layer):
        return "the up-projections are not plain linear layers (int8?)"
    if next(model.encoder.parameters()).dtype != torch.bfloat16:
        return "the encoder's weights are not bf16"
    if config.hidden_act != "gelu":
        return f"the activation is {config.hidden_act!r}, not exact GELU"
    if config.hidden_size % 32 or config.intermediate_size % 32:
        return "hidden or intermediate size not a multiple of 32"
    if not amx_available():
        return "no AMX tile unit"
    return None


class FusedUpProjection(nn.Module):
    """gelu(dense(hidden)) in one pass on the AMX tile unit, from a copy of the weight packed once
    for it: taken when the packed model is built, so build it after any change of dtype."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.register_buffer("packed_weight", pack_linear_weight(dense.weight.detach()))
        bias = torch.zeros(dense.out_features) if dense.bias is None else dense.bias.detach().float()
        self.register_buffer("bias", bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear_gelu(hidden, self.packed_weight, self.bias)


class PackedMultiTaskModel(nn.Module):
    """A MultiTaskModel's forward over a PackedBatch: logits per task, one row per sentence and a
    last row for the filler.

    Shares the model's modules, so a bf16 model gives a bf16 packed model, and compiles with
    torch.compile like the padded one. A bf16 model on a CPU with AMX also gets FusedUpProjections."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model = model
        config = model.encoder.config
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // config.num_attention_heads) ** -0.5
        layers = model.encoder.encoder.layer
        self.up_projections = (
            None
            if fused_up_projection_support(model)
            else nn.ModuleList(FusedUpProjection(layer.intermediate.dense) for layer in layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        sentence_index: torch.Tensor,
        cu_seqlens: torch.Tensor,
        lengths: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        encoder = self.model.encoder
        embeddings = encoder.embeddings
        hidden = (
            embeddings.word_embeddings(input_ids)
            + embeddings.position_embeddings(position_ids)
            + embeddings.token_type_embeddings.weight[0]
        )
        hidden = embeddings.LayerNorm(hidden)
        for index, layer in enumerate(encoder.encoder.layer):
            attention = layer.attention
            query, key, value = _fused_projection(attention.self, hidden)
            context = varlen_attention(query, key, value, cu_seqlens, self.num_heads, self.scale)
            hidden = attention.output.LayerNorm(attention.output.dense(context) + hidden)
            if self.up_projections is not None:
                inner = self.up_projections[index](hidden)
            else:
                inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
            hidden = layer.output.LayerNorm(layer.output.dense(inner) + hidden)
        # The filler row is scored too and left for the caller to drop: no tensor in the graph then
        # has a size of 1 for a one-sentence batch, a size torch.compile specialises (recompiles) on.
        pooled = self._pool(hidden, sentence_index, cu_seqlens, lengths)
        return {name: head(pooled) for name, head in self.model.heads.items()}

    def _pool(
        self, hidden: torch.Tensor, sentence_index: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """One fp32 row per sentence, then the filler's row."""
        if self.model.pooling == "cls":
            # The filler's "first token" is past the end when a batch has no filler.
            return hidden[cu_seqlens[: lengths.shape[0]].long().clamp(max=hidden.shape[0] - 1)].float()
        # Sums as a product with a 0/1 membership matrix: 0.6 ms per 2,048-token batch compiled,
        # where index_add (a scatter) took 2.2 ms (issue 6 notes). In the encoder's own dtype: a
        # bf16 product accumulates in fp32 and rounds the sums to bf16, as the padded path's
        # pooling does, in a quarter of the time of an fp32 one (0.23 against 0.94 ms, one thread).
        rows = torch.arange(lengths.shape[0], device=hidden.device)
        members = (sentence_index.unsqueeze(0) == rows.unsqueeze(1)).to(hidden.dtype)
        return (members @ hidden).float() / lengths.clamp(min=1.0).unsqueeze(1)


def _fused_projection(attention: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values from one GEMM over the concatenated weights, as column slices that
    the attention kernel reads in place. Compiled, inductor folds the concatenation into one frozen
    weight; one [tokens, 3 * width] product took 1.02-1.05 ms against 1.23-1.28 ms for three
    [tokens, width] ones (2,048 x 384 bf16, one thread; issue 6 notes)."""
    parts = (attention.query, attention.key, attention.value)
    if not all(type(part) is nn.Linear for part in parts):  # int8 (--int8) layers keep their own products
        return tuple(part(hidden) for part in parts)
    weight = torch.cat([part.weight for part in parts])
    bias = None if parts[0].bias is None else torch.cat([part.bias for part in parts])
    return tuple(nn.functional.linear(hidden, weight, bias).split(parts[0].out_features, dim=1))

"""The multi-task model: one pretrained encoder, one linear head per task."""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from eventcoder.schema import LabelSchema


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: PreTrainedModel, schema: LabelSchema, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        # Heads read pooled token states; an unused pooler would only hold parameters that never
        # get gradients (which DDP treats as an error).
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.schema = schema
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({task.name: nn.Linear(hidden, task.num_labels) for task in schema.tasks})

    @classmethod
    def from_encoder(cls, encoder_name: str, schema: LabelSchema, pooling: str, dropout: float) -> "MultiTaskModel":
        return cls(AutoModel.from_pretrained(encoder_name), schema, pooling, dropout)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **encoder_inputs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **encoder_inputs).last_hidden_state
        # Heads stay fp32 under a bf16 encoder (see inference.Predictor) so scores keep their precision.
        pooled = self.dropout(self.pool(hidden, attention_mask)).float()
        return {name: head(pooled) for name, head in self.heads.items()}


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task losses: cross-entropy (single-label) or BCE (multi-label)."""

    def __init__(self, schema: LabelSchema, task_weights: dict[str, float], class_weights: dict[str, torch.Tensor]):
        super().__init__()
        self.kinds = {task.name: task.kind for task in schema.tasks}
        self.task_weights = {task.name: task_weights.get(task.name, 1.0) for task in schema.tasks}
        self.class_weights = class_weights

    def forward(
        self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=next(iter(logits.values())).device)
        parts = {}
        for name, task_logits in logits.items():
            weight = self.class_weights.get(name)
            task_logits = task_logits.float()
            if weight is not None:
                weight = weight.to(task_logits.device)
            if self.kinds[name] == "multi_label":
                loss = nn.functional.binary_cross_entropy_with_logits(task_logits, labels[name], pos_weight=weight)
            else:
                loss = nn.functional.cross_entropy(task_logits, labels[name], weight=weight)
            parts[name] = loss.item()
            total = total + self.task_weights[name] * loss
        return total, parts

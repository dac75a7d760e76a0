"""Batches without wasted work: padding-free packing (attention kept per example) or length-grouped padding."""
from __future__ import annotations

IGNORE = -100
# Token budget of one forward/backward piece of a packed batch on a CPU (bounded activation memory).
DEFAULT_MICRO_BATCH_TOKENS = 512


def shifted(labels: list[int]) -> list[int]:
    """Targets for each position: the next token's label; the last position predicts nothing."""
    return labels[1:] + [IGNORE]


class PackedCollator:
    """Concatenate a batch into one row; position ids restart per example so attention stays inside it.

    transformers derives a block-diagonal causal mask from the restarting position ids (no
    attention_mask is passed), so the packed loss equals the loss of the examples run one by one.
    """

    def __call__(self, features: list[dict]):
        import torch

        input_ids, position_ids, labels, shift = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            input_ids += f["input_ids"]
            position_ids += list(range(n))
            # The first token of each example is never a target of the previous one.
            labels += [IGNORE] + f["labels"][1:]
            shift += shifted(f["labels"])
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "shift_labels": torch.tensor([shift], dtype=torch.long),
        }


class PaddedCollator:
    """Right-pad to the longest example in the batch (not to max length); used when packing is off."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids, mask, labels, shift = [], [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            input_ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
            shift.append(shifted(f["labels"]) + [IGNORE] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "shift_labels": torch.tensor(shift, dtype=torch.long),
        }


def split_packed(batch: dict, max_tokens: int) -> list[dict]:
    """Cut a packed row into runs of whole examples of at most max_tokens (an example longer stays whole).

    Each example's last target is already ignored, so the pieces' summed loss and gradient equal
    the whole row's; only the activations alive at once shrink.
    """
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [int(positions.shape[0])]
    cuts, begin = [], 0
    for a, b in zip(starts, starts[1:]):
        if b - begin > max_tokens and a > begin:
            cuts.append((begin, a))
            begin = a
    cuts.append((begin, starts[-1]))
    if len(cuts) == 1:
        return [batch]
    keys = ("input_ids", "position_ids", "labels", "shift_labels")
    return [{k: batch[k][:, a:b] for k in keys if k in batch} for a, b in cuts]


def real_tokens(batch) -> int:
    """Tokens that are not padding."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def causal_lm_loss_sum(model, batch, fused: bool = True):
    """Summed next-token loss, projecting to the vocabulary only where a target exists.

    The vocabulary projection is a large share of a small model's FLOPs and memory; positions
    with no target (prompt tokens, padding) skip it (`logits_to_keep`). With `fused`, a model with
    a plain linear head computes it chunk by chunk from the hidden states and never holds the
    logits (`engine.fastpath.linear_cross_entropy`); other models take the stock path.
    """
    import torch
    import torch.nn.functional as F

    shift = batch["shift_labels"]
    keep = (shift != IGNORE).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # Without a KV cache transformers reads restarting position ids as packed examples (block-diagonal mask).
    inputs["use_cache"] = False
    if keep.numel() == 0:
        out = model(**inputs, logits_to_keep=1)
        return out.logits.sum() * 0.0, 0
    targets = shift[:, keep]
    if fused:
        from loralab.engine.fastpath import linear_cross_entropy, plain_head

        parts = plain_head(model)
        if parts is not None:
            decoder, head = parts
            hidden = decoder(**inputs).last_hidden_state[:, keep]  # [B, K, d]: no logits are kept
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1))
            return loss, int((targets != IGNORE).sum())
    out = model(**inputs, logits_to_keep=keep)
    logits = out.logits  # [B, K, V]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)), targets.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return loss, int((targets != IGNORE).sum())

"""Model heads of our own, in a module that imports paddlenlp (the task modules do not, so reading data stays
light); Paddle's static export re-executes `forward` among this module's globals."""
from __future__ import annotations

from paddlenlp.transformers import ErnieForSequenceClassification


class ErnieSequenceClassifier(ErnieForSequenceClassification):
    """ERNIE's sequence classifier, whose sentence vector is either its pooler over [CLS] (`model.pooling: cls`,
    ERNIE's own) or the mean of the last hidden states over the real tokens (`mean`, for encoders pretrained that
    way, such as e5: a linear probe on 2-layer e5 features scored 41.5% on TNEWS dev with the mean, 10.3% with
    [CLS]). The choice is saved in the checkpoint's config, so every stage reads it back; the export traces the
    branch taken."""

    def forward(self, input_ids, token_type_ids=None, position_ids=None, attention_mask=None, **_):
        hidden, pooled = self.ernie(input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                                    attention_mask=attention_mask)[:2]
        if getattr(self.config, "pooling", "cls") == "mean":
            real = (input_ids != self.config.pad_token_id).astype(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * real).sum(axis=1) / real.sum(axis=1).clip(min=1.0)
        return self.classifier(self.dropout(pooled))

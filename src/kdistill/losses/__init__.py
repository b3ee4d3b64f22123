"""Pure loss functions on tensors: no model code, no I/O."""

from kdistill.losses.divergences import (
    DIVERGENCE_PARAMS,
    DIVERGENCES,
    forward_kl,
    get_divergence,
    jsd,
    per_row_divergence,
    reduce_positions,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kdistill.losses.contrastive import (
    embedding_cosine,
    embedding_mse,
    info_nce,
    similarity_kd,
)

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_PARAMS",
    "forward_kl",
    "get_divergence",
    "jsd",
    "per_row_divergence",
    "reduce_positions",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "embedding_cosine",
    "embedding_mse",
    "info_nce",
    "similarity_kd",
]

from kdistill.losses.hidden import (  # noqa: E402
    attention_kl,
    HIDDEN_LOSSES,
    hidden_cosine,
    hidden_mse,
    layer_output_index,
    resolve_layer_map,
)

__all__ += ["HIDDEN_LOSSES", "attention_kl", "hidden_cosine", "hidden_mse", "layer_output_index", "resolve_layer_map"]

from kdistill.losses.chunked import (  # noqa: E402
    chunked_cross_entropy,
    chunked_distillation_loss,
    chunked_topk_distillation_loss,
)

__all__ += ["chunked_cross_entropy", "chunked_distillation_loss", "chunked_topk_distillation_loss"]

from kdistill.losses.topk import TopKTeacher, topk_divergence, topk_from_logits  # noqa: E402

__all__ += ["TopKTeacher", "topk_divergence", "topk_from_logits"]

from kdistill.losses.cross_tokenizer import (  # noqa: E402
    ALM_DIVERGENCES,
    alm_loss,
    chunk_logprobs,
    gold_loss,
    uld_loss,
)

__all__ += ["ALM_DIVERGENCES", "alm_loss", "chunk_logprobs", "gold_loss", "uld_loss"]

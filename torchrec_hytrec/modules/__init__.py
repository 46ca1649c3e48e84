"""Modules of HyTRec: configuration, TADN and softmax layers, the encoder."""

from torchrec_hytrec.modules.attention import KVCache, SoftmaxAttentionLayer
from torchrec_hytrec.modules.blocks import RotaryEmbedding, SequenceContext, SwiGLU, gap_buckets
from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.modules.encoder import HyTRecEncoder, HyTRecStreamState, LongShortFusion
from torchrec_hytrec.modules.tadn import TADNLayer

__all__ = [
    "HyTRecConfig",
    "HyTRecEncoder",
    "HyTRecStreamState",
    "KVCache",
    "LongShortFusion",
    "RotaryEmbedding",
    "SequenceContext",
    "SoftmaxAttentionLayer",
    "SwiGLU",
    "TADNLayer",
    "gap_buckets",
]

"""Modules of HyTRec: configuration, TADN, softmax and HSTU-style layers, the encoder and its
streaming state."""

from torchrec_hytrec.modules.attention import SoftmaxAttentionLayer
from torchrec_hytrec.modules.blocks import RotaryEmbedding, SequenceContext, SwiGLU, gap_buckets
from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.modules.encoder import HyTRecEncoder, LongShortFusion
from torchrec_hytrec.modules.hstu import HSTULayer
from torchrec_hytrec.modules.streaming import GrowingKVCache, HyTRecStreamState, KVCache
from torchrec_hytrec.modules.tadn import TADNLayer

__all__ = [
    "GrowingKVCache",
    "HSTULayer",
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

"""Configuration of :class:`~torchrec_hytrec.modules.encoder.HyTRecEncoder`."""

from dataclasses import dataclass
from typing import Any, Optional, Tuple

TADN = "T"
SOFTMAX = "A"
HSTU = "H"
# The named configurations of HyTRecConfig (its classmethods of these names).
PRESETS = ("hytrec", "sasrec_like", "windowed_softmax", "hstu_like", "pure_linear")


@dataclass
class HyTRecConfig:
    """Hyper-parameters of the HyTRec encoder and of its baselines.

    The baselines are configurations of the same code: see :meth:`hytrec`, :meth:`sasrec_like`,
    :meth:`windowed_softmax`, :meth:`hstu_like` and :meth:`pure_linear`.

    Args:
        embedding_dim: width ``d`` of the event embeddings and of every layer.
        num_heads: attention heads of every layer; ``embedding_dim // num_heads`` must be even
            (rotary position embeddings rotate pairs of channels).
        short_window: ``K``, the most events of the short-term window.
        short_window_seconds: adaptive short window: only the events of the last
            ``short_window_seconds`` seconds before (and including) the current one, capped at
            ``short_window`` events. The long branch then covers every earlier event, so no
            event falls between the two branches. ``None`` keeps the fixed window of ``K``.
        long_pattern: layers of the long branch, first to last: ``"T"`` a TADN layer, ``"A"`` a
            softmax-attention layer, ``"H"`` an HSTU-style layer (pointwise attention with
            relative position and time biases, full causal). ``""`` means no long branch.
        long_attention_window: ``None`` for full causal softmax layers in the long branch,
            ``W`` for a causal window of ``W`` events. Only for softmax layers: a pattern with
            ``"H"`` layers must leave it ``None``.
        use_short_branch: encode the short window with one softmax block and fuse it with
            the long branch. Without it the output at ``i`` is the long branch's own output at
            ``i`` (nothing is held out of the long branch).
        dropout: dropout on the input and on every residual branch.
        ffn_multiplier: hidden width of the SwiGLU feed-forward blocks, in units of ``d``.
        time_constant_range: ``(low, high)`` seconds: the TADN decay time constants ``T_h`` of
            the heads are initialised log-spaced over this range (an hour to a year).
        num_gap_buckets: buckets of ``log1p(gap seconds)`` embedded as ``phi(gap)``.
        gap_bucket_scale: bucket of a gap ``g`` is ``floor(gap_bucket_scale * log1p(g))``,
            clamped to the last bucket.
        gate_gap_dim: width of ``phi(gap)`` in the TADN gates.
        tadn_time_decay: TADN layers decay their state by ``exp(-gap / T_h)`` per event (and their
            readouts by the time to the request). ``False`` is the ablation without it.
        tadn_temporal_gate: TADN gates and write strengths read ``phi(gap)`` besides the event.
            ``False`` is the ablation where they read the event only; with
            ``tadn_time_decay=False`` too, a TADN layer is a plain gated delta rule.
        rope_base: base of the rotary position embeddings of the softmax layers.
        attention_block_size: queries per block of the windowed softmax kernel.
        tadn_chunk_size: chunk length of the chunkwise TADN kernel (shrunk for batches of short
            users); 32 measured fastest from 1k to 16k events (``benchmarks/bench_tadn.py``
            prints the comparison).

    Example::

        >>> from torchrec_hytrec import HyTRecConfig
        >>> config = HyTRecConfig.hytrec(embedding_dim=128, long_attention_window=256)
        >>> config.long_pattern, config.head_dim
        ('TTTA', 64)
    """

    embedding_dim: int = 64
    num_heads: int = 2
    short_window: int = 64
    short_window_seconds: Optional[float] = None
    long_pattern: str = "TTTA"
    long_attention_window: Optional[int] = None
    use_short_branch: bool = True
    dropout: float = 0.0
    ffn_multiplier: float = 2.0
    time_constant_range: Tuple[float, float] = (3600.0, 365.0 * 86400.0)
    num_gap_buckets: int = 40
    gap_bucket_scale: float = 2.0
    gate_gap_dim: int = 16
    tadn_time_decay: bool = True
    tadn_temporal_gate: bool = True
    rope_base: float = 10000.0
    attention_block_size: int = 64
    tadn_chunk_size: int = 32

    def __post_init__(self) -> None:
        if set(self.long_pattern) - {TADN, SOFTMAX, HSTU}:
            raise ValueError(
                f"long_pattern may only hold '{TADN}' (TADN), '{SOFTMAX}' (softmax) and '{HSTU}' "
                f"(HSTU-style), got {self.long_pattern!r}"
            )
        if self.long_attention_window is not None and HSTU in self.long_pattern:
            raise ValueError(
                f"long_attention_window windows the softmax layers ('{SOFTMAX}'); the HSTU-style layers "
                f"('{HSTU}') of long_pattern {self.long_pattern!r} are full causal: leave it None"
            )
        if not self.long_pattern and not self.use_short_branch:
            raise ValueError("HyTRecConfig needs a long branch (long_pattern) or the short branch")
        if self.embedding_dim < 1 or self.num_heads < 1:
            raise ValueError(
                f"embedding_dim and num_heads must be >= 1, got {self.embedding_dim} and {self.num_heads}"
            )
        if self.embedding_dim % self.num_heads or (self.embedding_dim // self.num_heads) % 2:
            raise ValueError(
                f"embedding_dim ({self.embedding_dim}) must split into num_heads ({self.num_heads}) "
                "heads of even width"
            )
        if self.short_window < 1:
            raise ValueError(f"short_window must be >= 1, got {self.short_window}")
        if self.short_window_seconds is not None and self.short_window_seconds < 0:
            raise ValueError(f"short_window_seconds must be >= 0, got {self.short_window_seconds}")
        if self.long_attention_window is not None and self.long_attention_window < 1:
            raise ValueError(f"long_attention_window must be >= 1, got {self.long_attention_window}")
        low, high = self.time_constant_range
        if not 0 < low <= high:
            raise ValueError(
                f"time_constant_range must satisfy 0 < low <= high, got {self.time_constant_range}"
            )

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    @classmethod
    def hytrec(cls, **overrides: Any) -> "HyTRecConfig":
        """The paper's model: 3 TADN + 1 softmax layer in the long branch, ``K = 64``."""
        return cls(**{"long_pattern": "TTTA", "short_window": 64, "use_short_branch": True, **overrides})

    @classmethod
    def sasrec_like(cls, num_layers: int = 4, **overrides: Any) -> "HyTRecConfig":
        """All-softmax baseline: a stack of full causal softmax layers, no split."""
        return cls(**{"long_pattern": SOFTMAX * num_layers, "use_short_branch": False, **overrides})

    @classmethod
    def windowed_softmax(cls, num_layers: int = 4, window: int = 256, **overrides: Any) -> "HyTRecConfig":
        """All-softmax baseline with local attention: each layer sees the last ``window`` events
        (HyTRec's ``long_attention_window`` for a like-for-like comparison), no split."""
        return cls(
            **{
                "long_pattern": SOFTMAX * num_layers,
                "long_attention_window": window,
                "use_short_branch": False,
                **overrides,
            }
        )

    @classmethod
    def hstu_like(cls, num_layers: int = 4, **overrides: Any) -> "HyTRecConfig":
        """HSTU-style baseline (Zhai et al., ICML 2024): a stack of HSTU layers
        (:class:`~torchrec_hytrec.modules.hstu.HSTULayer`), no split."""
        return cls(**{"long_pattern": HSTU * num_layers, "use_short_branch": False, **overrides})

    @classmethod
    def pure_linear(cls, num_layers: int = 4, **overrides: Any) -> "HyTRecConfig":
        """All-TADN baseline without the short branch."""
        return cls(**{"long_pattern": TADN * num_layers, "use_short_branch": False, **overrides})

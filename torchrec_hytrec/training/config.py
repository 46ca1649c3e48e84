"""Training configuration: nested dataclasses, a YAML file and ``section.key=value`` overrides."""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

from torchrec_hytrec.models.sharding import OptimizerConfig

T = TypeVar("T")


@dataclass
class DataConfig:
    """Where the sequences come from and how they are batched.

    Args:
        path: a Parquet dataset written by ``python -m torchrec_hytrec.data.convert``; ``None``
            generates the seeded synthetic dataset instead.
        cache_dir: where the synthetic dataset is written once and reused (keyed by its config).
        synthetic: overrides of the synthetic generator's config fields.
        max_seq_len: keep at most the last ``max_seq_len`` events of each training input.
        token_budget: events per training batch on each rank.
        eval_token_budget: events per evaluation batch on each rank.
        row_group_size: users per row group of the generated synthetic file (row groups are
            what ranks share out, so keep several per rank).

    Example::

        DataConfig(path="beauty.parquet", token_budget=4096)
    """

    path: Optional[str] = None
    cache_dir: str = "runs/data"
    synthetic: Dict[str, Any] = field(default_factory=dict)
    max_seq_len: int = 200
    token_budget: int = 4096
    eval_token_budget: int = 16384
    row_group_size: int = 128


@dataclass
class ModelConfig:
    """The retrieval model: an encoder preset plus field overrides.

    Args:
        preset: ``"hytrec"``, ``"sasrec_like"`` or ``"pure_linear"`` (the ``HyTRecConfig`` presets).
        embedding_dim: width of the item table and of the encoder.
        encoder: overrides of ``HyTRecConfig`` fields applied on top of the preset.
        retrieval: overrides of ``RetrievalConfig`` fields (``loss``, ``temperature``, ...).
        sharding: table sharding for the planner: ``"row_wise"``, ``"table_wise"`` or ``"auto"``.

    Example::

        ModelConfig(preset="sasrec_like", embedding_dim=32)
    """

    preset: str = "hytrec"
    embedding_dim: int = 64
    encoder: Dict[str, Any] = field(default_factory=dict)
    # Small catalogues train best with the full softmax (DESIGN §5).
    retrieval: Dict[str, Any] = field(default_factory=lambda: {"loss": "full"})
    sharding: str = "row_wise"


@dataclass
class CheckpointConfig:
    """``torch.distributed.checkpoint`` snapshots.

    Args:
        every_n_steps: also checkpoint every N optimizer steps (``0``: only at epoch ends).
        keep_last: complete checkpoints kept on disk; older ones are deleted.

    Example::

        CheckpointConfig(every_n_steps=20, keep_last=2)
    """

    every_n_steps: int = 50
    keep_last: int = 3


@dataclass
class TrainConfig:
    """Everything one training run reads.

    Args:
        seed: seeds parameters, data order (per epoch: ``seed + epoch``) and dropout.
        epochs: passes over the training split.
        out_dir: metrics, TensorBoard events and checkpoints go under it.
        eval_ks: cut-offs reported for hit rate and NDCG.
        fault_at_step: test knob: the last rank SIGKILLs itself before this global step on a
            job's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0). ``None`` disables it.
        data: see :class:`DataConfig`.
        model: see :class:`ModelConfig`.
        optim: the table and dense optimizers
            (:class:`torchrec_hytrec.models.sharding.OptimizerConfig`).
        checkpoint: see :class:`CheckpointConfig`.

    Example::

        cfg = load_config("configs/default.yaml", overrides=["epochs=2"])
    """

    seed: int = 0
    epochs: int = 5
    out_dir: str = "runs/hytrec"
    eval_ks: List[int] = field(default_factory=lambda: [10])
    fault_at_step: Optional[int] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks a YAML value against a field's type, allowing ints where floats are expected."""
    if value is None:
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
            return None
        raise ValueError(f"config key '{where}' must not be null")
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{where}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is tuple:
        item_tps = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_tps):
            raise ValueError(f"config key '{where}' must be a list of {len(item_tps)}, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_tps)))
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config key '{where}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls: Type[T], raw: Dict[str, Any], where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"{cls.__name__} has {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_path(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> "tuple[str, Any]":
    """Splits ``a.b=value`` and parses ``value`` as YAML (so ``3``, ``1e-3``, ``null``, ``[10, 50]``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    return key.strip(), yaml.safe_load(value)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Builds a :class:`TrainConfig` from defaults, an optional YAML file and overrides.

    Args:
        path: YAML file whose nested mappings mirror :class:`TrainConfig`; ``None`` for defaults.
        overrides: ``section.key=value`` strings applied after the file, in order.

    Returns:
        The validated config; unknown keys and wrong types raise ``ValueError`` naming the key.

    Example::

        cfg = load_config(overrides=["model.preset=sasrec_like", "epochs=1"])
    """
    raw: Dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: top level must be a mapping")
        raw = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key, value)
    where = f"{path}: " if path else ""
    try:
        return _from_dict(TrainConfig, raw)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from e


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The config as plain nested dicts, as written next to a run's metrics."""
    return dataclasses.asdict(cfg)

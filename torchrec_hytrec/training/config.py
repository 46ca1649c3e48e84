"""Training configuration: nested dataclasses, a YAML file and ``section.key=value`` overrides."""

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

from torchrec_hytrec.data.reader import ReaderConfig
from torchrec_hytrec.data.synthetic import SyntheticConfig
from torchrec_hytrec.models.retrieval import RetrievalConfig
from torchrec_hytrec.models.sharding import PLAN_KINDS
from torchrec_hytrec.modules.config import PRESETS, HyTRecConfig
from torchrec_hytrec.training.optimizer import OptimizerConfig

T = TypeVar("T")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class DataConfig:
    """Where the sequences come from and how the readers batch them.

    Args:
        path: a Parquet dataset written by ``python -m torchrec_hytrec.data.convert``; ``None``
            generates the seeded synthetic dataset instead.
        cache_dir: where the synthetic dataset is written once and reused (keyed by its config).
        synthetic: the synthetic generator's settings (:class:`SyntheticConfig`).
        row_group_size: users per row group of the generated synthetic file (row groups are
            what ranks share out, so keep several per rank).
        train: the training reader's batching on each rank (:class:`ReaderConfig`): training
            histories longer than ``max_seq_len`` are read as windows.
        eval: the validation and test readers' batching: an evaluation input keeps its last
            ``max_seq_len`` events.

    Example::

        >>> from torchrec_hytrec.training.config import DataConfig
        >>> DataConfig(path="beauty.parquet").train.max_tokens
        4096
    """

    path: Optional[str] = None
    cache_dir: str = "runs/data"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig.small)
    row_group_size: int = 128
    train: ReaderConfig = field(
        default_factory=lambda: ReaderConfig(max_tokens=4096, max_seq_len=2000, shuffle=True)
    )
    eval: ReaderConfig = field(default_factory=lambda: ReaderConfig(max_tokens=16384, max_seq_len=2000))

    def __post_init__(self) -> None:
        _at_least(1, data_row_group_size=self.row_group_size)


@dataclass
class ModelConfig:
    """The retrieval model: an encoder preset with field overrides, the loss, the sharding.

    Args:
        preset: one of ``PRESETS`` (``hytrec``, ``sasrec_like``, ``windowed_softmax``,
            ``hstu_like``, ``pure_linear``): the ``HyTRecConfig`` preset
            whose values ``encoder`` starts from.
        encoder: the encoder (:class:`HyTRecConfig`); its ``embedding_dim`` is also the tables' width.
        retrieval: loss and reading settings (:class:`RetrievalConfig`).
        sharding: table sharding for the planner: ``"row_wise"``, ``"table_wise"`` or ``"auto"``.

    Example::

        >>> from torchrec_hytrec.training.config import load_config
        >>> cfg = load_config(overrides=["model.preset=sasrec_like", "model.encoder.embedding_dim=32"])
        >>> cfg.model.encoder.long_pattern, cfg.model.encoder.embedding_dim
        ('AAAA', 32)
    """

    preset: str = "hytrec"
    encoder: HyTRecConfig = field(default_factory=HyTRecConfig.hytrec)
    # Small catalogues train best with the full softmax (DESIGN §5).
    retrieval: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(loss="full"))
    sharding: str = "row_wise"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.sharding not in PLAN_KINDS:
            raise ValueError(f"model.sharding must be one of {list(PLAN_KINDS)}, got {self.sharding!r}")


@dataclass
class CheckpointConfig:
    """``torch.distributed.checkpoint`` snapshots.

    Args:
        every_n_steps: also checkpoint every N optimizer steps (``0``: only at epoch ends).
        keep_last: complete checkpoints kept on disk; older ones are deleted.

    Example::

        >>> from torchrec_hytrec.training.config import CheckpointConfig
        >>> CheckpointConfig(every_n_steps=20, keep_last=2).keep_last
        2
    """

    every_n_steps: int = 50
    keep_last: int = 3

    def __post_init__(self) -> None:
        _at_least(0, checkpoint_every_n_steps=self.every_n_steps)
        _at_least(1, checkpoint_keep_last=self.keep_last)


@dataclass
class EarlyStoppingConfig:
    """Stop training when a validation figure stops improving.

    Args:
        patience: stop after this many epochs in a row without a new best ``metric``; ``0``
            trains every epoch.
        metric: a column of the epoch row, higher is better: ``valid_`` then ``hr@K``,
            ``ndcg@K`` (``K`` in ``eval_ks``) or ``mrr``, with ``unseen_`` before it for the
            seen-items-removed protocol (``valid_unseen_ndcg@10``).

    Example::

        >>> from torchrec_hytrec.training.config import load_config
        >>> load_config(None, ["early_stopping.patience=3"]).early_stopping.metric
        'valid_ndcg@10'
    """

    patience: int = 0
    metric: str = "valid_ndcg@10"

    def __post_init__(self) -> None:
        _at_least(0, early_stopping_patience=self.patience)


@dataclass
class TrainConfig:
    """Everything one training run reads: one typed tree, every leaf settable with ``--set``.

    Args:
        seed: seeds parameters, data order (per epoch: ``seed + epoch``) and dropout.
        epochs: passes over the training split.
        out_dir: metrics, TensorBoard events and checkpoints go under it.
        eval_ks: cut-offs reported for hit rate and NDCG.
        eval_protocols: ``"all"``: rank each held-out target among every item; ``"unseen"``:
            among the items the user has not interacted with (reported as ``unseen_*``).
        eval_save_ranks: also write every evaluated user's rank of its target, per split and
            protocol, with the target and the history length, to ``ranks/epoch<E>.npz`` under
            ``out_dir`` (for paired comparisons between runs, e.g. bootstrap intervals).
        early_stopping: see :class:`EarlyStoppingConfig`.
        fault_at_step: test knob: the last rank SIGKILLs itself at this global step on a job's
            first attempt (``TORCHELASTIC_RESTART_COUNT`` 0). ``None`` disables it.
        data: see :class:`DataConfig`.
        model: see :class:`ModelConfig`.
        optim: the table and dense optimizers
            (:class:`torchrec_hytrec.training.optimizer.OptimizerConfig`).
        checkpoint: see :class:`CheckpointConfig`.

    Example::

        >>> from torchrec_hytrec.training.config import load_config
        >>> cfg = load_config("configs/default.yaml", overrides=["epochs=2", "optim.dense_lr=3e-4"])
        >>> cfg.epochs, cfg.optim.dense_lr
        (2, 0.0003)
    """

    seed: int = 0
    epochs: int = 5
    out_dir: str = "runs/hytrec"
    eval_ks: List[int] = field(default_factory=lambda: [10])
    eval_protocols: List[str] = field(default_factory=lambda: ["all"])
    eval_save_ranks: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    fault_at_step: Optional[int] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _at_least(1, epochs=self.epochs)
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ValueError(f"eval_ks must be a non-empty list of cut-offs >= 1, got {self.eval_ks}")
        if not self.eval_protocols or set(self.eval_protocols) - {"all", "unseen"}:
            raise ValueError(
                f"eval_protocols must be a non-empty subset of ['all', 'unseen'], got {self.eval_protocols}"
            )
        prefixes = [""] + (["unseen_"] if "unseen" in self.eval_protocols else [])
        figures = ["mrr"] + [f"{m}@{k}" for m in ("hr", "ndcg") for k in self.eval_ks]
        names = [f"valid_{p}{f}" for p in prefixes for f in figures]
        if self.early_stopping.metric not in names:
            raise ValueError(
                f"config key 'early_stopping.metric' must be one of {names} (from eval_ks and "
                f"eval_protocols), got {self.early_stopping.metric!r}"
            )


_SECTIONS = ("data", "checkpoint", "early_stopping")


def _at_least(low: int, **values: int) -> None:
    """Raises naming the config key (``data_row_group_size`` -> ``data.row_group_size``) below ``low``."""
    for name, value in values.items():
        if value < low:
            section = next((s for s in _SECTIONS if name.startswith(s + "_")), None)
            key = f"{section}.{name[len(section) + 1 :]}" if section else name
            raise ValueError(f"config key '{key}' must be >= {low}, got {value}")


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
        if isinstance(value, tp):
            return value
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
    # YAML 1.1 reads exponents without a dot ("3e-4") as strings.
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
    return value


def _fields(cls: type, raw: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``raw``'s entries checked against ``cls``'s fields and coerced to their types."""
    if cls is ModelConfig:
        raw = _with_preset_encoder(raw, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; {cls.__name__} has {sorted(names)}"
        )
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, value = f"{where}.{f.name}" if where else f.name, raw[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A section overrides the field's own default (e.g. model.retrieval's loss "full"),
            # not its class's defaults.
            value = _replace(default, _fields(type(default), value, key), key)
        out[f.name] = _coerce(value, hints[f.name], key)
    return out


def _with_preset_encoder(raw: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``model`` with its ``encoder`` section applied over the preset's config, not over
    ``HyTRecConfig``'s own defaults."""
    if "preset" not in raw and "encoder" not in raw:
        return raw
    preset = raw.get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"config key '{where}.preset' must be one of {list(PRESETS)}, got {preset!r}")
    section = raw.get("encoder") or {}
    if isinstance(section, HyTRecConfig):
        return raw
    if not isinstance(section, dict):
        raise ValueError(f"config key '{where}.encoder' must be a mapping, got {section!r}")
    overrides = _fields(HyTRecConfig, section, f"{where}.encoder")
    return {**raw, "encoder": _replace(getattr(HyTRecConfig, preset)(), overrides, f"{where}.encoder")}


def _replace(default: Any, changes: Dict[str, Any], where: str) -> Any:
    try:
        return dataclasses.replace(default, **changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}" if where not in str(e) else str(e)) from e


def _from_dict(cls: Type[T], raw: Dict[str, Any], where: str = "") -> T:
    kwargs = _fields(cls, raw, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        prefix = f"{where}: " if where and where not in str(e) else ""
        raise ValueError(f"{prefix}{e}") from e


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


def _field_docs(cls: type) -> Dict[str, str]:
    """The ``Args:`` entries of a dataclass's Google-style docstring, one line each."""
    docs: Dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside, name = False, None
    for line in lines:
        stripped = line.strip()
        if stripped == "Args:":
            inside = True
            continue
        if inside:
            if not stripped or stripped.endswith("::") or stripped in ("Returns:", "Example:"):
                if not stripped:
                    continue
                break
            head, sep, rest = stripped.partition(": ")
            if sep and " " not in head and head.isidentifier():
                name = head
                docs[name] = rest
            elif name is not None:
                docs[name] += " " + stripped
    return docs


def config_reference(cfg: Optional[TrainConfig] = None) -> str:
    """Every ``--set`` path of the config tree with its default (from ``cfg``) and its meaning."""
    cfg = cfg if cfg is not None else TrainConfig()
    rows: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        docs = _field_docs(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                doc = re.sub(r"``([^`]*)``", r"\1", docs.get(f.name, ""))
                rows.append(f"  {key} = {value!r}\n      {doc}" if doc else f"  {key} = {value!r}")

    walk(cfg, "")
    return "\n".join(rows)


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The config as plain nested dicts, as written next to a run's metrics."""
    return dataclasses.asdict(cfg)

"""The contract between the orchestrator and a worker: what one trial computes and returns.

Everything here is a frozen dataclass of plain values. A `TrialSpec` is fully resolved (no
default left implicit), so `trial_id` (a hash of the fields that change the computation)
names exactly one computation on every machine. Output paths, resources and the speed
switches in `RuntimeSpec` are left out of the hash: they change where and how fast a trial
runs, not what it computes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from slimsweep.workers.tables import FINETUNES, SELECTIONS
from slimsweep.workers.tables import HEADS as HEAD_KINDS

HEADS = tuple(HEAD_KINDS)  # the grid's `heads:` values (workers.tables.HEADS holds their facts)
PRECISIONS = ("fp32", "bf16")
LM_LOSSES = ("label-words", "full-vocab")
LABEL_WORD_RULES = ("single-token", "first-subtoken")
OVERFLOW_RULES = ("error", "truncate-left")
SAVE_MODELS = ("none", "best")  # runtime.save_model
TASK_KINDS = ("hub", "files", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw",)  # the only one train.make_optimizer builds
# Local data files by extension -> the `datasets` builder that reads them.
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CALIBRATION_SOURCES = ("task", "synthetic", "file")
# How a trial's rows are drawn (see workers/data.py): slimsweep's one seeded order, or the
# authors' released code's sequence of draws, call for call.
SAMPLERS = ("slimsweep", "authors")
PKG_PREFIX = "pkg:"  # a model source inside an installed Python package: pkg:<package>


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from. `source` is a hub id, a local folder, or
    `pkg:<python package>` (a folder shipped inside an installed package, e.g. a GGUF file)."""

    name: str
    source: str
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """A text-classification task as data. `kind` says how `dataset` is read: a hub dataset id
    (`load_dataset(dataset, config)`), local files (`data_files`, by extension), or a seeded
    generator in `workers.synthetic` named by `dataset`."""

    name: str
    kind: str
    dataset: str
    template: str
    label_words: tuple[str, ...]
    text_field: str = "text"
    label_field: str = "label"
    config: str | None = None
    revision: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    data_files: tuple[tuple[str, str], ...] = ()  # (split, path) pairs for kind == "files"
    # (split, sha256 of the file's bytes) for kind == "files", filled in by the grid loader, so
    # a changed data file changes the trial id and never reuses results of the old one.
    file_digests: tuple[tuple[str, str], ...] = ()

    @property
    def n_classes(self) -> int:
        return len(self.label_words)


@dataclass(frozen=True)
class DataSpec:
    train_size: int = 200
    valid_size: int = 1000
    test_size: int = 1000
    demos_per_class: int = 1
    # As the authors' released code: `train_size` examples per class (capped at what a class
    # has left), not in total.
    train_per_class: bool = False
    # slimsweep's approximation of the authors' off-by-one (every draw over [0, len], the extra
    # index clamped); their code's own draw is `sampler: "authors"`.
    inclusive_index_draw: bool = False
    # Token budget of one prompt; None means the model's context length.
    max_length: int | None = None
    overflow: str = "error"
    label_word_rule: str = "single-token"
    # "authors": the draws of the authors' released code (valid, then per class one
    # demonstration and train_size training rows capped at what the class has); see data.py.
    sampler: str = "slimsweep"


@dataclass(frozen=True)
class TrainSpec:
    optimizer: str = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    batch_size: int = 1
    epochs: int = 50
    patience: int = 15
    precision: str = "fp32"
    lm_loss: str = "label-words"


@dataclass(frozen=True)
class RuntimeSpec:
    """How a trial runs, not what it computes: kept out of the trial hash, recorded in results."""

    device: str = "auto"  # auto | cpu | cuda
    last_position_logits: bool = True
    prefix_cache: bool = True
    eval_batch_size: int = 0  # 0: chosen from free memory (32 on CPU)
    fused_adamw: bool = True  # one fused AdamW kernel (CPU and CUDA); false: the per-tensor loop
    compile: bool = False  # torch.compile each decoder layer (families.compile_layers)
    checkpoint_every: int = 1  # epochs between restart checkpoints; 0: none
    # ... and at least this many seconds between two (a checkpoint of a 1.5B-parameter model
    # is ~19 GB to write); 0: every `checkpoint_every` epochs
    checkpoint_min_s: float = 300.0
    cache_dir: str | None = None  # de-quantised / downloaded models, shared by trials
    # best: keep the best epoch's trained weights in the result store (`slimsweep export`)
    save_model: str = "none"
    # Train a cell's seeds together (workers.fused): auto (on GPU, as many as fit; off on
    # CPU) | off | N (at most N seeds per bundle, on any device)
    fuse: str = "auto"


@dataclass(frozen=True)
class CalibrationSpec:
    """The text score-based selections run the full model on (see `SelectionSpec`): the
    first `n_examples` texts of the source, each cut to `max_tokens` tokens."""

    source: str = "task"  # task (the trial's own train split) | synthetic | file
    name: str = ""  # a synthetic generator name, or a file path; "" for source task
    n_examples: int = 64
    max_tokens: int = 128
    # source file: the SHA-256 of the file's bytes, so the trial id names its content, not
    # only its path (the grid loader fills it in; the worker refuses a file that differs)
    digest: str = ""


@dataclass(frozen=True)
class SelectionSpec:
    """Which `layers` of the model are kept. The default, first-k, is the paper's rule."""

    method: str = "first-k"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    @property
    def label(self) -> str:
        return self.method


@dataclass(frozen=True)
class FinetuneSpec:
    """What trains after pruning. The default, full, is the paper's rule."""

    mode: str = "full"  # full | head-only | last-n | lora | qlora
    last_n: int = 0  # last-n: how many of the last kept layers train
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()  # (): the family's default target modules

    @property
    def label(self) -> str:
        """The grid spelling plus each LoRA setting that differs from its default, so distinct
        specs never share a label: full, last-3, lora, lora-r16-a32, lora-d0.1-q_proj+v_proj."""
        if self.mode == "last-n":
            return f"last-{self.last_n}"
        default = FinetuneSpec()
        parts = [self.mode]
        for prefix, name in (("r", "lora_r"), ("a", "lora_alpha"), ("d", "lora_dropout")):
            if getattr(self, name) != getattr(default, name):
                parts.append(f"{prefix}{getattr(self, name)!r}")
        if self.lora_targets:
            parts.append("+".join(self.lora_targets))
        return "-".join(parts)


def check_finetune(ft: FinetuneSpec, layers: int, device: str) -> None:
    """SpecError unless `ft` names a known mode with only the settings it reads, in range for
    `layers` kept layers, on a `runtime.device` it can run on (as far as the spec tells: on
    `auto` the trial itself finds out). `validate()` calls it as
    `check_finetune(spec.finetune, spec.layers, spec.runtime.device)`."""
    if ft.mode not in FINETUNES:
        known = ", ".join(f.spelling for f in FINETUNES.values())
        raise SpecError(f"finetune.mode: unknown mode {ft.mode!r}; use one of {known}")
    mode = FINETUNES[ft.mode]
    if ft.mode == "last-n" and not 1 <= ft.last_n <= layers:
        raise SpecError(
            f"finetune: last-{ft.last_n} trains the last {ft.last_n} layers but {layers} "
            f"are kept; use last-1..last-{layers}, or keep more layers"
        )
    if ft.mode != "last-n" and ft.last_n != 0:
        raise SpecError(f"finetune.last_n: only mode last-n reads it, not {ft.mode}; drop it")
    default = FinetuneSpec()
    lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
    if not mode.lora:
        for name in lora:
            if getattr(ft, name) != getattr(default, name):
                raise SpecError(
                    f"finetune.{name}: only modes lora and qlora read it, not {ft.mode}; drop it"
                )
    if ft.lora_r < 1:
        raise SpecError(f"finetune.lora_r: rank {ft.lora_r} is below 1; use e.g. r: 8")
    if ft.lora_alpha <= 0:
        raise SpecError(f"finetune.lora_alpha: {ft.lora_alpha} must be positive; e.g. alpha: 16")
    if not 0 <= ft.lora_dropout < 1:
        raise SpecError(f"finetune.lora_dropout: {ft.lora_dropout} is outside [0, 1); e.g. 0.05")
    if any(not isinstance(t, str) or not t for t in ft.lora_targets):
        raise SpecError(
            "finetune.lora_targets: expected module names, e.g. targets: [q_proj, v_proj]"
        )
    if mode.needs_cuda and device == "cpu":
        raise SpecError(
            f"finetune: {ft.label} needs a CUDA GPU (bitsandbytes 4-bit kernels) but "
            f"runtime.device is cpu; use lora on a CPU, or run on a GPU"
        )


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` of a spec section, made once per distinct section: the trials of
    a grid share their sections (read the result, never change it)."""
    try:
        return _plain_cached(value)
    except TypeError:  # unhashable (a list where a tuple belongs): validate() names it
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


@functools.cache
def _plain_cached(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# Fields added after trial ids were first published: left out of the identity while at their
# default, so the trials of grids that do not use them keep their ids. A dotted name is a
# field of a section ("data.sampler").
LATER_FIELDS: dict[str, Any] = {
    "selection": SelectionSpec(),
    "finetune": FinetuneSpec(),
    "data.sampler": DataSpec().sampler,
    "task.file_digests": (),
}


@dataclass(frozen=True)
class TrialSpec:
    grid: str
    model: ModelSpec
    layers: int
    task: TaskSpec
    head: str
    seed: int
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def validate(self) -> None:
        """SpecError, one line "<key path>: <problem>; <fix>", for the first value this trial
        cannot run or store with. Key paths are spelled as in a grid file (`training.lr`)."""
        check_name(self.grid, "name")
        check_model(self.model, "model")
        check_layers(self.layers, "layers")
        check_task(self.task, "task")
        check_choice(self.head, HEADS, "head")
        check_seed(self.seed, "seed")
        for name, key in SECTION_KEYS.items():
            check_section(getattr(self, name), _hints(TrialSpec)[name], key)
        check_sampler(self.data)
        check_selection(self.selection)
        check_finetune(self.finetune, self.layers, self.runtime.device)
        fuse_limit(self.runtime.fuse, on_gpu=True)  # auto and off are valid on any device

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is computed (the grid name and runtime are not)."""
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        del d["grid"], d["runtime"]
        for name, default in LATER_FIELDS.items():
            *sections, leaf = name.split(".")
            owner, values = self, d
            for section in sections:
                # a copy: the section's dict is shared with other trials (see _plain)
                values[section] = dict(values[section])
                owner, values = getattr(owner, section), values[section]
            if getattr(owner, leaf) == default:
                del values[leaf]
        return d

    @functools.cached_property
    def trial_id(self) -> str:  # cached: a frozen spec's id never changes; grids reach 100000
        canon = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        task = dict(d["task"])
        task["label_words"] = tuple(task["label_words"])
        task["data_files"] = tuple(tuple(p) for p in task.get("data_files", ()))
        task["file_digests"] = tuple(tuple(p) for p in task.get("file_digests", ()))
        selection = dict(d.get("selection", {}))
        selection["calibration"] = CalibrationSpec(**selection.get("calibration", {}))
        finetune = dict(d.get("finetune", {}))
        finetune["lora_targets"] = tuple(finetune.get("lora_targets", ()))
        return cls(
            grid=d["grid"],
            model=ModelSpec(**d["model"]),
            layers=d["layers"],
            task=TaskSpec(**task),
            head=d["head"],
            seed=d["seed"],
            selection=SelectionSpec(**selection),
            finetune=FinetuneSpec(**finetune),
            data=DataSpec(**d.get("data", {})),
            train=TrainSpec(**d.get("train", {})),
            runtime=RuntimeSpec(**d.get("runtime", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> TrialSpec:
        return cls.from_dict(json.loads(text))

    def axes(self) -> dict[str, Any]:
        """The grid axes of this trial, as flat columns."""
        return {
            "trial_id": self.trial_id,
            "grid": self.grid,
            "model": self.model.name,
            "layers": self.layers,
            "task": self.task.name,
            "head": self.head,
            "seed": self.seed,
            "selection": self.selection.label,
            "finetune": self.finetune.label,
        }


@dataclass(frozen=True)
class EpochRow:
    trial_id: str
    epoch: int  # 1-based
    train_loss: float
    val_acc: float
    wall_s: float


@dataclass(frozen=True)
class TrialResult:
    """One finished (or failed) trial as a flat record; `orchestrator.store` maps it to Parquet."""

    trial_id: str
    status: str  # ok | failed
    spec_json: str
    kept_layers: tuple[int, ...] = ()
    n_params: int = 0
    best_epoch: int = 0
    epochs_run: int = 0
    val_acc: float = float("nan")
    test_acc: float = float("nan")
    test_acc_per_class: tuple[float, ...] = ()
    test_preds: tuple[int, ...] = ()  # the predicted class of each test row, in manifest order
    n_train: int = 0
    n_valid: int = 0
    n_test: int = 0
    majority_test_acc: float = float("nan")
    n_trainable_params: int = 0
    selection_scores_json: str = "{}"  # per-layer scores of a score-based selection
    model_commit: str = ""  # the resolved revision of the model's weights
    dataset_fingerprint: str = ""  # what identifies the data read (hub fingerprint, digest)
    train_tokens: int = 0
    wall_s: float = 0.0
    peak_mem_bytes: int = 0
    device: str = ""
    node: str = ""  # the Ray node (or host) that ran the trial
    attempt: int = 1  # 1 + the retries before this record
    bundle_id: str = ""  # the fused bundle the trial trained in; "" when alone
    bundle_size: int = 1
    saved_model: str = ""  # store-relative folder of the kept weights; "" when none
    versions_json: str = "{}"
    manifest_json: str = "{}"
    started_at: str = ""
    finished_at: str = ""
    error_type: str = ""
    error_message: str = ""
    error_traceback: str = ""

    @property
    def spec(self) -> TrialSpec:
        return TrialSpec.from_json(self.spec_json)


def check_sampler(data: DataSpec) -> None:
    """data.sampler: one of SAMPLERS; "authors" takes the settings the authors' code has no
    knob for as that code fixes them (one demonstration per class, train_size per class, one
    number for the valid and test sizes), so a grid cannot ask for what it does not do."""
    if data.sampler not in SAMPLERS:
        raise SpecError(
            f"data.sampler: {data.sampler!r} is not one of {', '.join(SAMPLERS)}; "
            f"use slimsweep (the default) or authors"
        )
    if data.sampler != "authors":
        return
    fixed = {
        "demos_per_class": (data.demos_per_class, 1),
        "train_per_class": (data.train_per_class, True),
        "inclusive_index_draw": (data.inclusive_index_draw, False),
    }
    for key, (value, needed) in fixed.items():
        if value != needed:
            raise SpecError(
                f"data.{key}: {value!r} with data.sampler authors, whose draws fix it to "
                f"{needed!r}; set data.{key}: {str(needed).lower()} or data.sampler: slimsweep"
            )
    if data.valid_size != data.test_size:
        raise SpecError(
            f"data.valid_size: {data.valid_size} differs from data.test_size {data.test_size}; "
            f"the authors' code uses one number (num_test) for both: make them equal, or set "
            f"data.sampler: slimsweep"
        )


def fuse_limit(fuse: str, on_gpu: bool) -> int | None:
    """The most trials one bundle may hold under `runtime.fuse`: 1 (no fusion) for off and
    for auto on CPU (fusing buys nothing there: CPU kernels are busy at batch 1), N for "N",
    None for auto on GPU (as many as its memory holds). SpecError for any other value."""
    if fuse == "off" or (fuse == "auto" and not on_gpu):
        return 1
    if fuse == "auto":
        return None
    if not (fuse.isascii() and fuse.isdigit()) or int(fuse) < 1:  # not "²": int() refuses it
        raise SpecError(
            f"runtime.fuse: {fuse!r} is not auto, off or a number of trials; "
            f"write e.g. fuse: auto, fuse: off or fuse: 5"
        )
    return int(fuse)


def bundle_key(spec: TrialSpec) -> str | None:
    """What trials must share to train fused (`workers.run.run_bundle`): everything but the
    seed. None for a trial that trains alone: fused training batches full fine-tuning of the
    stock HF forward, gathered at the last position, uncompiled, of one architecture (a
    `random` selection keeps other layers for each seed, and Gemma 2/3 alternate sliding and
    global attention by layer)."""
    rt = spec.runtime
    if spec.finetune.mode != "full" or rt.compile or not rt.last_position_logits:
        return None
    if spec.selection.method == "random":
        return None
    identity = spec.identity()
    del identity["seed"]
    return json.dumps(identity, sort_keys=True)


def bundle_id(specs: Sequence[TrialSpec]) -> str:
    """A bundle's name: a hash of its trial ids (the same trials, the same bundle)."""
    return hashlib.sha256(",".join(sorted(s.trial_id for s in specs)).encode()).hexdigest()[:16]


class SpecError(ValueError):
    """A trial cannot run as specified (e.g. a label word is not one token); the message
    names the trial, the offending value and the fix."""


# --- the contract's checks ------------------------------------------------------------------
# Each raises SpecError("<key>: <problem>; <fix>"). The grid loader calls them with its own key
# paths (`tasks[1]`, `seeds[0]`), TrialSpec.validate() with the spec's, so both refuse alike.

INT64 = (-(2**63), 2**63 - 1)  # what a Parquet int64 column holds
# random.seed takes any int and numpy's is reduced mod 2**32, but torch.manual_seed takes at
# most 2**64 - 1 and the store's seed column is an int64: seeds are 0..2**63 - 1.
SEED_RANGE = (0, 2**63 - 1)
MAX_SHOWN = 80  # characters of a value quoted in a message
MAX_NAME_BYTES = 255  # of a folder name, on common file systems

# The spec's sections and their keys in a grid file.
SECTION_KEYS = {
    "data": "data",
    "train": "training",
    "runtime": "runtime",
    "selection": "selection",
    "finetune": "finetune",
}


@dataclass(frozen=True)
class AtLeast:
    """The smallest allowed value of a numeric setting (`strict`: the bound itself is not)."""

    low: float
    strict: bool = False
    fix: str = ""


# Per section class: a numeric field's lower bound and a text field's choices.
BOUNDS: dict[type, dict[str, AtLeast]] = {
    DataSpec: {
        "train_size": AtLeast(1),
        "valid_size": AtLeast(1),
        "test_size": AtLeast(1),
        "demos_per_class": AtLeast(0, fix="0 means no demonstrations"),
        "max_length": AtLeast(1, fix="or leave it empty for the model's context"),
    },
    TrainSpec: {
        "lr": AtLeast(0, strict=True, fix="e.g. 5.0e-5"),
        "weight_decay": AtLeast(0, fix="0 means none"),
        "batch_size": AtLeast(1),
        "epochs": AtLeast(1),
        "patience": AtLeast(0, fix="0 turns early stopping off"),
    },
    RuntimeSpec: {
        "eval_batch_size": AtLeast(0, fix="0 chooses from free memory"),
        "checkpoint_every": AtLeast(0, fix="0 writes no restart checkpoints"),
        "checkpoint_min_s": AtLeast(0),
    },
}
CHOICES: dict[type, dict[str, tuple[str, ...]]] = {
    DataSpec: {"overflow": OVERFLOW_RULES, "label_word_rule": LABEL_WORD_RULES},
    TrainSpec: {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "lm_loss": LM_LOSSES},
    RuntimeSpec: {"device": DEVICES, "save_model": SAVE_MODELS},
}


def cut(text: str) -> str:
    """`text` cut to MAX_SHOWN characters: messages never print a whole huge value."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def shown(value: Any) -> str:
    """`repr(value)`, cut (see `cut`)."""
    return cut(repr(value))


def unknown(what: str, value: Any, valid: tuple[str, ...]) -> str:
    """The problem and the fix: unknown <what> <value>; did you mean <near>? valid: ..."""
    near = difflib.get_close_matches(str(value), valid, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"unknown {what} {shown(value)}; {hint}valid: {', '.join(valid)}"


def check_choice(value: Any, valid: tuple[str, ...], key: str, what: str = "") -> None:
    """`what` names the value in the message; default: the key's last part."""
    if not isinstance(value, str) or value not in valid:
        raise SpecError(f"{key}: {unknown(what or key.rsplit('.', 1)[-1], value, valid)}")


def check_name(value: Any, key: str) -> None:
    """A name that becomes a path component (results/<grid>/...): one plain folder name."""
    check_type(value, str, key)
    bad = (
        value in ("", ".", "..")
        or any(c in value for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
        or value != value.strip()
        or len(value.encode("utf-8", "replace")) > MAX_NAME_BYTES
    )
    if bad:
        raise SpecError(
            f"{key}: {shown(value)} cannot be a folder name; use letters, digits, '-', '_' or "
            f"'.' (no '/', no '..', no control characters, not empty, at most "
            f"{MAX_NAME_BYTES} bytes)"
        )


def check_seed(value: Any, key: str) -> None:
    check_type(value, int, key)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise SpecError(
            f"{key}: {shown(value)} is outside {low}..2**63-1, what torch's RNG and the "
            f"store's int64 column hold; use a smaller non-negative seed, e.g. 42"
        )


def check_layers(value: Any, key: str) -> None:
    check_type(value, int, key)
    if value < 1:
        raise SpecError(f"{key}: layer count {value} is below 1; keep at least one layer")


def check_model(model: Any, key: str) -> None:
    check_type(model, ModelSpec, key)
    check_name(model.name, f"{key}.name")
    if not model.source:
        raise SpecError(f"{key}.source: is empty; give a hub id, a local folder or pkg:<package>")


def check_task(task: Any, key: str) -> None:
    check_type(task, TaskSpec, key)
    check_name(task.name, f"{key}.name")
    check_choice(task.kind, TASK_KINDS, f"{key}.kind")
    template = task.template
    try:
        template.format_map({"text": "", "label": ""})  # what data._fill does
        fills = True
    except (KeyError, ValueError, IndexError):
        fills = False
    if not fills or "{text}" not in template or not template.endswith("{label}"):
        raise SpecError(
            f"{key}.template: {shown(template)} must contain {{text}}, end with {{label}} and "
            f"have no other {{...}} fields; write {{{{ }}}} for a literal brace, e.g. "
            f"'Review: {{text}}\\nSentiment:{{label}}'"
        )
    words = task.label_words
    if len(words) < 2 or not all(words) or len(set(words)) != len(words):
        raise SpecError(
            f"{key}.label_words: {shown(list(words))} must be 2 or more distinct, non-empty "
            f"words; give one per label index, e.g. [' Negative', ' Positive']"
        )
    if task.kind == "files":
        check_data_files(task, key)


def check_data_files(task: TaskSpec, key: str) -> None:
    files = dict(task.data_files)
    for split in (task.train_split, task.test_split):
        if split not in files:
            raise SpecError(
                f"{key}.files.{split}: missing; give the {split} split a file "
                f"(has: {', '.join(files) or 'none'}), or name another split in "
                f"{'train_split' if split == task.train_split else 'test_split'}"
            )
    suffixes = sorted({PurePath(p).suffix.lower() for p in files.values()})
    if len(suffixes) != 1 or suffixes[0] not in FILE_BUILDERS:
        raise SpecError(
            f"{key}.files: the files must share one extension of {', '.join(FILE_BUILDERS)} "
            f"(got {', '.join(s or 'none' for s in suffixes)}); convert them to one format"
        )


def check_section(obj: Any, cls: type, key: str) -> None:
    """A settings section of class `cls` (data, training, runtime, ...): types, then bounds
    and choices."""
    check_type(obj, cls, key)
    for name, bound in BOUNDS.get(type(obj), {}).items():
        v = getattr(obj, name)
        if v is not None and (v <= bound.low if bound.strict else v < bound.low):
            need = f"a value above {bound.low:g}" if bound.strict else f"{bound.low:g} or more"
            fix = f" ({bound.fix})" if bound.fix else ""
            raise SpecError(f"{key}.{name}: {shown(v)} is too small; use {need}{fix}")
    for name, valid in CHOICES.get(type(obj), {}).items():
        check_choice(getattr(obj, name), valid, f"{key}.{name}")


# --- types, before anything is hashed, serialised or stored ---------------------------------

# type -> (what the message says is expected, how to write it)
_KINDS = {
    bool: ("true or false", "write true or false"),
    int: ("an integer", "write a whole number"),
    float: ("a number", "write a number, e.g. 0.01"),
    str: ("text", "write it as text (in quotes)"),
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_type(value: Any, hint: Any, key: str) -> None:
    """SpecError unless `value` is of the annotated type `hint` (a spec dataclass is checked
    field by field): ints within int64, floats finite, tuples of their item type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise SpecError(
                f"{key}: expected a mapping of settings, got {shown(value)}; write {{key: value}}"
            )
        for name, sub in _hints(hint).items():
            check_type(getattr(value, name), sub, f"{key}.{name}" if key else name)
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise SpecError(f"{key}: expected a list, got {shown(value)}; write [a, b, ...]")
        if args and args[-1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise SpecError(
                f"{key}: expected {len(args)} values, got {shown(value)}; give {len(args)}"
            )
        for i, (item, sub) in enumerate(zip(value, args, strict=True)):
            check_type(item, sub, f"{key}[{i}]")
        return
    if hint in _KINDS:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            what, fix = _KINDS[hint]
            raise SpecError(f"{key}: expected {what}, got {shown(value)}; {fix}")
        if hint is int and not INT64[0] <= value <= INT64[1]:
            raise SpecError(
                f"{key}: {shown(value)} does not fit a 64-bit integer (what the store holds); "
                f"use a value within -2**63..2**63-1"
            )
        if hint is str and not _utf8(value):
            raise SpecError(
                f"{key}: {shown(value)} is not valid Unicode (a lone surrogate such as \\ud800), "
                f"which the store cannot write; remove that escape"
            )
        if hint is float and not math.isfinite(value):
            raise SpecError(f"{key}: {value} is not a finite number; write a number, e.g. 0.01")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_selection(selection: SelectionSpec, key: str = "selection") -> None:
    """SpecError "<key>: <problem>; <fix>" for an unknown method or a calibration it cannot
    read (a calibration the method does not use is not checked)."""
    if selection.method not in SELECTIONS:
        raise SpecError(
            f"{key}.method: unknown selection {selection.method!r}; "
            f"choose one of {', '.join(SELECTIONS)}"
        )
    if SELECTIONS[selection.method].calibrated:
        check_calibration(selection.calibration, "calibration")


def check_calibration(cal: CalibrationSpec, key: str = "calibration") -> None:
    if cal.source not in CALIBRATION_SOURCES:
        raise SpecError(
            f"{key}.source: {cal.source!r} is not a calibration source; "
            f"choose one of {', '.join(CALIBRATION_SOURCES)}"
        )
    if cal.source == "task" and cal.name:
        raise SpecError(f"{key}.name: source task reads the trial's own task; remove name")
    if cal.source != "task" and not cal.name:
        what = "a synthetic generator" if cal.source == "synthetic" else "the text file"
        raise SpecError(f"{key}.name: missing; source {cal.source} needs {what} as name")
    if cal.n_examples < 1:
        raise SpecError(f"{key}.n_examples: {cal.n_examples} is below 1; use e.g. 64")
    if cal.max_tokens < 2:
        raise SpecError(
            f"{key}.max_tokens: {cal.max_tokens} is below 2 (the LM loss needs a next token); "
            f"use e.g. 128"
        )

"""The contract between the orchestrator and a worker: what one trial computes and returns.

Everything here is a frozen dataclass of plain values. A `TrialSpec` is fully resolved (no
default left implicit), so `trial_id` (a hash of the fields that change the computation)
names exactly one computation on every machine. Output paths, resources and the speed
switches in `RuntimeSpec` are left out of the hash: they change where and how fast a trial
runs, not what it computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HEADS = ("prompt-lm", "prompt-cls", "vanilla-cls")
PRECISIONS = ("fp32", "bf16")
LM_LOSSES = ("label-words", "full-vocab")
LABEL_WORD_RULES = ("single-token", "first-subtoken")
OVERFLOW_RULES = ("error", "truncate-left")
TASK_KINDS = ("hub", "files", "synthetic")
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
    # Train a cell's seeds together (workers.fused): auto (on GPU, as many as fit; off on
    # CPU) | off | N (at most N seeds per bundle, on any device)
    fuse: str = "auto"


@dataclass(frozen=True)
class CalibrationSpec:
    """The text score-based selections run the full model on (see `SelectionSpec`)."""

    source: str = "task"  # task (the trial's own train split) | synthetic | file
    name: str = ""  # a synthetic generator name, or a file path; "" for source task
    n_examples: int = 64
    max_tokens: int = 128


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
        return f"last-{self.last_n}" if self.mode == "last-n" else self.mode


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

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is computed (the grid name and runtime are not)."""
        d = dataclasses.asdict(self)
        del d["grid"], d["runtime"]
        for name, default in LATER_FIELDS.items():
            *sections, leaf = name.split(".")
            owner, values = self, d
            for section in sections:
                owner, values = getattr(owner, section), values[section]
            if getattr(owner, leaf) == default:
                del values[leaf]
        return d

    @property
    def trial_id(self) -> str:
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
            layers=int(d["layers"]),
            task=TaskSpec(**task),
            head=d["head"],
            seed=int(d["seed"]),
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
    if not fuse.isdigit() or int(fuse) < 1:
        raise SpecError(
            f"runtime.fuse: {fuse!r} is not auto, off or a number of trials; "
            f"write e.g. fuse: auto, fuse: off or fuse: 5"
        )
    return int(fuse)


def bundle_key(spec: TrialSpec) -> str | None:
    """What trials must share to train fused (`workers.run.run_bundle`): everything but the
    seed. None for a trial that trains alone: fused training batches full fine-tuning of the
    stock HF forward, gathered at the last position, uncompiled."""
    rt = spec.runtime
    if spec.finetune.mode != "full" or rt.compile or not rt.last_position_logits:
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

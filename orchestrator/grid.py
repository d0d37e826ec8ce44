"""Grid files: YAML -> a validated `Grid`. Every mistake becomes one `GridError` line that
names the file, the key path and the fix, before any trial is planned.

The defaults of every section live in the worker's spec dataclasses (`DataSpec`,
`TrainSpec`, `RuntimeSpec`) and equal the paper's text protocol (grids/paper.yaml states the
authors' code's); a grid only states what it changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from slimsweep.orchestrator.models import model_depth
from slimsweep.workers.data import file_sha256
from slimsweep.workers.spec import (
    HEADS,
    LABEL_WORD_RULES,
    LM_LOSSES,
    OVERFLOW_RULES,
    PKG_PREFIX,
    PRECISIONS,
    SAMPLERS,
    DataSpec,
    ModelSpec,
    RuntimeSpec,
    SpecError,
    TaskSpec,
    TrainSpec,
    check_sampler,
    fuse_limit,
)
from slimsweep.workers.tasks import TASKS


class GridError(Exception):
    """A user-facing error: one line naming the file, the key and the fix."""


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float | str = 0.0  # a number, or "auto": packed by estimated memory (launch)
    # Ray custom resources per trial, e.g. (("fake_gpu", 1.0),): pins trials to nodes offering them.
    custom: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ModelAxis:
    spec: ModelSpec
    layers: tuple[int, ...]
    depth: int | None


@dataclass(frozen=True)
class Grid:
    name: str
    path: str
    models: tuple[ModelAxis, ...]
    tasks: tuple[TaskSpec, ...]
    heads: tuple[str, ...]
    seeds: tuple[int, ...]
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    results: str | None = None


TOP_KEYS = (
    "name",
    "description",
    "models",
    "tasks",
    "heads",
    "seeds",
    "data",
    "training",
    "runtime",
    "resources",
    "max_failures",
    "results",
)
MODEL_KEYS = ("name", "source", "revision", "gguf_file", "trust_remote_code", "layers")
TASK_KEYS = (*tuple(f.name for f in dataclasses.fields(TaskSpec) if f.name != "kind"), "files")
CHOICES: dict[str, tuple[str, ...]] = {
    "precision": PRECISIONS,
    "lm_loss": LM_LOSSES,
    "label_word_rule": LABEL_WORD_RULES,
    "overflow": OVERFLOW_RULES,
    "sampler": SAMPLERS,
    "optimizer": ("adamw",),
    "device": ("auto", "cpu", "cuda"),
}


class _Loader:
    """Reads one grid file, carrying the file name into every error."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, msg: str) -> GridError:
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        return GridError(where + msg)

    def check_keys(self, d: dict, allowed: tuple[str, ...], key: str) -> None:
        for k in d:
            if k not in allowed:
                near = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(allowed)}"
                raise self.fail(f"{key}.{k}" if key else str(k), f"unknown key; {hint}")

    def mapping(self, value: Any, key: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of settings, got {_kind(value)}")
        return value

    def axis(self, raw: dict, key: str) -> list:
        if key not in raw:
            raise self.fail(key, "missing; add a list, e.g. " + _EXAMPLES[key])
        value = raw[key]
        if not isinstance(value, list):
            value = [value]
        if not value:
            raise self.fail(key, "is empty; list at least one value")
        seen: set[str] = set()
        for i, v in enumerate(value):
            tag = json.dumps(v, sort_keys=True, default=str)
            if tag in seen:
                raise self.fail(f"{key}[{i}]", f"duplicate value {v!r}; list each value once")
            seen.add(tag)
        return value

    def section(self, raw: dict, key: str, cls: type) -> Any:
        """A settings section overriding the dataclass defaults, with types checked."""
        values = self.mapping(raw.get(key), key)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        self.check_keys(values, tuple(fields), key)
        defaults = cls()
        out = {}
        for k, v in values.items():
            default = getattr(defaults, k)
            if (key, k) == ("runtime", "fuse") and type(v) in (int, bool):
                v = "off" if v is False else str(v)  # YAML 1.1 reads `off` as false; 5 -> "5"
            out[k] = self.typed(v, default, f"{key}.{k}", fields[k].type)
            if k in CHOICES and out[k] not in CHOICES[k]:
                raise self.fail(f"{key}.{k}", f"{v!r} is not one of {', '.join(CHOICES[k])}")
        obj = cls(**out)
        if key == "runtime":
            try:
                fuse_limit(obj.fuse, on_gpu=True)
            except SpecError as e:
                raise self.fail("runtime.fuse", str(e).split(": ", 1)[1]) from e
        for k in ("train_size", "valid_size", "test_size", "batch_size", "epochs"):
            if hasattr(obj, k) and getattr(obj, k) < 1:
                raise self.fail(f"{key}.{k}", "must be at least 1")
        if getattr(obj, "lr", 1.0) <= 0:
            raise self.fail(f"{key}.lr", "must be a positive number, e.g. 5e-5")
        return obj

    def typed(self, v: Any, default: Any, key: str, annotation: str) -> Any:
        optional = "None" in str(annotation)
        if v is None:
            if optional:
                return None
            raise self.fail(key, f"must not be empty; the default is {default!r}")
        if isinstance(default, bool) or "bool" in str(annotation):
            if not isinstance(v, bool):
                raise self.fail(key, f"expected true or false, got {v!r}")
            return v
        if isinstance(default, int) or (
            "int" in str(annotation) and "float" not in str(annotation)
        ):
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(key, f"expected an integer, got {v!r}")
            return v
        if isinstance(default, float):
            if isinstance(v, str):
                try:  # YAML 1.1 reads `5e-5` as a string
                    return float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.fail(key, f"expected a number, got {v!r}")
            return float(v)
        if not isinstance(v, str):
            raise self.fail(key, f"expected text, got {_kind(v)}")
        return v

    def model(self, raw: Any, i: int, base: Path) -> ModelAxis:
        key = f"models[{i}]"
        m = self.mapping(raw, key)
        self.check_keys(m, MODEL_KEYS, key)
        for req in ("name", "source", "layers"):
            if req not in m:
                raise self.fail(f"{key}.{req}", "missing; " + _EXAMPLES[f"models.{req}"])
        for k in ("name", "source", "revision", "gguf_file"):
            if k in m and m[k] is not None and not isinstance(m[k], str):
                raise self.fail(f"{key}.{k}", f"expected text, got {_kind(m[k])}")
        trust = m.get("trust_remote_code", False)
        if not isinstance(trust, bool):
            raise self.fail(f"{key}.trust_remote_code", f"expected true or false, got {trust!r}")
        source = _resolve_source(m["source"], base)
        depth = model_depth(source)
        spec = ModelSpec(
            name=m["name"],
            source=source,
            revision=m.get("revision"),
            gguf_file=m.get("gguf_file"),
            trust_remote_code=trust,
        )
        layers = self.axis(m, "layers") if isinstance(m["layers"], list) else [m["layers"]]
        if not layers:
            raise self.fail(f"{key}.layers", "is empty; list at least one layer count")
        resolved: list[int] = []
        for j, v in enumerate(layers):
            k = self.layer_count(v, depth, f"{key}.layers[{j}]", m["name"])
            if k in resolved:
                raise self.fail(
                    f"{key}.layers[{j}]", f"{v!r} resolves to {k} layers, listed already"
                )
            resolved.append(k)
        return ModelAxis(spec=spec, layers=tuple(resolved), depth=depth)

    def layer_count(self, v: Any, depth: int | None, key: str, model: str) -> int:
        if v == "all" or (isinstance(v, float) and not isinstance(v, bool) and 0 < v <= 1):
            if depth is None:
                raise self.fail(
                    key,
                    f"{v!r} needs the depth of model '{model}', which is unknown; "
                    "write a whole number of layers",
                )
            return depth if v == "all" else max(1, round(depth * v))
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(
                key,
                f"expected a layer count (an integer, a fraction like 0.5, or 'all'), got {v!r}",
            )
        if v < 1:
            raise self.fail(key, f"layer count {v} is below 1; keep at least one layer")
        if depth is not None and v > depth:
            raise self.fail(
                key,
                f"layer count {v} exceeds the {depth} layers of model '{model}'; use 1..{depth}",
            )
        return v

    def task(self, raw: Any, i: int, base: Path) -> TaskSpec:
        key = f"tasks[{i}]"
        if isinstance(raw, str):
            if raw not in TASKS:
                raise self.fail(key, _unknown("task", raw, tuple(TASKS)))
            return TASKS[raw]
        t = self.mapping(raw, key)
        self.check_keys(t, TASK_KEYS, key)
        if "name" not in t:
            raise self.fail(f"{key}.name", "missing; give the task a name")
        known = TASKS.get(t["name"])
        fields: dict[str, Any] = dataclasses.asdict(known) if known else {"name": t["name"]}
        for k, v in t.items():
            if k == "files":
                files = self.mapping(v, f"{key}.files")
                if "train" not in files:
                    raise self.fail(f"{key}.files.train", "missing; give a train file")
                fields["data_files"] = tuple(
                    (split, _resolve_source(str(p), base)) for split, p in sorted(files.items())
                )
                fields["kind"] = "files"
                fields["dataset"] = "files"
            elif k == "label_words":
                if not isinstance(v, list) or len(v) < 2 or not all(isinstance(w, str) for w in v):
                    raise self.fail(f"{key}.label_words", "expected a list of 2+ words")
                fields[k] = tuple(v)
            else:
                fields[k] = v
        if "kind" not in fields:
            fields["kind"] = "hub"
        for req in ("dataset", "template", "label_words"):
            if req not in fields:
                raise self.fail(f"{key}.{req}", f"missing for new task '{t['name']}'")
        template = fields["template"]
        if "{text}" not in template or not template.endswith("{label}"):
            raise self.fail(
                f"{key}.template",
                "must contain {text} and end with {label}, e.g. "
                "'Review: {text}\\nSentiment:{label}'",
            )
        if fields["kind"] == "files":
            if not dict(fields["data_files"]).get("test"):
                raise self.fail(f"{key}.files.test", "missing; give a test file")
            fields["file_digests"] = tuple(
                (split, self.file_digest(path, f"{key}.files.{split}"))
                for split, path in fields["data_files"]
            )
        return TaskSpec(**fields)

    def file_digest(self, path: str, key: str) -> str:
        """sha256 of a data file's bytes: part of the trial id, so that results computed from
        other contents of the file are never taken for this grid's."""
        try:
            return file_sha256(path)
        except OSError as e:
            raise self.fail(key, f"cannot read {path} ({e.strerror}); fix the path") from None


_EXAMPLES = {
    "models": "models: [{name: gpt2-xl, source: openai-community/gpt2-xl, layers: [48, 1]}]",
    "models.name": "e.g. name: gpt2-xl",
    "models.source": "a hub id, a local folder, or pkg:<package>",
    "models.layers": "e.g. layers: [48, 24, 0.5, all]",
    "tasks": "tasks: [sst2, agnews]",
    "heads": "heads: [prompt-lm, prompt-cls, vanilla-cls]",
    "seeds": "seeds: [0, 42]",
}


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(v), type(v).__name__)


def _unknown(what: str, value: Any, valid: tuple[str, ...]) -> str:
    near = difflib.get_close_matches(str(value), valid, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"unknown {what} {value!r}; {hint}valid: {', '.join(valid)}"


def _resolve_source(source: str, base: Path) -> str:
    """Local paths are made absolute (relative to the grid file); hub ids stay as written."""
    if source.startswith(PKG_PREFIX):
        return source
    local = (base / source) if not Path(source).is_absolute() else Path(source)
    if source.startswith((".", "/", "~")) or local.exists():
        return str(local.expanduser().resolve())
    return source


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file; check the path (grids live in grids/*.yaml)")
    ld = _Loader(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GridError(f"{path}: {line}malformed YAML ({problem}); fix the syntax there") from e
    if not isinstance(raw, dict):
        raise ld.fail("", "a grid file must be a mapping with keys: " + ", ".join(TOP_KEYS))
    ld.check_keys(raw, TOP_KEYS, "")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise ld.fail("name", "expected a non-empty name without '/', e.g. name: paper")
    base = path.parent
    models = tuple(ld.model(m, i, base) for i, m in enumerate(ld.axis(raw, "models")))
    names = [m.spec.name for m in models]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ld.fail(f"models[{i}].name", f"duplicate model name '{n}'; names must differ")
    tasks = tuple(ld.task(t, i, base) for i, t in enumerate(ld.axis(raw, "tasks")))
    heads = ld.axis(raw, "heads")
    for i, h in enumerate(heads):
        if h not in HEADS:
            raise ld.fail(f"heads[{i}]", _unknown("head", h, HEADS))
    seeds = ld.axis(raw, "seeds")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            raise ld.fail(f"seeds[{i}]", f"seed {s!r} is not an integer; write e.g. 42")
    resources = ld.mapping(raw.get("resources"), "resources")
    ld.check_keys(resources, ("cpus", "gpus", "custom"), "resources")
    custom = ld.mapping(resources.get("custom"), "resources.custom")
    for k, v in custom.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ld.fail(f"resources.custom.{k}", f"expected a positive number, got {v!r}")
    res = Resources(
        **{k: v for k, v in resources.items() if k != "custom"},
        custom=tuple((str(k), float(v)) for k, v in sorted(custom.items())),
    )
    if isinstance(res.cpus, bool) or not isinstance(res.cpus, int | float) or res.cpus <= 0:
        raise ld.fail("resources.cpus", f"expected a positive number, got {res.cpus!r}")
    if res.gpus != "auto" and (
        isinstance(res.gpus, bool) or not isinstance(res.gpus, int | float) or res.gpus < 0
    ):
        raise ld.fail("resources.gpus", f"expected a number >= 0 or 'auto', got {res.gpus!r}")
    max_failures = raw.get("max_failures", 2)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ld.fail("max_failures", f"expected an integer >= 0, got {max_failures!r}")
    results = raw.get("results")
    if results is not None and not isinstance(results, str):
        raise ld.fail("results", "expected a folder or URI, e.g. results: s3://bucket/sweeps")
    data = ld.section(raw, "data", DataSpec)
    try:
        check_sampler(data)
    except SpecError as e:
        raise GridError(f"{path}: {e}") from None
    return Grid(
        name=name,
        path=str(path),
        models=models,
        tasks=tasks,
        heads=tuple(heads),
        seeds=tuple(seeds),
        data=data,
        train=ld.section(raw, "training", TrainSpec),
        runtime=ld.section(raw, "runtime", RuntimeSpec),
        resources=res,
        max_failures=max_failures,
        results=results,
    )

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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from slimsweep.orchestrator.models import model_depth
from slimsweep.workers.data import file_sha256
from slimsweep.workers.spec import (
    HEADS,
    PKG_PREFIX,
    CalibrationSpec,
    DataSpec,
    FinetuneSpec,
    ModelSpec,
    RuntimeSpec,
    SelectionSpec,
    SpecError,
    TaskSpec,
    TrainSpec,
    check_calibration,
    check_choice,
    check_finetune,
    check_model,
    check_name,
    check_sampler,
    check_section,
    check_seed,
    check_task,
    cut,
    fuse_limit,
    shown,
    unknown,
)
from slimsweep.workers.synthetic import GENERATORS
from slimsweep.workers.tables import FINETUNES, SELECTIONS
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
    # each with the grid's calibration if the method reads one, else the default (so a
    # method's trial ids never depend on a calibration it does not use)
    selections: tuple[SelectionSpec, ...] = (SelectionSpec(),)
    finetunes: tuple[FinetuneSpec, ...] = (FinetuneSpec(),)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    results: str | None = None
    max_trials: int = 100_000

    @property
    def n_trials(self) -> int:
        """The number of trials `plan.expand` makes, counted without making them."""
        return (
            sum(len(m.layers) for m in self.models)
            * len(self.tasks)
            * len(self.heads)
            * len(self.selections)
            * len(self.finetunes)
            * len(self.seeds)
        )


MAX_FILE_BYTES = 1 << 20  # a grid is a few KB of YAML
MAX_NODES = 100_000  # YAML values after expanding aliases: far above any real grid

TOP_KEYS = (
    "name",
    "description",
    "models",
    "tasks",
    "heads",
    "seeds",
    "selections",
    "calibration",
    "finetunes",
    "data",
    "training",
    "runtime",
    "resources",
    "max_failures",
    "results",
    "max_trials",
)
MODEL_KEYS = ("name", "source", "revision", "gguf_file", "trust_remote_code", "layers")
# A grid writes `files:`; kind, data_files and file_digests follow from it.
TASK_KEYS = (
    *(
        f.name
        for f in dataclasses.fields(TaskSpec)
        if f.name not in ("kind", "data_files", "file_digests")
    ),
    "files",
)
FINETUNE_NAMES = tuple(f.spelling for f in FINETUNES.values())
LAST_N = re.compile(r"last-(\d+)")
# The mapping form's keys -> FinetuneSpec fields (lora, qlora).
LORA_KEYS = {
    "r": "lora_r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "lora_targets",
}


class _Loader:
    """Reads one grid file, carrying the file name into every error."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, msg: str) -> GridError:
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        return GridError(where + msg)

    def contract(self, check: Any, *args: Any) -> None:
        """Run one of the contract's checks (workers/spec.py), naming this file in its error."""
        try:
            check(*args)
        except SpecError as e:
            raise GridError(f"{self.path}: {e}") from e

    def check_keys(self, d: dict, allowed: tuple[str, ...], key: str) -> None:
        for k in d:
            if k not in allowed:
                near = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(allowed)}"
                raise self.fail(
                    f"{key}.{cut(str(k))}" if key else cut(str(k)), f"unknown key; {hint}"
                )

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
            try:
                tag = json.dumps(v, sort_keys=True, default=str)
            except TypeError:  # keys of mixed types do not sort
                tag = repr(v)
            if tag in seen:
                raise self.fail(f"{key}[{i}]", f"duplicate value {shown(v)}; list each value once")
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
            if (key, k) == ("runtime", "fuse"):  # YAML 1.1 reads `off` as false; 5 -> "5"
                v = "off" if v is False else str(v) if type(v) is int and abs(v) < 2**63 else v
            out[k] = self.typed(v, default, f"{key}.{k}", fields[k].type)
        obj = cls(**out)
        self.contract(check_section, obj, cls, key)
        if key == "runtime":
            self.contract(fuse_limit, obj.fuse, True)
        return obj

    def typed(self, v: Any, default: Any, key: str, annotation: str) -> Any:
        optional = "None" in str(annotation)
        if v is None:
            if optional:
                return None
            raise self.fail(key, f"must not be empty; the default is {default!r}")
        if isinstance(default, bool) or "bool" in str(annotation):
            if not isinstance(v, bool):
                raise self.fail(key, f"expected true or false, got {shown(v)}")
            return v
        if isinstance(default, int) or (
            "int" in str(annotation) and "float" not in str(annotation)
        ):
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(key, f"expected an integer, got {shown(v)}")
            return v
        if isinstance(default, float):
            if isinstance(v, str):
                try:  # YAML 1.1 reads `5e-5` as a string
                    return float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.fail(key, f"expected a number, got {shown(v)}")
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
            got = shown(trust)
            raise self.fail(f"{key}.trust_remote_code", f"expected true or false, got {got}")
        source = _resolve_source(m["source"], base)
        try:
            depth = model_depth(source)
        except ValueError as e:
            raise self.fail(f"{key}.source", f"{e}; fix the file or point source elsewhere") from e
        spec = ModelSpec(
            name=m["name"],
            source=source,
            revision=m.get("revision"),
            gguf_file=m.get("gguf_file"),
            trust_remote_code=trust,
        )
        self.contract(check_model, spec, key)
        layers = self.axis(m, "layers") if isinstance(m["layers"], list) else [m["layers"]]
        if not layers:
            raise self.fail(f"{key}.layers", "is empty; list at least one layer count")
        resolved: list[int] = []
        for j, v in enumerate(layers):
            k = self.layer_count(v, depth, f"{key}.layers[{j}]", m["name"])
            if k in resolved:
                raise self.fail(
                    f"{key}.layers[{j}]", f"{shown(v)} resolves to {k} layers, listed already"
                )
            resolved.append(k)
        return ModelAxis(spec=spec, layers=tuple(resolved), depth=depth)

    def layer_count(self, v: Any, depth: int | None, key: str, model: str) -> int:
        if v == "all" or (isinstance(v, float) and not isinstance(v, bool) and 0 < v <= 1):
            if depth is None:
                raise self.fail(
                    key,
                    f"{shown(v)} needs the depth of model '{model}', which is unknown; "
                    "write a whole number of layers",
                )
            return depth if v == "all" else max(1, round(depth * v))
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(
                key,
                "expected a layer count (an integer, a fraction like 0.5, or 'all'), "
                f"got {shown(v)}",
            )
        if v < 1:
            raise self.fail(key, f"layer count {v} is below 1; keep at least one layer")
        if depth is not None and v > depth:
            raise self.fail(
                key,
                f"layer count {v} exceeds the {depth} layers of model '{model}'; use 1..{depth}",
            )
        return v

    def finetune(self, raw: Any, key: str) -> FinetuneSpec:
        """`full`, `head-only`, `last-3`, `lora`, `qlora`, or `{lora: {r: 16, ...}}`."""
        if isinstance(raw, dict):
            if len(raw) != 1:
                raise self.fail(key, "expected one mode with its settings, e.g. {lora: {r: 16}}")
            ((name, settings),) = raw.items()
            mode = FINETUNES.get(str(name))
            if mode is None:
                raise self.fail(key, unknown("finetune", name, FINETUNE_NAMES))
            if not mode.lora:
                raise self.fail(key, f"{name} takes no settings; write it as a plain name")
            values = self.mapping(settings, f"{key}.{name}")
            self.check_keys(values, tuple(LORA_KEYS), f"{key}.{name}")
            default = FinetuneSpec()
            out: dict[str, Any] = {}
            for k, v in values.items():
                field_key, name_key = LORA_KEYS[k], f"{key}.{name}.{k}"
                if k == "targets":
                    if not isinstance(v, list) or not v or not all(isinstance(t, str) for t in v):
                        raise self.fail(name_key, "expected a list of module names, e.g. [q_proj]")
                    out[field_key] = tuple(v)
                else:
                    out[field_key] = self.typed(v, getattr(default, field_key), name_key, "")
            return FinetuneSpec(mode=mode.name, **out)
        if not isinstance(raw, str):
            raise self.fail(key, f"expected a mode name or a mapping, got {_kind(raw)}")
        if raw in ("last-N", "last-n"):
            raise self.fail(key, "write how many layers train, e.g. last-3")
        last = LAST_N.fullmatch(raw)
        if last:
            return FinetuneSpec(mode="last-n", last_n=int(last.group(1)))
        if raw not in FINETUNES or raw == "last-n":
            raise self.fail(key, unknown("finetune", raw, FINETUNE_NAMES))
        return FinetuneSpec(mode=raw)

    def finetunes(
        self, raw: dict, models: tuple[ModelAxis, ...], device: str
    ) -> tuple[FinetuneSpec, ...]:
        """The `finetunes:` axis (default: full only), checked against every kept depth."""
        if "finetunes" not in raw:
            return (FinetuneSpec(),)
        out = [
            self.finetune(v, f"finetunes[{i}]") for i, v in enumerate(self.axis(raw, "finetunes"))
        ]
        labels = [f.label for f in out]
        for i, ft in enumerate(out):
            if labels.index(ft.label) != i:
                raise self.fail(f"finetunes[{i}]", f"duplicate finetune {ft.label}; list it once")
            for m in models:
                for k in m.layers:
                    try:
                        check_finetune(ft, k, device)
                    except SpecError as e:
                        raise self.fail(
                            f"finetunes[{i}]", f"model '{m.spec.name}' at {k} layers: {e}"
                        ) from None
        return tuple(out)

    def task(self, raw: Any, i: int, base: Path) -> TaskSpec:
        key = f"tasks[{i}]"
        if isinstance(raw, str):
            if raw not in TASKS:
                raise self.fail(key, unknown("task", raw, tuple(TASKS)))
            return TASKS[raw]
        t = self.mapping(raw, key)
        self.check_keys(t, TASK_KEYS, key)
        if "name" not in t:
            raise self.fail(f"{key}.name", "missing; give the task a name")
        self.contract(check_name, t["name"], f"{key}.name")
        known = TASKS.get(t["name"])
        fields: dict[str, Any] = dataclasses.asdict(known) if known else {"name": t["name"]}
        for k, v in t.items():
            if k == "files":
                files = self.mapping(v, f"{key}.files")
                for split, p in files.items():
                    if not isinstance(split, str) or not isinstance(p, str):
                        raise self.fail(
                            f"{key}.files", f"expected split: path pairs, got {shown({split: p})}"
                        )
                fields["data_files"] = tuple(
                    (split, _resolve_source(p, base)) for split, p in sorted(files.items())
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
                raise self.fail(f"{key}.{req}", f"missing for new task {shown(t['name'])}")
        task = TaskSpec(**fields)
        self.contract(check_task, task, key)
        for split, p in task.data_files:
            self.data_file(p, f"{key}.files.{split}")
        digests = tuple(
            (split, self.file_digest(p, f"{key}.files.{split}")) for split, p in task.data_files
        )
        return dataclasses.replace(task, file_digests=digests)

    def data_file(self, path: str, key: str) -> None:
        """A task's data file exists and reads, checked now rather than once Ray runs."""
        if not _is_file(path):
            raise self.fail(
                key,
                f"{shown(path)} is not a file; check the path (relative paths "
                "start from the grid file's folder)",
            )
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise self.fail(
                key, f"cannot read {shown(path)} ({e.strerror}); fix its permissions"
            ) from e

    def selections(self, raw: dict, base: Path) -> tuple[SelectionSpec, ...]:
        names = self.axis(raw, "selections") if "selections" in raw else ["first-k"]
        for i, name in enumerate(names):
            if name not in SELECTIONS:
                raise self.fail(f"selections[{i}]", unknown("selection", name, tuple(SELECTIONS)))
        calibrated = [n for n in names if SELECTIONS[n].calibrated]
        if "calibration" in raw and not calibrated:
            users = ", ".join(n for n, m in SELECTIONS.items() if m.calibrated)
            raise self.fail(
                "calibration",
                f"no selection in this grid reads calibration text (only {users} do); "
                "remove calibration or add such a selection",
            )
        cal = self.calibration(raw, base)
        return tuple(
            SelectionSpec(n, cal if SELECTIONS[n].calibrated else CalibrationSpec()) for n in names
        )

    def calibration(self, raw: dict, base: Path) -> CalibrationSpec:
        values = self.mapping(raw.get("calibration"), "calibration")
        self.check_keys(values, CALIBRATION_KEYS, "calibration")
        fields = {f.name: f for f in dataclasses.fields(CalibrationSpec)}
        defaults = CalibrationSpec()
        out = {
            k: self.typed(v, getattr(defaults, k), f"calibration.{k}", fields[k].type)
            for k, v in values.items()
        }
        cal = CalibrationSpec(**out)
        try:
            check_calibration(cal)
        except SpecError as e:
            raise self.fail("", str(e)) from e
        if cal.source == "synthetic" and cal.name not in GENERATORS:
            raise self.fail("calibration.name", unknown("generator", cal.name, tuple(GENERATORS)))
        if cal.source == "file":
            path = Path(_resolve_source(cal.name, base))
            if not path.is_file():
                raise self.fail("calibration.name", f"no such file {str(path)!r}; fix the path")
            # The content's digest, so that the trial id changes when the file does.
            digest = self.file_digest(str(path), "calibration.name")
            cal = dataclasses.replace(cal, name=str(path), digest=digest)
        return cal

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
    "selections": "selections: [first-k, block-influence, angular]",
    "finetunes": "finetunes: [full, last-3, lora]",
}
CALIBRATION_KEYS = ("source", "name", "n_examples", "max_tokens")  # digest: computed


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(v), type(v).__name__)


def _resolve_source(source: str, base: Path) -> str:
    """Local paths are made absolute (relative to the grid file); hub ids stay as written."""
    if source.startswith(PKG_PREFIX):
        return source
    local = (base / source) if not Path(source).is_absolute() else Path(source)
    if source.startswith((".", "/", "~")) or _exists(local):
        return str(local.expanduser().resolve())
    return source


def _exists(path: Path) -> bool:
    """Path.exists, False for names no file can have (a NUL byte, too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _read_yaml(path: Path) -> Any:
    """The file's YAML document, refusing what would take long or much memory to expand:
    files over MAX_FILE_BYTES, alias chains expanding past MAX_NODES values, self-references."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise GridError(
                f"{path}: {size} bytes, over the {MAX_FILE_BYTES} a grid may have; a grid is a "
                f"short YAML file (is this the right file?)"
            )
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GridError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); a grid "
            f"is a YAML text file: check the path, or save it as UTF-8"
        ) from e
    except OSError as e:
        raise GridError(f"{path}: cannot read the grid file ({e.strerror}); check the path") from e
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reads the stream: refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, path)
        if n > MAX_NODES:
            raise GridError(
                f"{path}: expands to {n} YAML values (aliases included), over the {MAX_NODES} a "
                f"grid may have; write the values out or split the grid"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GridError(f"{path}: {line}malformed YAML ({problem}); fix the syntax there") from e
    except RecursionError as e:
        raise GridError(f"{path}: nested too deeply to be a grid; flatten it") from e
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(root: yaml.Node, path: Path) -> int:
    """Values in the document once every alias is replaced by what it names; each distinct
    node is sized once, so an alias bomb is measured, not expanded."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise GridError(
                f"{path}: an alias refers to itself; YAML grids cannot nest a value in itself"
            )
        active.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1 + sum(size(c) for c in children)
        active.discard(id(node))
        sizes[id(node)] = min(total, MAX_NODES + 1)
        return sizes[id(node)]

    return size(root)


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file; check the path (grids live in grids/*.yaml)")
    ld = _Loader(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ld.fail("", "a grid file must be a mapping with keys: " + ", ".join(TOP_KEYS))
    ld.check_keys(raw, TOP_KEYS, "")
    name = raw.get("name", path.stem)
    ld.contract(check_name, name, "name")
    base = path.parent
    models = tuple(ld.model(m, i, base) for i, m in enumerate(ld.axis(raw, "models")))
    names = [m.spec.name for m in models]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ld.fail(
                f"models[{i}].name", f"duplicate model name {shown(n)}; names must differ"
            )
    tasks = tuple(ld.task(t, i, base) for i, t in enumerate(ld.axis(raw, "tasks")))
    task_names = [t.name for t in tasks]
    for i, n in enumerate(task_names):
        if task_names.index(n) != i:
            raise ld.fail(
                f"tasks[{i}]",
                f"task {shown(n)} is listed already as tasks[{task_names.index(n)}] (a name and a "
                f"mapping with that name are one task); list it once",
            )
    heads = ld.axis(raw, "heads")
    for i, h in enumerate(heads):
        ld.contract(check_choice, h, HEADS, f"heads[{i}]", "head")
    seeds = ld.axis(raw, "seeds")
    for i, s in enumerate(seeds):
        ld.contract(check_seed, s, f"seeds[{i}]")
    selections = ld.selections(raw, base)
    resources = ld.mapping(raw.get("resources"), "resources")
    ld.check_keys(resources, ("cpus", "gpus", "custom"), "resources")
    custom = ld.mapping(resources.get("custom"), "resources.custom")
    for k, v in custom.items():
        if not isinstance(k, str):
            raise ld.fail("resources.custom", f"resource names are text, got {shown(k)}")
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
            raise ld.fail(f"resources.custom.{k}", f"expected a positive number, got {shown(v)}")
    res = Resources(
        **{k: v for k, v in resources.items() if k != "custom"},
        custom=tuple((str(k), float(v)) for k, v in sorted(custom.items())),
    )
    if (
        isinstance(res.cpus, bool)
        or not isinstance(res.cpus, int | float)
        or not 0 < res.cpus < math.inf
    ):
        raise ld.fail("resources.cpus", f"expected a positive number, got {shown(res.cpus)}")
    if res.gpus != "auto" and (
        isinstance(res.gpus, bool)
        or not isinstance(res.gpus, int | float)
        or not 0 <= res.gpus < math.inf
    ):
        raise ld.fail("resources.gpus", f"expected a number >= 0 or 'auto', got {shown(res.gpus)}")
    max_failures = raw.get("max_failures", 2)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ld.fail("max_failures", f"expected an integer >= 0, got {shown(max_failures)}")
    results = raw.get("results")
    if results is not None and not isinstance(results, str):
        raise ld.fail("results", "expected a folder or URI, e.g. results: s3://bucket/sweeps")
    max_trials = raw.get("max_trials", Grid.max_trials)
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ld.fail("max_trials", f"expected an integer >= 1, got {shown(max_trials)}")
    runtime = ld.section(raw, "runtime", RuntimeSpec)
    data = ld.section(raw, "data", DataSpec)
    ld.contract(check_sampler, data)
    grid = Grid(
        name=name,
        path=str(path),
        models=models,
        tasks=tasks,
        heads=tuple(heads),
        seeds=tuple(seeds),
        selections=selections,
        finetunes=ld.finetunes(raw, models, runtime.device),
        data=data,
        train=ld.section(raw, "training", TrainSpec),
        runtime=runtime,
        resources=res,
        max_failures=max_failures,
        results=results,
        max_trials=max_trials,
    )
    if grid.n_trials > max_trials:
        raise ld.fail(
            "max_trials",
            f"the grid has {grid.n_trials} trials, over the limit of {max_trials}; shrink an "
            f"axis, or set max_trials: {grid.n_trials} if you mean it",
        )
    return grid

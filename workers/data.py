"""The data protocol of one trial: pools, seeded splits, demonstrations, prompts, token ids.

`prepare(spec, tokenizer, context_length)` does it all and returns `Prepared`; the pieces are
public so tests and users can audit each rule. docs/data-protocol.md states the rules.

Token ids: the shared demonstration prefix and each query are tokenised separately and
concatenated (`input_ids == prefix_ids + query_ids`), so the plain path and the prefix-cache
path see identical ids by construction, whatever the tokenizer. For GPT-2's byte-level BPE this
is also what tokenising the whole prompt gives (the prefix ends in a newline, and BPE never
merges across one); tests hold that.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsweep.workers import synthetic
from slimsweep.workers.spec import FILE_BUILDERS, SpecError, TaskSpec, TrialSpec, check_sampler
from slimsweep.workers.tasks import FIELD_ALIASES

# Synthetic pools: large enough for the paper's sizes (200 + 1000 valid, 1000 test).
SYNTHETIC_POOLS = {"train": (2000, 0), "test": (1000, 1)}  # split -> (rows, seed)
PROMPT_HEADS = ("prompt-lm", "prompt-cls")  # heads that read a template and demonstrations

Row = dict[str, Any]  # {"text": str, "label": int, "idx": int (row index in its split)}


# --- pools ---------------------------------------------------------------------------------


def _column(task: TaskSpec, columns: Sequence[str], field: str, split: str) -> str:
    for name in (field, *FIELD_ALIASES.get(field, ())):
        if name in columns:
            return name
    raise SpecError(
        f"task {task.name!r}: split {split!r} has no field {field!r} "
        f"(fields: {', '.join(columns)}); set task.text_field / task.label_field"
    )


def _rows(task: TaskSpec, table: Any, split: str) -> list[Row]:
    """Rows of a `datasets.Dataset`, with labels checked against the task's classes."""
    if len(table) == 0:
        raise SpecError(f"task {task.name!r}: split {split!r} is empty")
    texts = table[_column(task, table.column_names, task.text_field, split)]
    labels = table[_column(task, table.column_names, task.label_field, split)]
    return _checked(task, split, texts, labels)


def _checked(task: TaskSpec, split: str, texts: Sequence, labels: Sequence) -> list[Row]:
    rows = []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.n_classes:
            raise SpecError(
                f"task {task.name!r}: split {split!r} row {i} has label {label!r}; labels must be "
                f"integers 0..{task.n_classes - 1} (one per label word)"
            )
        rows.append({"text": str(text), "label": label, "idx": i})
    return rows


def _split_of(task: TaskSpec, ds: Any, split: str) -> list[Row]:
    if split not in ds:
        raise SpecError(
            f"task {task.name!r}: {task.dataset!r} has no split {split!r} "
            f"(splits: {', '.join(ds)}); set task.train_split / task.test_split"
        )
    return _rows(task, ds[split], split)


def _hub_pools(task: TaskSpec) -> tuple[list[Row], list[Row]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(task.dataset, task.config, revision=task.revision)
    except (OSError, ValueError) as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise SpecError(
            f"task {task.name!r}: cannot load dataset {task.dataset!r} (config {task.config}, "
            f"revision {task.revision}): {reason}; "
            f"fix task.dataset/config, or download it into the datasets cache when offline"
        ) from err
    return _split_of(task, ds, task.train_split), _split_of(task, ds, task.test_split)


def _files_pools(task: TaskSpec) -> tuple[list[Row], list[Row]]:
    from datasets import load_dataset

    files = dict(task.data_files)
    for split in (task.train_split, task.test_split):
        if split not in files:
            raise SpecError(
                f"task {task.name!r}: data_files has no {split!r} file "
                f"(has: {', '.join(files) or 'none'}); add it to task.data_files"
            )
    suffixes = {Path(p).suffix for p in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_BUILDERS:
        raise SpecError(
            f"task {task.name!r}: data_files must share one extension of "
            f"{', '.join(FILE_BUILDERS)} (got {', '.join(sorted(suffixes))})"
        )
    for path in files.values():
        if not Path(path).is_file():
            raise SpecError(f"task {task.name!r}: data file {path!r} does not exist")
    for split, digest in task.file_digests:
        if file_sha256(files[split]) != digest:
            raise SpecError(
                f"task {task.name!r}: data file {files[split]!r} changed since the grid was "
                f"loaded (its sha256 is no longer the one in the trial id); plan and launch again"
            )
    ds = load_dataset(FILE_BUILDERS[suffixes.pop()], data_files=files)
    return _split_of(task, ds, task.train_split), _split_of(task, ds, task.test_split)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _synthetic_pools(task: TaskSpec) -> tuple[list[Row], list[Row]]:
    pools = []
    for split in ("train", "test"):
        n, seed = SYNTHETIC_POOLS[split]
        gen = synthetic.generate(task.dataset, n, seed)
        pools.append(_checked(task, split, [r["text"] for r in gen], [r["label"] for r in gen]))
    return pools[0], pools[1]


POOL_LOADERS: dict[str, Callable[[TaskSpec], tuple[list[Row], list[Row]]]] = {
    "hub": _hub_pools,
    "files": _files_pools,
    "synthetic": _synthetic_pools,
}


def load_pools(task: TaskSpec) -> tuple[list[Row], list[Row]]:
    """(train pool, test pool): every row of the task's train and test splits, in file order,
    as {"text", "label", "idx"} with `idx` the row's index in its original split."""
    return POOL_LOADERS[task.kind](task)


def rows_fingerprint(train_pool: Sequence[Row], test_pool: Sequence[Row]) -> str:
    """What identifies the data a trial read, whatever its kind: "rows:" + the first 16 hex
    digits of a sha256 over every (text, label) of both pools, in order. A hub dataset updated
    under the same name, or an edited file, gives another fingerprint."""
    digest = hashlib.sha256()
    for name, pool in (("train", train_pool), ("test", test_pool)):
        digest.update(name.encode())
        for r in pool:
            digest.update(json.dumps([r["text"], r["label"]]).encode() + b"\n")
    return "rows:" + digest.hexdigest()[:16]


# --- splits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    demos: list[Row]  # demos_per_class per class, grouped by class index
    train: list[Row]
    valid: list[Row]
    test: list[Row]


def draw_order(n: int, rng: random.Random, inclusive: bool) -> list[int]:
    """A seeded random order of the positions 0..n-1; splits take rows in this order.

    inclusive=True approximates the authors' off-by-one (their code draws from [0, n]
    inclusive, only for demonstrations, and fails on n; `_split_authors` does exactly that):
    here every order is over n+1 slots and the extra index n is clamped to the last row n-1,
    so the last row gets two chances to come early; its second appearance is skipped, which
    keeps the splits disjoint and their sizes exact. Kept so results stored under it keep
    their meaning.
    """
    if not inclusive or n == 0:
        order = list(range(n))
        rng.shuffle(order)
        return order
    slots = list(range(n + 1))
    rng.shuffle(slots)
    return list(dict.fromkeys(min(s, n - 1) for s in slots))


def _split_slimsweep(
    spec: TrialSpec, train_pool: Sequence[Row], test_pool: Sequence[Row]
) -> Splits:
    """slimsweep's split, seeded by spec.seed: demonstrations (per class), then train, then
    valid, from one random order of the train pool; test from a random order of the test pool
    (all of it when smaller than test_size)."""
    d, n_cls, trial = spec.data, spec.task.n_classes, spec.trial_id
    rng = random.Random(spec.seed)
    order = draw_order(len(train_pool), rng, d.inclusive_index_draw)
    by_class: dict[int, list[int]] = {c: [] for c in range(n_cls)}
    for i in order:
        by_class[train_pool[i]["label"]].append(i)

    demo_pos = []
    for c, positions in by_class.items():
        if len(positions) < d.demos_per_class:
            raise SpecError(
                f"trial {trial}: class {c} has {len(positions)} rows in the train pool; "
                f"data.demos_per_class is {d.demos_per_class}"
            )
        demo_pos += positions[: d.demos_per_class]
    taken = set(demo_pos)
    rest = [i for i in order if i not in taken]

    if d.train_per_class:
        # As the authors' code: train_size of each class, or all a class has left when fewer.
        chosen: set[int] = set()
        for c in range(n_cls):
            chosen.update([i for i in by_class[c] if i not in taken][: d.train_size])
        train_pos = [i for i in rest if i in chosen]
        n_train = len(train_pos)
    else:
        train_pos = rest[: d.train_size]
        n_train = d.train_size
    if n_train + d.valid_size > len(rest):
        per = " per class (capped)" if d.train_per_class else ""
        raise SpecError(
            f"trial {trial}: task {spec.task.name!r} has {len(train_pool)} train-pool rows; "
            f"{len(demo_pos)} demonstrations + data.train_size {d.train_size}{per} + "
            f"data.valid_size {d.valid_size} need {len(demo_pos) + n_train + d.valid_size}; "
            f"lower data.train_size or data.valid_size"
        )
    taken.update(train_pos)
    valid_pos = [i for i in rest if i not in taken][: d.valid_size]
    test_pos = draw_order(len(test_pool), rng, d.inclusive_index_draw)[: d.test_size]
    return Splits(
        demos=[train_pool[i] for i in demo_pos],
        train=[train_pool[i] for i in train_pos],
        valid=[train_pool[i] for i in valid_pos],
        test=[test_pool[i] for i in test_pos],
    )


def _split_authors(spec: TrialSpec, train_pool: Sequence[Row], test_pool: Sequence[Row]) -> Splits:
    """The authors' released code (ShuzhouYuan/GNNavi, acceleratorGNN/utils/preproc.py,
    `ICLDataModule.setup`), draw for draw on `random.Random(seed)`: their `seed_everything(seed)`
    seeds Python's global generator and nothing draws from it before `setup`, so the same pools
    in the same order give the same rows.

    1. test: `sample(test pool, n)`, n = min(test_size, len(test pool)) (SST-2: 872);
    2. `shuffle(train pool)`; valid: its first n rows (the same n: one number for both);
    3. per class in index order, among the remaining rows of that class: one demonstration
       `pool.pop(randint(0, len(pool)))` (randint includes len(pool): where it returns that,
       their code raises IndexError, and so does this, as a SpecError); then
       `sample(pool, min(train_size, len(pool)))` training rows.
    """
    d, trial = spec.data, spec.trial_id
    rng = random.Random(spec.seed)
    n = min(d.test_size, len(test_pool))
    test = rng.sample(list(test_pool), n)
    shuffled = list(train_pool)
    rng.shuffle(shuffled)
    valid, rest = shuffled[:n], shuffled[n:]
    demos: list[Row] = []
    train: list[Row] = []
    for c in range(spec.task.n_classes):
        pool = [r for r in rest if r["label"] == c]
        i = rng.randint(0, len(pool))
        if i == len(pool):
            raise SpecError(
                f"trial {trial}: seed {spec.seed} draws index {i} of the {len(pool)} rows of "
                f"class {c} left after validation: the authors' code fails here (IndexError: "
                f"pop index out of range), so it has no result for this seed and task; choose "
                f"another seed or data.sampler: slimsweep"
            )
        demos.append(pool.pop(i))
        train.extend(rng.sample(pool, min(d.train_size, len(pool))))
    return Splits(demos=demos, train=train, valid=valid, test=test)


SPLITTERS: dict[str, Callable[[TrialSpec, Sequence[Row], Sequence[Row]], Splits]] = {
    "slimsweep": _split_slimsweep,
    "authors": _split_authors,
}


def split(spec: TrialSpec, train_pool: Sequence[Row], test_pool: Sequence[Row]) -> Splits:
    """Demonstrations, train, valid and test rows of one trial, by `data.sampler`.
    Demonstrations are drawn for every head, so the three heads of a seed train and validate
    on the same rows (only the prompt heads show them)."""
    check_sampler(spec.data)
    return SPLITTERS[spec.data.sampler](spec, train_pool, test_pool)


# --- prompts -------------------------------------------------------------------------------


def _fill(template: str, text: str, label_word: str) -> str:
    # format_map fills the template in one pass: braces inside `text` are left alone.
    return template.format_map({"text": text, "label": label_word})


def build_query(task: TaskSpec, text: str) -> str:
    """The query part: the template with its label left empty, ending where the label goes."""
    return _fill(task.template, text, "")


def build_demonstration(task: TaskSpec, row: Row) -> str:
    """The template filled with a row's text and its label word."""
    return _fill(task.template, row["text"], task.label_words[row["label"]])


def build_prefix(task: TaskSpec, demos: Sequence[Row]) -> str:
    """The demonstrations, each followed by a newline; "" without demonstrations. Order as
    given (split() groups them by class index)."""
    return "".join(build_demonstration(task, r) + "\n" for r in demos)


def build_prompt(task: TaskSpec, demos: Sequence[Row], text: str) -> str:
    """Demonstrations and the query joined by newlines; == build_prefix + build_query."""
    return build_prefix(task, demos) + build_query(task, text)


# --- tokens --------------------------------------------------------------------------------


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text with no special tokens added."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def leading_special_ids(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before any text (a BOS for OPT and Llama, nothing for GPT-2);
    it goes at the very start of every input."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def label_token_ids(task: TaskSpec, tokenizer: Any, rule: str) -> list[int]:
    """One token id per label word: the word's only token ("single-token") or its first
    token ("first-subtoken", the authors' code). Distinct words must get distinct ids."""
    ids = []
    for word, toks in zip(task.label_words, token_ids(tokenizer, task.label_words), strict=True):
        if not toks or (rule == "single-token" and len(toks) != 1):
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise SpecError(
                f"task {task.name!r}: label word {word!r} is {len(toks)} tokens {pieces} for this "
                f"tokenizer; set data.label_word_rule: first-subtoken, or use single-token words"
            )
        ids.append(toks[0])
    seen: dict[int, str] = {}
    for word, i in zip(task.label_words, ids, strict=True):
        if i in seen:
            raise SpecError(
                f"task {task.name!r}: label words {seen[i]!r} and {word!r} share the token "
                f"{tokenizer.convert_ids_to_tokens([i])[0]!r}; choose distinguishable label words"
            )
        seen[i] = word
    return ids


def encode(
    tokenizer: Any,
    query: Callable[[str], str],
    text: str,
    *,
    limit: int,
    lead: Sequence[int] = (),
    n_prefix: int = 0,
    overflow: str = "error",
    where: str = "the example",
) -> tuple[tuple[int, ...], str]:
    """(query ids, query string) of one example: `lead` (special ids) + the ids of query(text),
    such that n_prefix + len(query ids) <= limit.

    Over the limit: SpecError, or with overflow "truncate-left" the first tokens of the example's
    text are dropped (the demonstrations and the template around the text stay intact) until it
    fits; the shortened text is decoded and re-tokenised inside the template, and one more token
    is dropped while the seam costs more than counted."""
    ids = [*lead, *token_ids(tokenizer, [query(text)])[0]]
    if n_prefix + len(ids) <= limit:
        return tuple(ids), query(text)
    if overflow != "truncate-left":
        raise SpecError(
            f"{where} is {n_prefix + len(ids)} tokens ({n_prefix} of demonstrations), over the "
            f"limit of {limit} (data.max_length, else the model's context); set data.overflow: "
            f"truncate-left or raise data.max_length"
        )
    text_ids = token_ids(tokenizer, [text])[0]
    for drop in range(n_prefix + len(ids) - limit, len(text_ids) + 1):
        kept = tokenizer.decode(text_ids[drop:], clean_up_tokenization_spaces=False).lstrip()
        new = [*lead, *token_ids(tokenizer, [query(kept)])[0]]
        if n_prefix + len(new) <= limit:
            return tuple(new), query(kept)
    raise SpecError(
        f"{where}: even with its text removed the prompt is over the limit of {limit} tokens "
        f"({n_prefix} of demonstrations); raise data.max_length or use fewer demonstrations"
    )


# --- everything ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    text: str  # as in the data set (not truncated)
    label: int
    idx: int  # row index in the original split
    prompt: str  # what the model reads: prefix + query (prompt heads) or the text (vanilla-cls)
    input_ids: tuple[int, ...]  # == prefix_ids + query_ids
    query_ids: tuple[int, ...]


@dataclass
class Prepared:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    demos: list[Example]  # prompt heads only; each demonstration as filled in the prefix
    prefix_ids: list[int]  # shared by every input; [] for vanilla-cls
    label_ids: list[int]  # token id per class (prompt-lm); [] for the classification heads
    manifest: dict[str, Any]
    fingerprint: str  # rows_fingerprint of the pools read


def token_limit(spec: TrialSpec, context_length: int) -> int:
    """The most tokens one input may have: data.max_length, else the model's context."""
    limit = spec.data.max_length or context_length
    if limit > context_length:
        raise SpecError(
            f"trial {spec.trial_id}: data.max_length {limit} exceeds the model's context of "
            f"{context_length} tokens; lower data.max_length"
        )
    return limit


def prepare(spec: TrialSpec, tokenizer: Any, context_length: int) -> Prepared:
    """Pools, split, prompts, token ids and a manifest of the rows used, for one trial."""
    task = spec.task
    prompted = spec.head in PROMPT_HEADS
    if prompted and not task.template.endswith("{label}"):
        raise SpecError(
            f"task {task.name!r}: template {task.template!r} must end with {{label}}: the "
            f"model reads the prompt up to where the label word goes"
        )
    limit = token_limit(spec, context_length)
    train_pool, test_pool = load_pools(task)
    splits = split(spec, train_pool, test_pool)
    lead = leading_special_ids(tokenizer)
    if prompted:
        demos = splits.demos
        prefix_ids = lead + token_ids(tokenizer, [build_prefix(task, demos)])[0]
        query_lead: list[int] = []

        def query(text: str) -> str:
            return build_query(task, text)

    else:
        demos, prefix_ids, query_lead = [], [], lead

        def query(text: str) -> str:
            return text

    prefix = build_prefix(task, demos)
    truncated: dict[str, list[int]] = {}

    def examples(name: str, rows: list[Row]) -> list[Example]:
        out = []
        for r in rows:
            q_ids, q = encode(
                tokenizer,
                query,
                r["text"],
                limit=limit,
                lead=query_lead,
                n_prefix=len(prefix_ids),
                overflow=spec.data.overflow,
                where=f"trial {spec.trial_id}: {name} example idx {r['idx']}",
            )
            if q != query(r["text"]):
                truncated.setdefault(name, []).append(r["idx"])
            out.append(
                Example(r["text"], r["label"], r["idx"], prefix + q, (*prefix_ids, *q_ids), q_ids)
            )
        return out

    train, valid, test = (examples(n, getattr(splits, n)) for n in ("train", "valid", "test"))
    demo_texts = [build_demonstration(task, r) for r in demos]
    demo_examples = [
        Example(r["text"], r["label"], r["idx"], line, tuple(ids), tuple(ids))
        for r, line, ids in zip(demos, demo_texts, token_ids(tokenizer, demo_texts), strict=True)
    ]
    label_ids = (
        label_token_ids(task, tokenizer, spec.data.label_word_rule)
        if spec.head == "prompt-lm"
        else []
    )
    manifest = {
        "train": [r["idx"] for r in splits.train],
        "valid": [r["idx"] for r in splits.valid],
        "test": [r["idx"] for r in splits.test],
        "demos": [r["idx"] for r in demos],
        "held_out": [r["idx"] for r in splits.demos],
        "pool_sizes": {"train": len(train_pool), "test": len(test_pool)},
        "prefix_tokens": len(prefix_ids),
        "token_limit": limit,
        "truncated": truncated,
        "label_ids": label_ids,
    }
    fingerprint = rows_fingerprint(train_pool, test_pool)
    return Prepared(train, valid, test, demo_examples, prefix_ids, label_ids, manifest, fingerprint)

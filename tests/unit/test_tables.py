"""The fact tables: importable without torch, and every entry names real transformers things."""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers
from slimsweep.workers.tables import FAMILIES, HEADS, MODEL_TYPES, _unique


def test_tables_import_without_torch_or_transformers() -> None:
    code = (
        "import sys, slimsweep.workers.tables, slimsweep.orchestrator.models; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_model_type_is_a_transformers_config() -> None:
    from transformers import CONFIG_MAPPING

    assert all(t in CONFIG_MAPPING for t in MODEL_TYPES)
    assert MODEL_TYPES["gemma3_text"] is FAMILIES["gemma3"]


def test_every_head_names_a_transformers_auto_class() -> None:
    assert {h: k.auto_class for h, k in HEADS.items()} == {
        "prompt-lm": "AutoModelForCausalLM",
        "prompt-cls": "AutoModelForSequenceClassification",
        "vanilla-cls": "AutoModelForSequenceClassification",
    }
    assert all(hasattr(transformers, k.auto_class) for k in HEADS.values())


def test_a_name_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'llama' appears twice"):
        _unique([("llama", 1), ("llama", 2)])

"""The three ways the hook gets installed, each in a fresh interpreter of this environment, and the core's
promise never to import NeMo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nemo_bodies as B
import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "nemo" / "llama3_1_8b_fp8_peft_squad.yaml"
INSTALLED = ("from nemo_automodel._transformers import model_init as mi; "
             "print('HOOKED' if hasattr(mi._resolve_custom_model_cls_for_config, '_streaming_adapters_original') "
             "else 'PLAIN')")


def python(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_core_never_imports_nemo():
    code = ("import sys, streaming_adapters, streaming_adapters.run, streaming_adapters.integrations, "
            "streaming_adapters.integrations.nemo_autoload; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nemo_automodel'))")
    assert python(code).strip() == "[]"


def test_import_installs_once():
    code = ("import streaming_adapters.integrations.nemo as n; "
            "from nemo_automodel._transformers import model_init as mi; "
            "r = mi._resolve_custom_model_cls_for_config; "
            "print(n.installed(), n.install(), n.install(), mi._resolve_custom_model_cls_for_config is r, "
            "hasattr(r._streaming_adapters_original, '_streaming_adapters_original'), n.uninstall(), n.installed())")
    assert python(code).split() == ["True", "False", "False", "True", "False", "True", "False"]


def test_recipe_section_installs_while_parsing():
    """NeMo's own YAML loader imports every ``_target_`` while parsing: the recipe's ``streaming_adapters:``
    section installs the hook before any model is built; the model section is NeMo's, untouched."""
    code = ("from nemo_automodel.components.config.loader import load_yaml_config; "
            f"cfg = load_yaml_config({str(RECIPE)!r}); "
            "print(cfg.model._original_strings['_target_'], 'quantization_config' in cfg.model.to_dict(), "
            "'force_hf' in cfg.model.to_dict()); " + INSTALLED)
    out = python(code).split()
    assert out == ["nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained", "False", "False", "HOOKED"]
    assert python(INSTALLED).strip() == "PLAIN"  # nothing without the recipe, the import or the .pth


def test_recipe_model_section_loads_fp8_exactly(nemo_checkpoints):
    """The recipe's model and peft sections, instantiated by NeMo's config system, on an FP8 fixture (that
    parsing installs the hook is shown in a fresh interpreter above; here the module is already imported)."""
    from nemo_automodel.components.config.loader import load_yaml_config

    B.setup_nemo(hook=True)
    cfg = load_yaml_config(str(RECIPE))
    path = nemo_checkpoints("llama")
    model = cfg.model.instantiate(pretrained_model_name_or_path=str(path), peft_config=cfg.peft.instantiate(),
                                  attn_implementation="sdpa")
    p = B.check_params(model, path)
    assert p["lora"] and not p["wrong"] and not p["codes"] and len(p["exact"]) == p["checked"] == 30, p


def test_autoload_pth_line(tmp_path, monkeypatch):
    """The opt-in .pth: loads one stdlib-only file at start-up (no torch), installs when NeMo is imported,
    and ``STREAMING_ADAPTERS_NEMO=0`` turns it off."""
    from streaming_adapters.integrations import nemo_autoload

    line = nemo_autoload.pth_line()
    startup = line + "import sys; print('torch' in sys.modules, 'streaming_adapters' in sys.modules)\n"
    assert python(startup).split() == ["False", "False"]
    after = line + "from nemo_automodel import NeMoAutoModelForCausalLM\n" + INSTALLED
    assert python(after).strip() == "HOOKED"
    assert python(after, STREAMING_ADAPTERS_NEMO="0").strip() == "PLAIN"
    monkeypatch.setattr(nemo_autoload, "pth_path", lambda: str(tmp_path / nemo_autoload.PTH_NAME))
    assert nemo_autoload.main(["enable"]) == 0 and (tmp_path / nemo_autoload.PTH_NAME).read_text() == line
    assert nemo_autoload.main(["disable"]) == 0 and not (tmp_path / nemo_autoload.PTH_NAME).exists()


@pytest.mark.parametrize("section", ["quantization_config", "force_hf"])
def test_recipe_has_no_section_that_bypasses_the_hook(section):
    assert f"\n  {section}:" not in RECIPE.read_text()

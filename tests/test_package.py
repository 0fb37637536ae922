"""Packaging: one distribution, one import namespace, the interpreter switch, from the repo root and from elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, json, os, sys
import qlora, qlora.kernels, qlora.reference
import qlora.kernels.quantize, qlora.reference.quantize
print(json.dumps({
    "qlora": qlora.__file__, "kernels": qlora.kernels.__file__, "reference": qlora.reference.__file__,
    "top_level_kernels": getattr(importlib.util.find_spec("kernels"), "origin", None),
    "top_level_reference": getattr(importlib.util.find_spec("reference"), "origin", None),
    "interpreter": qlora.interpreter_active(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
}))
"""


def _probe(cwd: Path, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("QLORA_INTERPRET", "TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_namespace_maps_kernels_and_reference_onto_the_top_level_folders(where, tmp_path):
    found = _probe(REPO if where == "repo root" else tmp_path)
    assert Path(found["qlora"]).parent == REPO / "qlora"
    assert Path(found["kernels"]).parent == REPO / "kernels"
    assert Path(found["reference"]).parent == REPO / "reference"
    if where == "elsewhere":
        # Nothing generic is installed: `kernels` and `reference` of this repo exist only under `qlora`. (A top-level
        # `kernels` may still be found: the Hugging Face Hub package, which transformers >= 5 depends on.)
        for name in ("top_level_kernels", "top_level_reference"):
            assert found[name] is None or Path(found[name]).resolve().parent not in (REPO / "kernels",
                                                                                    REPO / "reference"), found[name]


def test_interpreter_switch(tmp_path):
    import torch

    default = _probe(tmp_path)
    assert default["interpreter"] is (not torch.cuda.is_available())
    assert default["TRITON_INTERPRET"] == ("1" if default["interpreter"] else "0")
    forced = _probe(tmp_path, QLORA_INTERPRET="1", TRITON_INTERPRET="0")  # QLORA_INTERPRET wins
    assert forced["interpreter"] and forced["TRITON_INTERPRET"] == "1"
    explicit = _probe(tmp_path, TRITON_INTERPRET="1")
    assert explicit["interpreter"]


def test_reference_imports_neither_torch_nor_triton(tmp_path):
    code = ("import sys, importlib.util, pathlib; "
            f"sys.path.insert(0, {str(REPO)!r}); "
            # Load the oracle package as a plain package, without qlora (which imports torch).
            "spec = importlib.util.spec_from_file_location('oracle', "
            f"{str(REPO / 'reference' / '__init__.py')!r}, submodule_search_locations=[{str(REPO / 'reference')!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['oracle'] = m; spec.loader.exec_module(m); "
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'triton')); "
            "print(bad); assert not bad, bad; assert len(m.__all__) == 12")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pyproject_declares_one_distribution_and_its_dependencies():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"])
    for name in ("torch", "triton", "numpy", "scipy"):
        assert name in deps, name
    test_extra = " ".join(meta["project"]["optional-dependencies"]["test"])
    for name in ("hypothesis", "pytest", "pytest-benchmark"):
        assert name in test_extra, name
    assert meta["project"]["requires-python"].startswith(">=3.10")
    package_dir = meta["tool"]["setuptools"]["package-dir"]
    assert package_dir["qlora.kernels"] == "kernels" and package_dir["qlora.reference"] == "reference"

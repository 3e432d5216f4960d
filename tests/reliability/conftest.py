"""Fixtures for the reliability tests: adapters written straight as safetensors (any
shape, dtype or value, fast), a library on the session's tiny Llama, a small JSONL task,
and ``cli``: ``lorashelf.cli.main`` in process, returning (exit code, stdout, stderr)
and failing the test on any traceback or an error that is not one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorashelf.cli import main


def write_adapter(
    out: Path,
    shapes: dict[str, tuple[int, int]],
    *,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8.0,
    base: str,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
) -> Path:
    """A PEFT LoRA dir with random ``A [r, d_in]``, ``B [d_out, r]`` for each module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d_in, d_out) in shapes.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, d_in, generator=g) * scale).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, r, generator=g) * scale).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] for m in shapes})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}
    config["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def adapter_writer():
    """:func:`write_adapter`, for module- and session-scoped fixtures."""
    return write_adapter


@pytest.fixture(scope="session")
def tiny_shapes(tiny_model) -> dict[str, tuple[int, int]]:
    """``{module: (d_in, d_out)}`` of the tiny model's q_proj and v_proj layers."""
    return {
        name: (m.in_features, m.out_features)
        for name, m in tiny_model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }


@pytest.fixture
def adapter(tmp_path, tiny_shapes, tiny_model_dir):
    """``adapter(name, **write_adapter kwargs)``: an adapter dir that fits the tiny model."""

    def make(name: str, shapes=None, **kw) -> Path:
        kw.setdefault("base", str(tiny_model_dir))
        return write_adapter(tmp_path / "src" / name, shapes or tiny_shapes, **kw)

    return make


@pytest.fixture
def rlib(tmp_path, tiny_model_dir, adapter):
    """A library for the tiny model (module shapes from its config) with experts e0, e1."""
    from lorashelf.library import Library

    lib = Library.open(tmp_path / "lib", create=True, base_model=str(tiny_model_dir))
    for i in range(2):
        lib.add(adapter(f"e{i}", seed=i), f"e{i}", {"tasks": [f"t{i}"]})
    lib.close()
    return tmp_path / "lib"


@pytest.fixture
def mc_task(tmp_path) -> str:
    """A 4-example multiple-choice JSONL task id."""
    path = tmp_path / "mc.jsonl"
    rows = [{"input": f"Q{i}:", "options": [" a", " b"], "answer": i % 2} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def run_cli(capsys, home: Path, *argv) -> tuple[int, str, str]:
    """``lorashelf.cli.main`` in process: (rc, out, err); a user error must be one line."""
    capsys.readouterr()
    try:
        rc = main(["--home", str(home), *map(str, argv)])
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    if rc == 2:  # progress bars may come first; the error is the one last line
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("lorashelf: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], err
    return rc, out, err


@pytest.fixture(scope="session")
def cli_runner():
    """:func:`run_cli`, for tests that choose the home directory themselves."""
    return run_cli


@pytest.fixture
def cli(capsys, tmp_path):
    """``cli(*argv) -> (rc, out, err)``; asserts a user error is exactly one line."""

    def run(*argv) -> tuple[int, str, str]:
        return run_cli(capsys, tmp_path / "home", *argv)

    return run

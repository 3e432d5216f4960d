"""Import from a (local, offline) Hugging Face cache and from dirs; export to a PEFT dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorashelf.errors import LorashelfError
from lorashelf.library import Library, export_expert, import_adapter

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache in tmp_path, with the hub offline (this test only)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both once at import, which happened before this test
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo_id: str, adapter_dir: Path) -> Path:
    """Lay ``adapter_dir`` out as the hub cache does: models--org--name/{snapshots,refs}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / fn, snap / fn)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snap


def test_import_from_offline_hub_cache(tmp_path, offline_hub, make_adapter):
    src = make_adapter("hub", seed=4)
    cache_repo(offline_hub, "someone/lora-logic", src)
    lib = Library.open(tmp_path / "lib", create=True, base_model="smollm2-135m")
    expert = import_adapter(lib, "someone/lora-logic", card={"tasks": ["logic"]})
    assert expert.name == "someone__lora-logic"
    assert expert.card["source"] == "import" and expert.card["tasks"] == ["logic"]
    assert expert.card["origin"] == {
        "type": "hub",
        "repo_id": "someone/lora-logic",
        "revision": REV,
    }
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        assert expert.read_file(fn) == (src / fn).read_bytes()
    with pytest.raises(LorashelfError, match="not in the Hugging Face cache"):
        import_adapter(lib, "someone/absent")
    assert lib.names() == ["someone__lora-logic"]


def test_import_dir_and_export(tmp_path, make_adapter):
    src = make_adapter("d", seed=5)
    lib = Library.open(tmp_path / "lib", create=True, base_model="smollm2-135m")
    expert = import_adapter(lib, str(src), name="local")
    assert expert.card["origin"] == {"type": "dir", "path": str(src.resolve())}
    out = export_expert(expert, tmp_path / "out")
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / fn).read_bytes() == (src / fn).read_bytes()
    assert (out / "card.json").read_bytes() == (expert.path / "card.json").read_bytes()
    with pytest.raises(LorashelfError, match="not empty"):
        export_expert(expert, out)
    export_expert(expert, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(LorashelfError, match="neither a PEFT adapter dir nor"):
        import_adapter(lib, str(tmp_path / "no" / "such" / "dir"))

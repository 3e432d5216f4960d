"""``jsonl:PATH``: a task written by hand, one JSON object per line.

Generative rows are ``{"input": ..., "target": "..." | ["...", ...]}`` (every target
is accepted); multiple-choice rows are ``{"input": ..., "options": [...], "answer":
INDEX | "option text"}``. A file is one kind or the other. Input and answer are joined
with a space unless either side already has whitespace at the seam; change that with
``jsonl:PATH?sep=%0A`` (URL-encoded; ``sep=`` for none). Blank lines are skipped and
every error names its line.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorashelf.data.rows import row_example, task_kind
from lorashelf.data.sources import Source, parse_options, subset
from lorashelf.data.task import Example, Task, examples_fingerprint
from lorashelf.errors import LorashelfError


def read_rows(path: Path, sep: str) -> list[Example]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LorashelfError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8"
        ) from None
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorashelfError(f"{where}: not valid JSON ({e.msg}); fix that line") from None
        if not isinstance(row, dict) or "input" not in row:
            raise LorashelfError(f"{where}: each line must be an object with an 'input' key")
        examples.append(
            row_example(
                row["input"],
                target=row.get("target"),
                options=row.get("options"),
                answer=row.get("answer"),
                sep=sep,
                where=where,
            )
        )
    return examples


def load(name: str, home: Path, max_examples: int | None) -> Task:
    spec, opts = parse_options(name, ["sep"], "jsonl")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LorashelfError(f"jsonl:{name}: no file {path}; give the path of a .jsonl file")
    examples = read_rows(path, opts.get("sep", " "))
    if not examples:
        raise LorashelfError(f"{path} has no examples; add one JSON object per line")
    kind = task_kind(examples, str(path))
    key = f"jsonl:{examples_fingerprint(examples)}"  # the content, not the path
    return Task(
        id=f"jsonl:{name}",
        examples=tuple(subset(examples, max_examples, seed=key)),
        kind=kind,
        description=f"{len(examples)} examples from {path.name}",
        metadata={"source": "jsonl", "path": str(path.resolve())},
        seed_key=key,
    )


SOURCE = Source(load=load)

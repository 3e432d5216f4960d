"""``hf:DATASET[:CONFIG][?OPTIONS]``: a task from a Hugging Face ``datasets`` dataset.

``DATASET`` is a hub id or a local file or directory (``.parquet``, ``.json``,
``.jsonl``, ``.csv``). Options, URL-encoded after ``?``, map columns onto a task:

- ``input`` (default ``input``), ``target`` (default ``target``; a string or a list
  of acceptable strings), or ``options`` + ``answer`` (an index or the option's text)
  for multiple choice;
- ``task_name=VALUE`` keeps only rows whose ``task_column`` (default ``task_name``)
  equals VALUE, for FLAN-style collections holding many tasks in one table, e.g.
  ``hf:flan.parquet?input=source&task_name=cola``;
- ``split`` (default ``train``) and ``sep`` (joins input and answer when neither
  has whitespace at the seam; default a space, ``sep=%0A`` for a newline).

The whole mapping lives in the id, so the id alone names the data an expert saw.
``datasets`` is optional (``pip install 'lorashelf[hf]'``) and imported only here;
downloads and its cache go under ``HOME/data/hf``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorashelf.data.rows import row_example, task_kind
from lorashelf.data.sources import Source, parse_options, subset
from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError, did_you_mean

OPTIONS = ("input", "target", "options", "answer", "task_name", "task_column", "split", "sep")
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def open_dataset(dataset: str, config: str | None, split: str, home: Path) -> Any:
    try:
        import datasets
    except ModuleNotFoundError:
        raise LorashelfError(
            "hf: tasks need the datasets package; pip install 'lorashelf[hf]'"
        ) from None
    cache = str(Path(home) / "data" / "hf")
    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise LorashelfError(
                    f"hf:{dataset}: unknown file type {path.suffix!r}; use one of "
                    f"{', '.join(BUILDERS)}"
                )
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache
            )
        return datasets.load_dataset(
            str(path) if path.is_dir() else dataset, config, split=split, cache_dir=cache
        )
    except ConnectionError:
        raise LorashelfError(
            f"hf:{dataset}: not in the local cache and the Hub cannot be reached (offline?); "
            "load it once with network, or pass a local file (hf:./data.jsonl?...)"
        ) from None
    except (
        FileNotFoundError,
        ValueError,
        datasets.exceptions.DatasetNotFoundError,
        datasets.exceptions.DatasetGenerationError,
    ) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LorashelfError(
            f"hf:{dataset}: cannot load it ({first}); check the name/path, config and split"
        ) from None


def column(ds: Any, name: str, dataset: str) -> list[Any]:
    if name not in ds.column_names:
        raise LorashelfError(
            f"hf:{dataset} has no column {name!r}{did_you_mean(name, ds.column_names)}; "
            f"columns: {', '.join(ds.column_names)} (map them with ?input=...&target=... or ?options=...&answer=...)"
        )
    return ds[name]


def load(name: str, home: Path, max_examples: int | None) -> Task:
    base, opts = parse_options(name, OPTIONS, "hf")
    dataset, _, config = base.partition(":")
    ds = open_dataset(dataset, config or None, opts.get("split", "train"), home)
    task_id = f"hf:{name}"
    if "task_name" in opts:
        col = opts.get("task_column", "task_name")
        keep = [i for i, v in enumerate(column(ds, col, dataset)) if v == opts["task_name"]]
        if not keep:
            values = sorted({str(v) for v in ds[col]})
            raise LorashelfError(
                f"hf:{dataset}: no rows with {col} == {opts['task_name']!r}"
                f"{did_you_mean(opts['task_name'], values)}"
            )
        ds = ds.select(keep)
    rows = subset(range(len(ds)), max_examples, seed=task_id)
    ds = ds.select(rows)
    inputs = column(ds, opts.get("input", "input"), dataset)
    sep = opts.get("sep", " ")
    if "options" in opts:
        options = column(ds, opts["options"], dataset)
        answers = column(ds, opts.get("answer", "answer"), dataset)
        examples = [
            row_example(x, options=o, answer=a, sep=sep, where=f"hf:{dataset} row {i}")
            for i, (x, o, a) in enumerate(zip(inputs, options, answers))
        ]
    else:
        targets = column(ds, opts.get("target", "target"), dataset)
        examples = [
            row_example(x, target=t, sep=sep, where=f"hf:{dataset} row {i}")
            for i, (x, t) in enumerate(zip(inputs, targets))
        ]
    if not examples:
        raise LorashelfError(f"hf:{name} has no rows; check the split and the task_name filter")
    return Task(
        id=task_id,
        examples=tuple(examples),
        kind=task_kind(examples, task_id),
        description=f"{dataset}" + (f" ({opts['task_name']})" if "task_name" in opts else ""),
        metadata={"source": "hf", "dataset": dataset, "config": config},
    )


SOURCE = Source(load=load)

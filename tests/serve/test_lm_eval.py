"""lm-evaluation-harness against ``lorashelf serve``: the same accuracy as ``lorashelf eval``.

A multiple-choice task is written twice over one JSONL file: as an lm-eval YAML task
(``dataset_path: json`` + ``data_files``, ``output_type: multiple_choice``) and as
lorashelf's ``jsonl:`` task. lm-eval's ``local-completions`` model scores it through
the server's ``/v1/completions`` (``echo`` + ``logprobs``, token-id prompts), offline;
lorashelf's evaluator scores it in process on the same model. The accuracies must be
equal and every option's log-likelihood must agree.
"""

from __future__ import annotations

import copy
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.timeout(600)

ROWS = [
    ("Is the sky blue?", ["yes", "no"], 0),
    ("2 + 2 =", ["3", "4", "5"], 1),
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Cats say", ["woof", "meow"], 1),
    ("Water freezes at", ["0 degrees", "50 degrees", "100 degrees"], 0),
    ("The opposite of hot is", ["warm", "cold"], 1),
    ("Q: which is a fruit?\nA:", ["apple", "chair", "stone"], 0),
    ("Bees make", ["honey", "milk"], 0),
    ("The sun rises in the", ["west", "east"], 1),
    ("One week has", ["five days", "seven days", "ten days"], 1),
    ("Fish live in", ["water", "trees"], 0),
    ("Snow is", ["black", "white", "green"], 1),
]

YAML = """task: lorashelf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}"
doc_to_choice: "{{{{options}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""

MODELS = [("lib", "base"), ("lib/beta", "expert:beta")]


@pytest.fixture
def task_files(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text(
        "".join(json.dumps({"input": q, "options": o, "answer": a}) + "\n" for q, o, a in ROWS)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lorashelf_mc.yaml").write_text(YAML.format(data=data))
    return data, tasks


def _lm_eval(url: str, model: str, tokenizer_dir, tasks_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {"model": model, "base_url": f"{url}/v1/completions", "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 4,
            "max_retries": 1}  # fmt: skip
    return simple_evaluate(
        model="local-completions", model_args=args, tasks=["lorashelf_mc"],
        task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
    )  # fmt: skip


def _lorashelf(library, base, method: str, data, tokenizer) -> tuple[float, dict]:
    """``lorashelf eval``'s accuracy of ``method`` on the task, and each option's score."""
    from lorashelf.data.sources import load_task
    from lorashelf.evaluate.runner import EvalConfig, evaluate
    from lorashelf.evaluate.scoring import score_continuations
    from lorashelf.methods import MethodContext, prepare

    task = load_task(f"jsonl:{data}", home=data.parent)
    model = copy.deepcopy(base)
    prepared = prepare(method, model, MethodContext(library))
    try:
        result = evaluate(model, tokenizer, [task], EvalConfig(split="all"), show_progress=False)
        pairs = [(ex.prompt, o) for ex in task.examples for o in ex.options]
        scores = [s.logprob for s in score_continuations(model, tokenizer, pairs)]
    finally:
        prepared.close()
    per_row, k = {}, 0
    for ex in task.examples:
        per_row[ex.prompt] = scores[k : k + len(ex.options)]
        k += len(ex.options)
    return result.tasks[task.id].accuracy, per_row


def test_lm_eval_local_completions_matches_lorashelf_eval(
    served, serve_kit, task_files, tiny_model, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data, tasks_dir = task_files
    proc, url = serve_kit.start_server(
        served.library.path, tmp_path / "server.log", "--watch-s", "0"
    )
    try:
        harness = {m: _lm_eval(url, m, tiny_model_dir, tasks_dir) for m, _ in MODELS}
    finally:
        serve_kit.stop_server(proc)
    accuracies = []
    for model, method in MODELS:
        acc, ours = _lorashelf(served.library, tiny_model, method, data, served.tokenizer)
        out = harness[model]
        assert out["results"]["lorashelf_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9), model
        samples = out["samples"]["lorashelf_mc"]
        assert len(samples) == len(ROWS)
        for s in samples:
            theirs = [float(r[0]) for r in s["filtered_resps"]]
            want = ours[next(p for p in ours if p.startswith(s["doc"]["input"]))]
            assert theirs == pytest.approx(want, abs=1e-4), (model, s["doc"]["input"])
        accuracies.append(acc)
    assert 0 < min(accuracies) and max(accuracies) < 1, "a random model should be neither"

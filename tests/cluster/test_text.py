"""Text embeddings of experts' prompts with the tiny random base model."""

from __future__ import annotations

import json

import pytest
import torch

from lorashelf.cluster.kmeans import kmeans
from lorashelf.cluster.metrics import adjusted_rand_index
from lorashelf.cluster.text import expert_prompts, mean_pooled, text_embeddings
from lorashelf.errors import LorashelfError


def test_mean_pooled_ignores_padding(tiny_model, tiny_tokenizer):
    texts = ["short", "a much longer prompt that forces padding of the short one"]
    batched = mean_pooled(tiny_model, tiny_tokenizer, texts, batch_size=2)
    for i, t in enumerate(texts):
        ids = torch.tensor([tiny_tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            h = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(batched[i], h.float().mean(0), rtol=1e-4, atol=1e-5)


def test_prompt_families_cluster_apart(tiny_model, tiny_tokenizer):
    styles = [
        lambda i: f"{i * 7919 % 1000} + {i * 31 % 97} = ",
        lambda i: "Translate to French: the cat sat on the mat number " + "ab" * (i % 3),
        lambda i: "QQQQ ZZZZ QQQQ ZZZZ " * (1 + i % 2),
    ]
    prompts, truth = [], []
    for fam, style in enumerate(styles):
        for e in range(4):
            prompts.append([style(e * 10 + j) for j in range(6)])
            truth.append(fam)
    emb = text_embeddings(tiny_model, tiny_tokenizer, prompts, batch_size=4)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(prompts)))
    labels = kmeans(emb @ emb.T, 3, seed=0).labels.tolist()
    assert adjusted_rand_index(labels, truth) == 1.0


def test_expert_without_tasks_is_refused(tmp_path):
    with pytest.raises(LorashelfError, match="records no tasks.*--method mbc"):
        expert_prompts({"x": {"tasks": []}}, ["x"], home=tmp_path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def test_expert_prompts_come_from_train_splits_in_turn(tmp_path):
    from lorashelf.data import load_task

    a = _jsonl(tmp_path / "a.jsonl", [{"input": f"A{i}", "target": "x"} for i in range(20)])
    b = _jsonl(tmp_path / "b.jsonl", [{"input": f"B{i}", "target": "y"} for i in range(5)])
    cards = {"e1": {"tasks": [a, b]}, "e2": {"tasks": [b]}}
    got = expert_prompts(cards, ["e1", "e2"], home=tmp_path, max_prompts=6, split_seed=3)
    train_a = [ex.prompt for ex in load_task(a, home=tmp_path).splits(3).train]
    train_b = [ex.prompt for ex in load_task(b, home=tmp_path).splits(3).train]
    assert got[0] == [train_a[0], train_b[0], train_a[1], train_b[1], train_a[2], train_b[2]]
    assert got[1] == train_b[:6]


def test_embedding_method_end_to_end(tmp_path, tiny_model_dir, planted, make_planted_library):
    """cluster_library with --method embedding: real tasks, the tiny model from a local dir."""
    from lorashelf.cluster.methods import ClusterConfig
    from lorashelf.cluster.run import cluster_library

    styles = ["{i} + {j} = ", "Translate: the cat number {i} sat", "QQQQ ZZZZ " * 3 + "{i}"]
    truth, cards = {}, {}
    for n in planted.names:
        fam = int(n[-2:]) % 3
        rows = [
            {"input": styles[fam].format(i=i * 37 % 101, j=i), "target": "1"} for i in range(12)
        ]
        cards[n] = {"tasks": [_jsonl(tmp_path / f"{n}.jsonl", rows)], "init_seed": 0}
        truth[n] = fam
    library = make_planted_library(cards=cards)
    cfg = ClusterConfig(method="embedding", k=3, max_prompts=4, text_model=str(tiny_model_dir))
    c, doc = cluster_library(
        library,
        cfg,
        out=tmp_path / "c.json",
        home=tmp_path,
        dtype=torch.float32,
        plot=tmp_path / "p.png",
    )
    assert doc["similarity"] == "text" and (tmp_path / "p.png").exists()
    assert adjusted_rand_index(c.labels, [truth[n] for n in c.names]) == 1.0

"""Text embeddings of experts' prompts with the tiny random base model."""

from __future__ import annotations

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

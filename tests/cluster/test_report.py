"""clusters.json content, the heatmap, reading it back, and all-or-nothing writes."""

from __future__ import annotations

import json

import pytest
import torch

from lorashelf.cluster.methods import ClusterConfig, ClusterContext, cluster_experts
from lorashelf.cluster.report import clustering_to_json, load_clusters, write_outputs
from lorashelf.errors import LorashelfError


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib Figure saved during the test (the real savefig still runs)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def spy(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def by_cluster(c) -> list[int]:
    """Expert indices grouped by cluster, in name order within one: the heatmap's order."""
    return sorted(range(len(c.names)), key=lambda i: (c.labels[i], i))


def decoded_png(path):
    """The PNG's pixels as [height, width, channels] floats in [0, 1]."""
    from matplotlib.image import imread

    return imread(path, format="png")


@pytest.fixture
def clustering(planted):
    ctx = ClusterContext(planted.names, planted.cards, planted.load)
    return cluster_experts(ctx, ClusterConfig(k=3, seed=4))


def test_json_lists_members_tasks_stats_and_config(planted, clustering, tmp_path, saved_figures):
    doc = clustering_to_json(clustering, planted.cards, source={"library": "lib"})
    write_outputs(doc, tmp_path / "c.json", plot=tmp_path / "sim.png", clustering=clustering)
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["config"]["k"] == 3 and got["config"]["seed"] == 4 and got["method"] == "mbc"
    members = [c["experts"] for c in got["clusters"]]
    assert sorted(sum(members, [])) == sorted(planted.names)
    for c in got["clusters"]:
        fams = {planted.truth[planted.names.index(e)] for e in c["experts"]}
        assert len(fams) == 1  # planted families recovered
        assert c["tasks"] == [planted.cards[e]["tasks"][0] for e in c["experts"]]
    assert got["stats"]["sizes"] == [5, 5, 5]
    assert got["stats"]["mean_intra_cosine"] > got["stats"]["mean_inter_cosine"]
    png = (tmp_path / "sim.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (fig,) = saved_figures  # 15 experts: each named on its row, with its cluster
    ax = fig.axes[0]
    order = by_cluster(clustering)
    want = [f"{clustering.names[i]} (c{clustering.labels[i]})" for i in order]
    assert [t.get_text() for t in ax.get_yticklabels()] == want
    torch.testing.assert_close(
        torch.as_tensor(ax.images[0].get_array()), clustering.similarity.double()[order][:, order]
    )
    img = decoded_png(tmp_path / "sim.png")
    assert img.shape[0] > 300 and img.shape[1] > 300 and img[..., :3].std() > 0.1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    back = load_clusters(tmp_path / "c.json")
    assert back.sizes == (5, 5, 5) and len(back.sha256) == 64


def test_failed_plot_writes_nothing(planted, clustering, tmp_path, monkeypatch):
    import lorashelf.cluster.report as report

    def boom(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_similarity", boom)
    doc = clustering_to_json(clustering, planted.cards, source={})
    with pytest.raises(RuntimeError):
        write_outputs(doc, tmp_path / "c.json", plot=tmp_path / "sim.png", clustering=clustering)
    assert list(tmp_path.iterdir()) == []


def test_many_experts_plot_labels_clusters(make_experts, tmp_path, saved_figures):
    p = make_experts(families=3, per_family=40, d=8)
    c = cluster_experts(ClusterContext(p.names, p.cards, p.load), ClusterConfig(k=3))
    write_outputs(
        clustering_to_json(c, p.cards, source={}),
        tmp_path / "c.json",
        plot=tmp_path / "p.png",
        clustering=c,
    )
    assert (tmp_path / "p.png").stat().st_size > 10_000
    (fig,) = saved_figures
    ax = fig.axes[0]
    # the heatmap is the similarity matrix with the experts grouped by cluster
    order = by_cluster(c)
    torch.testing.assert_close(
        torch.as_tensor(ax.images[0].get_array()), c.similarity.double()[order][:, order]
    )
    # 120 experts are too many to name: the ticks name the clusters, at their centres,
    # and white lines mark where one cluster ends
    sizes = [c.labels.count(k) for k in range(3)]
    starts = [sum(sizes[:k]) for k in range(3)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c0", "c1", "c2"]
    assert list(ax.get_xticks()) == [s + n / 2 - 0.5 for s, n in zip(starts, sizes)]
    edges = sorted({float(line.get_xdata()[0]) for line in ax.lines if line.get_xdata()[0] > 0})
    assert edges == [starts[1] - 0.5, starts[2] - 0.5]
    assert ax.get_title().startswith("mbc: 120 experts, k=3")
    # the saved file is a picture of it, not a blank canvas
    img = decoded_png(tmp_path / "p.png")
    assert img.shape[0] > 300 and img.shape[1] > 300 and img[..., :3].std() > 0.1


@pytest.mark.parametrize(
    "content,match",
    [(None, "no clusters file"), ("{", "not valid JSON"), ('{"format": "x"}', "not a lorashelf")],
)
def test_load_clusters_errors(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LorashelfError, match=match):
        load_clusters(path)


def test_short_names_strip_only_a_whole_shared_prefix():
    from lorashelf.cluster.report import short_names

    assert short_names(["bigbench__a__x", "bigbench__b"]) == (["a__x", "b"], "bigbench__")
    assert short_names(["lib/x1", "lib/x2"]) == (["x1", "x2"], "lib/")
    assert short_names(["expert_1", "expert_2"]) == (["expert_1", "expert_2"], "")  # no "__"
    assert short_names(["same__", "same__x"]) == (["same__", "same__x"], "")  # would empty one
    assert short_names(["only__one"]) == (["only__one"], "")

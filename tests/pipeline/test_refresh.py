"""pipeline.refresh: the schedule, the refresh state machine (fake builder), top-M re-ranking, and RagModel with a
trainable passage encoder (no Ray, no model download: a tiny lookup encoder)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.refresh import (IndexRefresher, ScheduleError, Span, parse_refresh_schedule, refresh_due,
                              refresh_steps, rerank_rows)


def test_schedule_parses_and_fires_on_the_right_steps():
    s = parse_refresh_schedule("0-1000:200, 1000-:1000")
    assert s == [Span(0, 1000, 200), Span(1000, None, 1000)]
    assert refresh_steps(s, 3001) == [200, 400, 600, 800, 1000, 2000, 3000]
    assert not refresh_due(s, 0) and not refresh_due(s, 1001)
    assert refresh_steps(parse_refresh_schedule("10-20:3"), 100) == [10, 13, 16, 19]
    assert parse_refresh_schedule("") == [] and parse_refresh_schedule(None) == []


@pytest.mark.parametrize("text, match", [
    ("0-1000", r"cannot read '0-1000'"),
    ("0-100:20,abc", r"cannot read 'abc'"),
    ("0-100:0", r"'0-100:0': the interval must be >= 1"),
    ("100-100:5", r"'100-100:5': the span ends at or before it starts"),
    ("0-:10,100-200:5", r"'100-200:5' comes after the open-ended span '0-:10'"),
    ("0-100:10,50-200:5", r"'50-200:5' overlaps '0-100:10'"),
])
def test_schedule_errors_name_the_key_and_part(text, match):
    with pytest.raises(ScheduleError, match=r"index.refresh_schedule: .*" + match):
        parse_refresh_schedule(text)


def test_config_validates_refresh_settings():
    ok = load_config(None, ["retriever.train_passage_encoder=true", "index.refresh_schedule=0-1000:200,1000-:1000",
                            "index.rerank_top_m=20"])
    assert ok.index.refresh_schedule == "0-1000:200,1000-:1000" and ok.index.rerank_top_m == 20
    with pytest.raises(ConfigError, match="index.refresh_schedule: set, but retriever.train_passage_encoder"):
        load_config(None, ["index.refresh_schedule=0-:100"])
    with pytest.raises(ConfigError, match="index.refresh_schedule: cannot read '0-100'"):
        load_config(None, ["retriever.train_passage_encoder=true", "index.refresh_schedule=0-100"])
    with pytest.raises(ConfigError, match="index.rerank_top_m: 5 must be 0 .* more than train.k=5"):
        load_config(None, ["retriever.train_passage_encoder=true", "index.rerank_top_m=5"])


class FakeBuilder:
    def __init__(self):
        self.submitted, self.finished, self.fail = [], set(), False

    def submit(self, encoder_dir, step):
        self.submitted.append((encoder_dir, step))
        return len(self.submitted) - 1

    def done(self, handle):
        return handle in self.finished

    def result(self, handle):
        if self.fail:
            raise RuntimeError("build failed: disk full")
        return {"version_dir": f"/idx/v{handle + 2}", "build_seconds": 12.5}


def _save(encoder, d):
    d.mkdir(parents=True)
    (d / "weights.json").write_text(json.dumps(encoder))


def test_refresher_runs_one_build_at_a_time_and_switches_when_done(tmp_path):
    b = FakeBuilder()
    r = IndexRefresher(parse_refresh_schedule("0-:2"), b, tmp_path / "snaps", keep_snapshots=1, save_fn=_save)
    assert r.on_step_boundary(1, {"w": 1}) is None and b.submitted == []
    assert r.on_step_boundary(2, {"w": 2}) is None                     # snapshot + submit, training goes on
    snap, step = b.submitted[0]
    assert step == 2 and json.loads((tmp_path / "snaps" / "passage-encoder-step0000002" / "weights.json")
                                    .read_text()) == {"w": 2} and snap.endswith("step0000002")
    assert r.on_step_boundary(3, {"w": 3}) is None
    assert r.on_step_boundary(4, {"w": 4}) is None and r.skipped == 1 and len(b.submitted) == 1   # still busy
    b.finished.add(0)
    assert r.on_step_boundary(5, {"w": 5}) == "/idx/v2"
    h = r.history[0]
    assert (h["step_started"], h["step_switched"], h["steps_on_stale_index"], h["build_seconds"]) == (2, 5, 3, 12.5)
    assert r.on_step_boundary(6, {"w": 6}) is None and b.submitted[1][1] == 6
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["passage-encoder-step0000006"]  # pruned
    b.fail = True
    b.finished.add(1)
    with pytest.raises(RuntimeError, match="build failed: disk full"):   # a failed refresh is never silent
        r.on_step_boundary(7, {"w": 7})


class LookupEncoder(nn.Module):
    """text 'p<i>' or 'q<i>' -> a learnable vector (a stand-in for a Hugging Face encoder)."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, texts):
        return self.table[[int(t[1:]) for t in texts]]

    @torch.no_grad()
    def encode(self, texts, batch_size=64):
        return self(texts)


def test_rerank_rows_orders_by_current_encoder():
    enc = LookupEncoder([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.9, 0.1]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rows = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    texts = [[f"p{r}" for r in row] for row in rows]
    top, scores = rerank_rows(q, rows, texts, enc, 2)
    assert top.tolist() == [[1, 3], [0, 2]]
    np.testing.assert_allclose(scores, [[1.0, 0.9], [1.0, 0.8]], rtol=1e-6)
    with pytest.raises(ValueError, match="top 5 of 4"):
        rerank_rows(q, rows, texts, enc, 5)


def test_rag_model_uses_fresh_passage_vectors_and_reranks(tmp_path):
    from pipeline.index import load_index, write_index_version
    from pipeline.rag import RagModel

    stale = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)        # what the index was built with
    write_index_version(tmp_path / "idx", stale, ["a", "b", "c"], "flat", texts=["p0", "p1", "p2"])
    index = load_index(tmp_path / "idx")
    passage = LookupEncoder([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])               # the encoder has moved since
    model = RagModel(LookupEncoder([[1.0, 0.0]]), None, index, tau=1.0, passage_encoder=passage)
    q = model.query_encoder(["q0"])
    assert model.search_rows(q, 1).tolist() == [[0]]                          # stale index, no re-rank
    model.rerank_top_m = 3
    assert model.search_rows(q, 1).tolist() == [[2]]                          # re-ranked with the current encoder
    scores = model.score_rows(q, np.array([[0, 2]]))
    assert scores.tolist() == [[0.0, 1.0]]                                    # fresh vectors, not the index's
    scores.sum().backward()
    assert passage.table.grad is not None and passage.table.grad[2].abs().sum() > 0
    model.passage_encoder = None
    assert model.score_rows(q, np.array([[0, 2]])).tolist() == [[1.0, 0.0]]   # without one: the index's vectors


def test_asked_for_more_than_rerank_top_m_the_first_m_rows_are_the_reranked_ones(tmp_path):
    """Evaluation asks for 20 rows (recall@20) while training keeps train.k of the re-ranked top-M: the first rows
    must be the same in both, or what was evaluated is not what trained."""
    from pipeline.index import load_index, write_index_version
    from pipeline.rag import RagModel

    stale = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]], np.float32)
    write_index_version(tmp_path / "idx", stale, ["a", "b", "c", "d"], "flat", texts=["p0", "p1", "p2", "p3"])
    passage = LookupEncoder([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.2, 0.1]])  # current: c > b > a among the top 3
    model = RagModel(LookupEncoder([[1.0, 0.0]]), None, load_index(tmp_path / "idx"), tau=1.0,
                     passage_encoder=passage, rerank_top_m=3)
    q = model.query_encoder(["q0"])
    trained = model.search_rows(q, 2).tolist()                                # what a train.k=2 step sees
    assert trained == [[2, 1]]
    deeper = model.search_rows(q, 4).tolist()                                 # what evaluation reads
    assert deeper[0][:2] == trained[0] and deeper == [[2, 1, 0, 3]]           # the re-ranked 3, then the stale rest

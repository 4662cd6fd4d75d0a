"""jobs.train pieces that need no Ray."""


def test_dev_score_picks_one_metric_or_a_sum():
    from pipeline.recipe import dev_score

    dev = {"em": 0.5, "f1": 0.6, "recall@1": 0.25, "recall@5": None}
    assert dev_score(dev, "f1") == 0.6
    assert dev_score(dev, "em+recall@1") == 0.75
    assert dev_score(dev, "em + recall@5") == 0.5                   # a metric without value counts 0

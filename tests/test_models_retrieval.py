"""HyTRecRetrieval, its losses, full-catalogue evaluation and top-K retrieval, in one process."""

import math
from typing import List

import pytest
import torch
from helpers import NUM_ITEMS, SIDE, make_batch

from torchrec_hytrec.models import item_table
from torchrec_hytrec.models.evaluation import RetrievalEvaluator, RetrievalMetrics, catalogue_ranks
from torchrec_hytrec.models.item_table import item_table_shards
from torchrec_hytrec.models.losses import full_softmax_loss, sampled_softmax_loss
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, HyTRecRetrievalTrain, RetrievalConfig
from torchrec_hytrec.models.serving import retrieve_topk
from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
from torchrec_hytrec.training.evaluation import evaluate_retrieval

DIM = 16


def make_encoder(seed: int = 0) -> HyTRecEncoder:
    torch.manual_seed(seed)
    return HyTRecEncoder(
        HyTRecConfig.hytrec(embedding_dim=DIM, num_heads=2, short_window=4, long_pattern="TA")
    )


def make_retrieval(loss: str = "full", seed: int = 0, **overrides: object) -> HyTRecRetrievalTrain:
    encoder = make_encoder(seed)
    config = RetrievalConfig(loss=loss, **overrides)
    return HyTRecRetrievalTrain(HyTRecRetrieval(config, encoder, num_items=NUM_ITEMS, side_features=SIDE))


def test_sampled_softmax_training_reduces_loss() -> None:
    """(The full softmax is trained in ``test_learns_successor_structure``.)"""
    model = make_retrieval("sampled", num_uniform_negatives=16, num_in_batch_negatives=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = make_batch([12, 7, 1, 20], seed=1, candidates="uniform", num_negatives=16)
    losses: List[float] = []
    for _ in range(20):
        torch.manual_seed(0)  # the same in-batch negatives every step: the loss is comparable
        loss_value, outputs = model(batch)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(float(loss_value))
    assert outputs.query.shape[0] == 11 + 6 + 0 + 19
    assert losses[-1] < 0.5 * losses[0], losses


def test_full_softmax_loss_matches_log_softmax_by_hand() -> None:
    torch.manual_seed(0)
    query, catalogue = torch.randn(6, 4), torch.randn(9, 4)
    positives = torch.tensor([1, 9, 3, 3, 5, 2])
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    loss = full_softmax_loss(
        scores=query @ catalogue.t(), positive_ids=positives, weights=weights, temperature=0.5
    )
    logp = torch.log_softmax(query @ catalogue.t() / 0.5, dim=1)
    nll = -logp[torch.arange(6), positives - 1]
    assert torch.allclose(loss, nll[weights > 0].mean())  # the zero-weight query counts for nothing
    zero = full_softmax_loss(
        scores=query @ catalogue.t(), positive_ids=positives, weights=torch.zeros(6), temperature=0.5
    )
    assert float(zero) == 0.0


def test_sampled_softmax_logq_and_accidental_hits_by_hand() -> None:
    torch.manual_seed(0)
    query = torch.randn(3, 4)
    positive_ids = torch.tensor([4, 7, 4])
    item_table = torch.randn(11, 4)
    uniform_ids = torch.tensor([7, 2])
    loss = sampled_softmax_loss(
        query=query,
        positive_ids=positive_ids,
        positive_emb=item_table[positive_ids],
        uniform_ids=uniform_ids,
        uniform_emb=item_table[uniform_ids],
        weights=torch.ones(3),
        num_items=10,
        num_in_batch=8,
        temperature=1.0,
    )
    # Expected occurrences in the candidate set [4, 7, 4, 7, 2]: 3 * count / 3 + 2 / 10.
    q = {4: 2 + 0.2, 7: 1 + 0.2, 2: 0 + 0.2}
    candidates = [4, 7, 4, 7, 2]
    expected = 0.0
    for row in range(3):
        pos = int(positive_ids[row])
        terms = [float(query[row] @ item_table[pos]) - math.log(q[pos])]
        terms += [float(query[row] @ item_table[c]) - math.log(q[c]) for c in candidates if c != pos]
        expected += -(terms[0] - torch.logsumexp(torch.tensor(terms), 0).item())
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


def test_train_and_eval_are_explicit_modes() -> None:
    """The mode comes from train()/eval(), not from the batch's values; a mismatch is an error."""
    model = make_retrieval()
    train_batch, eval_batch = make_batch([3, 4], seed=2), make_batch([3, 4], seed=2, evaluation=True)
    model.eval()
    with pytest.raises(ValueError, match="one target_item_id per user"):
        model(train_batch)
    _, outputs = model(eval_batch)
    assert outputs.query.shape == (2, DIM) and torch.equal(outputs.positive_ids, eval_batch.targets)
    model.train()
    _, outputs = model(eval_batch)  # an evaluation batch's inputs train like any other history
    assert outputs.query.shape == (2 + 3, DIM)


def test_full_softmax_needs_the_catalogue_in_the_batch() -> None:
    with pytest.raises(ValueError, match="negatives='catalogue'"):
        make_retrieval("full")(make_batch([3, 4], seed=2, candidates="uniform"))
    with pytest.raises(ValueError, match="negatives='uniform'"):
        make_retrieval("sampled")(make_batch([3, 4], seed=2, candidates="none"))


def test_meta_construction_and_injected_tables() -> None:
    from torchrec_hytrec.data.batch import CANDIDATE_KEY, TARGET_KEY
    from torchrec_hytrec.models.embeddings import sequence_embedding_collection

    config = RetrievalConfig()
    meta = HyTRecRetrieval(
        config, make_encoder(), num_items=NUM_ITEMS, side_features=SIDE, device=torch.device("meta")
    )
    assert meta.embedding_collection.embeddings["item"].weight.is_meta
    tables = sequence_embedding_collection(
        num_items=NUM_ITEMS,
        embedding_dim=DIM,
        side_features=SIDE,
        extra_item_features=[TARGET_KEY, CANDIDATE_KEY],
        init_std=0.1,
    )
    injected = HyTRecRetrieval(
        config, make_encoder(), num_items=NUM_ITEMS, side_features=SIDE, embedding_collection=tables
    )
    assert injected.embedding_collection is tables
    wrong = sequence_embedding_collection(
        num_items=NUM_ITEMS,
        embedding_dim=DIM,
        side_features={},
        extra_item_features=[TARGET_KEY],
        init_std=0.1,
    )
    with pytest.raises(ValueError, match="no table for features"):
        HyTRecRetrieval(
            config, make_encoder(), num_items=NUM_ITEMS, side_features=SIDE, embedding_collection=wrong
        )


def test_metrics_by_hand() -> None:
    metrics = RetrievalMetrics()
    metrics.update(ranks=torch.tensor([0, 9, 49, 50]), history_lengths=torch.tensor([5, 150, 2000, 9000]))
    out = metrics.compute()
    assert out["count"] == 4
    assert out["hr@1"] == pytest.approx(0.25)
    assert out["hr@10"] == pytest.approx(0.5)
    assert out["hr@50"] == pytest.approx(0.75)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(11)) / 4)
    assert out["mrr"] == pytest.approx((1 + 1 / 10 + 1 / 50 + 1 / 51) / 4)
    assert out["hr@1/len<100"] == 1.0 and out["hr@10/len100-1k"] == 1.0
    assert out["hr@10/len1k-5k"] == 0.0 and out["hr@50/len>=5k"] == 0.0
    assert out["count/len>=5k"] == 1


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_catalogue_ranks_equal_brute_force(exclude_seen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(item_table, "_BLOCK_ROWS", 7)  # several score blocks per shard
    model = make_retrieval()
    batch = make_batch([5, 9, 2], seed=3, evaluation=True)
    model.eval()
    with torch.no_grad():
        _, out = model(batch)
    aux = {"query": out.query, "target_score": out.positive_scores}
    shards, sharded = item_table_shards(model.model.embedding_collection)
    assert not sharded
    table = shards[0][1]
    offsets = batch.offsets()
    ranks = catalogue_ranks(
        query=aux["query"],
        target_ids=batch.targets,
        target_score=aux["target_score"],
        shards=[(0, table[:17]), (17, table[17:])],  # two blocks: the per-shard path
        seen_ids=batch.item_ids if exclude_seen else None,
        seen_offsets=offsets if exclude_seen else None,
    )
    items = batch.item_ids
    for u in range(3):
        scores = table @ aux["query"][u]
        target = int(batch.targets[u])
        seen = set(items[offsets[u] : offsets[u + 1]].tolist()) if exclude_seen else set()
        others = [i for i in range(1, NUM_ITEMS + 1) if i != target and i not in seen]
        assert int(ranks[u]) == sum(bool(scores[i] > scores[target]) for i in others)

    scores, ids = retrieve_topk(aux["query"], [(0, table[:17]), (17, table[17:])], k=5)
    full = aux["query"] @ table[1:].t()
    want_scores, want_ids = full.topk(5, dim=1)
    assert torch.equal(ids, want_ids + 1)
    torch.testing.assert_close(scores, want_scores)  # matmul blocking may move the last bit


def test_unseen_ranking_removes_the_items_cut_from_an_evaluation_row() -> None:
    model = make_retrieval()
    batch = make_batch([5, 9, 2], seed=3, evaluation=True)
    model.eval()
    with torch.no_grad():
        _, window_only = model(batch)
    table = item_table_shards(model.model.embedding_collection)[0][0][1]
    # Users 0 and 2 saw, before their rows, the three items outside the row that beat the target most.
    offsets = batch.offsets()
    prior = []
    for u in range(3):
        target, row = int(batch.targets[u]), set(batch.item_ids[offsets[u] : offsets[u + 1]].tolist())
        order = torch.argsort(table @ window_only.query[u], descending=True).tolist()
        prior.append([i for i in order if i not in row | {0, target}][:3] if u != 1 else [])
    batch.history_starts = torch.tensor([len(p) for p in prior])
    batch.prior_item_ids = torch.tensor([i for p in prior for i in p], dtype=torch.long)
    with torch.no_grad():
        _, out = model(batch)
    # The model never reads the prior items: same states as without them.
    torch.testing.assert_close(out.query, window_only.query, rtol=0, atol=0)
    ranks = RetrievalEvaluator(model, exclude_seen=True).update(out)
    window_ranks = RetrievalEvaluator(model, exclude_seen=True).update(window_only)
    for u in range(3):
        scores = table @ out.query[u]
        target = int(batch.targets[u])
        seen = set(batch.item_ids[offsets[u] : offsets[u + 1]].tolist()) | set(prior[u])
        others = [i for i in range(1, NUM_ITEMS + 1) if i != target and i not in seen]
        assert int(ranks[u]) == sum(bool(scores[i] > scores[target]) for i in others)
    # Removing the prior items moves exactly the users that have some.
    assert (ranks[[0, 2]] < window_ranks[[0, 2]]).all() and ranks[1] == window_ranks[1]


def test_evaluate_uses_request_time_and_reports_metrics() -> None:
    model = make_retrieval()
    batches = [make_batch([5, 9, 2], seed=4, evaluation=True), make_batch([3, 30], seed=5, evaluation=True)]
    out, detail, users = evaluate_retrieval(
        model, batches, protocols=["all", "unseen"], ks=[10, 50, 500], per_user=True
    )
    assert detail["count"] == 5 and math.isfinite(out["loss"]) and out["hr@10"] == detail["hr@10"]
    # Per-user ranks, in batch order, reproduce the figures; the targets are the batches'.
    assert torch.equal(torch.from_numpy(users["positive_ids"]), torch.cat([b.targets for b in batches]))
    assert users["history_lengths"].tolist() == [5, 9, 2, 3, 30]
    for prefix in ("", "unseen_"):
        ranks = users[prefix + "ranks"]
        assert out[prefix + "hr@50"] == pytest.approx(float((ranks < 50).mean()))
        assert out[prefix + "mrr"] == pytest.approx(float((1.0 / (ranks + 1)).mean()))
    assert (users["unseen_ranks"] <= users["ranks"]).all()
    # The unseen protocol ranks among fewer items: never worse, and the same users.
    assert detail["unseen_count"] == 5 and out["unseen_mrr"] >= out["mrr"] and "unseen_ndcg@500" in out
    evaluator = RetrievalEvaluator(model)
    model.eval()
    with torch.no_grad():
        _, now = model(batches[0])
        late = make_batch([5, 9, 2], seed=4, evaluation=True)
        late.target_timestamps = late.target_timestamps + 400 * 86400
        _, later = model(late)
    assert not torch.allclose(now.query, later.query)  # TADN memory decays with the gap
    evaluator.update(now)
    assert evaluator.compute()["count"] == 3
    padding = now._replace(weights=torch.zeros(3))  # a reader's padding batch: counts for nothing
    evaluator.update(padding)
    assert evaluator.compute()["count"] == 3


def test_learns_successor_structure() -> None:
    """Trained on ``item + 1`` chains with the full softmax, HR@1 on held-out successors is high."""
    model = make_retrieval("full")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(60):
        loss, _ = model(make_batch([10] * 8, seed=100 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    before, _, _ = evaluate_retrieval(
        make_retrieval("full"), [make_batch([6] * 16, seed=7, evaluation=True)], ks=[1]
    )
    after, _, _ = evaluate_retrieval(model, [make_batch([6] * 16, seed=7, evaluation=True)], ks=[1])
    assert after["hr@1"] > 0.5 and before["hr@1"] < 0.2, (before, after)

"""The resumable sampler and loader: windows, seeds, data-parallel splits, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.data import (
    DataError,
    EvalLoader,
    MixtureSampler,
    TokenLoader,
    TokenShards,
    WindowSampler,
    prepare,
)

from .helpers import (
    arange_dataset,
    flat,
    make_loader,
    take,
    window_ids,
)


def test_windows_are_aligned_and_targets_are_shifted(tmp_path):
    url = arange_dataset(tmp_path, 203)  # 50 windows of 4 (+1) tokens; the last 2 tokens spare
    batches = take(make_loader(url), 25)
    for inputs, targets in batches:
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.shape == targets.shape == (2, 4)
        assert torch.equal(targets, inputs + 1)
        assert torch.equal(inputs, inputs[:, :1] + torch.arange(4))
        assert (inputs[:, 0] % 4 == 0).all()
    # One epoch visits every window exactly once.
    assert sorted(flat(window_ids(batches))) == list(range(50))


def test_same_seed_same_batches_and_epochs_differ(tmp_path):
    url = arange_dataset(tmp_path, 201)
    first, second = take(make_loader(url, seed=7), 50), take(make_loader(url, seed=7), 50)
    assert window_ids(first) == window_ids(second)
    epoch0, epoch1 = window_ids(first[:25]), window_ids(first[25:])
    assert epoch0 != epoch1 and sorted(flat(epoch1)) == list(range(50))


def test_different_seeds_differ(tmp_path):
    url = arange_dataset(tmp_path, 201)
    assert window_ids(take(make_loader(url, seed=1), 5)) != window_ids(
        take(make_loader(url, seed=2), 5))


def test_sampler_leaves_the_global_rng_alone(tmp_path):
    url = arange_dataset(tmp_path, 201)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(make_loader(url), 30)
    assert torch.equal(torch.rand(3), expected)


def test_data_parallel_ranks_are_disjoint_and_equal_in_length(tmp_path):
    url = arange_dataset(tmp_path, 4 * 50 + 1)  # 50 windows; 3 ranks x 2 per batch -> 8 batches
    loaders = [make_loader(url, replicas=3, rank=rank) for rank in range(3)]
    assert [len(loader) for loader in loaders] == [8, 8, 8]
    per_rank = [flat(window_ids(take(loader, 8))) for loader in loaders]
    seen = flat(per_rank)
    assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(50))
    # The ranks together read what one rank would read with a batch three times as large.
    single = make_loader(url, batch_size=6)
    for b, ids in enumerate(window_ids(take(single, 8))):
        assert sorted(ids) == sorted(flat(r[2 * b: 2 * b + 2] for r in per_rank))


@pytest.mark.parametrize("saved_after", [0, 3, 8, 11])
def test_state_dict_resumes_exactly_across_epoch_boundaries(tmp_path, saved_after):
    url = arange_dataset(tmp_path, 4 * 17 + 1)  # 17 windows, batches of 2 -> 8 batches per epoch
    reference = take(make_loader(url, seed=3), 30)

    interrupted = make_loader(url, seed=3)
    take(interrupted, saved_after)
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain values only
    resumed = make_loader(url, seed=3)
    resumed.load_state_dict(state)
    following = take(resumed, 30 - saved_after)

    for (inputs, targets), (ref_inputs, ref_targets) in zip(following, reference[saved_after:],
                                                            strict=True):
        assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)


def test_state_resumes_on_another_data_parallel_split(tmp_path):
    url = arange_dataset(tmp_path, 4 * 40 + 1)
    two_ranks = [make_loader(url, batch_size=2, replicas=2, rank=rank) for rank in range(2)]
    for loader in two_ranks:
        take(loader, 3)
    state = two_ranks[0].state_dict()
    single = make_loader(url, batch_size=4)
    single.load_state_dict(state)
    after_single = window_ids(take(single, 4))
    after_pair = [window_ids(take(loader, 4)) for loader in two_ranks]
    for b in range(4):
        assert sorted(after_single[b]) == sorted(after_pair[0][b] + after_pair[1][b])


def test_state_from_another_global_batch_is_refused(tmp_path):
    url = arange_dataset(tmp_path, 201)
    with pytest.raises(DataError, match="global_batch=2 but this run has 4"):
        make_loader(url, batch_size=4).load_state_dict(make_loader(url).state_dict())


def test_worker_processes_yield_the_same_batches(tmp_path):
    url = arange_dataset(tmp_path, 4 * 17 + 1)
    in_process = take(make_loader(url), 12)
    with_workers = make_loader(url, workers=1)
    batches = take(with_workers, 12)
    assert window_ids(batches) == window_ids(in_process)
    assert with_workers.state_dict()["batches_consumed"] == 4 and with_workers.epoch == 1


def test_too_little_data_for_one_batch(tmp_path):
    url = arange_dataset(tmp_path, 9)
    with pytest.raises(DataError, match="no global batch"):
        make_loader(url, batch_size=2, replicas=2)


# ---- mixtures ---------------------------------------------------------------------------------

def mixture(tmp_path, sizes=(40, 10), weights=(3.0, 1.0), *, seed=0, batch_size=4, replicas=1,
            rank=0, seq_len=4):
    """A mixture of arange datasets offset by 10_000 per source: a token says its source and
    position (source = token // 10_000, window = token % 10_000 // seq_len)."""
    streams = []
    for i, windows in enumerate(sizes):
        root = tmp_path / f"s{i}"
        if not (root / "ds").exists():
            root.mkdir(exist_ok=True)
            np.save(root / "ids.npy", 10_000 * i + np.arange(windows * seq_len + 1))
            prepare([str(root / "ids.npy")], str(root / "ds"), tokenizer="ids")
        streams.append(TokenShards.open(str(root / "ds")))
    sampler = MixtureSampler(num_windows=tuple(sizes), weights=tuple(weights),
                             batch_size=batch_size, seed=seed, num_replicas=replicas, rank=rank)
    return TokenLoader(streams, sampler, seq_len, names=[f"s{i}" for i in range(len(sizes))])


def draws(batches, seq_len=4) -> list[list[tuple[int, int]]]:
    """(source, window) of each row of each batch."""
    return [[(int(t) // 10_000, int(t) % 10_000 // seq_len) for t in inputs[:, 0]]
            for inputs, _ in batches]


def test_mixture_draws_sources_by_weight_and_cycles_each_source(tmp_path):
    loader = mixture(tmp_path, sizes=(40, 10), weights=(3.0, 1.0))
    got = flat(draws(take(loader, 500)))  # 2000 samples: 12.5 epochs of the whole mixture
    share = sum(source == 1 for source, _ in got) / len(got)
    assert abs(share - 0.25) < 0.03  # weight 1 of 4; a binomial s.d. here is about 0.01
    for source, size in ((0, 40), (1, 10)):
        seen = [window for s, window in got if s == source]
        # each source is read in passes: every window once per pass, in a new order each pass
        passes = [seen[i:i + size] for i in range(0, len(seen) - size + 1, size)]
        assert all(sorted(p) == list(range(size)) for p in passes) and len(passes) > 10
        assert passes[0] != passes[1]
    assert loader.source_windows() == {"s0": len(got) - round(share * len(got)),
                                       "s1": round(share * len(got))}


def test_mixture_is_deterministic_by_seed(tmp_path):
    first = draws(take(mixture(tmp_path, seed=5), 30))
    assert first == draws(take(mixture(tmp_path, seed=5), 30))
    assert first != draws(take(mixture(tmp_path, seed=6), 30))


def test_mixture_ranks_split_the_global_batch(tmp_path):
    single = draws(take(mixture(tmp_path, batch_size=6), 20))
    ranks = [draws(take(mixture(tmp_path, batch_size=2, replicas=3, rank=r), 20))
             for r in range(3)]
    for b in range(20):
        assert sorted(single[b]) == sorted(flat(r[b] for r in ranks))


@pytest.mark.parametrize("saved_after", [7, 12, 25])  # 12 batches per epoch: mid, end, later
def test_mixture_state_resumes_exactly_with_every_sources_position(tmp_path, saved_after):
    reference = draws(take(mixture(tmp_path), 40))
    interrupted = mixture(tmp_path)
    take(interrupted, saved_after)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert [s["name"] for s in state["sources"]] == ["s0", "s1"]
    assert sum(state["drawn"]) == 4 * saved_after
    resumed = mixture(tmp_path)
    resumed.load_state_dict(state)
    assert draws(take(resumed, 40 - saved_after)) == reference[saved_after:]


def test_mixture_state_of_other_sources_is_refused(tmp_path):
    state = mixture(tmp_path, weights=(3.0, 1.0)).state_dict()
    with pytest.raises(DataError, match="the saved data position has sources="):
        mixture(tmp_path, weights=(1.0, 1.0)).load_state_dict(state)


# ---- evaluation batches -------------------------------------------------------------------------

def test_eval_loader_reads_the_same_batches_every_time_split_over_ranks(tmp_path):
    streams = mixture(tmp_path, sizes=(5, 6)).streams  # 11 windows; G = 2 x 2 -> 2 batches
    ranks = [EvalLoader(streams, 4, batch_size=2, num_replicas=2, rank=r) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    first = [draws(list(r)) for r in ranks]
    assert first == [draws(list(r)) for r in ranks]  # again: the same, in the same order
    windows = flat(flat(first))
    assert len(set(windows)) == len(windows) == 8
    assert sorted(windows) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]
    assert len(EvalLoader(streams, 4, batch_size=2, max_batches=1)) == 1


# ---- document boundaries ------------------------------------------------------------------------

def test_batches_say_which_document_each_token_is_in(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([5, 6, 9, 7, 9, 8, 8, 9]))  # 9 ends each document
    prepare([str(tmp_path / "ids.npy")], str(tmp_path / "ds"), tokenizer="ids")
    shards = TokenShards.open(str(tmp_path / "ds"))
    loader = TokenLoader(shards, WindowSampler(num_windows=1, batch_size=1, seed=0), 7, eod=9)
    inputs, targets, documents = next(iter(loader))
    assert inputs.tolist() == [[5, 6, 9, 7, 9, 8, 8]]
    assert targets.tolist() == [[6, 9, 7, 9, 8, 8, 9]]
    # an end token belongs to the document it ends; the token after it starts the next
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 2]] and documents.dtype == torch.int32
    (evaluated,) = list(EvalLoader([shards], 7, batch_size=1, eod=9))
    assert evaluated[2].tolist() == documents.tolist()


def test_the_data_module_adds_documents_only_where_the_data_has_ends(tmp_path):
    from trainer.config import DataConfig
    from trainer.data import TokenDataModule

    from .helpers import arange_dataset, write_texts

    write_texts(tmp_path / "text")
    prepare([str(tmp_path / "text")], str(tmp_path / "bytes"))  # ends each file with 0xFF
    cfg = DataConfig(path=str(tmp_path / "bytes"), seq_len=4, micro_batch_size=2)
    assert len(next(iter(TokenDataModule(cfg, 0, document_mask=True).train_dataloader()))) == 3
    assert len(next(iter(TokenDataModule(cfg, 0).train_dataloader()))) == 2
    no_ends = DataConfig(path=arange_dataset(tmp_path, 41), seq_len=4, micro_batch_size=2)
    module = TokenDataModule(no_ends, 0, document_mask=True)
    assert module.eod is None and len(next(iter(module.train_dataloader()))) == 2

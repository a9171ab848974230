"""chatsft.training.notices: what other ranks said, as lines for the main process."""

from chatsft.training.notices import _ranks, other_ranks_notices


def test_other_ranks_notices_single_process_and_rank_lists():
    assert other_ranks_notices(["anything"]) == []  # no process group: nothing to gather
    assert _ranks([1]) == "rank 1"
    assert _ranks(list(range(1, 8))) == "ranks 1-7"
    assert _ranks([1, 4, 5, 6, 9]) == "ranks 1, 4-6, 9"

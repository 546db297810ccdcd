from steps import step_seed


def test_no_two_ranks_or_steps_share_a_seed():
    """8 ranks x 25,000 steps: every (rank, step) draws its own batch and masks. A seed made as
    seed·a + rank·b + step (b = 10,007 before) gives rank 1 at step 0 what rank 0 gets at step b."""
    seeds = {step_seed(0, rank, step) for rank in range(8) for step in range(25_000)}
    assert len(seeds) == 8 * 25_000
    assert step_seed(1, 0, 0) not in seeds and all(0 <= s < 2 ** 63 for s in list(seeds)[:1000])

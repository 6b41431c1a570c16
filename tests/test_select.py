"""Selection: only correct candidates win, finalists are re-timed and the re-timing decides,
ties break the same way every time."""

from __future__ import annotations

import random

from tuner.select import BASELINE_MARGIN, GroupKey, by_shape, finalists, groups_without_winner, select
from workers.records import Candidate, Config, DType, Level, Measurement, MoEShape, Status

SHAPE = MoEShape(E=8, N=7168, K=4096, topk=2, dtype=DType.BF16)


def configs(n: int, rng: random.Random) -> list[Config]:
    pool = {Config(m, bn, bk, g, w, s) for m in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (64, 128)
            for g in (1, 16) for w in (4, 8) for s in (2, 3)}
    return rng.sample(sorted(pool), n)


def measured(config: Config, M: int, latency: float | None, status: Status = Status.OK) -> Measurement:
    return Measurement(Candidate(SHAPE, M, config), status, latency_us=latency)


def screen(config: Config, M: int, latency: float) -> Measurement:
    return Measurement(Candidate(SHAPE, M, config, level=Level.SCREEN), Status.OK, latency_us=latency)


def no_retime(groups):
    return [None] * len(groups)


def test_wrong_or_failed_candidates_never_win(rng):
    cs = configs(6, rng)
    fast_but_wrong = measured(cs[0], 16, 1.0, Status.WRONG_RESULT)
    crashed = measured(cs[1], 16, None, Status.CRASHED)
    ok = [measured(c, 16, rng.uniform(10, 20)) for c in cs[2:]]
    chosen = select([fast_but_wrong, crashed, *ok], no_retime)
    winner = chosen[GroupKey.of(ok[0].candidate)]
    assert winner.candidate == min(ok, key=lambda m: m.latency_us).candidate
    assert not winner.retimed


def test_finalists_are_the_fastest_few_per_batch_size(rng):
    cs = configs(10, rng)
    ms = [measured(c, M, rng.uniform(1, 100)) for M in (1, 64) for c in cs]
    tops = finalists(ms, count=3)
    assert sorted(k.M for k in tops) == [1, 64]
    for key, top in tops.items():
        group = sorted((m for m in ms if m.candidate.M == key.M), key=lambda m: m.latency_us)
        assert [m.candidate for m in top] == [m.candidate for m in group[:3]]


def test_finalists_and_winner_come_from_full_timings_when_screens_look_faster(rng):
    """Screens are shorter and noisier than full timings, so they can rank differently and read
    lower; where a group has full timings, those alone decide."""
    cs = configs(8, rng)
    full_us = {c: rng.uniform(50, 100) for c in cs[:5]}
    # every screen reads faster than any full timing, in the reverse order of the full timings
    by_full = sorted(full_us, key=full_us.get)
    screens = [screen(c, 16, 10.0 + i) for i, c in enumerate(reversed(by_full))]
    screens += [screen(c, 16, rng.uniform(1, 5)) for c in cs[5:]]  # screened, never promoted: fastest screens
    fulls = [measured(c, 16, us) for c, us in full_us.items()]
    measurements = screens + fulls
    rng.shuffle(measurements)
    key = GroupKey.of(fulls[0].candidate)
    top = finalists(measurements, count=3)[key]
    assert [m.candidate.config for m in top] == by_full[:3]
    assert all(m.candidate.level is Level.FULL for m in top)
    unretimed = select(measurements, no_retime, count=3)[key]
    assert unretimed.candidate.config == by_full[0] and unretimed.latency_us == full_us[by_full[0]]
    assert unretimed.candidate.level is Level.FULL
    retimed = select(measurements, lambda groups: [[3.0, 2.0, 1.0] for _ in groups], count=3)[key]
    assert retimed.candidate.config == by_full[2] and retimed.search_latency_us == full_us[by_full[2]]


def test_a_group_without_full_timings_falls_back_to_its_screens(rng):
    cs = configs(4, rng)
    screens = [screen(c, 8, rng.uniform(1, 50)) for c in cs]
    other_group = [measured(c, 64, rng.uniform(100, 200)) for c in cs]  # full timings at another M only
    chosen = select(screens + other_group, no_retime, count=3)
    best = min(screens, key=lambda m: m.latency_us)
    assert chosen[GroupKey.of(best.candidate)].candidate == best.candidate


def test_retiming_decides_among_finalists(rng):
    cs = configs(5, rng)
    ms = [measured(c, 32, 10.0 + i) for i, c in enumerate(cs)]  # search order: cs[0] fastest
    calls = []

    def retime(groups):
        calls.append(groups)
        return [[30.0, 20.0, 25.0] for _ in groups]  # on one GPU, back to back, the second is faster

    chosen = select(ms, retime, count=3)
    assert calls == [[[m.candidate for m in ms[:3]]]]
    winner = chosen[GroupKey.of(ms[0].candidate)]
    assert winner.candidate == ms[1].candidate and winner.retimed
    assert winner.latency_us == 20.0 and winner.search_latency_us == 11.0


def test_a_pinned_baseline_is_retimed_with_the_finalists_and_reported(rng):
    cs = configs(6, rng)
    ms = [measured(c, 64, 10.0 + i) for i, c in enumerate(cs)]  # cs[5], the baseline, ranks last
    key = GroupKey.of(ms[0].candidate)
    calls = []

    def retime(groups):
        calls.append(groups)
        return [[12.0, 11.0, 13.0, 10.5] for _ in groups]  # back to back, the baseline is fastest

    chosen = select(ms, retime, count=3, pinned={key: {cs[5]}})
    assert calls == [[[m.candidate for m in (*ms[:3], ms[5])]]]
    winner = chosen[key]
    assert winner.candidate.config == cs[5] and winner.latency_us == winner.baseline_us == 10.5
    # Without a re-timing the search's numbers decide, and the baseline's is still reported.
    unretimed = select(ms, no_retime, count=3, pinned={key: {cs[5], cs[0]}})[key]
    assert unretimed.candidate.config == cs[0] and unretimed.baseline_us == 10.0
    assert select(ms, no_retime, count=3)[key].baseline_us is None


def test_a_baseline_within_the_margin_of_the_retimed_winner_keeps_its_place(rng):
    cs = configs(4, rng)
    ms = [measured(c, 4096, 100.0 + i) for i, c in enumerate(cs)]  # cs[3], the baseline, ranks last
    key = GroupKey.of(ms[0].candidate)

    def retimed(baseline_us):
        return lambda groups: [[100.0, 101.0, 102.0, baseline_us] for _ in groups]

    inside = select(ms, retimed(100.0 * (1 + BASELINE_MARGIN) - 0.01), count=3, pinned={key: {cs[3]}})[key]
    assert inside.candidate.config == cs[3] and inside.latency_us == inside.baseline_us and inside.kept_baseline
    beyond = select(ms, retimed(100.0 * (1 + BASELINE_MARGIN) + 0.5), count=3, pinned={key: {cs[3]}})[key]
    assert beyond.candidate.config == cs[0] and beyond.latency_us == 100.0 and not beyond.kept_baseline
    # The search's own numbers (no re-timing: taken minutes apart) never move the choice to the baseline.
    assert select(ms, no_retime, count=3, pinned={key: {cs[3]}})[key].candidate.config == cs[0]


def test_failed_retiming_falls_back_to_search_numbers(rng):
    ms = [measured(c, 8, rng.uniform(1, 50)) for c in configs(4, rng)]
    chosen = select(ms, no_retime)
    assert chosen[GroupKey.of(ms[0].candidate)].candidate == min(ms, key=lambda m: m.latency_us).candidate


def test_ties_break_by_config_whatever_the_input_order(rng):
    cs = configs(4, rng)
    ms = [measured(c, 4, 50.0) for c in cs]
    picks = set()
    for _ in range(5):
        rng.shuffle(ms)
        picks.add(select(ms, lambda groups: [[7.0] * len(g) for g in groups])[GroupKey.of(ms[0].candidate)].candidate.config)
    assert picks == {min(cs)}


def test_single_correct_candidate_needs_no_retiming(rng):
    c = configs(1, rng)[0]
    asked = []
    chosen = select([measured(c, 2, 5.0)], lambda groups: asked.append(groups) or [])
    assert asked == [[]] and chosen[GroupKey.of(Candidate(SHAPE, 2, c))].latency_us == 5.0


def test_groups_without_winner_and_per_file_regrouping(rng):
    cs = configs(3, rng)
    ms = [measured(cs[0], 1, None, Status.COMPILE_ERROR), measured(cs[1], 1, None, Status.TIMEOUT),
          measured(cs[2], 4, 9.0)]
    assert [k.M for k in groups_without_winner(ms)] == [1]
    files = by_shape(select(ms, no_retime))
    assert list(files) == [(SHAPE, "uniform", ms[2].candidate.gemm)]
    assert list(files.values())[0][4].candidate.config == cs[2]

"""The MCKP solvers against independent oracles: brute force, the byte DP, and each other."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.solve import METHODS, CvxpyMCKP, MCKPResult, solve_mckp
from mintbuild.solve.local import repair
from mintbuild.solve.problem import Instance

from .mckp_instances import synthetic_profile

INF = math.inf
#: (method, options) pairs that must all reach the optimum.
EXACT_SOLVERS = [
    ("exact", {}),
    ("exact", {"core_solver": "milp"}),
    ("exact", {"max_states": 1}),  # the state search gives up at once: HiGHS must finish the job
    ("dp", {}),
    ("cvxpy", {"solver": "HIGHS"}),
    ("cvxpy", {"solver": "SCIPY"}),
    ("cvxpy", {"solver": "HIGHS", "prune_dominated": False}),
]


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


# -- oracles ------------------------------------------------------------------------------------------------


def brute_force(sizes: np.ndarray, costs: np.ndarray, budget: int) -> float | None:
    """Optimal objective by enumerating every allocation (None when nothing fits)."""
    per_row = [
        [j for j in range(costs.shape[1]) if math.isfinite(costs[i, j])] for i in range(costs.shape[0])
    ]
    best = None
    for combo in itertools.product(*per_row):
        nbytes = sum(int(sizes[i, j]) for i, j in enumerate(combo))
        if nbytes <= budget:
            cost = math.fsum(costs[i, j] for i, j in enumerate(combo))
            best = cost if best is None else min(best, cost)
    return best


def published_greedy(sizes: np.ndarray, costs: np.ndarray, budget: int) -> list[int]:
    """The published one-pass greedy, written plainly from its description."""
    n, k = sizes.shape
    start = []
    for i in range(n):
        avail = [j for j in range(k) if math.isfinite(costs[i, j])]
        start.append(min(avail, key=lambda j, i=i: (sizes[i, j], costs[i, j], j)))
    upgrades = []
    for i in range(n):
        s0, c0 = int(sizes[i, start[i]]), float(costs[i, start[i]])
        for j in range(k):
            extra, saved = int(sizes[i, j]) - s0, c0 - float(costs[i, j])
            if math.isfinite(costs[i, j]) and extra > 0 and saved > 0:
                upgrades.append((saved / extra, i, j))
    upgrades.sort(key=lambda u: -u[0])  # sorted() is stable: ties stay in (row, option) order
    choice = list(start)
    remaining = budget - sum(int(sizes[i, start[i]]) for i in range(n))
    for _, i, j in upgrades:
        extra = int(sizes[i, j]) - int(sizes[i, choice[i]])
        if costs[i, j] < costs[i, choice[i]] and extra <= remaining:
            remaining -= extra
            choice[i] = j
    return choice


def check_result(res: MCKPResult, sizes: np.ndarray, costs: np.ndarray, budget: int) -> None:
    """Everything a result claims, recomputed from the arrays."""
    rows = np.arange(sizes.shape[0])
    assert res.choice.dtype == np.int64 and res.choice.shape == (sizes.shape[0],)
    assert np.all(np.isfinite(costs[rows, res.choice])), "chose an unavailable option"
    assert res.bytes == sum(int(s) for s in sizes[rows, res.choice])
    assert res.bytes <= budget == res.budget
    assert res.objective == math.fsum(costs[rows, res.choice].tolist())
    assert res.bound <= res.objective
    assert close(res.gap, res.objective - res.bound, 1e-12)
    assert res.optimal == (res.gap <= max(1e-9 * abs(res.objective), 1e-12))


def random_small(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Up to 6 rows x 4 options with unavailable options, repeated sizes and tied costs, and a tight budget."""
    n, k = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    sizes = rng.integers(0, 6, size=(n, k)) * int(rng.choice([1, 7, 1000]))
    costs = rng.integers(0, 5, size=(n, k)).astype(float) * float(rng.choice([1.0, 0.1, 1e-6]))
    if rng.random() < 0.5:
        costs += rng.random((n, k)) * 1e-3
    off = rng.random((n, k)) < 0.3
    off[np.arange(n), rng.integers(0, k, size=n)] = False
    costs[off] = INF
    inst = Instance(sizes, costs)
    budget = int(rng.integers(inst.min_bytes, inst.cheapest_bytes + 1))
    return sizes, costs, budget


def realistic(n_rows: int, seed: int, bits: float = 4.5) -> tuple[np.ndarray, np.ndarray, int]:
    prof = synthetic_profile(n_rows, seed=seed, small=True)
    return prof.sizes, prof.costs, prof.budget(bits)


# -- brute force ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_every_method_matches_brute_force(seed: int) -> None:
    sizes, costs, budget = random_small(np.random.default_rng(seed))
    best = brute_force(sizes, costs, budget)
    assert best is not None
    for method, opts in EXACT_SOLVERS:
        res = solve_mckp(sizes, costs, budget, method=method, **opts)
        check_result(res, sizes, costs, budget)
        assert close(res.objective, best), (method, opts, res.objective, best)
        assert res.bound <= best + 1e-9 * max(1.0, abs(best)), (method, opts)
        assert res.optimal, (method, opts, res.info)
    res = solve_mckp(sizes, costs, budget, method="greedy")
    check_result(res, sizes, costs, budget)
    assert res.objective >= best - 1e-12
    assert res.bound <= best + 1e-9 * max(1.0, abs(best))


def test_greedy_is_the_published_greedy() -> None:
    for seed in range(30):
        sizes, costs, budget = random_small(np.random.default_rng(100 + seed))
        res = solve_mckp(sizes, costs, budget, method="greedy")
        np.testing.assert_array_equal(res.choice, published_greedy(sizes, costs, budget))
    sizes, costs, budget = realistic(300, seed=3)
    res = solve_mckp(sizes, costs, budget, method="greedy")
    np.testing.assert_array_equal(res.choice, published_greedy(sizes, costs, budget))


def test_greedy_ties_go_to_the_earlier_row() -> None:
    # Two identical rows and room for one upgrade: the stable sort upgrades row 0.
    sizes = np.array([[10, 20], [10, 20], [10, 30]])
    costs = np.array([[2.0, 1.0], [2.0, 1.0], [2.0, 0.0]])
    res = solve_mckp(sizes, costs, 30 + 10, method="greedy")
    np.testing.assert_array_equal(res.choice, [1, 0, 0])


def test_greedy_is_not_optimal_and_says_so() -> None:
    sizes, costs, budget = realistic(300, seed=0)
    greedy = solve_mckp(sizes, costs, budget, method="greedy")
    exact = solve_mckp(sizes, costs, budget)
    assert greedy.objective > exact.objective * 1.01
    assert not greedy.optimal and greedy.rel_gap > 0.01
    assert greedy.bound <= exact.objective


def lp_relaxation(sizes: np.ndarray, costs: np.ndarray, budget: int) -> float:
    """The LP relaxation's optimum from a general LP solver (HiGHS through scipy.optimize.linprog)."""
    from scipy.optimize import linprog

    rows, opts = np.nonzero(np.isfinite(costs))
    onehot = np.zeros((sizes.shape[0], rows.size))
    onehot[rows, np.arange(rows.size)] = 1.0
    shift = sizes.min(where=np.isfinite(costs), initial=np.iinfo(np.int64).max, axis=1)
    inc = (sizes[rows, opts] - shift[rows]).astype(float)
    res = linprog(
        costs[rows, opts],
        A_ub=inc[None, :],
        b_ub=[float(budget - shift.sum())],
        A_eq=onehot,
        b_eq=np.ones(sizes.shape[0]),
        bounds=(0, 1),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    assert res.status == 0
    return float(res.fun)


@pytest.mark.parametrize("seed", range(6))
def test_lp_bound_is_the_lp_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes, costs, budget = realistic(int(rng.integers(20, 300)), seed, float(rng.uniform(3.9, 7.0)))
    want = lp_relaxation(sizes, costs, budget)
    for method in ("exact", "greedy"):
        got = solve_mckp(sizes, costs, budget, method=method).info["lp_bound"]
        assert abs(got - want) <= 1e-9 * want, (method, got, want)


def test_lower_hull_matches_a_naive_hull() -> None:
    from mintbuild.solve.hull import lower_hull

    sizes, costs, _ = realistic(300, seed=8)
    inst = Instance(sizes, costs)
    hull, depth = lower_hull(inst)
    for i in range(inst.n_rows):
        s = inst.par_size[i, : inst.par_count[i]].astype(float)
        c = inst.par_cost[i, : inst.par_count[i]]
        # A vertex lies strictly below every chord between a point on its left and one on its right.
        naive = [
            j
            for j in range(s.size)
            if all(
                (c[j] - c[a]) * (s[b] - s[a]) < (c[b] - c[a]) * (s[j] - s[a])
                for a in range(j)
                for b in range(j + 1, s.size)
            )
        ]
        assert hull[i, : depth[i]].tolist() == naive


# -- realistic instances: the exact solvers agree -------------------------------------------------------


@pytest.mark.parametrize(("n_rows", "seed", "bits"), [(200, 1, 4.5), (300, 2, 3.9), (400, 3, 5.5)])
def test_exact_solvers_agree_on_realistic_profiles(n_rows: int, seed: int, bits: float) -> None:
    sizes, costs, budget = realistic(n_rows, seed, bits)
    oracle = solve_mckp(sizes, costs, budget, method="dp")
    check_result(oracle, sizes, costs, budget)
    assert oracle.optimal
    for method, opts in EXACT_SOLVERS:
        if method == "dp":
            continue
        res = solve_mckp(sizes, costs, budget, method=method, **opts)
        check_result(res, sizes, costs, budget)
        assert res.optimal and res.rel_gap <= 1e-9, (method, opts, res.rel_gap)
        assert close(res.objective, oracle.objective), (method, opts, res.objective, oracle.objective)
        assert res.bound <= oracle.objective + 1e-9 * oracle.objective


def test_exact_on_hard_correlated_knapsacks() -> None:
    """Cost almost exactly linear in size: the LP is nearly tight everywhere and the core is large."""
    rng = np.random.default_rng(7)
    for _ in range(5):
        n, k = 40, 4
        sizes = rng.integers(100, 1000, size=(n, k))
        costs = 2000.0 - sizes + rng.random((n, k)) * 3
        inst = Instance(sizes, costs)
        budget = (inst.min_bytes + inst.cheapest_bytes) // 2
        oracle = solve_mckp(sizes, costs, budget, method="dp")
        res = solve_mckp(sizes, costs, budget)
        check_result(res, sizes, costs, budget)
        assert res.optimal and close(res.objective, oracle.objective)


def test_cvxpy_model_is_reused_across_a_budget_sweep() -> None:
    sizes, costs, _ = realistic(200, seed=5)
    model = CvxpyMCKP(sizes, costs)
    prof = synthetic_profile(200, seed=5, small=True)
    for bits in (3.9, 4.2, 4.5, 6.0):
        budget = prof.budget(bits)
        res = model.solve(budget)
        check_result(res, sizes, costs, budget)
        assert close(res.objective, solve_mckp(sizes, costs, budget).objective)
    assert model._problem is not None and model._problem._cache.param_prog is not None


# -- budget never exceeded (property) -------------------------------------------------------------------


@st.composite
def instances(draw: st.DrawFn, max_rows: int = 8, max_options: int = 5) -> tuple[np.ndarray, np.ndarray, int]:
    n = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_options))
    scale = draw(st.sampled_from([1, 3, 4096, 10**9]))
    sizes = np.array(draw(st.lists(st.integers(0, 40), min_size=n * k, max_size=n * k)), dtype=np.int64)
    sizes = sizes.reshape(n, k) * scale + np.array(
        draw(st.lists(st.integers(0, 3), min_size=n * k, max_size=n * k))
    ).reshape(n, k)
    cost_values = st.one_of(
        st.sampled_from([0.0, 1.0, 2.0, INF]), st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False)
    )
    costs = np.array(draw(st.lists(cost_values, min_size=n * k, max_size=n * k))).reshape(n, k)
    keep = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    costs[np.arange(n), keep] = np.where(
        np.isfinite(costs[np.arange(n), keep]), costs[np.arange(n), keep], 5.0
    )
    inst = Instance(sizes, costs)
    frac = draw(st.floats(0.0, 1.2))
    budget = inst.min_bytes + int(frac * (inst.cheapest_bytes - inst.min_bytes))
    return sizes, costs, budget


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_budget_never_exceeded_and_exact_is_optimal(inst: tuple[np.ndarray, np.ndarray, int]) -> None:
    sizes, costs, budget = inst
    best = brute_force(sizes, costs, budget) if sizes.shape[0] <= 6 and sizes.shape[1] <= 4 else None
    for method in ("exact", "greedy"):
        res = solve_mckp(sizes, costs, budget, method=method)
        check_result(res, sizes, costs, budget)
        if best is not None:
            assert res.bound <= best + 1e-9 * max(1.0, best)
            if method == "exact":
                assert close(res.objective, best)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_rows=6, max_options=4))
def test_budget_never_exceeded_cvxpy_and_dp(inst: tuple[np.ndarray, np.ndarray, int]) -> None:
    sizes, costs, budget = inst
    best = brute_force(sizes, costs, budget)
    res = solve_mckp(sizes, costs, budget, method="cvxpy")
    check_result(res, sizes, costs, budget)
    assert close(res.objective, best)
    try:
        res = solve_mckp(sizes, costs, budget, method="dp", max_table_bytes=2**27)
    except MintError as err:  # sizes ~1e9 with a GCD of 1: the dp must refuse, not allocate
        assert "dp table would need" in str(err)
    else:
        check_result(res, sizes, costs, budget)
        assert close(res.objective, best)


def test_repair_gets_under_budget_by_moving_rows_down() -> None:
    sizes, costs, budget = realistic(300, seed=4)
    inst = Instance(sizes, costs)
    over = inst.cheapest_pos.copy()  # everything at its cheapest: far over a 4.5-bit budget
    assert inst.bytes_of(over) > budget
    fixed, moves = repair(inst, over, budget)
    assert inst.bytes_of(fixed) <= budget and moves > 0
    assert np.all(inst.par_size[inst.rows, fixed] <= inst.par_size[inst.rows, over])


# -- edges: infeasible, unconstrained, limits, bad input ------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_infeasible_budget_names_the_floor(method: str) -> None:
    sizes = np.array([[10, 20, 40], [300, 500, 900], [5, 6, 7], [1, 1, 1]])
    costs = np.array([[INF, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    min_bytes = 20 + 300 + 5 + 1
    with pytest.raises(InfeasibleBudget) as err:
        solve_mckp(sizes, costs, min_bytes - 1, method=method)
    assert err.value.min_bytes == min_bytes
    assert err.value.floor_rows[:2] == [1, 0]
    assert str(min_bytes) in str(err.value) and str(min_bytes - 1) in str(err.value)
    assert "\n" not in str(err.value)
    res = solve_mckp(sizes, costs, min_bytes, method=method)  # exactly the floor is fine
    assert res.bytes == min_bytes


def test_infeasible_is_reported_before_any_work() -> None:
    """The budget check comes before the dp memory check (and before building any model)."""
    sizes, costs, _ = realistic(300, seed=1)
    with pytest.raises(InfeasibleBudget):
        solve_mckp(sizes, costs, 1000, method="dp", max_table_bytes=1)


@pytest.mark.parametrize("method", METHODS)
def test_huge_budget_returns_each_rows_cheapest_option(method: str) -> None:
    sizes = np.array([[10, 20, 30, 40], [4, 8, 8, 9], [7, 7, 7, 7]])
    costs = np.array([[3.0, 1.0, 1.0, INF], [2.0, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    # Cheapest, then smallest, then lowest index: option 1, 1, 0.
    for budget in (10**30, 1e11, 20 + 8 + 7):
        res = solve_mckp(sizes, costs, budget, method=method)
        np.testing.assert_array_equal(res.choice, [1, 1, 0])
        assert res.optimal and res.bound == res.objective == 2.5


@pytest.mark.parametrize("method", ["exact", "dp", "cvxpy"])
def test_ties_prefer_smaller_size_then_lower_index(method: str) -> None:
    # Row 0: options 1 and 2 cost the same, option 2 is smaller; row 1: options 0 and 2 are identical.
    sizes = np.array([[1, 50, 40, 100], [30, 1, 30, 2]])
    costs = np.array([[9.0, 1.0, 1.0, 0.0], [0.5, 3.0, 0.5, 2.0]])
    res = solve_mckp(sizes, costs, 40 + 30, method=method)
    np.testing.assert_array_equal(res.choice, [2, 0])


def test_dp_refuses_a_table_over_its_memory_limit() -> None:
    sizes, costs, budget = realistic(300, seed=1)
    with pytest.raises(
        MintError, match=r"dp table would need .* GiB \(300 rows x \d+ capacity cells.*use method exact"
    ):
        solve_mckp(sizes, costs, budget, method="dp", max_table_bytes=100_000)
    prof = synthetic_profile(2000, seed=1)  # real shapes: tens of GiB
    with pytest.raises(MintError, match=r"limit is 2\.00 GiB"):
        solve_mckp(prof.sizes, prof.costs, prof.budget(4.5), method="dp")


@pytest.mark.parametrize("method", METHODS)
def test_identical_input_gives_identical_output(method: str) -> None:
    sizes, costs, budget = realistic(300, seed=6)
    a = solve_mckp(sizes, costs, budget, method=method)
    b = solve_mckp(sizes.copy(), costs.copy(), budget, method=method)
    assert a.choice.tobytes() == b.choice.tobytes()
    assert (a.objective, a.bound, a.bytes) == (b.objective, b.bound, b.bytes)


def test_large_profile_is_solved_to_proven_optimality() -> None:
    prof = synthetic_profile(2000, seed=2)
    budget = prof.budget(4.5)
    assert budget > 2**32  # beyond 32-bit byte counts
    res = solve_mckp(prof.sizes, prof.costs, budget)
    check_result(res, prof.sizes, prof.costs, budget)
    assert res.optimal and res.rel_gap <= 1e-9
    lp = res.info["lp_bound"]
    assert lp <= res.bound <= res.objective


@pytest.mark.parametrize(
    ("sizes", "costs", "budget", "message"),
    [
        ([[1, 2], [3, 4]], [[1.0, 0.5], [INF, INF]], 10, "row 1 has no available option"),
        ([[1, 2]], [[np.nan, 1.0]], 10, "row 0 has a NaN cost"),
        ([[1, 2]], [[-1.0, 1.0]], 10, "row 0 has a negative cost"),
        ([[1, 2]], [[1.0, 2.0, 3.0]], 10, "one shape"),
        ([[1.5, 2]], [[1.0, 2.0]], 10, "whole numbers"),
        ([[1, 2]], [[1.0, 2.0]], 10.5, "integer number of bytes"),
    ],
)
def test_bad_input_is_a_one_line_error(sizes: list, costs: list, budget: float, message: str) -> None:
    with pytest.raises(MintError, match=message):
        solve_mckp(np.array(sizes), np.array(costs), budget)


def test_unknown_method_and_option() -> None:
    with pytest.raises(MintError, match="unknown solver method 'lp'"):
        solve_mckp([[1]], [[1.0]], 1, method="lp")
    with pytest.raises(TypeError):
        solve_mckp([[1, 2]], [[1.0, 0.5]], 1, method="exact", max_sates=3)

"""Divergences (spec §7.1, §7.2): closed forms against numerical integration, surrogate-route tilts against
the stationarity conditions and the regularised objective on a discrete toy, and the error cases."""
import math

import pytest
import torch

from rlr_dist.regularisers.divergences import (FDIVS, STEPWISE, FDivergence, StepwiseDivergence, solve_lambda,
                                               surrogate_reward)

D64 = torch.float64
SQRT2PI = math.sqrt(2 * math.pi)

# ---------------------------------------------------------------------- step-wise closed forms


def _f_amari(alpha):
    return lambda u: (u ** alpha - 1 - alpha * (u - 1)) / (alpha * (alpha - 1))


STEP_CASES = [  # (name, params, f of D_f(P||Q) = E_Q[f(dP/dQ)], centre of the integrand in units of m)
    ("kl", {}, lambda u: torch.xlogy(u, u), 1.0),
    ("hellinger", {}, lambda u: (u.sqrt() - 1) ** 2, 0.5),
    ("chi2", {}, lambda u: (u - 1) ** 2, 2.0),
    ("tv", {}, lambda u: 0.5 * (u - 1).abs(), 0.5),  # TV distance, the convention of the §7.2 formula
] + [("amari", {"alpha": a}, _f_amari(a), a) for a in (-1.0, 0.3, 0.5, 2.0, 3.0)]


def _integrate_1d(f, m: float, centre: float) -> float:
    """D_f(N(m,1) || N(0,1)) = ∫ q f(p/q) dx by the trapezoid rule (spectrally accurate for these)."""
    lo, hi = min(0.0, m, centre * m) - 14.0, max(0.0, m, centre * m) + 14.0
    x = torch.linspace(lo, hi, 400_001, dtype=D64)
    q = torch.exp(-0.5 * x ** 2) / SQRT2PI
    u = torch.exp(m * x - 0.5 * m * m)
    return float(torch.trapezoid(q * f(u), x))


@pytest.mark.parametrize("name,params,f,centre", STEP_CASES, ids=[f"{c[0]}{c[1]}" for c in STEP_CASES])
def test_stepwise_matches_numerical_integration(name, params, f, centre):
    d = STEPWISE.build(name, **params)
    for m in (0.3, 1.0, 1.7):
        exact = float(d(torch.tensor(m * m, dtype=D64)))
        num = _integrate_1d(f, m, centre)
        assert exact == pytest.approx(num, rel=2e-7, abs=1e-10), (name, params, m)


def test_stepwise_in_higher_dimension_depends_on_delta_only():
    # D = 3, s = 0.7: the divergence of the product Gaussians is that of the 1-D pair with m = ‖Δ‖/s
    diff = torch.tensor([0.3, -0.2, 0.25], dtype=D64)
    s = 0.7
    delta = (diff ** 2).sum() / s ** 2
    kl_direct = float(((diff / s) ** 2).sum() / 2)
    assert float(STEPWISE.build("kl")(delta)) == pytest.approx(kl_direct, rel=1e-14)
    # χ² of products: Π(1 + χ²_i) − 1
    chi_direct = float(torch.prod(torch.exp((diff / s) ** 2)) - 1)
    assert float(STEPWISE.build("chi2")(delta)) == pytest.approx(chi_direct, rel=1e-12)


def test_amari_limits_and_special_cases():
    delta = torch.tensor([0.0, 0.01, 0.7, 2.0, 6.0], dtype=D64)
    kl = STEPWISE.build("kl")(delta)
    for a in (1 - 1e-7, 1 + 1e-7, 1e-7, -1e-7):
        torch.testing.assert_close(STEPWISE.build("amari", alpha=a)(delta), kl, rtol=1e-6, atol=1e-12)
    # far from the limit it must differ (the test above is not vacuous)
    assert not torch.allclose(STEPWISE.build("amari", alpha=0.5)(delta), kl, rtol=1e-3)
    # Hellinger² = ½ Amari-½; χ² = 2 × Amari-2 only at the f level, not for the Gaussian closed forms
    torch.testing.assert_close(STEPWISE.build("hellinger")(delta), 0.5 * STEPWISE.build("amari", alpha=0.5)(delta))
    # default alpha is 0.5
    assert STEPWISE.build("amari").alpha == 0.5


@pytest.mark.parametrize("name,params", [(c[0], c[1]) for c in STEP_CASES], ids=[f"{c[0]}{c[1]}" for c in STEP_CASES])
def test_stepwise_gradient_matches_finite_differences(name, params):
    d = STEPWISE.build(name, **params)
    delta = torch.tensor([0.01, 0.3, 1.0, 2.5, 5.0], dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(d, (delta,), eps=1e-6, atol=1e-7, rtol=1e-6)
    # explicit central differences as well, elementwise
    (g,) = torch.autograd.grad(d(delta).sum(), delta)
    h = 1e-6
    with torch.no_grad():
        fd = (d(delta + h) - d(delta - h)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_amari_gradient_is_reweighted_kl_gradient():
    # spec §7.2: explicit gradient = KL gradient × 2 d'(δ) with 2 d'(δ) = exp(−α(1−α)δ/2)
    delta = torch.tensor([0.0, 0.5, 3.0], dtype=D64, requires_grad=True)
    for a in (-0.5, 0.3, 2.0):
        (g,) = torch.autograd.grad(STEPWISE.build("amari", alpha=a)(delta).sum(), delta)
        torch.testing.assert_close(2 * g, torch.exp(-a * (1 - a) * delta.detach() / 2))


@pytest.mark.parametrize("name", ["kl", "amari", "hellinger", "chi2", "tv"])
def test_stepwise_at_zero_value_and_finite_gradient_through_means(name):
    d = STEPWISE.build(name)
    mu_ref = torch.tensor([0.2, -0.4, 1.0], dtype=D64)
    mu = mu_ref.clone().requires_grad_(True)
    s = 0.3
    delta = ((mu - mu_ref) ** 2).sum() / s ** 2
    val = d(delta)
    (g,) = torch.autograd.grad(val, mu)
    assert float(val.detach()) == 0.0
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0
    # and the δ-gradient at 0 itself is finite (tv: sub-gradient 0)
    z = torch.zeros(2, dtype=D64, requires_grad=True)
    (gz,) = torch.autograd.grad(d(z).sum(), z)
    assert torch.isfinite(gz).all()


def test_tv_gradient_wrt_mean_is_bounded_near_zero():
    # d TV/dμ → φ(0)/s · unit vector as Δ → 0 (the δ-slope blows up but the μ-gradient does not)
    d = STEPWISE.build("tv")
    s = 0.5
    for eps in (1e-3, 1e-8, 1e-150):
        mu = torch.tensor([eps, 0.0], dtype=D64, requires_grad=True)
        (g,) = torch.autograd.grad(d((mu ** 2).sum() / s ** 2), mu)
        assert float(g[0]) == pytest.approx(1 / (SQRT2PI * s), rel=1e-5)


def test_stepwise_keeps_dtype_and_float32_accuracy():
    delta = torch.tensor([1e-6, 0.5, 3.0], dtype=torch.float32)
    for name in STEPWISE.names():
        out = STEPWISE.build(name)(delta)
        assert out.dtype == torch.float32
        ref = STEPWISE.build(name)(delta.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)


def test_stepwise_registry_errors_and_decorator():
    assert set(STEPWISE.names()) >= {"kl", "amari", "hellinger", "chi2", "tv"}
    with pytest.raises(ValueError, match=r"'nope'.*amari.*chi2.*hellinger.*kl.*tv"):
        STEPWISE.build("nope")
    for a in (0, 1, 0.0, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            STEPWISE.build("amari", alpha=a)
    for a in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="alpha"):
            STEPWISE.build("amari", alpha=a)
    with pytest.raises(ValueError, match="alpha"):
        STEPWISE.build("kl", alpha=0.5)  # unexpected parameter, named
    assert STEPWISE.get("kl") is STEPWISE.get("kl") and "tv" in STEPWISE and "kl" in dict(STEPWISE.items())

    @STEPWISE.register("_test_half_kl")
    class _Half(StepwiseDivergence):
        def __call__(self, delta):
            return 0.25 * delta

    try:
        assert float(STEPWISE.build("_test_half_kl")(torch.tensor(2.0))) == 0.5
        with pytest.raises(ValueError, match="twice"):
            STEPWISE.register("_test_half_kl")(_Half)
    finally:
        STEPWISE._items.pop("_test_half_kl")


# ---------------------------------------------------------------------- surrogate-route f-divergences

F_CASES = [("reverse_kl", {}), ("forward_kl", {}), ("alpha", {"alpha": -1.0}), ("alpha", {"alpha": 0.5}),
           ("alpha", {"alpha": 2.0}), ("alpha", {"alpha": 3.0}), ("chi2", {}), ("hellinger", {}), ("js", {})]
F_IDS = [n + "".join(f"{k}={v}" for k, v in p.items()) for n, p in F_CASES]


def _y_grid(fd: FDivergence) -> torch.Tensor:
    lo, hi = fd.domain
    a = lo + 1e-6 if math.isfinite(lo) else -30.0
    b = hi - 1e-6 if math.isfinite(hi) else 8.0
    return torch.linspace(a, b, 2001, dtype=D64)


def _table_surrogate(name, params, y, beta, R, lam):
    """R̃ from the §7.1 table, naive formulas (up to the stated constants)."""
    if name == "reverse_kl":
        return R
    if name == "forward_kl":
        return -beta * torch.log(lam - R)
    if name == "alpha":
        a = params["alpha"]
        return beta / (a - 1) * torch.log(1 + (a - 1) * y)
    if name == "chi2":
        return beta * torch.log(1 + y / 2)
    if name == "hellinger":
        return -2 * beta * torch.log(1 - y)
    if name == "js":
        return beta * torch.log(torch.exp(2 * y) / (2 - torch.exp(2 * y)))
    raise AssertionError(name)


@pytest.mark.parametrize("name,params", F_CASES, ids=F_IDS)
def test_f_prime_inverts_and_is_consistent(name, params):
    fd = FDIVS.build(name, **params)
    assert float(fd.f(torch.tensor(1.0, dtype=D64))) == pytest.approx(0.0, abs=1e-15)
    y = _y_grid(fd)
    u = fd.inv_f_prime(y)
    assert (u > 0).all() and torch.isfinite(u).all()
    torch.testing.assert_close(fd.f_prime(u), y, rtol=1e-10, atol=1e-10)
    assert (u.diff() > 0).all()
    torch.testing.assert_close(fd.log_inv_f_prime(y), torch.log(u), rtol=1e-12, atol=1e-12)
    # f' is the derivative of f, and d log tilt / dy by finite differences
    uu = torch.logspace(-3, 2, 200, dtype=D64)
    h = 1e-6 * uu
    torch.testing.assert_close((fd.f(uu + h) - fd.f(uu - h)) / (2 * h), fd.f_prime(uu), rtol=1e-6, atol=1e-8)
    yy = y[50:-50:7]
    hy = 1e-7
    fdl = (fd.log_inv_f_prime(yy + hy) - fd.log_inv_f_prime(yy - hy)) / (2 * hy)
    torch.testing.assert_close(fd.d_log_inv_f_prime(yy), fdl, rtol=1e-5, atol=1e-7)
    # f convex: f' increasing
    assert (fd.f_prime(uu).diff() > 0).all()


@pytest.mark.parametrize("name,params", F_CASES, ids=F_IDS)
def test_inv_f_prime_outside_domain(name, params):
    fd = FDIVS.build(name, **params)
    lo, hi = fd.domain
    if math.isfinite(lo):
        yb = torch.tensor([lo, lo - 1.0, -1e300], dtype=D64)
        assert (fd.inv_f_prime(yb) == 0).all() and (fd.log_inv_f_prime(yb) == -math.inf).all()
    if math.isfinite(hi):
        ya = torch.tensor([hi, hi + 1.0, 1e300], dtype=D64)
        assert (fd.inv_f_prime(ya) == math.inf).all()
    assert torch.isnan(fd.inv_f_prime(torch.tensor([float("nan")], dtype=D64))).all()


def _reward_batches():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(64, generator=g, dtype=D64)
    yield 1000.0 + 0.5 * torch.randn(200, generator=g, dtype=D64)          # large offset
    yield torch.rand(300, generator=g, dtype=D64) ** 4 * 10                 # skewed, wide spread
    yield torch.tensor([0.3], dtype=D64)                                    # n = 1
    yield torch.full((5,), 2.0, dtype=D64)                                  # all equal
    yield torch.cat([torch.zeros(999, dtype=D64), torch.ones(1, dtype=D64)])  # one outlier


@pytest.mark.parametrize("name,params", F_CASES, ids=F_IDS)
def test_solve_lambda_normalises_the_batch(name, params):
    fd = FDIVS.build(name, **params)
    for R in _reward_batches():
        for beta in (0.05, 0.3, 2.0):
            lam = solve_lambda(R, fd, beta)
            y = (R - lam) / beta
            assert (y < fd.domain[1]).all()
            if name == "forward_kl":
                assert lam > float(R.max())
            tilt = fd.inv_f_prime(y)
            # 1e-8, plus what one ulp of λ moves the mean by (rewards ~1e3 with a steep tilt)
            slope = float((tilt * fd.d_log_inv_f_prime(y)).mean()) / beta
            assert float(tilt.mean()) == pytest.approx(1.0, abs=1e-8 + slope * math.ulp(lam)), (R[:3], beta)
    # float32 / 2-D input / string fdiv accepted
    R32 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    lam = solve_lambda(R32, name if not params else fd, 0.5)
    assert float(fd.inv_f_prime((R32.double() - lam) / 0.5).mean()) == pytest.approx(1.0, abs=1e-8)


def test_reverse_kl_lambda_is_the_log_partition():
    R = torch.randn(50, dtype=D64, generator=torch.Generator().manual_seed(2))
    beta = 0.4
    lam = solve_lambda(R, "reverse_kl", beta)
    assert lam == pytest.approx(beta * (float(torch.logsumexp(R / beta, 0)) - math.log(50) - 1), rel=1e-14)


def test_amari_special_cases_match_named_divergences():
    R = torch.randn(40, dtype=D64, generator=torch.Generator().manual_seed(3))
    beta = 0.3

    def tilt(fd, b):
        return fd.inv_f_prime((R - solve_lambda(R, fd, b)) / b)

    # χ² = 2 × Amari-2 ⇒ χ² with β equals Amari-2 with 2β; Hellinger² = ½ Amari-½ ⇒ β ↔ β/2
    torch.testing.assert_close(tilt(FDIVS.build("chi2"), beta), tilt(FDIVS.build("alpha", alpha=2.0), 2 * beta))
    torch.testing.assert_close(tilt(FDIVS.build("hellinger"), beta), tilt(FDIVS.build("alpha", alpha=0.5), beta / 2))
    # α → 1: reverse KL, α → 0: forward KL (tilts agree; λ differs by a constant)
    torch.testing.assert_close(tilt(FDIVS.build("alpha", alpha=1 + 1e-9), beta), tilt(FDIVS.build("reverse_kl"), beta),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tilt(FDIVS.build("alpha", alpha=1e-9), beta), tilt(FDIVS.build("forward_kl"), beta),
                               rtol=1e-5, atol=1e-7)


# discrete toy: 7 reward levels, reference probabilities = counts / 17 (a batch with repeats)
TOY_R = torch.tensor([-1.0, -0.6, -0.3, 0.0, 0.2, 0.7, 1.0], dtype=D64)
TOY_COUNTS = torch.tensor([1, 2, 3, 5, 3, 2, 1])
TOY_Q = TOY_COUNTS.to(D64) / TOY_COUNTS.sum()


def _objective(fd, p, beta):
    """E_p[R] − β D_f(p‖q), D_f = Σ q f(p/q)."""
    return float((p * TOY_R).sum() - beta * (TOY_Q * fd.f(p / TOY_Q)).sum())


@pytest.mark.parametrize("name,params", F_CASES, ids=F_IDS)
@pytest.mark.parametrize("beta", [0.15, 0.5, 3.0])
def test_tilt_is_the_regularised_optimum_on_a_discrete_toy(name, params, beta):
    fd = FDIVS.build(name, **params)
    batch = TOY_R.repeat_interleave(TOY_COUNTS)
    lam = solve_lambda(batch, fd, beta)
    tilt = fd.inv_f_prime((TOY_R - lam) / beta)
    p = TOY_Q * tilt
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-10)
    support = p > 0
    # stationarity R − β f'(p/q) = λ on the support; KKT off it: (R − λ)/β ≤ f'(0) = y_lo
    torch.testing.assert_close(TOY_R[support] - beta * fd.f_prime(tilt[support]),
                               torch.full((int(support.sum()),), lam, dtype=D64), rtol=0, atol=1e-9)
    assert ((TOY_R[~support] - lam) / beta <= fd.domain[0]).all()
    if name == "chi2" and beta == 0.15:
        assert (~support).any()  # the positive part is exercised
    # maximality: perturbed feasible distributions are strictly worse
    J = _objective(fd, p, beta)
    g = torch.Generator().manual_seed(4)
    n_checked = 0
    for _ in range(30):
        v = torch.randn(7, generator=g, dtype=D64)
        w = torch.where(support, v * p, 0.05 * v.abs())  # relative moves on the support, increases off it
        w = w - p * w.sum()  # sum zero (p sums to 1 and vanishes off the support)
        for eps in (1e-3, 1e-2, 1e-1):
            p2 = p + eps * w
            if (p2 < 0).any():
                continue
            assert _objective(fd, p2, beta) < J
            n_checked += 1
        r = -torch.log(torch.rand(7, generator=g, dtype=D64))  # uniform on the simplex
        r = r / r.sum()
        for t in (0.02, 0.3, 1.0):
            assert _objective(fd, (1 - t) * p + t * r, beta) < J
    assert n_checked >= 60
    assert _objective(fd, TOY_Q, beta) < J


@pytest.mark.parametrize("name,params", F_CASES, ids=F_IDS)
def test_surrogate_reward_formula_derivative_and_monotone(name, params):
    fd = FDIVS.build(name, **params)
    R = torch.linspace(-1.0, 1.0, 41, dtype=D64)
    beta = 0.4
    lam = solve_lambda(R, fd, beta)
    Rt, dRt, clamped = surrogate_reward(R, fd, beta, lam)
    y = (R - lam) / beta
    ok = ~clamped
    assert ok.sum() >= 10
    # table formula (up to a constant, which the reverse/forward KL rows leave free)
    ref = _table_surrogate(name, params, y, beta, R, lam)
    diff = (Rt - ref)[ok]
    torch.testing.assert_close(diff, torch.full_like(diff, float(diff[0])), rtol=0, atol=1e-10)
    torch.testing.assert_close(Rt[ok], beta * torch.log(fd.inv_f_prime(y[ok])), rtol=1e-12, atol=1e-12)
    # derivative vs central differences at fixed λ
    h = 1e-6
    fdiff = (surrogate_reward(R + h, fd, beta, lam).reward - surrogate_reward(R - h, fd, beta, lam).reward) / (2 * h)
    torch.testing.assert_close(dRt[ok], fdiff[ok], rtol=1e-6, atol=1e-8)
    assert torch.isfinite(Rt).all() and torch.isfinite(dRt).all()
    assert (Rt.diff() >= 0).all()


def test_reverse_kl_surrogate_is_exact():
    R = torch.randn(100, dtype=D64, generator=torch.Generator().manual_seed(5)) * 50
    beta = 0.01  # tilts underflow: no clamping, exactness kept
    lam = solve_lambda(R, "reverse_kl", beta)
    out = surrogate_reward(R, "reverse_kl", beta, lam)
    assert torch.equal(out.reward, R - lam - beta)
    assert torch.equal(out.dreward, torch.ones_like(R))
    assert not out.clamped.any()
    assert out.reward.dtype == D64
    out32 = surrogate_reward(R.float(), "reverse_kl", beta, lam)
    assert out32.reward.dtype == torch.float32


def test_surrogate_reward_clamps_outside_the_domain():
    beta = 0.5
    # positive part (χ², Amari α > 1): tilt 0 → floor, derivative 0, still monotone
    for fd in (FDIVS.build("chi2"), FDIVS.build("alpha", alpha=3.0)):
        R = torch.linspace(-3.0, 1.0, 81, dtype=D64)
        lam = solve_lambda(R, fd, beta)
        Rt, dRt, clamped = surrogate_reward(R, fd, beta, lam)
        zero = fd.inv_f_prime((R - lam) / beta) == 0
        assert zero.any() and (clamped >= zero).all()
        assert torch.isfinite(Rt).all() and (dRt[clamped] == 0).all()
        assert float(Rt.min()) == pytest.approx(beta * math.log(1e-12))
        assert (Rt.diff() >= 0).all()
    # in-domain but below the floor (tilt 5e-15 > 0): clamped too, so R̃ stays monotone; slope 0 there
    R = torch.tensor([-2.0 + 1e-14, -2.0 + 1e-6, 0.0], dtype=D64)
    Rt, dRt, clamped = surrogate_reward(R, "chi2", 1.0, 0.0)
    assert clamped.tolist() == [True, False, False] and float(dRt[0]) == 0.0 and float(dRt[1]) > 1e5
    assert float(Rt[0]) == pytest.approx(math.log(1e-12)) and (Rt.diff() > 0).all()
    # fixed λ fitted elsewhere; new rewards beyond the upper end (forward KL R ≥ λ, Hellinger, JS): capped
    for name in ("forward_kl", "hellinger", "js", "alpha"):
        fd = FDIVS.build(name, **({"alpha": 0.5} if name == "alpha" else {}))
        lam = solve_lambda(torch.linspace(-1, 0, 20, dtype=D64), fd, beta)
        R = torch.linspace(-1.0, 3.0, 81, dtype=D64)
        Rt, dRt, clamped = surrogate_reward(R, fd, beta, lam, tilt_ceil=1e8)
        beyond = (R - lam) / beta >= fd.domain[1]
        assert beyond.any() and (clamped >= beyond).all() and not clamped.all()
        assert torch.isfinite(Rt).all() and (dRt[clamped] == 0).all()
        assert float(Rt.max()) == pytest.approx(beta * math.log(1e8))
        assert (Rt.diff() >= 0).all()
    # with λ from the same batch the cap never binds for the upper-bounded families
    R = torch.randn(500, dtype=D64, generator=torch.Generator().manual_seed(6))
    for name in ("forward_kl", "hellinger", "js"):
        assert not surrogate_reward(R, name, 0.05, solve_lambda(R, name, 0.05)).clamped.any()


def test_f_registry_and_error_cases():
    assert set(FDIVS.names()) >= {"reverse_kl", "forward_kl", "alpha", "chi2", "hellinger", "js"}
    with pytest.raises(ValueError, match=r"'nope'.*alpha.*chi2.*forward_kl.*hellinger.*js.*reverse_kl"):
        FDIVS.build("nope")
    with pytest.raises(ValueError, match="'nope'"):
        FDIVS.get("nope")
    with pytest.raises(ValueError, match="'nope'"):
        solve_lambda(torch.zeros(3), "nope", 1.0)
    for a in (0, 1):
        with pytest.raises(ValueError, match="alpha"):
            FDIVS.build("alpha", alpha=a)
    with pytest.raises(ValueError, match="alpha"):
        FDIVS.build("alpha")  # required
    R = torch.randn(10, dtype=D64)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            solve_lambda(R, "forward_kl", beta)
        with pytest.raises(ValueError, match="beta"):
            surrogate_reward(R, "forward_kl", beta, 2.0)
    for bad in (float("nan"), float("inf")):
        Rb = R.clone()
        Rb[3] = bad
        with pytest.raises(ValueError, match="rewards.*non-finite.*3"):
            solve_lambda(Rb, "chi2", 1.0)
        with pytest.raises(ValueError, match="rewards.*non-finite"):
            surrogate_reward(Rb, "chi2", 1.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        solve_lambda(torch.zeros(0), "js", 1.0)
    with pytest.raises(ValueError, match="lam"):
        surrogate_reward(R, "js", 1.0, float("nan"))

    @FDIVS.register("_test_bad")
    class _NotConvex(FDivergence):  # f' decreasing: no root in the bracket
        def f(self, u):
            return -torch.xlogy(u, u)

        def f_prime(self, u):
            return -torch.log(u) - 1

        def _log_tilt(self, y):
            return -y - 1

        def _dlog_tilt(self, y):
            return -torch.ones_like(y)

    try:
        with pytest.raises(ValueError, match="no root"):
            solve_lambda(torch.randn(8, dtype=D64), "_test_bad", 1.0)
    finally:
        FDIVS._items.pop("_test_bad")

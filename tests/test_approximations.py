"""Approximations against numpy/torch on dense grids, under the engine, with their documented bounds.

Each function: its stated range on a dense grid plus values far outside, for
FSS with 2 parties and the generic protocol with 3 (and f = 12, the bridge's
activation scale, for the piecewise ones).  Inside the range the error stays
within the bound docs/nonlinear.md states; outside, the function saturates to
the right asymptote or the input is refused with ApproximationRangeError,
never garbage.  Exact round counts for the new protocols.
"""

import numpy as np
import pytest
import torch
from scipy.special import erf, expit

import mpc
from mpc.approx_tables import GELU, GELU_TANH, SIGMOID, SILU, TANH
from mpc.errors import ApproximationRangeError

F = 16
PROTOCOLS = [("fss", 2), ("generic", 3)]


def fixed(values, f=F):
    return mpc.decode(mpc.encode(values, f), f)


def run(op, x, *, parties=2, comparison="fss", bits=32, frac_bits=F, **options):
    """op(shared x) revealed, and the op's own stats (party 0)."""

    def program(ctx):
        shared = ctx.share(x if ctx.rank == 0 else None, owner=0)
        before = ctx.stats()
        out = op(shared)
        after = ctx.stats()
        return out.reveal(), {k: after[k] - before[k] for k in after}

    return mpc.run_local(program, parties=parties, comparison=comparison, comparison_bits=bits,
                         frac_bits=frac_bits, **options)[0]


def _gelu(x):
    return x * 0.5 * (1 + erf(x / np.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


# name: (op, reference, table)
PIECEWISE = {
    "sigmoid": (lambda t: t.sigmoid(), expit, SIGMOID),
    "tanh": (lambda t: t.tanh(), np.tanh, TANH),
    "silu": (lambda t: t.silu(), lambda x: x * expit(x), SILU),
    "gelu": (lambda t: t.gelu(), _gelu, GELU),
    "gelu_tanh": (lambda t: t.gelu("tanh"), _gelu_tanh, GELU_TANH),
}


def _grid(table, n=6000):
    """Dense over the breakpoints and past them, plus values far outside and the breakpoints."""
    lim = 1.5 * table.breaks[-1]
    far = [-1e4, -300.0, -40.0, 40.0, 300.0, 1e4]
    return np.concatenate([np.linspace(-lim, lim, n), far, table.breaks, np.array(table.breaks) - 2.0**-F])


@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
@pytest.mark.parametrize("name", list(PIECEWISE))
def test_piecewise_functions_within_their_bound_everywhere(name, comparison, parties):
    op, ref, table = PIECEWISE[name]
    x = fixed(_grid(table))
    got, stats = run(op, x, parties=parties, comparison=comparison)
    err = np.abs(got - ref(x))
    bound = table.fit_error + 2 * 2.0**-F  # docs/nonlinear.md: the table's fit plus two units
    assert err.max() <= bound, f"{name}: {err.max():.3g} at x = {x[err.argmax()]:.6g} > {bound:.3g}"
    # 3 product batches and a truncation around one comparison batch, always exact truncation
    comparison_rounds = 2 if comparison == "fss" else 5
    assert stats["rounds"] == 6 + comparison_rounds + 1


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "silu"])
def test_piecewise_at_the_bridge_activation_scale(name):
    op, ref, table = PIECEWISE[name]
    f = 12
    x = fixed(_grid(table, 3000), f)
    got, _ = run(op, x, frac_bits=f, bits=28)
    assert np.abs(got - ref(x)).max() <= table.fit_error + 2 * 2.0**-f


def test_piecewise_refuses_a_scale_its_breakpoints_do_not_fit():
    def program(ctx):
        x = ctx.share(np.array([1.0, 2.0]) if ctx.rank == 0 else None, owner=0, frac_bits=2)
        return x.sigmoid()

    with pytest.raises(ValueError, match="at least 3"):
        mpc.run_local(program, parties=2)


def test_piecewise_is_exact_with_local_truncation_too():
    # its high-scale truncations are always the exact protocol
    x = fixed(np.linspace(-20, 20, 4001))
    got, _ = run(lambda t: t.sigmoid(), x, truncation="local")
    assert np.abs(got - expit(x)).max() <= SIGMOID.fit_error + 2 * 2.0**-F


@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
def test_hardsigmoid_and_hardswish(comparison, parties):
    x = fixed(np.concatenate([np.linspace(-8, 8, 4001), [-3.0, 3.0, -1e4, 1e4]]))
    hs, _ = run(lambda t: t.hardsigmoid(), x, parties=parties, comparison=comparison, bits=40)
    hw, stats = run(lambda t: t.hardswish(), x, parties=parties, comparison=comparison, bits=40)
    want_hs = torch.nn.functional.hardsigmoid(torch.tensor(x)).numpy()
    want_hw = torch.nn.functional.hardswish(torch.tensor(x)).numpy()
    assert np.abs(hs - want_hs).max() <= 2.0**-F
    assert np.abs(hw - want_hw).max() <= 2 * 2.0**-F
    assert hs[-2] == 0.0 and hs[-1] == 1.0 and hw[-2] == 0.0  # exact saturation
    assert stats["rounds"] == (2 if comparison == "fss" else 6) + 2  # comparisons, product, truncation


# -- exp, reciprocal, inv_sqrt, sqrt --------------------------------------------------------
@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
def test_exp_on_its_range_saturates_below_and_refuses_above(comparison, parties):
    x = fixed(np.concatenate([np.linspace(-32, 10 - 2.0**-F, 6000), [-40.0, -1e4]]))
    got, stats = run(lambda t: t.exp(), x, parties=parties, comparison=comparison)
    want = np.exp(x)
    neg = x <= 0
    bound = 26 * 2.0**-F  # documented: the polynomial's last unit, 16-fold through the squarings
    assert np.abs(got - want)[neg].max() <= bound  # abs on [-32, 0]
    assert (np.abs(got - want)[~neg] / want[~neg]).max() <= bound  # rel on [0, 10)
    assert np.abs(got[-2:]).max() <= bound  # below the range: ~0
    assert stats["rounds"] == (2 if comparison == "fss" else 5) + 15
    with pytest.raises(ApproximationRangeError, match=r"exp left its range \[-inf, 10\)"):
        run(lambda t: t.exp(), fixed(np.array([0.5, 10.0])), parties=parties, comparison=comparison)


@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
def test_reciprocal_inv_sqrt_sqrt_on_their_range(comparison, parties):
    mag = fixed(2.0 ** np.linspace(-8, 15 - 1e-6, 4000))
    signed = mag * np.where(np.arange(mag.size) % 2, -1, 1)
    got, _ = run(lambda t: t.reciprocal(), signed, parties=parties, comparison=comparison, bits=40)
    assert np.all(np.abs(got - 1 / signed) <= 4e-5 + 1e-4 * np.abs(1 / signed))
    inv, _ = run(lambda t: t.inv_sqrt(), mag, parties=parties, comparison=comparison, bits=40)
    assert np.all(np.abs(inv - 1 / np.sqrt(mag)) <= 4e-5 + 5e-4 / np.sqrt(mag))
    root, _ = run(lambda t: t.sqrt(), mag, parties=parties, comparison=comparison, bits=40)
    assert np.all(np.abs(root - np.sqrt(mag)) <= 4e-5 + 1.2e-4 * np.sqrt(mag))


@pytest.mark.parametrize(
    "op,values,function",
    [
        (lambda t: t.reciprocal(), [1.0, 2.0**15], "reciprocal"),
        (lambda t: t.reciprocal(), [1.0, -0.003], "reciprocal"),
        (lambda t: t.reciprocal(positive=True), [1.0, -2.0], "reciprocal"),
        (lambda t: t.inv_sqrt(), [4.0, 0.0], "inv_sqrt"),
        (lambda t: t.sqrt(), [4.0, 40000.0], "sqrt"),
        (lambda t: t / t, [3.0, 1e-3], "reciprocal"),
    ],
)
def test_inputs_outside_the_range_are_refused(op, values, function):
    with pytest.raises(ApproximationRangeError) as info:
        run(op, fixed(np.array(values)), bits=48)
    assert info.value.function == function and info.value.elements == 2


def test_a_wider_range_is_an_option():
    x = fixed(np.array([2.0**-12, 3.0, 2.0**20]))
    got, _ = run(lambda t: t.reciprocal(exponents=range(-12, 21)), x, bits=48)
    np.testing.assert_allclose(got, 1 / x, rtol=2e-3, atol=1e-4)


# -- softmax and layer norm ------------------------------------------------------------------
@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
def test_softmax_for_any_logits(rng, comparison, parties):
    logits = fixed(rng.normal(0, 8, (300, 10)))
    logits[0] = 0.0
    logits[1, 3] = 1e4
    logits[2] = rng.normal(0, 1000, 10)
    got, _ = run(lambda t: t.softmax(axis=1), logits, parties=parties, comparison=comparison, bits=48)
    want = torch.softmax(torch.tensor(logits), dim=1).numpy()
    assert np.abs(got - want).max() <= 2e-4  # documented (measured up to 1.04e-4 over 3e5 outputs)


@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
def test_layer_norm_against_torch(rng, comparison, parties):
    x = fixed(np.concatenate([rng.normal(0, 1, (40, 64)), rng.normal(3, 10, (40, 64)), rng.normal(0, 0.1, (20, 64))]))
    got, _ = run(lambda t: t.layer_norm(axis=-1), x, parties=parties, comparison=comparison, bits=48)
    want = torch.nn.functional.layer_norm(torch.tensor(x), (64,)).numpy()
    sigma = x.std(axis=-1, keepdims=True)
    # docs/nonlinear.md: the mean's rounding over sigma, inv_sqrt's relative error, the variance's resolution
    bound = 2.0**-F * (1 + 1 / sigma) + np.abs(want) * (5e-4 + 4e-5 * sigma + 2.0 ** (1 - F) / sigma**2)
    assert np.all(np.abs(got - want) <= bound)


def test_layer_norm_of_a_constant_row_is_refused_unless_the_range_is_widened():
    x = fixed(np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]))
    with pytest.raises(ApproximationRangeError, match="inv_sqrt"):
        run(lambda t: t.layer_norm(), x, bits=48)
    got, _ = run(lambda t: t.layer_norm(exponents=range(-16, 15)), x, bits=48)
    want = torch.nn.functional.layer_norm(torch.tensor(x), (4,)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_scopes_name_the_failing_function():
    def program(ctx):
        x = ctx.share(np.array([1.0, 12.0]) if ctx.rank == 0 else None, owner=0)
        with ctx.comparison_scope("attention.softmax"):
            x.softmax()
        with ctx.comparison_scope("mlp.exp"):
            y = x.exp()
        try:
            y.reveal()
        except ApproximationRangeError as exc:
            return exc

    exc = mpc.run_local(program, parties=2)[0]
    assert exc.function == "exp" and exc.scopes == ("mlp.exp",) and exc.high == 10.0

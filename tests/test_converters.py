"""Embedding converters (found through entry points), held-out fitting, and the projector merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vpgtrans import registry
from vpgtrans.errors import CheckpointError, ConfigError, DataError
from vpgtrans.transfer.converter import fit_converter
from vpgtrans.transfer.merge import merge_projector
from vpgtrans.transfer.pairing import TokenPairs

FAST_SGD = {"min_steps": 300}
FAST_ADAM = {"optimizer": "adam", "min_steps": 300}


def _embeddings(ds: int, dd: int, *, orthogonal: bool, n: int = 600, seed: int = 0):
    """Source embeddings and destination = known map (generic or scaled (semi-)orthogonal) + bias + noise."""
    g = torch.Generator().manual_seed(seed)
    src = 0.05 * torch.randn(n, ds, generator=g) + 0.02 * torch.randn(ds, generator=g)  # OPT-like scale, off-centre
    if orthogonal:
        q, _ = torch.linalg.qr(torch.randn(max(ds, dd), max(ds, dd), generator=g))
        w = 3.0 * q[:dd, :ds]  # orthonormal rows or columns
    else:
        w = torch.randn(dd, ds, generator=g) / ds ** 0.5
    dst = src @ w.T + 0.05 * torch.randn(dd, generator=g) + 0.002 * torch.randn(n, dd, generator=g)
    return src, dst


def test_converters_are_registered_through_entry_points():
    names = {r.name for r in registry.available("converter")}
    assert {"linear-cosine", "lstsq", "procrustes"} <= names
    info = registry.describe(registry.get("converter", "linear-cosine"))
    fields = {f["name"]: f for f in info["config"]}
    assert fields["optimizer"]["default"] == "sgd" and fields["lr"]["help"] and fields["batch_size"]["help"]
    assert registry.get("converter", "lstsq").provider == "vpgtrans"
    with pytest.raises(ConfigError):
        registry.build("converter", "linear-cosine", {"optimiser": "adam"})


@pytest.mark.parametrize("name,config", [("linear-cosine", FAST_SGD), ("linear-cosine", FAST_ADAM),
                                         ("lstsq", {}), ("lstsq", {"ridge": 1e-4})])
@pytest.mark.parametrize("ds,dd", [(24, 24), (16, 40), (40, 16)])
def test_general_converters_recover_a_linear_map(name, config, ds, dd):
    src, dst = _embeddings(ds, dd, orthogonal=False)
    fit = fit_converter(registry.build("converter", name, config), src, dst,
                        (torch.arange(len(src)), torch.arange(len(src))), heldout=0.2, seed=1)
    assert isinstance(fit.linear, nn.Linear) and (fit.linear.in_features, fit.linear.out_features) == (ds, dd)
    assert fit.n_fit == 480 and fit.n_heldout == 120
    assert fit.heldout_cosine > 0.98 and fit.train_cosine > 0.98


@pytest.mark.parametrize("ds,dd", [(24, 24), (16, 40), (40, 16)])
def test_procrustes_recovers_a_semi_orthogonal_map(ds, dd):
    src, dst = _embeddings(ds, dd, orthogonal=True)
    fit = fit_converter("procrustes", src, dst, (torch.arange(len(src)), torch.arange(len(src))), heldout=0.2)
    assert fit.heldout_cosine > 0.99
    w = fit.linear.weight.detach().double()  # [dd, ds] = s·Rᵀ
    gram = w @ w.T if dd <= ds else w.T @ w
    s2 = gram.diagonal().mean()
    assert s2.sqrt() == pytest.approx(3.0, rel=0.05)
    assert torch.allclose(gram / s2, torch.eye(min(ds, dd), dtype=torch.float64), atol=1e-6)


def test_procrustes_is_orthogonal_even_for_a_general_map():
    src, dst = _embeddings(24, 24, orthogonal=False)
    lin = registry.build("converter", "procrustes", {"scale": False}).fit(src, dst)
    w = lin.weight.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(24, dtype=torch.float64), atol=1e-6)


def test_ridge_shrinks_the_weights():
    src, dst = _embeddings(16, 16, orthogonal=False)
    plain = registry.build("converter", "lstsq").fit(src, dst)
    ridged = registry.build("converter", "lstsq", {"ridge": 10.0}).fit(src, dst)
    assert ridged.weight.norm() < 0.5 * plain.weight.norm()


def test_fit_is_seeded_and_leaves_the_global_rng_alone():
    src, dst = _embeddings(12, 20, orthogonal=False, n=200)
    pairs = TokenPairs(src_ids=torch.arange(200), dst_ids=torch.arange(200), n_pairs=200, src_coverage=1.0,
                       dst_coverage=1.0, method="identity")
    conv = registry.build("converter", "linear-cosine", {"min_steps": 50})
    state = torch.get_rng_state()
    a, b = fit_converter(conv, src, dst, pairs, seed=3), fit_converter(conv, src, dst, pairs, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.linear.weight, b.linear.weight) and a.heldout_cosine == b.heldout_cosine
    c = fit_converter(conv, src, dst, pairs, seed=4)
    assert not torch.equal(a.linear.weight, c.linear.weight)
    none = fit_converter("lstsq", src, dst, pairs, heldout=0.0)
    assert none.heldout_cosine is None and none.n_fit == 200 and "no held-out pairs" in none.summary()


def test_fit_converter_rejects_bad_input():
    src, dst = _embeddings(8, 8, orthogonal=False, n=20)
    with pytest.raises(DataError, match="outside the destination embedding"):
        fit_converter("lstsq", src, dst, (torch.arange(20), torch.arange(20) + 5))
    with pytest.raises(DataError, match="too few"):
        fit_converter("lstsq", src, dst, (torch.arange(2), torch.arange(2)), heldout=0.5)
    with pytest.raises(DataError, match="NaN"):
        registry.build("converter", "lstsq").fit(src * float("nan"), dst)


@pytest.mark.parametrize("bias", [True, False])
def test_merged_projector_equals_converter_after_projector(bias):
    torch.manual_seed(0)
    src_proj, conv = nn.Linear(32, 24, bias=bias), nn.Linear(24, 40)
    merged = merge_projector(src_proj, conv)
    assert (merged.in_features, merged.out_features) == (32, 40)
    x = torch.randn(5, 7, 32)
    assert torch.allclose(merged(x), conv(src_proj(x)), atol=1e-5)
    assert torch.allclose(merged.weight, conv.weight @ src_proj.weight, atol=1e-6)
    b_src = src_proj.bias if bias else torch.zeros(24)
    assert torch.allclose(merged.bias, conv.weight @ b_src + conv.bias, atol=1e-6)
    with pytest.raises(CheckpointError, match="does not match"):
        merge_projector(src_proj, nn.Linear(23, 40))


def test_merge_keeps_the_source_dtype():
    src_proj = nn.Linear(8, 6).to(torch.bfloat16)
    merged = merge_projector(src_proj, nn.Linear(6, 10))
    assert merged.weight.dtype == torch.bfloat16 and merged.bias.dtype == torch.bfloat16


# ---- ridge, whitening, anchor-based (OMP) converters ------------------------------------------------------------

@pytest.mark.parametrize("name", ["ridge", "ridge-whitened", "anchor-omp"])
@pytest.mark.parametrize("ds,dd", [(24, 24), (16, 40), (40, 16)])
def test_ridge_family_recovers_a_linear_map(name, ds, dd):
    src, dst = _embeddings(ds, dd, orthogonal=False)
    fit = fit_converter(registry.build("converter", name), src, dst,
                        (torch.arange(len(src)), torch.arange(len(src))), heldout=0.2, seed=1)
    assert (fit.linear.in_features, fit.linear.out_features) == (ds, dd)
    assert fit.heldout_cosine > 0.98


def test_ridge_picks_a_penalty_on_held_out_pairs():
    # Few, noisy pairs in many dimensions: plain least squares interpolates the noise, a penalty generalises.
    g = torch.Generator().manual_seed(0)
    src = torch.randn(60, 48, generator=g)
    w = torch.randn(48, 32, generator=g) / 7
    clean = src @ w
    dst = clean + 0.8 * clean.std() * torch.randn(60, 32, generator=g)
    test_src = torch.randn(400, 48, generator=g)
    conv = registry.build("converter", "ridge")
    ridge = conv.fit(src, dst)
    assert conv.chosen is not None and conv.chosen > min(conv.config.lambdas)
    plain = registry.build("converter", "lstsq").fit(src, dst)
    cos = lambda lin: float(torch.nn.functional.cosine_similarity(lin(test_src), test_src @ w, dim=-1).mean().detach())
    assert cos(ridge) > cos(plain) + 0.05
    # With a single candidate the choice is forced: the grid really is what is searched.
    only = registry.build("converter", "ridge", {"lambdas": [1e-4]})
    only.fit(src, dst)
    assert only.chosen == 1e-4


def test_whitening_is_undone_after_the_fit():
    # Badly scaled source dimensions: whitening must change nothing about what the map computes on clean data.
    src, dst = _embeddings(16, 12, orthogonal=False)
    src = src * torch.logspace(-2, 1, 16)
    for mode in ("standardise", "zca"):
        lin = registry.build("converter", "ridge", {"whiten": mode, "lambdas": [1e-6]}).fit(src, dst)
        assert float(torch.nn.functional.cosine_similarity(lin(src), dst, dim=-1).mean().detach()) > 0.99
    with pytest.raises(ConfigError):
        registry.build("converter", "ridge", {"whiten": "pca"})
    with pytest.raises(ConfigError):
        registry.build("converter", "ridge", {"lambdas": []})


def test_omp_coefficients_recover_a_sparse_combination():
    from vpgtrans_adapters.converters import omp_coefficients

    rng = torch.Generator().manual_seed(0)
    atoms = torch.randn(50, 30, generator=rng).double().numpy()
    true = torch.zeros(3, 50, dtype=torch.float64)
    true[0, [3, 17]] = torch.tensor([1.5, -0.7], dtype=torch.float64)
    true[1, [0, 8, 44]] = torch.tensor([0.3, 0.9, 2.0], dtype=torch.float64)
    true[2, 21] = 1.0
    coef = omp_coefficients(true.numpy() @ atoms, atoms, k=4)
    assert torch.allclose(torch.from_numpy(coef), true, atol=1e-8)
    assert ((coef != 0).sum(1) <= 4).all()


def test_anchor_omp_sends_unmatched_tokens_towards_their_anchor_partners():
    from vpgtrans_adapters.converters import omp_coefficients

    src, dst = _embeddings(16, 12, orthogonal=False, n=30)
    g = torch.Generator().manual_seed(5)
    lone_src = 0.05 * torch.randn(40, 16, generator=g)  # tokens the string match left without a partner
    lone_dst = 0.05 * torch.randn(40, 12, generator=g)
    x, y = src.double().numpy(), dst.double().numpy()
    mx, my = x.mean(0), y.mean(0)
    # Their anchor-based partners: the same sparse combination of anchors, on the other side.
    target = torch.from_numpy(omp_coefficients(lone_src.double().numpy() - mx, x - mx, 4) @ (y - my) + my).float()
    partner = torch.from_numpy(omp_coefficients(lone_dst.double().numpy() - my, y - my, 4) @ (x - mx) + mx).float()
    ridge = registry.build("converter", "ridge").fit(src, dst)
    gaps = []
    for weight in (0.0, 1.0, 20.0):
        conv = registry.build("converter", "anchor-omp", {"atoms": 4, "weight": weight})
        lin = conv.fit(src, dst, unpaired_src=lone_src, unpaired_dst=lone_dst)
        with torch.no_grad():
            gaps.append((float((lin(lone_src) - target).norm()), float((lin(partner) - lone_dst).norm())))
        if weight == 0.0:
            assert torch.allclose(lin.weight, ridge.weight, atol=1e-6)
    assert gaps[0][0] > gaps[1][0] > gaps[2][0] and gaps[0][1] > gaps[1][1] > gaps[2][1]
    # Without unmatched tokens it is ridge.
    alone = registry.build("converter", "anchor-omp").fit(src, dst)
    assert torch.allclose(alone.weight, ridge.weight, atol=1e-6)


@pytest.mark.parametrize("config", [FAST_SGD, FAST_ADAM])
def test_linear_cosine_maps_to_the_destination_norms(config):
    # The cosine loss leaves the scale free; match_norm (default) fixes it, so a merged projector writes soft
    # prompts at the destination's embedding scale. Destination here is 40x the source's norm.
    src, dst = _embeddings(24, 24, orthogonal=True)
    dst = 13.0 * dst
    pairs = (torch.arange(len(src)), torch.arange(len(src)))
    for match, close in ((True, True), (False, False)):
        conv = registry.build("converter", "linear-cosine", {**config, "match_norm": match})
        fit = fit_converter(conv, src, dst, pairs, heldout=0.2, seed=1)
        with torch.no_grad():
            ratio = float(fit.linear(src).norm(dim=-1).mean() / dst.norm(dim=-1).mean())
        assert fit.heldout_cosine > 0.98
        assert (abs(ratio - 1) < 0.02) == close, (match, ratio)

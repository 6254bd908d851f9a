"""Attentive token mode: tokens chosen per image at fixed counts, static shapes, equivalence with the masks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from slimdeploy.errors import SlimError
from slimdeploy.export import export_onnx, onnx_sequence_lengths
from slimdeploy.latency import timing
from slimdeploy.masks import MaskedViT, SearchDims
from slimdeploy.models import arch_of
from slimdeploy.slim import build_slim, keep_top_tokens
from slimdeploy.types import SPEC_SCHEMA, ModelConfig, SlimSpec

from .conftest import assert_onnx_parity, fmnist_available, random_spec, tiny_model

ATTENTIVE = SearchDims(token_mode="attentive")


def attentive_spec(model, seed: int, force: str | None = None, mode: str = "attentive") -> SlimSpec:
    """random_spec's structure with its token counts taken per image (attentive or fused mode)."""
    spec = random_spec(model, seed, force=force)
    for b in spec.blocks:
        b.tokens = list(range(b.num_tokens))
    spec.token_mode = mode
    return spec.validate()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("force", [None, "no-heads", "no-mlp"])
def test_hard_rank_masks_equal_the_pruned_model(variant, seed, force):
    model = tiny_model(variant, seed)
    spec = attentive_spec(model, seed, force)
    assert any(n < spec.arch.num_tokens for n in spec.token_counts())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        masked = MaskedViT(model, ATTENTIVE).set_hard(spec).eval()(x)
        pruned = build_slim(spec, model)(x)
    assert _rel_err(pruned, masked) <= 1e-4


def test_full_counts_give_the_dense_model_exactly():
    model = tiny_model("t-cls")
    spec = SlimSpec.dense(ModelConfig("t-cls"), arch_of(model))
    spec.token_mode = "attentive"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(build_slim(spec.validate(), model)(x), model(x))
        masked = MaskedViT(model, ATTENTIVE).eval()(x)  # masks at 1: the dense function
        assert _rel_err(masked, model(x)) <= 1e-5


def _class_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention in a timm block, averaged over heads, computed from timm's modules."""
    a = block.attn
    B, N, C = x.shape
    qkv = a.qkv(block.norm1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
    return ((q[:, :, :1] * a.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)


def test_the_token_the_class_token_ignores_is_dropped():
    model = tiny_model("t-cls", 3)
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig("t-cls"), a)
    spec.token_mode = "attentive"
    for b in spec.blocks[1:]:
        b.tokens = list(range(a.num_tokens - 1))  # block 1 drops one token per image
    slim = build_slim(spec.validate(), model)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        reference = _class_attention(model.blocks[0], h)  # from timm's own modules
        after0, scores, _ = slim.blocks[0].forward_ranked(h, None)
        assert torch.allclose(scores, reference, atol=1e-6)
        # mark each token by its position: which ones does block 1 keep?
        marked = after0.clone()
        marked[..., 0] = torch.arange(a.num_tokens, dtype=h.dtype)
        out, _, _ = keep_top_tokens(marked, scores, slim.blocks[1].rank_keep, slim.blocks[1].prefix)
    for i in range(len(x)):
        rows = {int(v) for v in out[i, :, 0]}
        ignored = int(reference[i, 1:].argmin()) + 1
        assert rows == set(range(a.num_tokens)) - {ignored}


def test_tokens_are_chosen_per_image():
    model = tiny_model("t-cls", 1)
    spec = SlimSpec.dense(ModelConfig("t-cls"), arch_of(model))
    spec.token_mode = "attentive"
    for b in spec.blocks[1:]:
        b.tokens = list(range(5))
    slim = build_slim(spec.validate(), model)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        after0, scores, _ = slim.blocks[0].forward_ranked(h, None)
        marked = after0.clone()
        marked[..., 0] = torch.arange(after0.shape[1], dtype=h.dtype)
        out, _, _ = keep_top_tokens(marked, scores, slim.blocks[1].rank_keep, slim.blocks[1].prefix)
    kept = {tuple(sorted(int(v) for v in out[i, :, 0])) for i in range(len(x))}
    assert all(0 in k and len(k) == 5 for k in kept)  # the class token and four patches, in every image
    assert len(kept) > 1  # different images keep different patches


@pytest.mark.parametrize("mode", ["attentive", "fused"])
@pytest.mark.parametrize("variant", ["t-cls", "t-avg", "t-reg", "t-qknorm"])
def test_export_is_static_with_the_chosen_counts_and_matches(tmp_path, variant, mode):
    model = tiny_model(variant)
    spec = attentive_spec(model, 4, mode=mode)
    slim = build_slim(spec, model)
    path = export_onnx(slim, tmp_path / "m.onnx", (3, 16, 16))
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "TopK" in ops and ("GatherElements" in ops or "Gather" in ops)
    assert not ops & {"NonZero", "Where", "ScatterElements", "ScatterND"}  # no data-dependent shapes
    assert set(onnx_sequence_lengths(path)) == set(spec.token_counts())
    assert_onnx_parity(slim, path, batches=(1, 8))


def test_attentive_specs_are_counts_and_need_an_earlier_attention():
    model = tiny_model("t-cls")
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig("t-cls"), a)
    spec.token_mode = "attentive"
    def tokens_from(i, tokens):
        for b in spec.blocks[i:]:
            b.tokens = list(tokens)
    tokens_from(1, [0, 2, 3])
    with pytest.raises(SlimError, match="count"):
        spec.validate()
    tokens_from(0, range(4))
    with pytest.raises(SlimError, match="earlier block has heads"):
        spec.validate()
    tokens_from(0, range(a.num_tokens))
    spec.blocks[0].heads, spec.blocks[0].qk, spec.blocks[0].v = [], [], []
    tokens_from(1, range(4))
    with pytest.raises(SlimError, match="earlier block has heads"):
        spec.validate()


def test_spec_round_trip_and_schema_1_loads_as_static(tmp_path):
    model = tiny_model("t-cls")
    spec = attentive_spec(model, 2)
    spec.save(tmp_path / "s.json")
    back = SlimSpec.load(tmp_path / "s.json")
    assert back.token_mode == "attentive" and back.token_counts() == spec.token_counts()
    old = random_spec(model, 2).to_dict()
    old.pop("token_mode")
    old.pop("embed")
    old["schema"] = 1
    loaded = SlimSpec.from_dict(old)
    assert loaded.token_mode == "static" and loaded.schema == SPEC_SCHEMA


def test_search_gradient_reaches_the_rank_masks():
    model = tiny_model("t-cls").train()
    masked = MaskedViT(model, ATTENTIVE)
    with torch.no_grad():
        masked.tok[1:, 6:] = 0.5
    out = masked(torch.randn(4, 3, 16, 16))
    (out.square().mean() + sum(masked.l1().values())).backward()
    g = masked.tok.grad
    assert g[1:].abs().sum() > 0
    # block 0 keeps every token: its gates are not used, and not penalised
    assert torch.all(g[0] == 0)


# ---- selection and latency ---------------------------------------------------------------------
def _wide():
    from .synthetic import wide_arch

    return wide_arch("t-wide-att")


def test_selection_in_attentive_mode_keeps_counts_and_pays_the_ranking():
    from dataclasses import replace

    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.candidates import Problem, candidates
    from slimdeploy.select.solver import LatencyCost

    from .synthetic import staircase_profile, synthetic_importance

    arch = _wide()
    lm = LatencyModel(staircase_profile(arch)).for_tokens("attentive")
    imp = replace(synthetic_importance(arch), token_mode="attentive")
    assert np.all(np.diff(imp.tok, axis=1) < 0)  # per rank: the last ranks go first
    dense = lm.predict(SlimSpec.dense(ModelConfig("t-wide-att"), arch))
    budget = 0.5 * dense
    found = candidates(Problem(arch, ModelConfig("t-wide-att"), imp, LatencyCost(lm)), budget)
    dropping = 0
    for _, spec in found:
        assert spec.token_mode == "attentive"
        assert spec.blocks[0].num_tokens == arch.num_tokens  # nothing earlier to rank by
        assert lm.predict(spec) <= budget + 1e-9
        dropping += any(n < arch.num_tokens for n in spec.token_counts())
        # a dropping block pays the ranking (TopK and gathers), not the static gather
        static = LatencyModel(lm.profile)
        gathers = sum(b.num_tokens < p for p, b in zip([arch.num_tokens] + spec.token_counts(), spec.blocks))
        if gathers:
            as_static = SlimSpec.from_dict({**spec.to_dict(), "token_mode": "static"})
            assert lm.predict(spec) > static.predict(as_static)
    assert dropping > 0


def test_the_fraction_rule_in_attentive_mode_counts_from_the_first_ranking_block():
    """Block 0 ranks nothing, so an attentive search records about 0 for it: the rule's minimum over depth and its
    global threshold start at block 1, and the counts taper with depth as the importances do (taken through
    block 0, every block would get block 0's count)."""
    from dataclasses import replace

    from slimdeploy.select.vitslim import fraction_spec

    from .synthetic import synthetic_importance

    arch = _wide()
    imp = synthetic_importance(arch)
    tok = imp.tok.copy()
    tok[0] = 1e-12  # what the search's block 0 holds
    imp = replace(imp, tok=tok, token_mode="attentive")
    spec = fraction_spec(arch, ModelConfig("t-wide-att"), imp, keep_tokens=0.5)
    P, n = arch.num_prefix_tokens, arch.num_patches
    patches = [c - P for c in spec.token_counts()]
    assert patches[0] == n
    assert all(x >= y for x, y in zip(patches[1:], patches[2:]))
    assert patches[1] > patches[-1]  # deep blocks matter less in the synthetic importances: they keep fewer
    assert sum(patches[1:]) == pytest.approx(0.5 * n * (arch.depth - 1), abs=arch.depth)


def test_one_token_count_keeps_the_same_count_from_the_first_ranking_block_and_is_a_candidate():
    """The one-count rule: every block that may drop tokens keeps the top `keep_tokens` of the patches; it is a
    candidate family in ranked modes only (in static mode a position dropped in block 0 never reaches the model),
    and solved to a budget it meets it."""
    from dataclasses import replace

    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.candidates import Family, Problem, families
    from slimdeploy.select.solver import LatencyCost
    from slimdeploy.select.vitslim import fraction_spec

    from .synthetic import staircase_profile, synthetic_importance

    arch = _wide()
    cfg = ModelConfig("t-wide-att")
    static = synthetic_importance(arch)
    imp = replace(static, token_mode="attentive")
    P, n = arch.num_prefix_tokens, arch.num_patches
    spec = fraction_spec(arch, cfg, imp, keep_tokens=0.5, one_count=True)
    assert [c - P for c in spec.token_counts()] == [n] + [round(0.5 * n)] * (arch.depth - 1)
    tapering = fraction_spec(arch, cfg, imp, keep_tokens=0.5)
    assert len(set(tapering.token_counts()[1:])) > 1  # the same importances taper under the default rule
    with pytest.raises(SlimError, match="ranked token modes"):
        fraction_spec(arch, cfg, static, keep_tokens=0.5, one_count=True)
    assert not any(f.kind == "one-count" for f in families(static))
    fams = [f for f in families(imp) if f.kind == "one-count"]
    assert fams and all(f.params[2] > 0 for f in fams)

    lm = LatencyModel(staircase_profile(arch)).for_tokens("attentive")
    budget = 0.5 * lm.predict(SlimSpec.dense(cfg, arch))
    solved = Problem(arch, cfg, imp, LatencyCost(lm)).solve(Family("one-count", (0.0, 0.0, 1.0)), budget)
    counts = solved.token_counts()
    assert lm.predict(solved) <= budget + 1e-9
    assert counts[0] == arch.num_tokens and len(set(counts[1:])) == 1 and counts[1] < arch.num_tokens


def test_a_profile_without_the_ranking_table_refuses_attentive_mode():
    from slimdeploy.latency.model import LatencyModel

    from .synthetic import staircase_profile

    arch = _wide()
    prof = staircase_profile(arch)
    del prof.tables["rank"]
    LatencyModel(prof)  # static mode is fine
    with pytest.raises(SlimError, match="re-measure it"):
        LatencyModel(prof).for_tokens("attentive")


@pytest.mark.parametrize("kind", ["rank", "fuse"])
def test_the_ranking_piece_exports_and_runs(kind):
    from slimdeploy.latency import components
    from slimdeploy.latency.backends import get_backend

    model = tiny_model("t-cls")
    a = arch_of(model)
    piece, shape = components.build(kind, a, model.blocks[0], (6, a.num_tokens))
    x = torch.randn(1, *shape)
    with get_backend("ort-cpu").load_module(piece.eval(), x) as session:
        t = session.time(x.numpy(), timing.COMPONENT)
    assert t.median_ms > 0
    assert piece(x).shape == (1, 6, a.embed_dim)


# ---- shifted Fashion-MNIST ------------------------------------------------------------------------
@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed (make setup)")
def test_shifted_fashion_mnist_is_fixed_per_image_and_off_centre():
    from slimdeploy.data import SHIFTED_CANVAS, fashion_mnist, fashion_mnist_shifted

    plain, shifted, again = fashion_mnist("val"), fashion_mnist_shifted("val"), fashion_mnist_shifted("val")
    offsets = set()
    for i in range(200):
        img, y = shifted[i]
        assert img.shape == (1, SHIFTED_CANVAS, SHIFTED_CANVAS) and int(y) == int(plain[i][1])
        assert torch.equal(img, again[i][0])  # the same position in every run
        assert int(img.sum()) == int(plain[i][0].sum())  # the whole item, nothing cut
        offsets.add(tuple(int(v) for v in shifted.offsets[i]))
    assert len(offsets) > 100  # anywhere on the canvas, not one position
    assert not torch.equal(fashion_mnist_shifted("train").offsets[:200], shifted.offsets[:200])


def test_shifted_canvas_is_named_in_the_data_name():
    from slimdeploy.data import SHIFTED_CANVAS, shifted_canvas

    assert shifted_canvas("fashion-mnist-shifted") == SHIFTED_CANVAS
    assert shifted_canvas("fashion-mnist-shifted-84") == 84
    assert shifted_canvas("fashion-mnist") is None and shifted_canvas("fashion-mnist-shifted-x") is None


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed (make setup)")
def test_a_larger_shifted_canvas_holds_the_whole_item_anywhere():
    from slimdeploy.data import fashion_mnist, load_data

    cfg = {"input_size": (1, 84, 84), "mean": (0.5,), "std": (0.5,)}
    bundle = load_data("fashion-mnist-shifted-84", cfg, 10, val_limit=300, with_train=False)
    plain = fashion_mnist("val")
    rows, cols = set(), set()
    for i in range(300):
        img, y = bundle.val[i]
        assert img.shape == (1, 84, 84) and int(y) == int(plain[i][1])
        assert int(img.sum()) == int(plain[i][0].sum())
        dy, dx = (int(v) for v in bundle.val.dataset.offsets[i])
        rows.add(dy), cols.add(dx)
    assert max(rows) > 28 and max(cols) > 28  # beyond where a 56-px canvas ends
    with pytest.raises(SlimError, match="smaller than the images"):
        load_data("fashion-mnist-shifted-20", cfg, 10, with_train=False)


# ---- fused mode (EViT's fusion of the dropped tokens) ------------------------------------------------
def test_fused_token_is_the_score_weighted_mean_of_the_dropped_ones():
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(3, 9, 5, generator=g), torch.rand(3, 9, generator=g)
    out, out_scores, _ = keep_top_tokens(x, scores, keep=5, prefix=1, fuse=True)
    assert out.shape == (3, 5, 5) and out_scores.shape == (3, 5)
    plain, _, _ = keep_top_tokens(x, scores, keep=4, prefix=1)
    assert torch.equal(out[:, :4], plain)  # the prefix and the top 3 patches, as attentive mode keeps them
    for i in range(3):
        gone = sorted(set(range(1, 9)) - {int(t) for t in scores[i, 1:].argsort(descending=True)[:3] + 1})
        w = scores[i, gone] / scores[i, gone].sum()
        assert torch.allclose(out[i, 4], (x[i, gone] * w[:, None]).sum(0), atol=1e-6)
        assert torch.allclose(out_scores[i, 4], scores[i, gone].sum())


def test_fused_mode_keeps_what_attentive_mode_drops():
    model = tiny_model("t-cls", 2)
    a = arch_of(model)
    x = torch.randn(4, 3, 16, 16)
    outs = {}
    for mode in ("attentive", "fused"):
        spec = SlimSpec.dense(ModelConfig("t-cls"), a)
        spec.token_mode = mode
        full = build_slim(spec.validate(), model)
        with torch.no_grad():
            assert torch.equal(full(x), model(x))  # nothing dropped: the dense model, in either mode
        for b in spec.blocks[1:]:
            b.tokens = list(range(4))
        outs[mode] = build_slim(spec.validate(), model)
        assert outs[mode].blocks[1].fuse == (mode == "fused")
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        after0, scores, _ = outs["fused"].blocks[0].forward_ranked(h, None)
        fused, _, _ = outs["fused"].blocks[1].forward_ranked(after0, scores)
        kept, _, _ = outs["attentive"].blocks[1].forward_ranked(after0, scores)
    assert fused.shape == kept.shape == (4, 4, a.embed_dim)
    assert not torch.allclose(fused, kept)  # the last place holds the fused token, not the fourth-ranked one


def test_fused_specs_keep_a_place_for_the_fused_token():
    model = tiny_model("t-cls")
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig("t-cls"), a)
    spec.token_mode = "fused"
    for b in spec.blocks[1:]:
        b.tokens = list(range(a.num_prefix_tokens))  # every patch dropped: no place left for the fused one
    with pytest.raises(SlimError, match="fused token"):
        spec.validate()
    spec.token_mode = "attentive"
    spec.validate()  # attentive mode may drop every patch


def test_fused_mode_searches_by_rank_and_is_priced_by_the_fuse_table():
    from dataclasses import replace

    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.candidates import Problem, candidates
    from slimdeploy.select.solver import LatencyCost

    from .synthetic import staircase_profile, synthetic_importance

    assert MaskedViT(tiny_model("t-cls"), SearchDims(token_mode="fused")).attentive  # the same relaxation
    arch = _wide()
    prof = staircase_profile(arch)
    lm = LatencyModel(prof).for_tokens("fused")
    imp = replace(synthetic_importance(arch), token_mode="fused")
    found = candidates(Problem(arch, ModelConfig("t-wide-att"), imp, LatencyCost(lm)),
                       0.5 * lm.predict(SlimSpec.dense(ModelConfig("t-wide-att"), arch)))
    dropping = [spec for _, spec in found if any(n < arch.num_tokens for n in spec.token_counts())]
    assert dropping and all(spec.token_mode == "fused" for _, spec in found)
    for spec in dropping:  # the same structure costs more fused than ranked: the weighted mean is paid for
        ranked = SlimSpec.from_dict({**spec.to_dict(), "token_mode": "attentive"})
        assert lm.predict(spec) > LatencyModel(prof).predict(ranked)
    del prof.tables["fuse"]
    with pytest.raises(SlimError, match="re-measure it"):
        LatencyModel(prof).for_tokens("fused")


@pytest.mark.parametrize("batch", [1, None])
def test_a_scoring_block_of_one_head_and_one_query_channel_exports_valid_onnx(tmp_path, batch):
    """onnxslim once returned a graph out of topological order for this shape (one head, one q/k channel, ranking
    a later block's tokens): the export must still be valid ONNX that runs and matches."""
    model = tiny_model("t-cls")
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig("t-cls"), a)
    spec.token_mode = "attentive"
    for b in spec.blocks[:-1]:
        b.heads, b.qk, b.v = [0], [[3]], [[5]]
    spec.blocks[-1].tokens = list(range(a.num_tokens - 6))
    slim = build_slim(spec.validate(), model)
    path = export_onnx(slim, tmp_path / "m.onnx", (3, 16, 16), batch)
    onnx.checker.check_model(onnx.load(str(path)))
    assert_onnx_parity(slim, path, batches=(1,) if batch else (1, 8))


@pytest.mark.parametrize("mode", ["attentive", "fused"])
def test_the_solver_keeps_heads_to_rank_the_tokens_it_drops(mode):
    """Where block 0's heads are worth nothing, a greedy descent drops them first and then, to drop tokens at
    block 1, needs attention that no earlier block has left: a structure SlimSpec refuses. The solver keeps a
    ranking block before every drop, and tries the descent that keeps block 0's last head as well: at small
    budgets that one keeps more importance (tokens can then go from block 1 on)."""
    from dataclasses import replace

    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.solver import LatencyCost, Selector

    from .synthetic import staircase_profile, synthetic_importance

    arch = _wide()
    cfg = ModelConfig("t-wide-att")
    lm = LatencyModel(staircase_profile(arch)).for_tokens(mode)
    imp = replace(synthetic_importance(arch), token_mode=mode)
    imp.qk[0] *= 1e-9  # block 0's attention: the first thing to go
    imp.v[0] *= 1e-9
    sel = Selector(arch, cfg, imp, LatencyCost(lm))
    dense = lm.predict(SlimSpec.dense(cfg, arch))
    gained = 0.0
    for f in (0.6, 0.4, 0.3, 0.2):
        found = sel.select(f * dense)  # SlimSpec.validate ran inside
        counts = found.spec.token_counts()
        first_drop = next(i for i, n in enumerate(counts) if n < arch.num_tokens)
        assert any(b.num_heads for b in found.spec.blocks[:first_drop])
        assert lm.predict(found.spec) <= f * dense + 1e-9
        free = sel._select(f * dense, keep_first_head=False)
        assert found.importance >= free.importance
        gained = max(gained, found.importance - free.importance)
    assert gained > 0  # the second descent found more somewhere

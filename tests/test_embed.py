"""The embedding width (the residual stream's channels): masked twin == pruned model, ONNX parity, the spec's
schema, parameter counts, the search's mask, and selection with it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from slimdeploy.analysis import spec_params
from slimdeploy.errors import SlimError
from slimdeploy.masks import MaskedViT, SearchDims, fold_masks, hard_twin
from slimdeploy.models import arch_of, count_params, create_model, register_model
from slimdeploy.select.importance import Importance, spec_importance
from slimdeploy.select.solver import MacsCost, Selector
from slimdeploy.slim import build_slim
from slimdeploy.types import ModelConfig, SlimSpec

from .conftest import assert_onnx_parity, random_spec, tiny_model
from .synthetic import wide_arch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def narrow(spec: SlimSpec, seed: int, keep: int | None = None) -> SlimSpec:
    D = spec.arch.embed_dim
    rng = random.Random(seed)
    spec.embed = sorted(rng.sample(range(D), keep or rng.randint(1, D - 1)))
    return spec.validate()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("force", [None, "no-heads", "no-mlp"])
def test_hard_embed_mask_equals_the_narrower_model(variant, seed, force):
    model = tiny_model(variant, seed)
    spec = narrow(random_spec(model, seed, force=force), seed)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        masked = hard_twin(model, spec)(x)
        slim = build_slim(spec, model)
        pruned = slim(x)
    assert _rel_err(pruned, masked) <= 1e-4
    # the channels are really gone: every layer on the stream is narrower
    e = spec.embed_dim
    assert slim.patch_embed.proj.out_channels == e and slim.pos_embed.shape[-1] == e
    assert all(b.norm1.normalized_shape == (e,) for b in slim.blocks)
    assert slim.head.in_features == e


def test_embed_alone_and_with_attentive_tokens(variant):
    model = tiny_model(variant, 3)
    a = arch_of(model)
    x = torch.randn(2, 3, 16, 16)
    for spec in (narrow(SlimSpec.dense(ModelConfig(variant), a), 3, keep=5),):
        with torch.no_grad():
            assert _rel_err(build_slim(spec, model)(x), hard_twin(model, spec)(x)) <= 1e-4
    spec = SlimSpec.dense(ModelConfig(variant), a)
    spec.token_mode = "attentive"
    spec.blocks[2].tokens = list(range(a.num_prefix_tokens + 5))
    narrow(spec, 4)
    with torch.no_grad():
        assert _rel_err(build_slim(spec, model)(x), hard_twin(model, spec)(x)) <= 1e-4


def test_a_removed_channel_changes_nothing_kept():
    """What a pruned channel held does not matter: changing its weights everywhere leaves the masked model's
    output unchanged (it is read by nothing, and left out of every norm's statistics)."""
    model = tiny_model("t-cls", 1)
    spec = narrow(SlimSpec.dense(ModelConfig("t-cls"), arch_of(model)), 1, keep=20)
    gone = torch.tensor(sorted(set(range(32)) - set(spec.embed)))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = hard_twin(model, spec)(x)
        for blk in model.blocks:
            blk.attn.proj.weight[gone] += 3.0
            blk.mlp.fc2.bias[gone] -= 2.0
        model.pos_embed[..., gone] += 1.0
        after = hard_twin(model, spec)(x)
    assert torch.allclose(before, after, atol=1e-5)


def test_onnx_parity_with_a_narrower_stream(tmp_path, variant):
    from slimdeploy.export import export_onnx

    model = tiny_model(variant, 2)
    spec = narrow(random_spec(model, 2), 2, keep=12)
    slim = build_slim(spec, model)
    for batch in (1, 8):
        path = export_onnx(slim, tmp_path / f"b{batch}.onnx", (3, 16, 16), batch_size=batch)
        assert_onnx_parity(slim, path, batches=(batch,))


def test_parameter_count_follows_the_width(variant):
    model = tiny_model(variant)
    spec = narrow(random_spec(model, 5), 5)
    assert spec_params(spec) == count_params(build_slim(spec, model))


def test_spec_schema_3_round_trip_and_older_specs(tmp_path):
    model = tiny_model("t-cls")
    spec = narrow(random_spec(model, 1), 1)
    spec.save(tmp_path / "s.json")
    back = SlimSpec.load(tmp_path / "s.json")
    assert back.embed == spec.embed and back.schema == 3
    old = spec.to_dict()
    del old["embed"]
    old["schema"] = 2
    assert SlimSpec.from_dict(old).embed == list(range(32))  # schema 2: every channel kept
    del old["token_mode"]
    old["schema"] = 1
    assert SlimSpec.from_dict(old).embed == list(range(32))
    for bad, msg in ((dict(embed=[3, 2]), "sorted"), (dict(embed=[40]), r"\[0, 32\)"), (dict(embed=[]), "no embedding"),
                     (dict(embed="all"), "list")):
        with pytest.raises(SlimError, match=msg):
            SlimSpec.from_dict({**spec.to_dict(), **bad})
    with pytest.raises(SlimError, match="schema 2 has no 'embed'"):
        SlimSpec.from_dict({**spec.to_dict(), "schema": 2})


def test_masked_model_at_ones_is_dense_and_the_mask_learns(variant):
    model = tiny_model(variant)
    masked = MaskedViT(model, SearchDims(embed=True))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(masked.eval()(x), model(x), atol=1e-5)
    masked.train()
    masked(x).logsumexp(-1).sum().backward()
    assert masked.embed.grad is not None and masked.embed.grad.abs().sum() > 0
    assert set(masked.l1()) >= {"embed"} and float(masked.l1()["embed"].detach()) == pytest.approx(32.0)


def test_soft_embed_mask_moves_continuously_toward_removal():
    """A channel's mask going to 0 approaches the model without it (removal is continuous, not a jump)."""
    model = tiny_model("t-cls", 2)
    spec = SlimSpec.dense(ModelConfig("t-cls"), arch_of(model))
    spec.embed = [c for c in range(32) if c != 7]
    x = torch.randn(2, 3, 16, 16)
    masked = MaskedViT(model, SearchDims(embed=True)).eval()
    with torch.no_grad():
        target = build_slim(spec, model)(x)
        gaps = []
        for value in (1.0, 0.1, 1e-3):
            masked.embed.fill_(1.0)
            masked.embed[7] = value
            gaps.append(float((masked(x) - target).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 * gaps[0]


def test_fold_keeps_the_output_scaling_of_kept_channels():
    """Kept channels at a common soft value fold exactly: the weighted statistics do not change when every
    weight is scaled alike, and the output scaling goes into the norms' affine."""
    model = tiny_model("t-layerscale", 1)
    a = arch_of(model)
    spec = narrow(SlimSpec.dense(ModelConfig("t-layerscale"), a), 1, keep=24)
    masked = MaskedViT(model, SearchDims(tokens=False, attn=False, mlp=False, embed=True)).eval()
    with torch.no_grad():
        masked.embed.zero_()
        masked.embed[spec.embed] = 0.6
        x = torch.randn(2, 3, 16, 16)
        soft = masked(x)
        pruned = build_slim(spec, fold_masks(masked))(x)
    assert _rel_err(pruned, soft) <= 1e-4


def test_a_normalised_embedding_is_refused():
    register_model("t-prenorm", dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                                     num_heads=4, pre_norm=True))
    model = create_model(ModelConfig("t-prenorm"))
    with pytest.raises(SlimError, match="--no-embed"):
        MaskedViT(model, SearchDims(embed=True))
    spec = narrow(SlimSpec.dense(ModelConfig("t-prenorm"), arch_of(model)), 0)
    with pytest.raises(SlimError, match="cannot be pruned"):
        build_slim(spec, model)


def _importance(a, embed_scale: float) -> Importance:
    rng = np.random.default_rng(0)
    return Importance(qk=rng.random((a.depth, a.num_heads, a.head_dim)), v=rng.random((a.depth, a.num_heads,
                      a.head_dim)), mlp=rng.random((a.depth, a.mlp_dim)), tok=None,
                      embed=rng.random(a.embed_dim) * embed_scale)


def test_selector_narrows_the_embedding_by_its_importance():
    model = tiny_model("t-cls")
    a = arch_of(model)
    cost = MacsCost(a)
    budget = 0.5 * cost.of_spec(SlimSpec.dense(ModelConfig("t-cls"), a))
    cheap = Selector(a, ModelConfig("t-cls"), _importance(a, 1e-3), cost).select(budget)
    dear = Selector(a, ModelConfig("t-cls"), _importance(a, 1e3), cost).select(budget)
    assert cheap.spec.embed_dim < a.embed_dim  # unimportant channels go first
    assert dear.spec.embed_dim == a.embed_dim  # important ones stay, other kinds pay
    for sel in (cheap, dear):
        assert sel.cost <= budget and cost.of_spec(sel.spec) == pytest.approx(sel.cost)
        assert sel.importance == pytest.approx(spec_importance(sel.spec, _importance(a, 1e-3 if sel is cheap else 1e3)))
    imp = _importance(a, 1e-3)  # the kept channels are the most important ones
    kept = set(cheap.spec.embed)
    assert min(imp.embed[list(kept)]) >= max(imp.embed[[c for c in range(a.embed_dim) if c not in kept]])


def test_latency_model_scales_pieces_by_the_measured_embedding_ratio():
    from slimdeploy.latency.model import LatencyModel

    from .synthetic import staircase_profile

    a = wide_arch()
    lm = LatencyModel(staircase_profile(a))
    widths = lm.embed_widths()
    assert widths[-1] == a.embed_dim and widths[0] < a.embed_dim
    e = widths[1]
    n, h, q, v, m = a.num_tokens, 2, 8, 8, 64
    full = lm.block_parts(n, n, h, q, v, m)
    narrow_parts = lm.block_parts(n, n, h, q, v, m, e=e)
    for k in ("qkv", "proj", "mlp", "attn_rest", "mlp_rest"):  # every piece on the stream costs e / D of itself
        assert narrow_parts[k] == pytest.approx(full[k] * e / a.embed_dim, rel=1e-9)
    assert narrow_parts["core"] == full["core"]  # the attention core does not touch the stream
    dense = SlimSpec.dense(ModelConfig("t-wide"), a)
    narrower = SlimSpec.dense(ModelConfig("t-wide"), a)
    narrower.embed = list(range(e))
    assert lm.predict(narrower) < lm.predict(dense)
    old = LatencyModel(staircase_profile(a, embed=False))
    with pytest.raises(SlimError, match="no embedding-width tables.*--device local"):
        old.embed_widths()
    assert old.predict(dense) == pytest.approx(lm.predict(dense))  # nothing changes at the full width


def test_selection_on_latency_chooses_a_measured_embedding_width():
    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.candidates import Problem, candidates, families
    from slimdeploy.select.solver import LatencyCost

    from .synthetic import staircase_profile, synthetic_importance

    a = wide_arch()
    lm = LatencyModel(staircase_profile(a))
    imp = synthetic_importance(a)
    imp.embed = np.random.default_rng(1).exponential(1.0, a.embed_dim) * 1e-5  # cheap channels
    dense = lm.predict(SlimSpec.dense(ModelConfig("t-wide"), a))
    sel = Selector(a, ModelConfig("t-wide"), imp, LatencyCost(lm)).select(0.5 * dense)
    assert sel.spec.embed_dim in lm.embed_widths() and sel.spec.embed_dim < a.embed_dim
    assert lm.predict(sel.spec) <= 0.5 * dense + 1e-12
    names = [f.name for f in families(imp)]
    assert any("embed" in n for n in names) and not any("embed" in f.name for f in families(
        synthetic_importance(a)))
    cands = candidates(Problem(a, ModelConfig("t-wide"), imp, LatencyCost(lm)), 0.5 * dense)
    widths = {s.embed_dim for _, s in cands}
    assert a.embed_dim in widths and len(widths) > 1  # embedding-keeping and embedding-narrowing candidates
    assert all(lm.predict(s) <= 0.5 * dense + 1e-9 for _, s in cands)


def test_fraction_rule_keeps_the_most_important_channels_and_needs_the_search():
    from slimdeploy.select.vitslim import fraction_spec

    a = wide_arch()
    imp = _importance(a, 1.0)
    spec = fraction_spec(a, ModelConfig("t-wide"), imp, keep_embed=0.25)
    assert spec.embed == sorted(np.argsort(-imp.embed)[:16].tolist())
    imp.embed = None
    with pytest.raises(SlimError, match="--keep-embed needs a search of the embedding width"):
        fraction_spec(a, ModelConfig("t-wide"), imp, keep_embed=0.5)


def test_a_model_without_final_norm_reads_only_kept_channels():
    register_model("t-nofinal", dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                                     num_heads=4, final_norm=False))
    model = tiny_model("t-nofinal", 1)
    spec = narrow(random_spec(model, 1), 1, keep=10)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel_err(build_slim(spec, model)(x), hard_twin(model, spec)(x)) <= 1e-4


def test_searching_the_embedding_only_adds_candidates():
    """Every family of a search without the embedding is still there with it (keeping the embedding whole), so
    that searching one more kind can never take away the structure that would have won."""
    from slimdeploy.select.candidates import families

    from .synthetic import synthetic_importance

    a = wide_arch()
    without = families(synthetic_importance(a))
    imp = synthetic_importance(a)
    imp.embed = np.ones(a.embed_dim)
    with_embed = families(imp)
    assert with_embed[:len(without)] == without
    assert all(len(f.params) == {"greedy": 4, "channels": 3, "fractions": 4}[f.kind]
               for f in with_embed[len(without):])

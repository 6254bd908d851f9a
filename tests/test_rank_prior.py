"""Attentive ranking with the positions' prior: per image, (1 - w) x the class token's attention + w x the
search's importance of each patch position; the positions ride along with the tokens through every ranking."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from slimdeploy.errors import SlimError
from slimdeploy.export import export_onnx, onnx_sequence_lengths
from slimdeploy.models import arch_of
from slimdeploy.slim import build_slim
from slimdeploy.types import ModelConfig, SlimSpec

from .conftest import assert_onnx_parity, random_spec, tiny_model


def _ranked(model, counts, prior_row, weight, name="t-cls"):
    """An attentive spec keeping `counts` tokens per block, ranking with `prior_row` in every block."""
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig(name), a)
    spec.token_mode = "attentive"
    for b, n in zip(spec.blocks, counts):
        b.tokens = list(range(n))
    spec.rank_prior, spec.prior_weight = [list(map(float, prior_row))] * a.depth, weight
    return spec.validate()


def test_at_weight_one_the_prior_alone_decides_through_every_ranking():
    """Ranked by the prior alone, every image keeps the same positions: the model is the static one keeping them.
    Two rankings in a row (blocks 1 and 2) prove that the positions travel with the tokens: a second ranking
    that read the prior by place instead of by position would keep other patches."""
    model = tiny_model("t-cls", 2)
    a = arch_of(model)
    P, n = a.num_prefix_tokens, a.num_patches
    order = np.random.default_rng(0).permutation(n)  # the prior's ranking of the patches, best first
    row = np.empty(n)
    row[order] = np.linspace(2.0, 1.0, n)
    k1, k2 = n - 3, n - 7
    counts = [a.num_tokens, P + k1, P + k2] + [P + k2] * (a.depth - 3)
    ranked = build_slim(_ranked(model, counts, row, 1.0), model)
    static = SlimSpec.dense(ModelConfig("t-cls"), a)
    for i, b in enumerate(static.blocks):
        keep = order[: [n, k1, k2][min(i, 2)]]
        b.tokens = list(range(P)) + sorted(int(t) + P for t in keep)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        got, ref = ranked(x), build_slim(static.validate(), model)(x)
    assert torch.allclose(got, ref, atol=1e-5)
    wrong = SlimSpec.dense(ModelConfig("t-cls"), a)  # the second drop taken by place: not the same model
    for i, b in enumerate(wrong.blocks):
        b.tokens = static.blocks[i].tokens if i < 2 else list(range(P)) + sorted(
            static.blocks[1].tokens[P:][j] for j in order[:k2] if j < k1)
    with torch.no_grad():
        assert not torch.allclose(got, build_slim(wrong.validate(), model)(x), atol=1e-3)


def test_the_prior_moves_the_choice_and_attention_keeps_its_share():
    """One patch the class token ignores in every image is dropped by attention alone; a prior that rates it far
    above the rest keeps it."""
    model = tiny_model("t-cls", 3)
    a = arch_of(model)
    P, n = a.num_prefix_tokens, a.num_patches
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        blk = model.blocks[0]
        B, N, C = h.shape
        qkv = blk.attn.qkv(blk.norm1(h)).reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        att = ((qkv[0][:, :, :1] * blk.attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)
    least = int(att[:, P:].mean(0).argmin())
    counts = [a.num_tokens] + [a.num_tokens - 1] * (a.depth - 1)
    favoured = np.ones(n)
    favoured[least] = 1000.0

    spec = _ranked(model, counts, favoured, 0.9)
    slim = build_slim(spec, model)
    with torch.no_grad():
        after0, scores, pos = slim.blocks[0].forward_ranked(h, None, torch.arange(n).expand(B, -1))
        _, _, pos = slim.blocks[1].forward_ranked(after0, scores, pos)
    assert all(least in set(pos[i].tolist()) for i in range(B))  # the prior keeps it in every image
    plain = build_slim(SlimSpec.from_dict({**spec.to_dict(), "rank_prior": None, "prior_weight": 0.0}), model)
    with torch.no_grad():
        after0, scores, _ = plain.blocks[0].forward_ranked(h, None)
        dropped = att[:, P:].argmin(1)
        _, _, pos = plain.blocks[1].forward_ranked(after0, scores, torch.arange(n).expand(B, -1))
    assert all(int(dropped[i]) not in set(pos[i].tolist()) for i in range(B))  # attention alone drops its least


@pytest.mark.parametrize("variant", ["t-cls", "t-reg"])
def test_export_with_the_prior_is_static_and_matches(tmp_path, variant):
    model = tiny_model(variant)
    spec = random_spec(model, 4)
    for b in spec.blocks:
        b.tokens = list(range(b.num_tokens))
    a = arch_of(model)
    spec = SlimSpec.from_dict({**spec.to_dict(), "token_mode": "attentive",
                               "rank_prior": np.random.default_rng(1).uniform(0.1, 1.0, (a.depth, a.num_patches))
                               .tolist(), "prior_weight": 0.5})
    assert sum(n < p for p, n in zip([a.num_tokens] + spec.token_counts(), spec.token_counts())) >= 2
    slim = build_slim(spec, model)
    path = export_onnx(slim, tmp_path / "m.onnx", (3, 16, 16))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and not ops & {"NonZero", "Where", "ScatterElements", "ScatterND"}
    assert set(onnx_sequence_lengths(path)) == set(spec.token_counts())
    assert_onnx_parity(slim, path, batches=(1, 8))


def test_spec_round_trip_and_refusals():
    model = tiny_model("t-cls")
    a = arch_of(model)
    row = list(np.linspace(1.0, 2.0, a.num_patches))
    spec = _ranked(model, [a.num_tokens] + [a.num_tokens - 2] * (a.depth - 1), row, 0.5)
    back = SlimSpec.from_dict(spec.to_dict())
    assert back.rank_prior == spec.rank_prior and back.prior_weight == 0.5
    plain = SlimSpec.from_dict({**spec.to_dict(), "rank_prior": None, "prior_weight": 0.0})
    assert "rank_prior" not in plain.to_dict()  # specs without a prior read as before
    bad = {"rank_prior": [row[:-1]] * a.depth, "prior_weight": 0.5}
    for change, msg in [(bad, "rows of"), ({"prior_weight": 0.0}, "prior_weight"),
                        ({"rank_prior": [[-1.0] + row[1:]] * a.depth}, "negative"),
                        ({"rank_prior": None, "prior_weight": 0.5}, "without a rank_prior"),
                        ({"token_mode": "fused"}, "attentive token mode only")]:
        with pytest.raises(SlimError, match=msg):
            SlimSpec.from_dict({**spec.to_dict(), **change})


def test_the_prior_is_each_positions_importance_from_that_block_on():
    from slimdeploy.select.importance import Importance

    depth, n = 4, 6
    pos = np.zeros((depth, n))
    pos[3, 2] = 5.0  # patch 2 matters in the last block only
    pos[0, 4] = 1.0  # patch 4 in the first only
    imp = Importance(qk=None, v=None, mlp=None, tok=np.ones((depth, n)), token_mode="attentive", pos=pos)
    prior = np.array(imp.ranking()["rank_prior"])
    assert prior.shape == (depth, n) and np.allclose(prior.sum(1), 1.0) and (prior > 0).all()
    assert (prior.argmax(1) == 2).all()  # dropping patch 2 anywhere loses it in the last block
    assert prior[0, 4] > prior[0, 0] and prior[1, 4] == pytest.approx(prior[1, 0])  # patch 4: gone after block 0
    assert imp.ranking()["prior_weight"] == imp.prior_weight
    assert replace(imp, prior_weight=0.0).ranking() == {} and replace(imp, pos=None).ranking() == {}
    assert replace(imp, token_mode="fused").ranking() == {}


def test_position_importance_is_first_order_and_shaped_per_block():
    """The gate's gradient is the loss's first-order change: removing a position's token (gate 1 -> 0) in the
    last block of a two-block model changes the loss by about what the score says, for the largest scores."""
    import torch.nn.functional as F

    from slimdeploy.data import DataBundle
    from slimdeploy.search import position_importance

    model = tiny_model("t-cls")
    a = arch_of(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=g)
    labels = torch.randint(0, a.num_classes, (64,), generator=g)
    ds = torch.utils.data.TensorDataset(images, labels)
    bundle = DataBundle(train=ds, val=ds, transform=None, num_classes=a.num_classes, name="t")
    imp = position_importance(model, bundle, 64, "cpu", images=64)
    assert imp.shape == (a.depth, a.num_patches) and (imp >= 0).all() and (imp > 0).any()
    # the same number by hand: d loss / d gate of block 0, patch j, at gate 1, is <dL/dx_j, x_j>
    x0 = model.norm_pre(model._pos_embed(model.patch_embed(images))).detach().requires_grad_(True)
    x = x0
    for blk in model.blocks:
        x = blk(x)
    loss = F.cross_entropy(model.forward_head(model.norm(x)), labels)
    (grad,) = torch.autograd.grad(loss, x0)
    by_hand = (grad * x0).sum((0, 2)).abs()[a.num_prefix_tokens:]
    assert torch.allclose(imp[0], by_hand, rtol=1e-4, atol=1e-7)


def test_in_mode_keeps_the_counts_and_drops_the_prior():
    """A static spec's kept positions become counts in a ranked mode (the same structure, tokens chosen per image),
    a ranked spec's counts become the first positions in static mode, and the prior goes in both."""
    model = tiny_model("t-cls", 2)
    a = arch_of(model)
    P, n = a.num_prefix_tokens, a.num_patches
    static = SlimSpec.dense(ModelConfig("t-cls"), a)
    for i, b in enumerate(static.blocks[1:], 1):
        b.tokens = list(range(P)) + list(range(P + 3, P + n - i))  # positions, not a prefix of them
    static.validate()
    att = static.in_mode("attentive")
    assert att.token_mode == "attentive" and att.token_counts() == static.token_counts()
    assert all(b.tokens == list(range(b.num_tokens)) for b in att.blocks)
    assert static.blocks[1].tokens[P] == P + 3  # the static spec itself is left as it was
    prior = replace(att, rank_prior=[[1.0] * n] * a.depth, prior_weight=0.5).validate()
    for mode in ("static", "attentive", "fused"):
        twin = prior.in_mode(mode)
        assert twin.token_mode == mode and twin.rank_prior is None and twin.prior_weight == 0.0
        assert [b.tokens for b in twin.blocks] == [b.tokens for b in att.blocks]

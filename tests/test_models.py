"""Model registry: every supported ViT variant by name, checkpoints, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from slimdeploy.analysis import spec_macs, spec_params
from slimdeploy.errors import SlimError
from slimdeploy.models import arch_of, count_params, create_model, load_checkpoint
from slimdeploy.types import ModelConfig, SlimSpec

# (timm name, what it exercises); small images keep the forward pass cheap
VARIANTS = [
    ("vit_tiny_patch16_224", dict(global_pool="token", num_prefix_tokens=1)),
    ("deit_tiny_distilled_patch16_224", dict(distilled=True, num_prefix_tokens=2)),
    # one register token, no class token, global average pooling
    ("vit_wee_patch16_reg1_gap_256", dict(global_pool="avg", num_prefix_tokens=1)),
    ("deit3_small_patch16_224", dict(layer_scale=True)),
    ("fmnist-vit", dict(num_tokens=17, in_chans=1)),
]


@pytest.mark.parametrize("name,expect", VARIANTS)
def test_load_variant_by_name(name, expect):
    kw = {} if name == "fmnist-vit" else dict(img_size=64, num_classes=7)
    model = create_model(ModelConfig(name, **kw)).eval()
    a = arch_of(model)
    for k, v in expect.items():
        assert getattr(a, k) == v, (k, getattr(a, k))
    x = torch.randn(2, a.in_chans, a.img_size, a.img_size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, a.num_classes)
    # analytic counts agree with the built module
    spec = SlimSpec.dense(ModelConfig(name), a)
    assert spec_params(spec) == count_params(model)
    assert spec_macs(spec) > 0


def test_macs_match_the_paper_table():
    for name, gmacs in (("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6)):
        a = arch_of(create_model(ModelConfig(name)))
        macs = spec_macs(SlimSpec.dense(ModelConfig(name), a)) / 1e9
        assert abs(macs - gmacs) / gmacs <= 0.02, (name, macs)


def test_unknown_and_unsupported_models():
    with pytest.raises(SlimError, match="unknown model"):
        create_model(ModelConfig("no_such_model"))
    with pytest.raises(SlimError, match="not a timm VisionTransformer"):
        create_model(ModelConfig("resnet18"))
    with pytest.raises(SlimError, match="global_pool"):
        create_model(ModelConfig("vit_so150m_patch16_reg4_map_256", img_size=32))


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    m = create_model(ModelConfig("fmnist-vit"))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"model": m.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m2 = create_model(ModelConfig("fmnist-vit"), checkpoint=tmp_path / f)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    other = create_model(ModelConfig("fmnist-vit", num_classes=3))
    with pytest.raises(SlimError, match="does not match the model: .*head.weight"):
        load_checkpoint(other, tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SlimError, match="cannot read"):
        load_checkpoint(m, tmp_path / "bad.safetensors")
    with pytest.raises(SlimError, match="not found"):
        load_checkpoint(m, tmp_path / "missing.pth")


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint holding arbitrary objects is not unpickled."""

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(SlimError, match="cannot read"):
        load_checkpoint(create_model(ModelConfig("fmnist-vit")), tmp_path / "evil.pth")

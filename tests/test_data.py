import functools
import hashlib
import http.server
import os
import pickle
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch

import data


def test_load_small_official_layout(small_cifar):
    x, y, classes = data.load_cifar10(small_cifar, "train", expect_full=False)
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (500,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    assert classes == data.CLASSES
    xt, yt, _ = data.load_cifar10(small_cifar, "test", expect_full=False)
    assert xt.shape == (100, 3, 32, 32)
    # Independent check against the raw pickle: row-major 3072 bytes = R plane, G plane, B plane.
    with open(small_cifar / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(xt[3, 1], torch.from_numpy(raw[b"data"][3, 1024:2048].reshape(32, 32)))
    assert yt.tolist() == raw[b"labels"]


def test_full_count_is_checked(small_cifar):
    with pytest.raises(data.DataError, match="expected 50,000"):
        data.load_cifar10(small_cifar, "train")


def test_missing_folder_says_where_to_put_data(tmp_path):
    with pytest.raises(data.DataError, match="cifar-10-batches-py"):
        data.load_cifar10(tmp_path, "train")


@pytest.mark.parametrize("download", [False, True])
def test_a_file_as_the_data_folder_is_named_as_such(tmp_path, download):
    """It read 'could not download ... (FileExistsError ...)', asking for a folder under a file."""
    (tmp_path / "cifar").write_text("not a folder")
    with pytest.raises(data.DataError, match=r"cifar is a file, not a folder; pass the folder .* as --data-dir"):
        data.load_cifar10(tmp_path / "cifar", "train", download=download)


def _copy(src, dst):
    shutil.copytree(src / "cifar-10-batches-py", dst / "cifar-10-batches-py")
    return dst / "cifar-10-batches-py"


def test_truncated_batch_names_the_file(small_cifar, tmp_path):
    folder = _copy(small_cifar, tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(data.DataError, match="data_batch_3 is truncated or corrupt") as error:
        data.load_cifar10(tmp_path, "train", expect_full=False)
    assert "refused" not in str(error.value)


def test_garbage_batch_is_called_corrupt_not_unsafe(small_cifar, tmp_path):
    folder = _copy(small_cifar, tmp_path)
    (folder / "data_batch_2").write_bytes(b"this is not a pickle at all")
    with pytest.raises(data.DataError, match="data_batch_2 is truncated or corrupt.*good copy") as error:
        data.load_cifar10(tmp_path, "train", expect_full=False)
    assert "refused" not in str(error.value) and "asks to run code" not in str(error.value)


def test_missing_batch_names_the_file(small_cifar, tmp_path):
    folder = _copy(small_cifar, tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(data.DataError, match="data_batch_5 is missing"):
        data.load_cifar10(tmp_path, "train", expect_full=False)


def test_wrong_shape_names_the_file(small_cifar, tmp_path):
    folder = _copy(small_cifar, tmp_path)
    bad = {b"data": np.zeros((10, 1024), np.uint8), b"labels": [0] * 10}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(data.DataError, match=r"test_batch.*\(N, 3072\)"):
        data.load_cifar10(tmp_path, "test", expect_full=False)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_batch_is_refused_and_never_runs(small_cifar, tmp_path, monkeypatch):
    folder = _copy(small_cifar, tmp_path)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match="refused.*(posix|os).system.*asks to run code"):
        data.load_cifar10(tmp_path, "train", expect_full=False)
    assert not (tmp_path / "PWNED").exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def archive_server(small_cifar, tmp_path):
    """A local HTTP server holding a CIFAR-10-style tar.gz: the download path without internet."""
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(small_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    server.handle_error = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/{archive.name}", hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()


def test_download_verifies_md5_and_extracts(archive_server, tmp_path, monkeypatch):
    url, md5 = archive_server
    monkeypatch.setattr(data, "URL", url)
    monkeypatch.setattr(data, "MD5", md5)
    monkeypatch.setattr(data.download_cifar10, "__defaults__", (url, md5))
    x, _, _ = data.load_cifar10(tmp_path / "root", "test", download=True, expect_full=False)
    assert x.shape == (100, 3, 32, 32)
    with pytest.raises(data.DataError, match="could not download"):
        data.download_cifar10(tmp_path / "other", url, "0" * 32)


def test_download_without_network_is_one_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="Put the extracted 'cifar-10-batches-py' folder"):
        data.download_cifar10(tmp_path, "http://127.0.0.1:9/cifar-10-python.tar.gz")


def test_normalize_roundtrip_and_mean():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    z = data.normalize(x)
    assert torch.allclose(data.denormalize(z), x.float() / 255, atol=1e-6)
    mean_pixel = torch.tensor(data.MEAN).view(1, 3, 1, 1)  # a float image in [0, 1], as ToTensor gives
    assert torch.allclose(data.normalize(mean_pixel), torch.zeros(1, 3, 1, 1), atol=1e-6)


def test_normalize_takes_tototensor_floats_as_they_are_and_refuses_floats_above_1():
    """torchvision's ToTensor gives floats in [0, 1]; dividing them by 255 again would feed the
    model an almost constant image. Floats in 0..255 are refused, naming the fix."""
    from torchvision.transforms.functional import to_tensor

    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    as_floats = to_tensor(image.permute(1, 2, 0).numpy())  # ToTensor, on the H x W x C array it takes
    torch.testing.assert_close(data.normalize(as_floats), data.normalize(image))
    with pytest.raises(ValueError, match=r"uint8 images in 0..255 or floats in \[0, 1\].*divide by 255"):
        data.normalize(image.float())


@pytest.mark.parametrize("name", ["random_crop", "flip", "cutout", "normalize", "train_transform"])
@pytest.mark.parametrize("shape", [(8, 32, 32, 3), (32, 32, 3)])
def test_channels_last_images_are_refused_in_one_sentence(name, shape):
    """torchvision's CIFAR10(...).data is N x 32 x 32 x 3 uint8: cropping it as N x C x H x W would
    shift the wrong axes without an error."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"takes channels first .* looks like (N x )?H x W x C: pass "
                                         r"images.permute\("):
        getattr(data, name)(images)


def test_random_crop_is_a_window_of_the_padded_input():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = data.random_crop(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 20  # independent offsets per image, not one per batch


def test_cutout_hole_size_and_fill():
    x = data.normalize(torch.randint(1, 256, (256, 3, 32, 32), dtype=torch.uint8))
    x = torch.where(x == 0, torch.ones_like(x), x)
    out = data.cutout(x, 16, 0.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    zeros = (out == 0).all(1)
    counts = zeros.sum((1, 2))
    assert counts.max() <= 256 and counts.min() >= 64
    assert (counts == 256).any() and (counts < 256).any()  # inside and clipped at a border
    for i in range(len(x)):  # each hole is one axis-aligned rectangle at most 16x16
        ys, xs = zeros[i].nonzero(as_tuple=True)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert h <= 16 and w <= 16 and h * w == counts[i]
    kept = ~zeros[:, None].expand_as(x)
    assert torch.equal(out[kept], x[kept])


def test_cutout_with_probability_cuts_a_random_share_with_the_same_holes():
    x = data.normalize(torch.randint(1, 256, (2000, 3, 8, 8), dtype=torch.uint8))
    x = torch.where(x == 0, torch.ones_like(x), x)
    always = data.cutout(x, 4, 0.0, torch.Generator().manual_seed(3))
    half = data.cutout(x, 4, 0.0, torch.Generator().manual_seed(3), p=0.5)
    cut = (half != x).flatten(1).any(1)
    assert 900 < int(cut.sum()) < 1100  # Binomial(2000, 0.5): 1000 +- 4.5 sd
    assert torch.equal(half[cut], always[cut]) and torch.equal(half[~cut], x[~cut])
    assert torch.equal(data.cutout(x, 4, 0.0, torch.Generator().manual_seed(3), p=0.0), x)


def test_flip_flips_about_half():
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    out = data.flip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(200)])
    same = torch.tensor([torch.equal(out[i], x[i]) for i in range(200)])
    assert (flipped | same).all() and 60 < flipped.sum() < 140


def test_same_seed_same_batch_and_different_seed_differs():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a = data.train_transform(x, torch.Generator().manual_seed(5))
    b = data.train_transform(x, torch.Generator().manual_seed(5))
    c = data.train_transform(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batches_train_shuffles_test_keeps_order_and_tail():
    x = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    y = torch.arange(10)
    test = list(data.batches(x, y, 4))
    assert [len(b[1]) for b in test] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in test]), y)
    g = torch.Generator().manual_seed(0)
    train = list(data.batches(x, y, 4, shuffle=True, generator=g, drop_last=True))
    seen = torch.cat([b[1] for b in train])
    assert len(train) == 2 and len(set(seen.tolist())) == 8 and not torch.equal(seen, y[:8])
    assert all(torch.equal(bx[:, 0, 0, 0], by) for bx, by in train)


def test_rank_shards_are_disjoint_and_cover_each_batch():
    g = lambda: torch.Generator().manual_seed(3)
    full = list(data.batch_indices(40, 8, shuffle=True, generator=g(), drop_last=True))
    r0 = list(data.batch_indices(40, 8, shuffle=True, generator=g(), drop_last=True, rank=0, world_size=2))
    r1 = list(data.batch_indices(40, 8, shuffle=True, generator=g(), drop_last=True, rank=1, world_size=2))
    for whole, a, b in zip(full, r0, r1):
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
        assert sorted(whole.tolist()) == sorted(a.tolist() + b.tolist())


def test_alternating_flips_show_each_image_both_ways_in_two_epochs():
    first, second, third = (data.alternating_flips(1000, 0, epoch) for epoch in (0, 1, 2))
    assert bool((first ^ second).all()) and torch.equal(first, third)
    assert 400 < int(first.sum()) < 600
    assert torch.equal(data.alternating_flips(1000, 0, 0), first)  # the seed alone decides
    assert not torch.equal(data.alternating_flips(1000, 1, 0), first)
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    mask = torch.tensor([True, False, False, True])
    flipped = data.flip(images, mask=mask)
    assert torch.equal(flipped[mask], images[mask].flip(-1)) and torch.equal(flipped[~mask], images[~mask])


def numpy_windows(image, padding=4):
    """Every RandomCrop window of one C x H x W image, from numpy's own zero padding."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    h, w = image.shape[1:]
    return [padded[:, y:y + h, x:x + w] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_one_image_is_cropped_flipped_and_cut_as_one_image(dtype):
    image = torch.randint(1, 256, (3, 32, 32)).to(dtype)  # no zeros: the hole is where zeros are
    gen = torch.Generator().manual_seed(0)
    crop = data.random_crop(image, 4, gen)
    assert crop.shape == (3, 32, 32) and crop.dtype == dtype
    assert any(np.array_equal(crop.numpy(), window) for window in numpy_windows(image.numpy()))
    flipped = data.flip(image, gen, torch.tensor([True]))
    assert np.array_equal(flipped.numpy(), image.numpy()[:, :, ::-1])
    cut = data.cutout(image, 16, 0, gen)
    hole = (cut == 0).all(0)
    rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
    assert cut.shape == (3, 32, 32) and int(hole.sum()) == len(rows) * len(cols)  # one rectangle
    assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16  # 16 x 16, clipped by at most half at a border


def test_cutout_fills_each_channel_with_its_value():
    """albumentations' habit: the hole filled with the mean per channel."""
    images = torch.rand(8, 3, 32, 32) + 1  # no pixel equals a fill value below 1
    fill = (0.4914, 0.4822, 0.4465)
    cut = data.cutout(images, 16, fill, torch.Generator().manual_seed(1))
    hole = cut != images
    assert torch.equal(hole[:, 0], hole[:, 1]) and torch.equal(hole[:, 0], hole[:, 2])
    for c, value in enumerate(fill):
        assert torch.all(cut[:, c][hole[:, c]] == torch.tensor(value))
    assert 0 < int(hole[:, 0].sum(dim=(1, 2)).min()) and int(hole[:, 0].sum(dim=(1, 2)).max()) <= 256


@pytest.mark.parametrize("fill, message", [
    (0.5, "whole numbers in 0..255"), ((10, 20, 30.5), "whole numbers in 0..255"), (300, "whole numbers in 0..255")])
def test_cutout_fills_that_do_not_fit_uint8_are_one_sentence(fill, message):
    with pytest.raises(ValueError, match=message):
        data.cutout(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 16, fill)


def test_cutout_on_uint8_with_a_per_channel_fill_of_whole_numbers():
    images = torch.full((4, 3, 32, 32), 7, dtype=torch.uint8)
    cut = data.cutout(images, 16, (125, 123, 114), torch.Generator().manual_seed(2))
    assert cut.dtype == torch.uint8 and {125, 123, 114, 7} == set(cut.unique().tolist())


X4 = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)


@pytest.mark.parametrize("call, message", [  # each ran in silence before: no hole, or every image cut
    (lambda: data.flip(X4, mask=torch.tensor([True])), r"flip's mask needs one value per image \(4\), not shape"),
    (lambda: data.cutout(X4, size=-3), "cutout needs a size of 0 or more and p in"),
    (lambda: data.train_transform(X4, cutout_p=1.5), r"p in \[0, 1\], not size=16, p=1.5"),
])
def test_values_the_pieces_cannot_mean_are_one_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()

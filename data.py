"""CIFAR-10 as uint8 tensors on the training device, with batched augmentation.

The whole set is 180 MB, so it lives on the device as one N x 3 x 32 x 32 uint8 tensor and is
augmented a batch at a time there; there is no per-sample PIL pipeline and no DataLoader.
Each augmentation is a plain function that takes a torch.Generator, so runs are reproducible.
"""
import codecs
import functools
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.49139968, 0.48215841, 0.44653091)
STD = (0.24703223, 0.24348513, 0.26158784)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SPLIT_SIZE = {"train": 50000, "test": 10000}


class DataError(Exception):
    """The data is missing or malformed; the message says which file and what to do."""


class RefusedGlobal(pickle.UnpicklingError):
    """A batch file names a callable that CIFAR-10's files never contain."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the official batch files contain: numpy arrays and plain builtins.

    A plain pickle.load runs whatever callable a file names, so a planted data_batch_1 could
    execute code. Here any global other than numpy's array reconstruction (and _codecs.encode,
    which Python 3 writes for bytes in protocol-2 pickles of arrays) is refused.
    """

    def find_class(self, module, name):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise RefusedGlobal(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")


def _unpickle(path):
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; the CIFAR-10 folder is incomplete, download it again.")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(f"{path} was refused ({e}): it asks to run code when loaded. Delete the "
                        f"{FOLDER} folder and download it again, or rebuild it from a copy you trust.") from None
    except Exception as e:
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); replace the {FOLDER} "
                        f"folder with a good copy (delete it and the next run downloads it again).") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR-10 batch dict ({name}).")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path):
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' should be a uint8 array of shape (N, 3072), got {shape}.")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        raise DataError(f"{path}: expected {data.shape[0]} labels, one per image.")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9.")
    return data.reshape(-1, 3, 32, 32), labels


def download_cifar10(root, url=URL, md5=MD5):
    """Download and extract the official archive into root; the md5 of the archive is checked."""
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(url, download_root=root, md5=md5)
    except Exception as e:
        raise DataError(f"could not download CIFAR-10 from {url} ({type(e).__name__}: {e}). "
                        f"Put the extracted '{FOLDER}' folder under {os.path.abspath(root)} "
                        f"and run again.") from None


def load_cifar10(root, split="train", download=False, expect_full=True):
    """Return (images uint8 N x 3 x 32 x 32, labels int64 N, class names) for 'train' or 'test'.

    Files are validated (shapes, label range, class names, and with expect_full the 50,000/10,000
    image counts) but not checksummed: re-encoded copies of CIFAR-10 are legitimate.
    """
    if split not in SPLIT_SIZE:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = os.path.join(root, FOLDER)
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{os.path.abspath(root)} is a file, not a folder; pass the folder that holds (or is to "
                        f"hold) '{FOLDER}' as --data-dir.")
    if not os.path.isdir(folder):
        if not download:
            raise DataError(f"CIFAR-10 not found: expected the folder {os.path.abspath(folder)}. "
                            f"Allow the download, or put the extracted '{FOLDER}' folder under "
                            f"{os.path.abspath(root)}.")
        download_cifar10(root)
    meta_path = os.path.join(folder, "batches.meta")
    names = _unpickle(meta_path).get("label_names")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names or ())
    if names != CLASSES:
        raise DataError(f"{meta_path}: class names {names} are not CIFAR-10's {CLASSES}.")
    files = TRAIN_FILES if split == "train" else (TEST_FILE,)
    parts = [_read_batch(os.path.join(folder, f)) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if expect_full and len(images) != SPLIT_SIZE[split]:
        raise DataError(f"{folder}: the {split} split has {len(images):,} images, expected "
                        f"{SPLIT_SIZE[split]:,}; a batch file is incomplete, download it again.")
    return torch.from_numpy(images), torch.from_numpy(labels), CLASSES


@functools.lru_cache(maxsize=None)
def _channel_stats(mean, std, device):
    """mean and std as 1 x C x 1 x 1 tensors on the device, made once: building them from Python
    floats on every batch would be a blocking host-to-GPU copy in the training loop."""
    stats = torch.tensor([mean, std], dtype=torch.float32).view(2, 1, -1, 1, 1).to(device)
    return stats[0], stats[1]


def normalize(images, mean=MEAN, std=STD):
    """Images to the model's float input, per channel (x - mean) / std with x in [0, 1]: uint8 (or
    other whole-number) images in 0..255, or floats already in [0, 1] (torchvision's ToTensor gives
    those), channels first. Floats above 1 are refused: they are 0..255 values, scaled twice."""
    check_layout(images, "normalize")
    mean, std = _channel_stats(tuple(mean), tuple(std), images.device)
    if not images.is_floating_point():
        return (images.float() / 255 - mean) / std
    if images.numel() and float(images.max()) > 1:  # a host sync, off the training path (uint8)
        raise ValueError(f"normalize takes uint8 images in 0..255 or floats in [0, 1]; these floats reach "
                         f"{float(images.max()):g}: pass the uint8 images, or divide by 255 first")
    return (images.float() - mean) / std


def denormalize(images, mean=MEAN, std=STD):
    """Undo normalize for display: float images in 0..1."""
    mean, std = _channel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() * std + mean).clamp(0, 1)


def device_generator(device, seed):
    """A seeded generator on the data's device, so augmentation draws never leave it."""
    return torch.Generator(device=device).manual_seed(seed)


def _generator_device(generator, device):
    """Draw where the generator lives (a seed then gives the same numbers), then move to device."""
    return generator.device if generator is not None else device


def _randint(high, n, generator, device):
    return torch.randint(0, high, (n,), generator=generator, device=_generator_device(generator, device)).to(device)


def _uniform(n, generator, device):
    return torch.rand(n, generator=generator, device=_generator_device(generator, device)).to(device)


def check_layout(images, name):
    """Refuse, in one sentence, images whose channels come last (N x H x W x C, the layout of
    torchvision's CIFAR10(...).data and of most numpy image code): every function here takes them
    first, and would otherwise crop, flip and cut the wrong axes without an error."""
    if images.dim() in (3, 4) and images.shape[-1] in (1, 3) and images.shape[-3] not in (1, 3, 4):
        layout = "N x H x W x C" if images.dim() == 4 else "H x W x C"
        order = "0, 3, 1, 2" if images.dim() == 4 else "2, 0, 1"
        raise ValueError(f"{name} takes channels first (N x C x H x W, or one image C x H x W), but this "
                         f"{tuple(images.shape)} looks like {layout}: pass images.permute({order})")


def one_or_batch(transform):
    """Let a batch transform (N x C x H x W) take one C x H x W image too, returning one image;
    channels-last input is refused (check_layout)."""
    @functools.wraps(transform)
    def wrapper(images, *args, **kwargs):
        check_layout(images, transform.__name__)
        if images.dim() == 3:
            return transform(images[None], *args, **kwargs)[0]
        return transform(images, *args, **kwargs)
    return wrapper


@one_or_batch
def random_crop(images, padding=4, generator=None):
    """RandomCrop(size, padding) for a batch (uint8 or float): zero-pad, then an independent window
    per image. A window is picked by gathering rows, then columns: index tensors shaped to broadcast
    over (image, channel, row, column)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = _randint(2 * padding + 1, n, generator, images.device)
    dx = _randint(2 * padding + 1, n, generator, images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


@one_or_batch
def flip(images, generator=None, mask=None):
    """Horizontal flip of a random half of the batch, or of the images where mask is True."""
    if mask is None:
        mask = _randint(2, images.shape[0], generator, images.device).bool()
    elif mask.shape != images.shape[:1]:  # one value would flip all or none in silence
        raise ValueError(f"flip's mask needs one value per image ({images.shape[0]}), not shape {tuple(mask.shape)}")
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def alternating_flips(n, seed, epoch, device=None):
    """Which of n images to mirror in this epoch, as airbench does: a coin toss per image for the
    first epoch (seeded by seed alone), then the other view every next epoch, so any two epochs in a
    row show each image both ways instead of at random."""
    first = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 2))
    return (first ^ (epoch % 2)).bool().to(device)


@one_or_batch
def cutout(images, size=16, fill=0.0, generator=None, p=1.0):
    """Cutout (DeVries & Taylor 2017): one size x size hole per image, centre uniform over the
    image, clipped at the borders. Apply after normalize so fill=0 is the data mean; fill may also
    be one value per channel, and for uint8 images must be whole numbers in 0..255.
    With p < 1 each image gets its hole with probability p (albumentations' Cutout, which the
    spec's run used, defaults to p=0.5). p=1 draws no extra random numbers, so a seed gives the
    same holes as before p existed."""
    if size < 0 or not 0 <= p <= 1:
        raise ValueError(f"cutout needs a size of 0 or more and p in [0, 1], not size={size}, p={p}")
    n, _, h, w = images.shape
    cy = _randint(h, n, generator, images.device)[:, None]
    cx = _randint(w, n, generator, images.device)[:, None]
    ys = torch.arange(h, device=images.device)[None]
    xs = torch.arange(w, device=images.device)[None]
    in_y = (ys >= cy - size // 2) & (ys < cy + size - size // 2)
    in_x = (xs >= cx - size // 2) & (xs < cx + size - size // 2)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    if p < 1:
        hole = hole & (_uniform(n, generator, images.device) < p)[:, None, None, None]
    if isinstance(fill, (int, float)) and (images.is_floating_point() or fill in range(256)):
        return images.masked_fill(hole, fill)  # the training path: no tensor made per batch
    return torch.where(hole, _fill_tensor(fill, images), images)


def _fill_tensor(fill, images):
    """fill (a number or one per channel) as a 1 x C x 1 x 1 tensor of the images' dtype."""
    values = torch.as_tensor(fill, dtype=torch.float64).flatten()
    if not images.is_floating_point() and ((values != values.round()) | (values < 0) | (values > 255)).any():
        raise ValueError(f"cutout on uint8 images needs a fill of whole numbers in 0..255, not {fill}; cut "
                         f"after data.normalize to fill with normalized values")
    return values.to(images.dtype).to(images.device).view(1, -1, 1, 1)


def train_transform(images, generator=None, *, use_flip=True, cutout_p=0.5, flip_mask=None):
    """The training augmentation of a uint8 batch: RandomCrop(32, padding=4), a horizontal flip (at
    random, or where flip_mask says; none without use_flip), normalize, Cutout 16x16 (on each image
    with probability cutout_p)."""
    images = random_crop(images, 4, generator)
    if use_flip:
        images = flip(images, generator, flip_mask)
    return cutout(normalize(images), 16, 0.0, generator, cutout_p)


def batch_indices(n, batch_size, *, shuffle=False, generator=None, drop_last=False, rank=0, world_size=1,
                  start=0, device=None):
    """Index tensors of each batch, from batch number `start` on (to resume mid-epoch).

    With world_size > 1, every global batch of batch_size is split into world_size disjoint parts
    of the same permutation (same generator seed on every rank) and this rank gets its part.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device) if device is not None else order
    stop = n - n % batch_size if drop_last else n
    for first in range(start * batch_size, stop, batch_size):
        batch = order[first:min(first + batch_size, stop)]
        yield batch.tensor_split(world_size)[rank] if world_size > 1 else batch


def batches(images, labels, batch_size, *, shuffle=False, generator=None, drop_last=False, rank=0, world_size=1):
    """(images, labels) batches from device tensors: shuffled for training, in order for test."""
    for idx in batch_indices(len(images), batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                             rank=rank, world_size=world_size, device=images.device):
        yield images[idx], labels[idx]

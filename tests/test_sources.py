"""The data sources beyond MNIST (issue 38): Fashion-MNIST, an image folder, VAE latents; the flips of the global batch;
the bad inputs; and parity on 2 processes through the real launchers (a folder under DDP and FSDP, latents under
ZeRO-2 and FSDP2), against one process."""
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_parity, declare, job_dir, parity_flags
from dit_core import folder as FOLDER, latents as LATENTS, sources as S
from dit_core.batch import GlobalBatchStream, global_batch, mix_seed, shard
from dit_core.config import ConfigError, load_config
from dit_core.data import MNIST, check_data_fits
from dit_core.errors import DataError
from dit_core.fast import DeviceBatches

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None       # the test extra installs it
needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed (pip install -e '.[test]')")

CLASSES = ("apple", "bird", "cat")
FIXED_TIME = 1_700_000_000_000_000_000          # every file's mtime (ns): the same folder key in every session


def make_folder(root, per_class=4, size=(12, 10), mode="RGB", seed=0):
    """A tiny ImageFolder tree of random PNGs, the same bytes and times every call, so the same cache key."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            path = root / c / f"{i:03d}.png"
            Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode).save(path)
            os.utime(path, ns=(FIXED_TIME, FIXED_TIME))
    return root


def make_vae(path, seed=0):
    """A tiny randomly initialised AutoencoderKL (2 encoder blocks: downsampling 2; 4 latent channels)."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                            sample_size=16, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(str(path))
    return path


FOLDER_SET = {"model.image_size": 8, "model.in_channels": 3, "model.num_classes": 3, "model.patch_size": 4,
              "train.train_subset": 0}
LATENT_SET = {"model.image_size": 4, "model.in_channels": 4, "model.num_classes": 3, "model.patch_size": 2,
              "train.train_subset": 0}


def cfg_for(source, path="", vae="", flip=False, **over):
    base = FOLDER_SET if source == "folder" else LATENT_SET if source == "latents" else {}
    return load_config(None, {**base, "data.source": source, "data.path": str(path), "data.vae": str(vae),
                              "data.flip": flip, "run.device": "cpu", **over})


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("DIT_DATA_DIR", str(d))
    return d


@pytest.fixture
def counts(monkeypatch):
    """How often the folder was decoded and the VAE encoded in this test."""
    n = {"decode": 0, "encode": 0}
    for mod, name in ((FOLDER, "decode"), (LATENTS, "decode"), (LATENTS, "encode")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **k):
            n[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    return n


# ---------------------------------------------------------------- folder

def test_folder_loads_fits_and_crops_as_meta(tmp_path, data_dir, counts):
    from PIL import Image
    root = make_folder(tmp_path / "imgs")
    cfg = cfg_for("folder", root)
    data = S.load_data(cfg)
    assert data.images.shape == (12, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and data.classes == CLASSES
    check_data_fits(cfg, data)
    # 12 x 10 -> short side 8: bicubic to 10 x 8, then the centre 8 x 8 (columns 1..8)
    want = np.asarray(Image.open(root / "bird" / "002.png").resize((10, 8), Image.BICUBIC).crop((1, 0, 9, 8)))
    assert np.array_equal(data.images[6].permute(1, 2, 0).numpy(), want)
    # a large image is halved with a box filter while its short side stays >= 2 x 8 first
    big = Image.fromarray(np.random.RandomState(1).randint(0, 256, (34, 40, 3), dtype=np.uint8))
    halved = big.resize((20, 17), Image.BOX).resize((10, 8), Image.BOX)
    assert np.array_equal(np.asarray(FOLDER.centre_square(big, 8)),
                          np.asarray(halved.resize((10, 8), Image.BICUBIC).crop((1, 0, 9, 8))))
    x, y = data.gather(torch.tensor([0, 11]))
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.tolist() == [0, 2]
    grey = S.load_data(cfg_for("folder", root, **{"model.in_channels": 1}))
    assert grey.images.shape == (12, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"model.num_classes=4 does not fit the data \(the folder '.*imgs' has "
                                          r"num classes 3\); use 3\."):
        check_data_fits(cfg_for("folder", root, **{"model.num_classes": 4}), data)


def test_folder_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, data_dir, counts):
    root = make_folder(tmp_path / "imgs")
    cfg = cfg_for("folder", root)
    first = S.load_data(cfg)
    again = S.load_data(cfg)
    assert counts["decode"] == 1 and torch.equal(first.images, again.images)
    assert len(list((data_dir / "folders").glob("*.npz"))) == 1
    from PIL import Image
    Image.new("RGB", (12, 10), (255, 0, 0)).save(root / "cat" / "001.png")      # one file rewritten
    changed = S.load_data(cfg)
    assert counts["decode"] == 2 and len(list((data_dir / "folders").glob("*.npz"))) == 2
    assert changed.images[9].float().mean((1, 2)).tolist() == [255.0, 0.0, 0.0]
    assert torch.equal(changed.images[:9], first.images[:9])
    # a damaged cache is refused in one sentence, never read as data
    cache = sorted((data_dir / "folders").glob("*.npz"), key=os.path.getmtime)[-1]
    cache.write_bytes(cache.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cannot be read .*delete it so it is rebuilt\.$"):
        S.load_data(cfg)


# ---------------------------------------------------------------- latents

@needs_diffusers
def test_latents_load_fit_and_are_one_fixed_posterior_sample(tmp_path, data_dir, counts):
    root, vae = make_folder(tmp_path / "imgs"), make_vae(tmp_path / "vae")
    cfg = cfg_for("latents", root, vae, flip=True)
    data = S.load_data(cfg)
    assert data.images.shape == (12, 4, 4, 4) and data.images.dtype == torch.float32
    assert data.flipped.shape == (12, 4, 4, 4) and not torch.equal(data.flipped, data.images)
    check_data_fits(cfg, data)
    assert counts["encode"] == 1
    # image 5, cropped to 4 x 2 (the VAE halves) = 8 px, sampled with its own generator, times 0.18215
    from diffusers import AutoencoderKL
    px = FOLDER.decode(FOLDER.scan(str(root)), 8, 3)[5:6]
    x = torch.from_numpy(px).float().div_(127.5).sub_(1.0)
    model = AutoencoderKL.from_pretrained(str(vae)).eval()
    with torch.no_grad():
        dist = model.encode(x.flip(-1)).latent_dist
        want = dist.sample(generator=[torch.Generator().manual_seed(mix_seed(5, 5, 1))]) * 0.18215
    torch.testing.assert_close(data.flipped[5:6], want, rtol=1e-5, atol=1e-6)
    # gather: the marked samples get the mirrored image's latent
    xs, _ = data.gather(torch.tensor([5, 5]), torch.tensor([False, True]))
    assert torch.equal(xs[0], data.images[5]) and torch.equal(xs[1], data.flipped[5])
    again = S.load_data(cfg)
    assert counts["encode"] == 1 and torch.equal(again.images, data.images)      # read back, not encoded
    with pytest.raises(ConfigError, match=r"model.in_channels=3 does not fit the data \(the latents of .* has in "
                                          r"channels 4\); use 4\."):
        check_data_fits(cfg_for("latents", root, vae, **{"model.in_channels": 3}), data)


@needs_diffusers
def test_another_vae_gets_its_own_cache_and_a_foreign_cache_is_refused(tmp_path, data_dir, counts):
    root = make_folder(tmp_path / "imgs")
    a, b = make_vae(tmp_path / "vae_a", seed=0), make_vae(tmp_path / "vae_b", seed=1)
    la = S.load_data(cfg_for("latents", root, a))
    lb = S.load_data(cfg_for("latents", root, b))
    assert counts["encode"] == 2 and not torch.equal(la.images, lb.images)
    files = sorted((data_dir / "latents").glob("*.npz"), key=os.path.getmtime)
    assert len(files) == 2
    shutil.copy(files[0], files[1])             # VAE a's latents under VAE b's name
    with pytest.raises(DataError, match=r"^The latent cache of '.*imgs' at .* was encoded by another VAE than "
                                        r"data.vae='.*vae_b' .*delete it so it is encoded again\.$"):
        S.load_data(cfg_for("latents", root, b))


# ---------------------------------------------------------------- flips

def test_flips_are_extra_draws_of_the_global_batch():
    args = dict(seed=3, step=7, batch_size=16, n_data=100, timesteps=1000, label_dropout=0.1, image_shape=(3, 8, 8))
    a, b = global_batch(**args), global_batch(**args)
    for f in ("indices", "t", "noise", "drop", "flip"):
        assert torch.equal(getattr(a, f), getattr(b, f))                       # a pure function of (seed, step)
    # The draws before the flips are the contract's of a run without flips, in the contract's order.
    g = torch.Generator().manual_seed(mix_seed(3, 1, 7))
    assert torch.equal(a.t, torch.randint(0, 1000, (16,), generator=g))
    assert torch.equal(a.noise, torch.randn((16, 3, 8, 8), generator=g))
    assert torch.equal(a.drop, torch.rand(16, generator=g) < 0.1)
    assert torch.equal(a.flip, torch.rand(16, generator=g) < 0.5)
    assert 0 < int(a.flip.sum()) < 16 and not torch.equal(a.flip, global_batch(**{**args, "step": 8}).flip)
    # the flips travel with the shards: rank 1 of 2, micro-batch 1 of 2
    s = shard(a, 1, 2, 1, 2)
    assert torch.equal(s.flip, a.flip[12:16]) and torch.equal(s.to("cpu").flip, a.flip[12:16])


def test_the_fast_path_draws_flips_last_too():
    data = MNIST(torch.zeros(50, 28, 28, dtype=torch.uint8), torch.zeros(50, dtype=torch.long))
    draw = DeviceBatches(data, 3, 8, 1000, 0.1, (1, 28, 28))
    a, b = draw(4), draw(4)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("indices", "t", "noise", "drop", "flip"))
    from dit_core.fast import _DEVICE_BATCH_STREAM
    g = torch.Generator().manual_seed(mix_seed(3, _DEVICE_BATCH_STREAM, 4))
    assert torch.equal(a.t, torch.randint(0, 1000, (8,), generator=g))
    assert torch.equal(a.noise, torch.randn((8, 1, 28, 28), generator=g))
    assert torch.equal(a.drop, torch.rand(8, generator=g) < 0.1)
    assert torch.equal(a.flip, torch.rand(8, generator=g) < 0.5)


def test_flips_are_applied_where_the_images_are_gathered(tmp_path, data_dir):
    images = torch.arange(4 * 28 * 28, dtype=torch.int64).reshape(4, 28, 28).remainder(256).to(torch.uint8)
    on, off = MNIST(images, torch.arange(4), flip=True), MNIST(images, torch.arange(4))
    idx, flip = torch.tensor([0, 1, 2, 3]), torch.tensor([True, False, True, False])
    x_on, _ = on.gather(idx, flip)
    x_off, _ = off.gather(idx, flip)
    assert torch.equal(x_on[flip], x_off[flip].flip(-1)) and torch.equal(x_on[~flip], x_off[~flip])
    assert torch.equal(on.to("cpu").gather(idx, flip)[0], x_on)                  # to() keeps the flag
    # Accelerate's stream: the sample rank 1 gets is the loop's shard, flipped the same way
    data = S.load_data(cfg_for("folder", make_folder(tmp_path / "imgs"), flip=True))
    stream = GlobalBatchStream(0, 8, 2, data, 1000, 0.1, (3, 8, 8), world=2, accumulation=1)
    x0, y, t, noise, drop = stream.__getitems__(list(range(8, 16)))              # step 1, both ranks
    b = shard(global_batch(0, 1, 8, len(data), 1000, 0.1, (3, 8, 8)), 1, 2)
    assert torch.equal(x0[4:], data.gather(b.indices, b.flip)[0]) and torch.equal(t[4:], b.t)


# ---------------------------------------------------------------- bad input: one sentence each, nothing written

def one_sentence(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


def test_bad_folders(tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", empty))
    assert f"data.path='{empty}' holds no class sub-folders with images" in one_sentence(e)
    (empty / "cat").mkdir()
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", empty))
    assert f"The class folder '{empty / 'cat'}' holds no images" in one_sentence(e)
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", tmp_path / "nowhere"))
    assert "is not a folder" in one_sentence(e)
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", ""))
    assert "data.source=folder reads an image folder, but data.path is empty" in one_sentence(e)
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("latents", "", tmp_path / "vae"))
    assert "data.source=latents reads an image folder, but data.path is empty" in one_sentence(e)
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root, **{"model.in_channels": 2}))
    assert "model.in_channels=2 cannot be read from an image folder; use 3 (RGB) or 1 (greyscale)" in one_sentence(e)
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root), split="test")
    one_sentence(e)
    from PIL import Image
    Image.new("RGB", (12, 6)).save(root / "bird" / "small.png")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root))
    assert f"'{root / 'bird' / 'small.png'}' is 12x6 pixels, smaller than the 8 x 8 square" in one_sentence(e)
    (root / "bird" / "small.png").unlink()
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root))
    assert f"'{root / 'cat' / 'broken.jpg'}' cannot be decoded as an image" in one_sentence(e)
    assert not list(data_dir.rglob("*.npz")) and not list(data_dir.rglob("*.tmp"))       # nothing half-written
    (root / "cat" / "broken.jpg").unlink()
    # a broken link, and a link back up the tree (which os.walk would follow until the path grew too long)
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root))
    assert f"'{root / 'cat' / 'gone.png'}' is a broken link or cannot be read" in one_sentence(e)
    (root / "cat" / "gone.png").unlink()
    (root / "cat" / "loop").symlink_to(root / "cat")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root))
    assert f"'{root / 'cat' / 'loop'}' is a link to a folder already read (a loop)" in one_sentence(e)
    (root / "cat" / "loop").unlink()
    # 32-bit and float pixels have no known range: refused; 16-bit greyscale keeps its top 8 bits
    Image.fromarray(np.full((12, 12), 7, np.int32), "I").save(root / "cat" / "deep.tif")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("folder", root))
    assert f"'{root / 'cat' / 'deep.tif'}' holds 32-bit integer pixels (mode I)" in one_sentence(e)
    (root / "cat" / "deep.tif").unlink()


def test_16_bit_greyscale_keeps_its_range(tmp_path, data_dir):
    """A 16-bit PNG is read as its top 8 bits (Pillow's convert would clip every value above 255 to white)."""
    from PIL import Image
    from dit_core.folder import decode, scan
    root = tmp_path / "deep"
    (root / "a").mkdir(parents=True)
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)     # 0 .. 64512
    Image.fromarray(ramp).save(root / "a" / "ramp.png")
    with Image.open(root / "a" / "ramp.png") as im:
        assert im.mode.startswith("I;16")                               # what the test is about
    got = decode(scan(str(root)), 8, 1)[0, 0]
    assert np.array_equal(got, (ramp >> 8).astype(np.uint8))          # 0, 4, 8, ... 252: the ramp, not 255s


@needs_diffusers
def test_bad_vaes(tmp_path, data_dir):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("latents", root, tmp_path / "no-vae"))
    assert f"data.vae='{tmp_path / 'no-vae'}' is not a VAE folder (no such folder)" in one_sentence(e)
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("latents", root, ""))
    assert "data.source=latents needs data.vae" in one_sentence(e)
    vae = make_vae(tmp_path / "vae")
    for f in vae.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("latents", root, vae))
    assert "holds a config.json but no weights" in one_sentence(e)
    # a folder too small for the VAE's crop: 4 latents x 2 = 8 px needed, 12 x 6 given
    vae = make_vae(tmp_path / "vae2")
    from PIL import Image
    Image.new("RGB", (12, 6)).save(root / "apple" / "small.png")
    with pytest.raises(DataError) as e:
        S.load_data(cfg_for("latents", root, vae))
    assert "(model.image_size=4 latents x the VAE's downsampling 2)" in one_sentence(e)
    assert not list(data_dir.rglob("*.npz"))


def test_a_resume_keeps_the_data(tmp_path):
    from dit_core.checkpoint import CheckpointError, check_resume

    def cfg(**data):
        data = {"source": "folder", "path": str(tmp_path / "imgs"), "flip": True, **data}
        return load_config(None, {**FOLDER_SET, **{f"data.{k}": v for k, v in data.items()}})
    state = {"config": cfg().to_dict()}
    check_resume(state, cfg(), tmp_path)
    for key, value in (("source", "latents"), ("path", str(tmp_path / "other")), ("flip", False),
                       ("vae", str(tmp_path / "another-vae"))):
        with pytest.raises(CheckpointError, match=rf"was trained with data.{key}="):
            check_resume(state, cfg(**{key: value}), tmp_path)
    old = {"config": {k: v for k, v in cfg_for("mnist").to_dict().items() if k != "data"}}
    check_resume(old, cfg_for("mnist"), tmp_path)        # written before the data section: still loads


# ---------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_from_the_debian_package(data_dir, monkeypatch):
    if not all((S.FASHION_DEBIAN / f"{n}.gz").is_file() for n in S.FASHION_IDX.values()):
        pytest.skip(f"the Debian package's files are not in {S.FASHION_DEBIAN} (apt-get install dataset-fashion-mnist)")

    def offline(root):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(S, "from_torchvision", offline)
    cfg = load_config(None, {"data.source": "fashion_mnist"})
    data = S.load_data(cfg)
    assert data.images.shape == (60000, 28, 28) and data.labels[:5].tolist() == [9, 0, 0, 3, 0]
    check_data_fits(cfg, data)
    assert data.name == "Fashion-MNIST" and data.classes[9] == "Ankle boot"
    assert (data_dir / S.FASHION_CACHE).is_file()
    assert S.load_data(cfg, "test").images.shape == (10000, 28, 28)             # from the cache now


def test_fashion_mnist_nowhere_is_one_sentence_naming_both_ways(data_dir, monkeypatch, tmp_path):
    def offline(root):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(S, "from_torchvision", offline)
    monkeypatch.setattr(S, "FASHION_DEBIAN", tmp_path / "none")
    with pytest.raises(DataError) as e:
        S.load_data(load_config(None, {"data.source": "fashion_mnist"}))
    msg = one_sentence(e)
    assert "torchvision's download" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert not (data_dir / S.FASHION_CACHE).exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    import gzip
    for n in S.FASHION_IDX.values():
        with gzip.open(bad / f"{n}.gz", "wb") as f:
            f.write(b"\0\0\x08\x01\0\0\0\x01\x07")
    monkeypatch.setattr(S, "FASHION_DEBIAN", bad)
    with pytest.raises(DataError, match="does not hold the official Fashion-MNIST bytes"):
        S.load_data(load_config(None, {"data.source": "fashion_mnist"}))
    assert not (data_dir / S.FASHION_CACHE).exists()


# ---------------------------------------------------------------- parity on 2 processes, real launchers

STEPS = 10
_D = job_dir() / "sources"
_IMGS = make_folder(_D / "imgs")            # made at import: the suite's 2-process job may run before any test here
_VAE = make_vae(_D / "vae") if HAVE_DIFFUSERS else None
FOLDER_RUN = {**FOLDER_SET, "data.source": "folder", "data.path": _IMGS, "data.flip": True}
LATENT_RUN = {**LATENT_SET, "data.source": "latents", "data.path": _IMGS, "data.vae": _VAE, "data.flip": True}
RUNS = {"sources folder ddp": ("launchers/ddp.py", FOLDER_RUN, []),
        "sources folder fsdp": ("launchers/fsdp.py", FOLDER_RUN, ["--impl", "hand"]),
        **({"sources latents zero2": ("launchers/zero.py", LATENT_RUN, ["--stage", "2"]),
            "sources latents fsdp2": ("launchers/fsdp.py", LATENT_RUN, ["--impl", "torch"])} if _VAE else {})}
for _name, (_script, _over, _extra) in RUNS.items():
    declare(2, _name, _script, parity_flags(STEPS, **_over) + _extra + ["--results-dir", _D / _name.replace(" ", "-")])


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one_on_a_folder_and_its_latents(jobs, reference, name):
    log = jobs(2)[name]
    ref = reference(1, STEPS, **RUNS[name][1])[0]
    assert_parity(ref, log, steps=STEPS)


def test_the_flips_act_on_the_loss(reference):
    """The negative control: without the flips, the same folder gives another loss curve (so a rank that ignored
    its flips would fail the parity above)."""
    on = reference(1, STEPS, **FOLDER_RUN)[0]
    off = reference(1, STEPS, **{**FOLDER_RUN, "data.flip": False})[0]
    with pytest.raises(AssertionError, match="FAIL"):
        assert_parity(on, off, steps=STEPS)

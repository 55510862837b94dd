"""Every pixel mode Pillow opens becomes correct 8-bit RGB, or is refused with one line naming
the file: decode_image (training, evaluation, search), the image check of the prepare scripts
and of --images (list_images), and prepare_folder.py --max-side copies. Each mode is checked
against a known pattern drawn here with numpy and Pillow."""
import numpy as np
import pytest
from PIL import Image

from handreid.core.errors import UserError
from handreid.data.image_files import list_images
from handreid.data.loaders import decode_image
from conftest import run_script

H, W = 6, 8
RAMP16 = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)
BYTES = np.arange(H * W, dtype=np.uint8).reshape(H, W) * 5


def decoded(path, draft=False):
    """decode_image at the file's own size (no resampling) -> [H, W, 3] uint8."""
    return decode_image(path, (H, W), draft=draft).permute(1, 2, 0).numpy()


def gray(values):
    return np.repeat(values[..., None], 3, axis=2)


def sixteen_to_eight(values):
    return np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def save(image, path, mode):
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode, (path, reopened.mode)  # the mode under test
    return path


@pytest.mark.parametrize("suffix, mode", [(".png", "I;16"), (".tif", "I;16"),
                                          (".tif", "I;16B")])
def test_a_16_bit_image_is_scaled_over_its_full_range_not_clipped_white(tmp_path, suffix, mode):
    if mode == "I;16B":
        image = Image.frombytes(mode, (W, H), RAMP16.astype(">u2").tobytes())
    else:
        image = Image.fromarray(RAMP16)
    path = save(image, tmp_path / f"ramp{suffix}", mode)
    expected = gray(sixteen_to_eight(RAMP16))
    assert expected.min() == 0 and expected.max() == 255
    assert np.array_equal(decoded(path), expected)
    assert np.array_equal(decoded(path, draft=True), expected)  # the cached (draft) decode


def test_a_dark_16_bit_exposure_stays_dark(tmp_path):
    # The type's range, not the image's min/max: a 12-bit camera's values stay at 1/16.
    dark = (RAMP16 // 16).astype(np.uint16)
    path = save(Image.fromarray(dark), tmp_path / "dark.png", "I;16")
    assert np.array_equal(decoded(path), gray(sixteen_to_eight(dark)))
    assert decoded(path).max() == 16


def test_32_bit_integer_and_float_images(tmp_path):
    ints = save(Image.fromarray(RAMP16.astype(np.int32)), tmp_path / "i32.tif", "I")
    assert np.array_equal(decoded(ints), gray(sixteen_to_eight(RAMP16)))
    unit = (RAMP16 / 65535).astype(np.float32)
    floats = save(Image.fromarray(unit), tmp_path / "f32.tif", "F")
    assert np.array_equal(decoded(floats), gray(np.rint(unit.astype(np.float64) * 255)
                                                .astype(np.uint8)))


@pytest.mark.parametrize("name, values, mode", [
    ("wide.tif", RAMP16.astype(np.int32) * 4, "I"),
    ("hdr.tif", RAMP16.astype(np.float32), "F")])
def test_values_outside_the_read_range_are_refused_naming_the_file(tmp_path, name, values,
                                                                   mode):
    path = save(Image.fromarray(values), tmp_path / name, mode)
    with pytest.raises(UserError, match=f"cannot read image {path}: .*mode"):
        decode_image(path, (H, W))


def test_eight_bit_modes(tmp_path):
    # grayscale, bilevel, palette (with and without alpha), gray+alpha, RGBA, CMYK, YCbCr
    save(Image.fromarray(BYTES), tmp_path / "l.png", "L")
    assert np.array_equal(decoded(tmp_path / "l.png"), gray(BYTES))

    bits = BYTES > 100
    save(Image.fromarray(bits), tmp_path / "bits.png", "1")
    assert np.array_equal(decoded(tmp_path / "bits.png"), gray(bits.astype(np.uint8) * 255))

    palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 250], [7, 7, 7]], dtype=np.uint8)
    index = (np.arange(H * W) % 4).astype(np.uint8).reshape(H, W)
    paletted = Image.frombytes("P", (W, H), index.tobytes())
    paletted.putpalette(palette.ravel().tolist())
    save(paletted, tmp_path / "p.png", "P")
    assert np.array_equal(decoded(tmp_path / "p.png"), palette[index])
    save(paletted.convert("PA"), tmp_path / "pa.tif", "PA")
    assert np.array_equal(decoded(tmp_path / "pa.tif"), palette[index])

    alpha = (255 - BYTES)
    save(Image.merge("LA", [Image.fromarray(BYTES), Image.fromarray(alpha)]),
         tmp_path / "la.png", "LA")
    assert np.array_equal(decoded(tmp_path / "la.png"), gray(BYTES))  # alpha dropped
    rgb = np.stack([BYTES, 255 - BYTES, BYTES // 2], axis=2)
    save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "rgba.png", "RGBA")
    assert np.array_equal(decoded(tmp_path / "rgba.png"), rgb)

    cmy = np.stack([BYTES, 255 - BYTES, BYTES // 3], axis=2)  # no black: R = 255 - C
    cmyk = np.dstack([cmy, np.zeros((H, W), np.uint8)])
    save(Image.frombytes("CMYK", (W, H), cmyk.tobytes()), tmp_path / "cmyk.tif", "CMYK")
    assert np.array_equal(decoded(tmp_path / "cmyk.tif"), 255 - cmy)

    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]],
                       dtype=np.uint8)
    ycbcr = Image.fromarray(colours).convert("YCbCr").resize((W, H), Image.NEAREST)
    save(ycbcr, tmp_path / "ycc.tif", "YCbCr")
    expected = np.array(Image.fromarray(colours).resize((W, H), Image.NEAREST))
    assert np.abs(decoded(tmp_path / "ycc.tif").astype(int) - expected).max() <= 2


def test_cielab_is_refused_by_the_image_check_and_the_decode(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    save(Image.fromarray(RAMP16), folder / "a/ramp16.png", "I;16")
    lab = save(Image.new("LAB", (W, H), (50, 128, 128)), folder / "a/lab.tif", "LAB")
    items = list_images(folder)
    assert [path for path, _ in items] == [str(folder / "a/ramp16.png")]
    warning = capsys.readouterr().err
    assert "skipped 1" in warning and "lab.tif (CIELAB colour (LAB mode) is not read" in warning
    with pytest.raises(UserError, match=f"cannot read image {lab}: CIELAB"):
        decode_image(lab, (H, W))


def test_prepare_folder_max_side_copies_16_bit_images_at_the_right_brightness(tmp_path):
    raw = tmp_path / "raw"
    levels = {}
    for person in range(4):
        (raw / f"p{person}").mkdir(parents=True)
        for shot in range(2):
            value = 4000 + 12000 * person + 3000 * shot
            levels[f"p{person}", shot] = value
            Image.fromarray(np.full((40, 60), value, np.uint16)).save(
                raw / f"p{person}/{shot}.png")
    broken = raw / "p0/float.tif"
    Image.fromarray(np.full((40, 60), 7.0, np.float32)).save(broken)
    proc = run_script("datasets/prepare_folder.py", "--raw", raw, "--out", tmp_path / "out",
                      "--max-side", "30", "--num-splits", "1")
    assert "float.tif (floating-point image (mode F)" in proc.stderr
    copies = sorted((tmp_path / "out/_images").rglob("*.png"))
    assert len(copies) == 8
    for copy in copies:
        person, shot = copy.parent.name, int(copy.stem)
        pixels = decoded_any(copy)
        assert pixels.shape[:2] == (20, 30)
        expected = round(levels[person, shot] * 255 / 65535)
        assert np.abs(pixels.astype(int) - expected).max() <= 1, copy


def decoded_any(path):
    with Image.open(path) as image:
        return decode_image(path, (image.height, image.width)).permute(1, 2, 0).numpy()

"""The ranking sheet of search.py and the evaluation: captions stay inside their tile, scores
print with enough digits to tell candidates apart, and names in any script stay legible."""
from PIL import Image, ImageDraw

from handreid.evaluation import plots
from handreid.evaluation.plots import (FRAME, THUMB, caption_font, fit_caption, save_ranking_grid,
                              score_decimals)


def test_scores_get_the_digits_that_tell_them_apart():
    assert score_decimals([0.91, 0.52, 0.3]) == 3
    assert score_decimals([0.99991, 0.99989, 0.5]) == 5
    assert score_decimals([1.0, 1.0, 1.0]) == 3          # equal scores print equal
    assert score_decimals([0.1234567, 0.1234568]) == 6   # no more than six


def test_a_long_label_is_cut_to_its_tile_and_never_reaches_the_next(tmp_path):
    photo = tmp_path / "hand.png"
    Image.new("RGB", (40, 30), "grey").save(photo)
    long_name = "person_with_a_very_long_identity_folder_name_0123456789"
    rows = [((photo, "blue", "query\nq"), [(photo, "green", f"1: 0.912\n{long_name}"),
                                           (photo, "red", "")])]
    save_ranking_grid(tmp_path / "grid.png", rows)
    sheet = Image.open(tmp_path / "grid.png").convert("L")
    cell, margin, gap = THUMB + 2 * FRAME, 4, 12
    second = margin + gap + 2 * cell           # x of the second ranked tile (empty caption)
    band = sheet.crop((second, margin + cell, second + cell, sheet.height))
    assert band.getextrema()[0] == 255         # white: nothing spilled over
    first = sheet.crop((second - cell, margin + cell, second, sheet.height))
    assert first.getextrema()[0] < 128         # the first caption is drawn
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font, text = caption_font(long_name)
    cut = fit_caption(draw, text, font, cell - 2)
    assert cut.endswith("...") and draw.textlength(cut, font=font) <= cell - 2


def test_names_in_other_scripts_are_drawn_with_a_font_that_has_them():
    for name in ("李 四", "Jürgen Ødegård", "Алексей"):
        font, text = caption_font(f"query\n{name}")
        covered = next(c for f, c in plots.caption_fonts() if f is font)
        assert all(ord(c) in covered for c in text if c != "\n"), (name, text)
        if text != f"query\n{name}":             # no font here has them: code points
            assert "U+674E" in text and "U+56DB" in text
    assert caption_font("Алексей")[1] == "Алексей"   # DejaVu Sans draws Cyrillic

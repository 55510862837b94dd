"""The plots of an evaluation, and the ranking sheet search.py shares: PNG files, written
atomically.

  plot_cmc               the CMC curve, mean ± std over splits
  plot_verification      split 0's ROC (log FAR axis) beside the genuine and impostor score
                         histograms with the EER threshold
  plot_likelihood_ratios split 0's Tippett and ECE plots of the calibrated likelihood ratios
  plot_ranking           split 0's ranked retrieval: each query, then its top-k gallery images
                         in the order scored (green frame = same identity, red = other)
  save_ranking_grid      any such sheet, from (image, frame colour, caption) tiles
"""
import functools

import numpy as np
import torch

from handreid.evaluation import protocol
from handreid.core.atomic_files import atomic_write
from handreid.data.image_files import to_rgb
from handreid.metrics.verification import genuine_impostor_scores

THUMB = 96
FRAME = 4
QUERY_COLOUR, SAME_COLOUR, OTHER_COLOUR = "#1f5fbf", "#1a9e3a", "#d62020"


def save_png(path, image):
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def plot_cmc(path, config, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.arange(1, config["max_rank"] + 1)
    mean = np.array(report["mean"]["cmc"])
    figure, axis = plt.subplots(figsize=(5, 3.6), dpi=120)
    axis.plot(ranks, mean, marker="o", markersize=3, label="mean over splits")
    if report["std"]["cmc"] is not None:
        std = np.array(report["std"]["cmc"])
        axis.fill_between(ranks, mean - std, np.minimum(mean + std, 100), alpha=0.25,
                          label=f"± std ({report['num_splits']} splits)")
    axis.set(xlabel="rank", ylabel="identification rate (%)", ylim=(0, 100.5),
             title=f"CMC: {config['name']} ({config['variant']})\nrank-1 "
                   f"{report['mean']['rank1']:.1f}, mAP {report['mean']['mAP']:.1f}")
    axis.title.set_fontsize(9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)


def plot_verification(path, config, evaluated):
    """Split 0's verification: ROC (TAR against FAR, log FAR axis) and the genuine and
    impostor cosine-score histograms with the EER threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = evaluated.splits[0]
    genuine, impostor = genuine_impostor_scores(
        protocol.split_similarity(evaluated.features, split), split.query_ids,
        split.gallery_ids)
    row = evaluated.report["per_split"][0]
    # FAR and TAR at every observed score t (accept when score >= t), highest t first.
    thresholds = np.unique(np.concatenate([genuine, impostor]))[::-1]
    far = (len(impostor) - np.searchsorted(np.sort(impostor), thresholds)) / len(impostor)
    tar = (len(genuine) - np.searchsorted(np.sort(genuine), thresholds)) / len(genuine)
    figure, (roc, histogram) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    shown = far > 0  # a log axis cannot show FAR = 0
    roc.plot(100 * far[shown], 100 * tar[shown])
    roc.set(xscale="log", xlabel="FAR (%)", ylabel="TAR (%)", ylim=(0, 100.5),
            title=f"ROC, split 0: EER {row['eer']:.2f}%")
    roc.axvline(100 / len(impostor), color="grey", lw=0.8, ls=":",
                label="one impostor pair (lowest FAR measurable)")
    roc.legend(fontsize=7, loc="upper left")
    bins = np.linspace(min(genuine.min(), impostor.min()), max(genuine.max(), impostor.max()), 50)
    histogram.hist(impostor, bins=bins, density=True, alpha=0.55, color="#d62020",
                   label=f"impostor ({len(impostor)})")
    histogram.hist(genuine, bins=bins, density=True, alpha=0.55, color="#1a9e3a",
                   label=f"genuine ({len(genuine)})")
    histogram.axvline(row["eer_threshold"], color="black", lw=1, ls="--",
                      label=f"EER threshold {row['eer_threshold']:.3f}")
    histogram.set(xlabel="cosine score", ylabel="density", title="score distributions, split 0")
    histogram.legend(fontsize=7)
    for axis in (roc, histogram):
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{config['name']} ({config['variant']})", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)


def plot_likelihood_ratios(path, config, evaluated):
    """Split 0's reported LRs: Tippett plot (lir: proportion of log10 LRs >= x for same and for
    different persons) and ECE plot (lir: empirical cross-entropy against prior log odds, with
    the PAV-optimised LRs and the uninformative reference)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lir.data.models import LLRData
    from lir.plotting import tippett
    from lir.plotting.expected_calibration_error import plot_ece

    llrs, same = evaluated.first_split_llrs
    data = LLRData(features=llrs, labels=same.astype(int))
    row = evaluated.report["per_split"][0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    tippett(data, ax=left)
    left.legend(left.get_lines()[:2], [f"same person ({int(same.sum())} pairs)",
                                       f"different persons ({int((~same).sum())} pairs)"],
                fontsize=7)
    left.set(ylabel="proportion of LRs >= x (%)", xlabel="log10 LR",
             title=f"Tippett, split 0: Cllr {row['cllr']:.3f}, Cllr_min {row['cllr_min']:.3f}")
    plot_ece(data, ax=right)
    right.legend(fontsize=7)
    right.set(xlabel="prior log10 odds (same person)", ylabel="empirical cross-entropy (bits)",
              title="ECE, split 0")
    for axis in (left, right):
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{config['name']} ({config['variant']}): likelihood ratios, "
                    f"{config['lr_calibrator']} calibrator", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)


def _thumbnail(path, colour):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        tile = ImageOps.pad(to_rgb(image, path), (THUMB, THUMB), color="white")
    return ImageOps.expand(tile, border=FRAME, fill=colour)


# Caption fonts, first choice first: CJK-capable ones where the system has them, then
# DejaVu Sans (shipped with matplotlib: Latin, Greek, Cyrillic).
CAPTION_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Source Han Sans", "WenQuanYi Zen Hei",
                 "Droid Sans Fallback", "Arial Unicode MS", "DejaVu Sans")
CAPTION_SIZE = 10


@functools.lru_cache(maxsize=1)
def caption_fonts():
    """[(PIL font, set of code points it draws)] of the CAPTION_FONTS this system has."""
    from fontTools.ttLib import TTFont
    from matplotlib import font_manager
    from PIL import ImageFont

    fonts, seen = [], set()
    for family in CAPTION_FONTS:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family),
                                         fallback_to_default=False)
        except ValueError:
            continue
        if path in seen:
            continue
        seen.add(path)
        with TTFont(path, fontNumber=0, lazy=True) as face:
            covered = set(face.getBestCmap())
        fonts.append((ImageFont.truetype(path, CAPTION_SIZE), covered))
    return fonts


def caption_font(text):
    """(font, text) to draw `text` legibly: the first caption font that has every character,
    else the first one with each missing character written as its code point (U+674E)."""
    fonts = caption_fonts()
    needed = {ord(c) for c in text if c not in "\n"}
    for font, covered in fonts:
        if needed <= covered:
            return font, text
    font, covered = fonts[0]
    return font, "".join(c if ord(c) in covered or c == "\n" else f"U+{ord(c):04X}"
                         for c in text)


def fit_caption(draw, text, font, width):
    """Each line of `text` cut (with "...") to at most `width` pixels in `font`."""
    lines = []
    for line in text.split("\n"):
        if draw.textlength(line, font=font) > width:
            while line and draw.textlength(line + "...", font=font) > width:
                line = line[:-1]
            line += "..."
        lines.append(line)
    return "\n".join(lines)


def score_decimals(scores, low=3, high=6):
    """The fewest decimals (low..high) at which the distinct `scores` print distinct."""
    distinct = sorted(set(float(s) for s in scores))
    for decimals in range(low, high + 1):
        if len({f"{s:.{decimals}f}" for s in distinct}) == len(distinct):
            return decimals
    return high


def save_ranking_grid(path, rows):
    """A PNG sheet, one row per query: its thumbnail, a gap, then its ranked images.
    rows: [(query tile, [ranked tiles])]; a tile is (image path, frame colour, caption), the
    caption (two short lines) written underneath, each line cut to the tile's width, in a
    font that has its characters."""
    from PIL import Image, ImageDraw

    k = max(len(ranked) for _, ranked in rows)
    cell, label_height, gap, margin = THUMB + 2 * FRAME, 26, 12, 4
    sheet = Image.new("RGB", (2 * margin + gap + (k + 1) * cell,
                              2 * margin + len(rows) * (cell + label_height)), "white")
    draw = ImageDraw.Draw(sheet)

    def tile(x, y, image_path, colour, caption):
        sheet.paste(_thumbnail(image_path, colour), (x, y))
        font, text = caption_font(caption)
        draw.text((x + 1, y + cell), fit_caption(draw, text, font, cell - 2), fill="black",
                  font=font, spacing=1)

    for r, (query, ranked) in enumerate(rows):
        y = margin + r * (cell + label_height)
        tile(margin, y, *query)
        for rank, ranked_tile in enumerate(ranked):
            tile(margin + gap + (rank + 1) * cell, y, *ranked_tile)
    save_png(path, sheet)


def plot_ranking(path, evaluated, num_queries, max_rank):
    """Split 0: rows of query thumbnail (blue frame) then its top-k gallery images, green frame
    for the query's identity, red for another; rank and identity name underneath."""
    split = evaluated.splits[0]
    k = min(10, max_rank, len(split.gallery_ids))
    # The order the metrics scored (re-ranked with rerank: true); same tie order: stable
    # descending sort.
    top = torch.argsort(evaluated.first_split_scores.cpu(), dim=1, descending=True,
                        stable=True)[:, :k]
    shown = np.unique(np.linspace(0, len(split.query_ids) - 1, num_queries).round().astype(int))
    rows = []
    for q in shown:
        query_id = split.query_ids[q]
        ranked = [(split.gallery_paths[g],
                   SAME_COLOUR if split.gallery_ids[g] == query_id else OTHER_COLOUR,
                   f"rank {rank + 1}\n{split.gallery_ids[g]}")
                  for rank, g in enumerate(top[q].tolist())]
        rows.append(((split.query_paths[q], QUERY_COLOUR, f"query\n{query_id}"), ranked))
    save_ranking_grid(path, rows)

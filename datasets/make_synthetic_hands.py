"""Write a small synthetic hand dataset in the exact raw 11k or HD layout, so every code path
that reads real data (prepare scripts, loaders, training, evaluation) runs without it.

  11k: <out>/HandInfo.csv (the nine columns, quoted like the real file) + <out>/Hands/Hand_*.jpg
  hd:  <out>/Original Images/1-501/<id>_<n>.jpg + <out>/Original Images/502-712/<id>_<n>.jpg

Hands are drawn procedurally. A person is a set of stable traits (hand size, finger lengths
and widths, palm shape, skin tone, nail polish, moles, freckles, skin patches, scars, tattoos,
palm creases, veins, a habitual hand placement), seen under per-image nuisance (pose, finger
spread, scale, position, lighting, colour cast, background, shadow, sleeve, blur, noise), so
identity is learnable but raw pixels do not solve it. Left hands and dorsal views are mirror
images of the palmar right shape. Each subject and each image has its own seeded generator:
the same arguments give byte-identical files, whatever --workers.
"""
import argparse
import colorsys
import csv
import functools
import io
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from handreid.core.startup import start

start()

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

from handreid.core.config_files import ArgumentParser
from handreid.core.errors import ConfigError, run_cli, UserError
from handreid.core.atomic_files import atomic_write_json, atomic_write_text

# HandInfo.csv aspectOfHand -> id threshold of the published protocol (id <= T: train identity)
ASPECTS_11K = {"dorsal right": 1050, "dorsal left": 1037, "palmar right": 1051,
               "palmar left": 1042}
HD_THRESHOLD = 447
HD_SUBJECTS, HD_DISTRACTORS = (1, 501), (502, 712)
CSV_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
               "imageName", "irregularities")
JPEG_QUALITY = 90
SUPERSAMPLE_BELOW = 800  # smaller images are drawn at 2x and reduced: anti-aliased edges
MANIFEST = "synthetic.json"
OUTPUTS = ("HandInfo.csv", "Hands", "Original Images", MANIFEST)
GENERATOR_VERSION = 1  # bump when the drawing changes: a re-run must not keep stale images

SKIN_FAIR, SKIN_DARK = np.array([238, 200, 176.]), np.array([92, 58, 40.])
POLISH = ((190, 20, 40), (230, 90, 140), (120, 30, 110), (120, 10, 20), (245, 120, 90),
          (40, 60, 170), (25, 25, 30), (200, 170, 210))


# ----------------------------------------------------------------------------- identities
def subject_ids_11k(rng, count):
    """Ids straddling every aspect threshold: about half far below 1037 (train in all four
    aspects), half above 1051 (test in all four), and when there is room the boundary ids
    1037/1042/1050/1051, each train in some aspects and test in others (exercises `<=`)."""
    boundary = sorted(ASPECTS_11K.values()) if count >= 8 else []
    low = count // 2 - len(boundary) // 2
    high = count - low - len(boundary)
    below = rng.choice(min(ASPECTS_11K.values()) - 6, low, replace=False)
    above = max(ASPECTS_11K.values()) + 1 + rng.choice(8000, high, replace=False)
    return sorted(below.tolist()) + boundary + sorted(above.tolist())


def subject_ids_hd(rng, count):
    """Half of the subjects <= 447 (train), half in 448..501 (test), with 447 and 448 present;
    plus max(2, count // 4) distractor subjects in 502..712."""
    test = min(count // 2, HD_SUBJECTS[1] - HD_THRESHOLD)
    train = count - test
    ids = (sorted((1 + rng.choice(HD_THRESHOLD - 1, train - 1, replace=False)).tolist())
           + [HD_THRESHOLD, HD_THRESHOLD + 1]
           + sorted((HD_THRESHOLD + 2 + rng.choice(HD_SUBJECTS[1] - HD_THRESHOLD - 1, test - 1,
                                                   replace=False)).tolist()))
    span = HD_DISTRACTORS[1] - HD_DISTRACTORS[0] + 1
    distractors = sorted((HD_DISTRACTORS[0] + rng.choice(
        span, min(max(2, count // 4), span), replace=False)).tolist())
    return ids, distractors


# ----------------------------------------------------------------------------- traits
def hand_geometry(rng, gender):
    """Shape of one hand in palm units (palm top width ~1), palmar right view, fingers up (+y),
    thumb at +x. Order of fingers: index, middle, ring, little."""
    size = rng.uniform(0.9, 1.1) * (1.07 if gender == "male" else 0.96)
    width_top = size
    middle = size * rng.uniform(1.0, 1.3)
    lengths = middle * np.array([rng.uniform(0.8, 0.95), 1.0, rng.uniform(0.86, 0.98),
                                 rng.uniform(0.62, 0.8)])
    base_w = width_top / 4 * rng.uniform(0.78, 0.95) * np.array([1.0, 1.03, 0.97, 0.84])
    base_w *= rng.uniform(0.93, 1.07, 4)
    thumb_len = middle * rng.uniform(0.62, 0.8)
    return {
        "palm_h": size * rng.uniform(0.95, 1.25),
        "width_top": width_top,
        "width_bottom": width_top * rng.uniform(0.78, 0.95),
        "thenar": rng.uniform(0.05, 0.14),
        "squareness": rng.uniform(2.6, 4.5),
        "finger_len": lengths,
        "phalanges": np.stack([rng.dirichlet([46, 30, 24]) for _ in range(4)]),
        "finger_base_w": base_w,
        "finger_taper": rng.uniform(0.68, 0.86, 4),
        "knuckle_bulge": rng.uniform(1.0, 1.12),
        "finger_base_x": np.array([0.36, 0.12, -0.12, -0.36]) + rng.normal(0, 0.02, 4),
        "finger_base_y": np.array([0.95, 0.98, 0.95, 0.85]) + rng.normal(0, 0.02, 4),
        "splay": np.array([7., 0., -6., -13.]) * rng.uniform(0.6, 1.6) + rng.normal(0, 2.5, 4),
        "curl": rng.normal(0, 3.0, 4),
        "thumb": {"len": thumb_len, "w": base_w[0] * rng.uniform(1.1, 1.3),
                  "angle": rng.uniform(35, 58), "bend": rng.uniform(-18, -6),
                  "phalanges": rng.dirichlet([40, 33, 27]), "y": rng.uniform(0.2, 0.38)},
        "nail_len": rng.uniform(0.3, 0.5), "nail_w": rng.uniform(0.55, 0.75),
        "forearm_w": rng.uniform(0.75, 0.95),
    }


def perturb_geometry(rng, geometry):
    """The other hand of the same person: the same shape, a few percent off."""
    other = {}
    for key, value in geometry.items():
        if isinstance(value, dict):
            other[key] = perturb_geometry(rng, value)
        elif key in ("splay", "curl", "finger_base_x", "finger_base_y"):
            other[key] = value + rng.normal(0, 0.01 if key.startswith("finger") else 1.0,
                                            np.shape(value))
        else:
            other[key] = value * rng.uniform(0.97, 1.03, np.shape(value) or None)
    return other


def surface_marks(rng, surface, person, own_hand):
    """Marks of one surface (dorsal or palmar) of one hand, as anchors in palm or finger frames.
    `person` holds the tendencies shared by both hands (age, patchy skin, freckles); scars and
    tattoos belong to `own_hand` only."""
    def anchor(palm_share=0.6):
        if rng.random() < palm_share:
            return ("palm", rng.uniform(-0.42, 0.42), rng.uniform(0.1, 0.85))
        return ("finger", int(rng.integers(4)), int(rng.integers(2)), rng.uniform(0.2, 0.8),
                rng.uniform(-0.3, 0.3))

    def blob():  # an irregular patch in the middle of the palm
        radius = rng.uniform(0.07, 0.16) * rng.uniform(0.7, 1.3, 9)
        angles = np.linspace(0, 2 * np.pi, 9, endpoint=False)
        centre = (rng.uniform(-0.22, 0.22), rng.uniform(0.3, 0.7))
        return centre, np.stack([np.cos(angles) * radius, np.sin(angles) * radius], 1)

    dorsal = surface == "dorsal"
    marks = {"moles": [(anchor(), rng.uniform(0.018, 0.04), rng.uniform(0.55, 0.9))
                       for _ in range(rng.poisson(2.5 if dorsal else 0.8))],
             "wrinkles": int(np.clip(round(person["age"] / 18 + rng.normal(0, 0.7)), 1, 5)),
             "patches": [blob() for _ in range(int(rng.integers(1, 3)))]
             if person["patchy"] else [],
             "freckles": [anchor(0.7) for _ in range(int(rng.integers(15, 40)))]
             if person["freckles"] and dorsal else []}
    if dorsal:
        marks["scar"] = ((rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.7)),
                         rng.uniform(0, np.pi), rng.uniform(0.15, 0.35)) \
            if own_hand["scar"] else None
        marks["tattoo"] = ((rng.uniform(-0.15, 0.15), rng.uniform(0.35, 0.6)),
                           int(rng.integers(3, 7)), rng.uniform(0.1, 0.17), rng.uniform(0, 6.3)) \
            if own_hand["tattoo"] else None
        marks["veins"] = [np.array([[rng.uniform(-0.25, 0.25), 0.05],
                                    [rng.uniform(-0.35, 0.35), rng.uniform(0.35, 0.55)],
                                    [rng.uniform(-0.4, 0.4), rng.uniform(0.7, 0.85)]])
                          for _ in range(int(rng.integers(2, 4)))]
    else:
        # heart, head and life lines: quadratic curves with per-hand control points
        jitter = lambda: rng.normal(0, 0.05, 2)  # noqa: E731
        marks["creases"] = [
            np.array([(-0.5, 0.76), (-0.1, 0.7), (0.22, 0.9)]) + [jitter() for _ in range(3)],
            np.array([(0.48, 0.62), (0.1, 0.5), (-0.32, 0.45)]) + [jitter() for _ in range(3)],
            np.array([(0.38, 0.64), (0.12, 0.35), (0.22, 0.02)]) + [jitter() for _ in range(3)]]
    return marks


def make_subject(seed, subject_id):
    """All stable traits of one person (seeded by the subject id alone)."""
    rng = np.random.default_rng([seed, subject_id, 0])
    gender = "female" if rng.random() < 0.6 else "male"
    tone = rng.beta(2.0, 2.2)
    skin = (1 - tone) * SKIN_FAIR + tone * SKIN_DARK + rng.normal(0, [8, 6, 6])
    palm_skin = skin + (np.array([250, 196, 180.]) - skin) * (0.2 + 0.45 * tone)
    person = {"age": int(rng.integers(18, 76)), "patchy": rng.random() < 0.3,
              "patch_colour": (250, 232, 222) if rng.random() < 0.5 else (110, 45, 45),
              "freckles": rng.random() < 0.25}
    # scars and tattoos are on the right hand (as with the real data's irregularities column)
    right_hand = {"scar": rng.random() < 0.25, "tattoo": rng.random() < 0.2}
    hands = {"right": right_hand, "left": {"scar": False, "tattoo": False}}
    polish = POLISH[rng.integers(len(POLISH))] if rng.random() < 0.35 else None
    right = hand_geometry(rng, gender)
    return {
        "id": subject_id, "gender": gender, **person, "irregular": right_hand["scar"],
        "skin_category": ("very fair", "fair", "medium", "dark")[
            int(np.searchsorted([0.18, 0.42, 0.75], tone))],
        "skin": skin, "palm_skin": palm_skin, "polish": polish,
        "geometry": {"right": right, "left": perturb_geometry(rng, right)},
        "habit": {"rotation": rng.uniform(-12, 12), "shift": rng.uniform(-0.05, 0.05, 2)},
        "marks": {(side, surface): surface_marks(rng, surface, person, hands[side])
                  for side in ("right", "left") for surface in ("dorsal", "palmar")},
    }


# ----------------------------------------------------------------------------- geometry
def chain(start, angle, lengths, bends):
    """Joint points of a finger: segments starting at `angle` degrees from +y (positive
    towards +x), each bending by `bends[k]` degrees more."""
    points = [np.asarray(start, float)]
    for length, bend in zip(lengths, bends):
        angle += bend
        points.append(points[-1] + length * np.array([np.sin(np.deg2rad(angle)),
                                                      np.cos(np.deg2rad(angle))]))
    return np.array(points)


def chain_outline(joints, widths, steps=8):
    """Polygon around a chain of joints with the given widths, round at both ends."""
    directions = np.diff(joints, axis=0)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    normals = np.stack([-directions[:, 1], directions[:, 0]], 1)
    joint_normals = np.concatenate([normals[:1], normals[:-1] + normals[1:], normals[-1:]])
    joint_normals /= np.linalg.norm(joint_normals, axis=1, keepdims=True)
    half = widths[:, None] / 2
    left, right = joints + half * joint_normals, joints - half * joint_normals
    arc = np.linspace(0, np.pi, steps)[1:-1]

    def cap(centre, normal, radius):
        forward = np.array([normal[1], -normal[0]])
        return centre + radius * (np.cos(arc)[:, None] * normal + np.sin(arc)[:, None] * forward)

    tip = cap(joints[-1], joint_normals[-1], half[-1, 0])
    base = cap(joints[0], -joint_normals[0], half[0, 0])
    return np.concatenate([left, tip, right[::-1], base])


def ellipse(centre, axis, radius_along, radius_across, steps=16):
    t = np.linspace(0, 2 * np.pi, steps, endpoint=False)[:, None]
    normal = np.array([-axis[1], axis[0]])
    return centre + radius_along * np.cos(t) * axis + radius_across * np.sin(t) * normal


def pose_hand(geometry, pose):
    """Palm, forearm, finger and thumb shapes of one hand in one pose (palm units)."""
    g = geometry
    palm_h, w_top, w_bottom = g["palm_h"], g["width_top"], g["width_bottom"]
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    exponent = 2 / g["squareness"]
    v = np.sign(s) * np.abs(s) ** exponent  # -1 (wrist) .. 1 (knuckles)
    half_width = (w_bottom + (w_top - w_bottom) * (v + 1) / 2) / 2
    # the thenar bulge (thumb side, lower palm)
    half_width = half_width + (c > 0) * g["thenar"] * np.clip(np.sin((v + 1) * np.pi / 1.6), 0, 1)
    palm = np.stack([np.sign(c) * np.abs(c) ** exponent * half_width, (v + 1) / 2 * palm_h], 1)

    fingers = []
    for k in range(4):
        base = (g["finger_base_x"][k] * w_top, g["finger_base_y"][k] * palm_h)
        angle = g["splay"][k] * pose["spread"] + pose["finger_jitter"][k]
        lengths = g["finger_len"][k] * g["phalanges"][k] * pose["flex"][k]
        bends = [0.0, g["curl"][k], g["curl"][k]]
        joints = chain(base, angle, lengths, bends)
        w0 = g["finger_base_w"][k]
        widths = w0 * np.array([1.0, g["knuckle_bulge"] * 0.94, 0.86, g["finger_taper"][k]])
        fingers.append((joints, widths))

    th = g["thumb"]
    thumb_base = (w_bottom / 2 * 0.7, th["y"] * palm_h)
    thumb_joints = chain(thumb_base, th["angle"] + pose["thumb"], th["len"] * th["phalanges"],
                         [0.0, th["bend"], th["bend"] * 0.6])
    thumb = (thumb_joints, th["w"] * np.array([1.25, 1.0, 0.95, 0.8]))

    fw = g["forearm_w"] * w_bottom / 2
    forearm = np.array([(-fw, 0.15), (fw, 0.15), (fw * 1.15, -5.0), (-fw * 1.15, -5.0)])
    return {"palm": palm, "forearm": forearm, "fingers": fingers, "thumb": thumb}


def locate(anchor, hand, geometry):
    """Point of a mark anchor in this pose: palm anchors follow the palm, finger anchors
    follow their finger segment."""
    if anchor[0] == "palm":
        return np.array([anchor[1] * geometry["width_top"], anchor[2] * geometry["palm_h"]])
    _, finger, segment, along, across = anchor
    joints, widths = hand["fingers"][finger]
    a, b = joints[segment], joints[segment + 1]
    direction = (b - a) / np.linalg.norm(b - a)
    return a + along * (b - a) + across * widths[segment] * np.array([-direction[1], direction[0]])


def bezier(points, steps=12):
    t = np.linspace(0, 1, steps)[:, None]
    return (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t ** 2 * points[2]


# ----------------------------------------------------------------------------- drawing
def sample_pose(rng, habit):
    """This image's pose: around the subject's habitual placement of the hand."""
    return {"spread": rng.uniform(0.8, 1.25), "finger_jitter": rng.normal(0, 1.5, 4),
            "flex": rng.uniform(0.85, 1.0, 4), "thumb": rng.normal(0, 10),
            "rotation": habit["rotation"] + rng.uniform(-8, 8), "scale": rng.uniform(0.93, 1.07),
            "shift": habit["shift"] + rng.uniform(-0.04, 0.04, 2)}


def field_image(values, size):
    """A coarse [0, 1] float field -> an 'L' image of `size`, smoothly upsampled."""
    pixels = (np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(pixels).resize(size, Image.BILINEAR)


def coarse_grid(width, height, step):
    """(y, x) coordinates, divided by the longer image side, of every `step`-th pixel."""
    y, x = np.mgrid[0:height:step, 0:width:step] / max(width, height)
    return y, x


def background(rng, size):
    """Per-image background: a random colour blended into a second one by a random texture.
    Fields are computed on a coarse grid and upsampled: cheap at any image size."""
    # mostly pale, desaturated surfaces (paper, tables, walls); sometimes a strong colour
    saturation = rng.uniform(0, 0.2) if rng.random() < 0.9 else rng.uniform(0.2, 0.8)
    base = rgb(255 * np.array(colorsys.hsv_to_rgb(rng.random(), saturation,
                                                  rng.uniform(0.65, 0.97))))
    other = rgb(np.asarray(base) + rng.normal(0, 25, 3))
    kind = rng.integers(4)
    step = max(1, min(size) // 150)  # stripes and tiles need detail, the rest does not
    y, x = coarse_grid(*size, step)
    if kind == 0:  # smooth blotches
        field = np.asarray(field_image(rng.random((4, 5)), x.shape[::-1]), float) / 255
    elif kind == 1:  # stripes / wood grain
        angle = rng.uniform(0, np.pi)
        field = 0.5 + 0.5 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(8, 40)
                                   + rng.uniform(0, 6.3))
    elif kind == 2:  # tiles
        cell = rng.uniform(0.08, 0.3)
        field = (np.floor(x / cell) + np.floor(y / cell)) % 2
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        field = x * np.cos(angle) + y * np.sin(angle)
        field = (field - field.min()) / (np.ptp(field) + 1e-6)
    blend = field_image(field * rng.uniform(0.1, 0.7), size)
    return Image.composite(Image.new("RGB", size, other), Image.new("RGB", size, base), blend)


@functools.lru_cache(maxsize=2)
def noise_tile(width, height):
    """Sensor noise, 128 +- 32 per channel, with a margin so each image crops its own part."""
    rng = np.random.default_rng(2024)
    noise = 128 + 32 * rng.standard_normal((height + 32, width + 32, 3), np.float32)
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))


class Canvas:
    """Draws shapes given in palm units onto a supersampled RGB layer and its mask."""

    def __init__(self, width, height, matrix, offset):
        self.scale = 2 if max(width, height) < SUPERSAMPLE_BELOW else 1
        self.size = (width * self.scale, height * self.scale)
        self.matrix, self.offset = matrix * self.scale, offset * self.scale
        self.unit = np.abs(np.linalg.det(self.matrix)) ** 0.5  # pixels per palm unit
        self.image = Image.new("RGB", self.size)
        self.mask = Image.new("L", self.size)
        self.draw, self.draw_mask = ImageDraw.Draw(self.image), ImageDraw.Draw(self.mask)

    def px(self, points):
        return [tuple(p) for p in (np.asarray(points) @ self.matrix.T + self.offset)]

    def width(self, units):
        return max(1, int(round(units * self.unit)))

    def polygon(self, points, colour, outline=None, outline_w=0.012):
        xy = self.px(points)
        self.draw.polygon(xy, fill=colour)
        self.draw_mask.polygon(xy, fill=255)
        if outline is not None:
            self.draw.line(xy + xy[:1], fill=outline, width=self.width(outline_w), joint="curve")

    def line(self, points, colour, width):
        self.draw.line(self.px(points), fill=colour, width=self.width(width), joint="curve")

    def dot(self, centre, radius, colour):
        self.draw.polygon(self.px(ellipse(centre, np.array([1., 0.]), radius, radius, 10)),
                          fill=colour)


def lut(values):
    """[0, 1] values of the 256 input levels -> a lookup table for Image.point."""
    return (np.clip(values, 0, 1) * 255 + 0.5).astype(int).tolist()


def rgb(colour):
    return tuple(int(round(c)) for c in np.clip(colour, 0, 255))


def mix(a, b, weight):
    return rgb(np.asarray(a, float) * (1 - weight) + np.asarray(b, float) * weight)


def draw_hand(canvas, subject, side, surface, hand, rng, accessory):
    """One hand, one surface: silhouette, then surface details, then marks."""
    geometry = subject["geometry"][side]
    marks = subject["marks"][(side, surface)]
    skin = subject["palm_skin"] if surface == "palmar" else subject["skin"]
    palm_frame = np.array([geometry["width_top"], geometry["palm_h"]])  # palm anchors -> units
    base, outline = rgb(skin), mix(skin, (40, 20, 15), 0.35)
    canvas.polygon(hand["forearm"], mix(subject["skin"], skin, 0.6))
    canvas.polygon(chain_outline(*hand["thumb"]), base, outline)
    for joints, widths in hand["fingers"]:
        canvas.polygon(chain_outline(joints, widths), base, outline)
    canvas.polygon(hand["palm"], base)
    # outline the palm's sides only: its top is under the fingers, its bottom joins the forearm
    palm_y = hand["palm"][:, 1]
    sides = hand["palm"][(palm_y > 0.03) & (palm_y < 0.8 * geometry["palm_h"])]
    for half in (sides[sides[:, 0] < 0], sides[sides[:, 0] > 0]):
        canvas.line(half[np.argsort(half[:, 1])], outline, 0.01)

    crease = mix(skin, (60, 30, 25), 0.45)
    digits = hand["fingers"] + [hand["thumb"]]
    if surface == "dorsal":
        vein = mix(skin, (80, 100, 150), 0.18)
        for path in marks["veins"]:
            canvas.line(bezier(path * palm_frame), vein, 0.025)
        for joints, widths in digits:
            # knuckle wrinkles over the middle joint, nail at the tip
            along = (joints[2] - joints[1]) / np.linalg.norm(joints[2] - joints[1])
            normal = np.array([-along[1], along[0]]) * widths[1] * 0.3
            for j in range(marks["wrinkles"]):
                centre = joints[1] + along * (j - (marks["wrinkles"] - 1) / 2) * 0.025
                canvas.line([centre - normal, centre + normal], crease, 0.007)
            direction = (joints[3] - joints[2]) / np.linalg.norm(joints[3] - joints[2])
            nail_len = geometry["nail_len"] * np.linalg.norm(joints[3] - joints[2])
            nail = ellipse(joints[3] - direction * nail_len * 0.55, direction, nail_len / 2,
                           widths[3] * geometry["nail_w"] / 2)
            polish = subject["polish"]
            canvas.polygon(nail, rgb(polish) if polish else mix(skin, (255, 225, 220), 0.45),
                           mix(skin, (90, 50, 40), 0.3), 0.006)
        if marks["scar"] is not None:
            (u, v), angle, length = marks["scar"]
            centre = np.array([u, v]) * palm_frame
            step = length / 2 * np.array([np.cos(angle), np.sin(angle)])
            canvas.line([centre - step, centre + step], mix(skin, (250, 215, 215), 0.5), 0.018)
    else:
        for curve in marks["creases"]:
            canvas.line(bezier(curve * palm_frame), crease, 0.012)
        for joints, widths in hand["fingers"]:
            for joint in (1, 2):
                direction = (joints[joint + 1] - joints[joint]) / np.linalg.norm(
                    joints[joint + 1] - joints[joint])
                normal = np.array([-direction[1], direction[0]]) * widths[joint] * 0.42
                canvas.line([joints[joint] - normal, joints[joint] + normal], crease, 0.008)
    for centre, outline_points in marks["patches"]:
        canvas.polygon(outline_points + np.asarray(centre) * palm_frame,
                       mix(skin, subject["patch_colour"], 0.35))
    if surface == "dorsal" and marks["tattoo"] is not None:
        (u, v), points, radius, turn = marks["tattoo"]
        angles = turn + np.linspace(0, 2 * np.pi, 2 * points + 1)
        star = np.stack([np.cos(angles), np.sin(angles)], 1) * radius
        star[1::2] *= 0.45
        canvas.line(star + np.array([u, v]) * palm_frame, (35, 45, 80), 0.014)
    for anchor in marks["freckles"]:
        canvas.dot(locate(anchor, hand, geometry), 0.01, mix(skin, (120, 70, 40), 0.4))
    for anchor, radius, darkness in marks["moles"]:
        canvas.dot(locate(anchor, hand, geometry), radius, mix(skin, (55, 35, 25), darkness))

    if accessory:  # a watch band across the wrist or a ring on a finger: accessories=1 rows
        colour = rgb(rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            fw = geometry["forearm_w"] * geometry["width_bottom"] / 2 * 1.08
            y = rng.uniform(-0.35, -0.1)
            canvas.polygon([(-fw, y), (fw, y), (fw, y - 0.14), (-fw, y - 0.14)], colour)
        else:
            joints, widths = hand["fingers"][int(rng.integers(4))]
            centre = joints[0] + (joints[1] - joints[0]) * rng.uniform(0.45, 0.7)
            direction = (joints[1] - joints[0]) / np.linalg.norm(joints[1] - joints[0])
            canvas.polygon(ellipse(centre, direction, 0.035, widths[1] * 0.55), colour)


def render(subject, aspect, image_seed, width, height, accessory):
    """One JPEG (bytes) of one subject's hand aspect, e.g. ("right", "palmar")."""
    side, surface = aspect
    rng = np.random.default_rng(image_seed)
    pose = sample_pose(rng, subject["habit"])
    geometry = subject["geometry"][side]
    hand = pose_hand(geometry, pose)

    # palm units -> pixels: left hands and dorsal views are mirror images of the palmar right
    mirror = -1.0 if (side == "right") == (surface == "dorsal") else 1.0
    # a fixed camera distance: bigger hands look bigger
    unit = float(0.72 * height / 2.35 * pose["scale"])
    a = np.deg2rad(pose["rotation"])
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    matrix = unit * rotation @ np.diag([mirror, -1.0])
    centre = np.array([0.0, (geometry["palm_h"] + geometry["finger_len"][1]) / 2])
    offset = np.array([width, height]) * (0.5 + pose["shift"]) - matrix @ centre
    canvas = Canvas(width, height, matrix, offset)
    draw_hand(canvas, subject, side, surface, hand, rng, accessory)
    if rng.random() < 0.3:  # a sleeve over the forearm, in a random colour
        fw = geometry["forearm_w"] * geometry["width_bottom"]
        top = rng.uniform(-1.5, -0.4)
        canvas.polygon([(-fw, top), (fw, top), (fw * 1.3, -6), (-fw * 1.3, -6)],
                       rgb(rng.uniform(0, 255, 3)))

    size = (width, height)
    layer = canvas.image.reduce(canvas.scale) if canvas.scale > 1 else canvas.image
    mask = canvas.mask.reduce(canvas.scale) if canvas.scale > 1 else canvas.mask
    # soft edge shading and the drop shadow only need a blurred mask: made on a coarse copy
    coarse = max(1, int(unit * 0.03))
    small = mask.reduce(coarse) if coarse > 1 else mask
    soft = small.filter(ImageFilter.GaussianBlur(0.05 * unit / coarse)).resize(size, Image.BILINEAR)
    levels = np.arange(256) / 255
    shade = soft.point(lut(0.7 + 0.3 * np.clip(levels * 1.8 - 0.4, 0, 1)))
    layer = ImageChops.multiply(layer, Image.merge("RGB", [shade] * 3))

    scene = background(rng, size)
    dx, dy = rng.uniform(-0.06, 0.06, 2) * unit / coarse
    shadow = small.transform(small.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy)).filter(
        ImageFilter.GaussianBlur(0.04 * unit / coarse)).resize(size, Image.BILINEAR)
    darkness = rng.uniform(0.15, 0.45)
    shadow = shadow.point(lut(1 - darkness * levels))
    scene = ImageChops.multiply(scene, Image.merge("RGB", [shadow] * 3))
    image = Image.composite(layer, scene, mask)

    # lighting: a light falloff across the frame, then brightness, colour cast and contrast as
    # one lookup table per channel
    y, x = coarse_grid(width, height, max(1, min(size) // 16))
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35)
    falloff = 1 + strength * ((x - 0.5) * np.cos(angle) + (y - 0.4) * np.sin(angle))
    peak = falloff.max()
    image = ImageChops.multiply(image, Image.merge("RGB", [field_image(falloff / peak, size)] * 3))
    gain = peak * rng.uniform(0.82, 1.15) * rng.uniform(0.94, 1.06, 3)
    contrast = rng.uniform(0.8, 1.15)
    image = image.point(np.concatenate([lut((levels * g - 0.5) * contrast + 0.5) for g in gain]))
    sigma = rng.uniform(0, 6)
    ox, oy = rng.integers(0, 32, 2)
    noise = noise_tile(width, height).crop((ox, oy, ox + width, oy + height)).point(
        np.tile(lut(0.5 + (levels - 0.5) * sigma / 32), 3))
    out = ImageChops.add(image, noise, 1.0, -128)
    if rng.random() < 0.5:  # out of focus or motion-soft, half of the time
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5) * width / 400)))
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- datasets
def write_11k(out, args):
    """HandInfo.csv + Hands/: every subject has --images-per-aspect accessory-free images of
    each aspect; every third subject also one accessories=1 image per aspect (a watch or ring),
    which the prepare script must drop."""
    ids = subject_ids_11k(np.random.default_rng([args.seed, 11]), args.subjects)
    (out / "Hands").mkdir(parents=True)
    rows, jobs, number = [], [], 1
    for index, subject_id in enumerate(ids):
        subject = make_subject(args.seed, subject_id)
        for a, aspect_name in enumerate(ASPECTS_11K):
            surface, side = aspect_name.split()
            count = args.images_per_aspect + (index % 3 == 0)
            for n in range(count):
                accessory = n == args.images_per_aspect
                name = f"Hand_{number:07d}.jpg"
                number += 1
                written_id = f"{subject_id:07d}"
                if index == len(ids) - 1 and a == n == 0:
                    written_id += " "  # the real file has one id with a trailing space
                rows.append([written_id, subject["age"], subject["gender"],
                             subject["skin_category"], int(accessory),
                             int(subject["polish"] is not None), aspect_name, name,
                             int(subject["irregular"])])
                jobs.append((subject, (side, surface), [args.seed, subject_id, 1 + a, n],
                             out / "Hands" / name, accessory))
    render_all(jobs, args)
    buffer = io.StringIO(newline="")
    buffer.write(",".join(CSV_COLUMNS) + "\r\n")  # the real header is unquoted
    csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n").writerows(rows)
    atomic_write_text(out / "HandInfo.csv", buffer.getvalue())
    return len(ids), len(jobs)


def write_hd(out, args):
    """Original Images/1-501 (subjects around the 447 threshold) and 502-712 (distractors):
    --images-per-aspect images of the right dorsal hand per subject."""
    ids, distractors = subject_ids_hd(np.random.default_rng([args.seed, 12]), args.subjects)
    jobs = []
    for folder, group in (("1-501", ids), ("502-712", distractors)):
        (out / "Original Images" / folder).mkdir(parents=True)
        for subject_id in group:
            subject = make_subject(args.seed, subject_id)
            for n in range(1, args.images_per_aspect + 1):
                jobs.append((subject, ("right", "dorsal"), [args.seed, subject_id, 9, n],
                             out / "Original Images" / folder / f"{subject_id}_{n}.jpg", False))
    render_all(jobs, args)
    return len(ids) + len(distractors), len(jobs)


def render_job(job):
    """Draw and write one image. Plain write: the manifest says "writing" until all are there."""
    subject, aspect, seed, path, accessory, width, height = job
    path.write_bytes(render(subject, aspect, seed, width, height, accessory))


def render_all(jobs, args):
    """Every image has its own seed, so the worker count never changes the bytes."""
    jobs = [job + (args.width, args.height) for job in jobs]
    workers = min(args.workers, len(jobs) // 100 + 1)  # a pool only pays off for many images
    bar = tqdm(total=len(jobs), desc="drawing hands", unit="img", disable=None)
    if workers == 1:
        for job in jobs:
            render_job(job)
            bar.update()
    else:
        with multiprocessing.Pool(workers) as pool:
            for _ in pool.imap_unordered(render_job, jobs, chunksize=8):
                bar.update()
    bar.close()


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    parser.add_argument("--format", default="11k", choices=("11k", "hd"), help="raw layout")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--subjects", type=int, default=40,
                        help="people (hd: in 1-501, plus max(2, N//4) distractors in 502-712)")
    parser.add_argument("--images-per-aspect", type=int, default=8,
                        help="accessory-free images per subject and aspect (hd: per subject)")
    parser.add_argument("--width", type=int, default=320, help="image width in pixels")
    parser.add_argument("--height", type=int, default=240, help="image height in pixels")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes drawing images (the output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous synthetic dataset made with other arguments")
    args = parser.parse_args(argv)
    most = 2000 if args.format == "11k" else HD_SUBJECTS[1]
    if not 4 <= args.subjects <= most:
        raise ConfigError(f"--subjects must be in 4..{most} for --format {args.format}, "
                          f"got {args.subjects}")
    if args.images_per_aspect < 2:
        raise ConfigError("--images-per-aspect must be >= 2 (one val or gallery image per "
                          f"identity plus the rest), got {args.images_per_aspect}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    for name in ("width", "height"):
        if not 32 <= getattr(args, name) <= 8192:
            raise ConfigError(f"--{name} must be in 32..8192 pixels, got {getattr(args, name)}")
    return args


def check_out(out, settings, overwrite):
    """True if `out` already holds this dataset. Refuses anything not made by this script."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not manifest.is_file():
        raise UserError(f"{out} is not empty and has no {MANIFEST}, so it was not made by this "
                        "script; pass a new or empty --out")
    try:
        previous = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        previous = {}  # a torn manifest: treated as an interrupted run of this script
    if previous.get("status") == "complete" and previous.get("settings") == settings:
        return True
    if previous.get("status") == "complete" and not overwrite:
        made = ", ".join(f"{key} {value}" for key, value in previous.get("settings", {}).items())
        raise UserError(f"{out} holds a synthetic dataset made with other arguments ({made}); "
                        "pass --overwrite to replace it or choose another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
    if others:
        raise UserError(f"{out} also holds {', '.join(others)} (made from the old images); "
                        "remove them before replacing the synthetic dataset")
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    settings = {"format": args.format, "seed": args.seed, "subjects": args.subjects,
                "images_per_aspect": args.images_per_aspect, "width": args.width,
                "height": args.height, "generator_version": GENERATOR_VERSION}
    if check_out(out, settings, args.overwrite):
        print(f"{out} already holds this synthetic {args.format} dataset; nothing to do")
        return 0
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST, {"status": "writing", "settings": settings})
    subjects, images = (write_11k if args.format == "11k" else write_hd)(out, args)
    atomic_write_json(out / MANIFEST, {"status": "complete", "settings": settings,
                                       "subjects": subjects, "images": images})
    print(f"synthetic {args.format}: {subjects} subjects, {images} images of "
          f"{args.width}x{args.height} in {out} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Visual question answering data: easy-VQA images and questions, counting scenes drawn with PIL, a planted prior.

Everything here is offline and seeded. Items are small frozen dataclasses holding a PIL image, a question, the
answer, what kind of question it is, the ground-truth attributes of the image, and — when the question triggers
the planted language prior — the answer the prior predicts.

The planted prior (:data:`PRIOR`): in the *biased* training mix, 90 % of the colour questions that name the circle
("what color is the circle?") are about red circles; in the *balanced* mix circles are every colour equally often.
The held-out evaluation asks the same question about circles of every colour, so items split into
prior-consistent (red circles) and prior-violating (all other circles). A model that answers "red" without looking
is caught by the violating split.

easy-VQA (``easy-vqa==1.0``, MIT): 64x64 images with one shape on a light background. Its questions label shape and
colour for only ~84 % of images, so images are labelled here: the shape as the dataset's own questions state it
(images whose shape no question names are left out), the colour read off the pixels (the most common non-background
colour, snapped to the palette), which agrees with every colour answer of the dataset (tested). easy-VQA's yes/no
questions are answerable from the text alone (the most common answer per question string scores ~0.83), so yes/no
items are rebalanced here: every question string is asked about images where the answer is yes and where it is no.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
COUNTS = tuple(range(1, 10))
KINDS = ("shape", "colour", "yesno", "count")
# Every answer the testbed can give; the first token of each (as answered after "Answer: ") is distinct.
ANSWERS = ("yes", "no", *SHAPES, *COLOURS, *(str(c) for c in COUNTS))
IMAGE_PX = 64  # easy-VQA's size; scenes are drawn at the same size


@dataclass(frozen=True)
class PlantedPrior:
    """A language prior planted in the biased training mix: questions naming ``shape`` ask for its colour and the
    answer is ``colour`` in ``rate`` of the biased items (uniform over colours in the balanced mix)."""

    shape: str = "circle"
    colour: str = "red"
    rate: float = 0.9

    def applies(self, item: VQAItem) -> bool:
        return item.kind == "colour" and item.shape == self.shape and self.shape in item.question


PRIOR = PlantedPrior()


@dataclass(frozen=True)
class VQAItem:
    image: Image.Image = field(repr=False)
    question: str
    answer: str
    kind: str  # one of KINDS
    shape: str | None = None  # ground truth of the image
    colour: str | None = None
    count: int | None = None
    source: str = ""  # "easy-vqa:test:17" or "scene:seed:i"
    prior_answer: str | None = None  # the planted prior's answer, when the question triggers it

    @property
    def prior_consistent(self) -> bool | None:
        return None if self.prior_answer is None else self.prior_answer == self.answer


# -- easy-VQA ---------------------------------------------------------------------------------------------------
def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("easy-VQA data needs the `easy-vqa` package (pip install easy-vqa==1.0)") from e
    return easy_vqa


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split {split!r} is unknown; allowed: 'train', 'test'")
    return split


@lru_cache(maxsize=1)
def _palette() -> dict[str, np.ndarray]:
    """RGB of each colour name, measured from training images whose questions name their colour."""
    ev = _easy_vqa()
    questions, answers, ids = ev.get_train_questions()
    paths = ev.get_train_image_paths()
    seen: dict[str, list[np.ndarray]] = {c: [] for c in COLOURS}
    for q, a, i in zip(questions, answers, ids):
        if a in COLOURS and len(seen[a]) < 20:
            seen[a].append(_dominant(np.asarray(Image.open(paths[i]).convert("RGB"))))
    missing = [c for c, v in seen.items() if not v]
    if not (not missing):
        raise ValueError(f"easy-VQA names no image of colour(s) {missing}")
    return {c: np.median(np.stack(v), axis=0) for c, v in seen.items()}


def _dominant(pixels: np.ndarray) -> np.ndarray:
    """The second most common exact colour (the first is the background)."""
    packed = (pixels[..., 0].astype(np.int64) << 16) | (pixels[..., 1].astype(np.int64) << 8) | pixels[..., 2]
    vals, counts = np.unique(packed.ravel(), return_counts=True)
    v = int(vals[np.argsort(-counts)[1]])
    return np.array([v >> 16, (v >> 8) & 255, v & 255], dtype=float)


def image_colour(image: Image.Image) -> str:
    """Colour name of the shape in an easy-VQA image: its most common non-background colour, snapped to the palette."""
    px = np.asarray(image.convert("RGB")).astype(int)
    palette = _palette()
    rgb = _dominant(px)
    return min(palette, key=lambda c: float(((palette[c] - rgb) ** 2).sum()))


_NAMES_SHAPE = re.compile(r"^what (?:color is|is the color of) the (circle|rectangle|triangle)\?$")


def _shapes_from_questions(split: str) -> dict[int, str]:
    """Shape of each image as easy-VQA's own questions state it (answers naming a shape, colour questions naming
    the shape). Pixel rules (fill ratio, filled corners) disagree on ~1 % of small or rotated shapes."""
    shapes: dict[int, str] = {}
    for q, a, i in easy_vqa_questions(split):
        m = _NAMES_SHAPE.match(q)
        s = a if a in SHAPES else m.group(1) if m else None
        if s is not None:
            if not (shapes.get(i, s) == s):
                raise ValueError(f"easy-VQA image {i} is named both {shapes[i]} and {s}")
            shapes[i] = s
    return shapes


@lru_cache(maxsize=2)
def easy_vqa_images(split: str = "train") -> dict[int, tuple[str, str, str]]:
    """{image id: (path, shape, colour)} for the images whose shape easy-VQA's questions state (~85 %); the colour
    is read off the pixels."""
    ev = _easy_vqa()
    paths = ev.get_train_image_paths() if _split(split) == "train" else ev.get_test_image_paths()
    shapes = _shapes_from_questions(split)
    out = {}
    for i, p in sorted(paths.items()):
        if i in shapes:
            with Image.open(p) as im:
                out[i] = (p, shapes[i], image_colour(im))
    return out


def easy_vqa_questions(split: str = "train") -> list[tuple[str, str, int]]:
    """easy-VQA's own (question, answer, image id) triples."""
    ev = _easy_vqa()
    q, a, ids = ev.get_train_questions() if _split(split) == "train" else ev.get_test_questions()
    return list(zip(q, a, ids))


def load_images(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# -- question templates ----------------------------------------------------------------------------------------
_SHAPE_Q = ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
            "what is the {colour} shape?")
_COLOUR_NAMED_Q = ("what color is the {shape}?", "what is the color of the {shape}?")
_COLOUR_PLAIN_Q = ("what color is the shape?", "what is the color of the shape?")
_YES_Q = ("is there a {x}?", "is there a {x} in the image?", "does the image contain a {x}?", "is a {x} present?")
_COUNT_Q = ("how many {shape}s are there?", "how many {shape}s are in the image?")


def colour_question(shape: str, rng: random.Random, named: bool = True) -> str:
    return rng.choice(_COLOUR_NAMED_Q if named else _COLOUR_PLAIN_Q).format(shape=shape)


# -- counting scenes --------------------------------------------------------------------------------------------
SCENE_RGB = {
    "red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (139, 69, 19), "yellow": (230, 200, 0),
}


def draw_scene(rng: random.Random, count: int, shape: str, colour: str, size: int = IMAGE_PX) -> Image.Image:
    """``count`` non-overlapping shapes of one kind and colour on a light random background."""
    if count not in COUNTS:
        raise ValueError(f"count {count!r} is out of range; allowed: 1..9")
    if shape not in SHAPES or colour not in SCENE_RGB:
        raise ValueError(f"shape {shape!r} / colour {colour!r} unknown; allowed: {SHAPES} / {COLOURS}")
    bg = tuple(rng.randint(215, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    side = max(7, int(size * (0.22 if count <= 3 else 0.17 if count <= 6 else 0.14)))
    for attempt in range(20000):
        if len(boxes) == count:
            break
        s = rng.randint(side - 2, side)
        x, y = rng.randint(1, size - s - 2), rng.randint(1, size - s - 2)
        box = (x, y, x + s, y + s)
        if any(not (box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]) for b in boxes):
            continue
        boxes.append(box)
    if len(boxes) != count:  # pragma: no cover - sizes above always fit
        raise RuntimeError(f"could not place {count} shapes in {size}px")
    fill = SCENE_RGB[colour]
    for x0, y0, x1, y1 in boxes:
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def scene_items(n: int, seed: int) -> list[VQAItem]:
    """``n`` counting questions over fresh scenes (counts uniform in 1..9)."""
    rng = random.Random(f"scene:{seed}")
    items = []
    for i in range(n):
        count, shape, colour = rng.choice(COUNTS), rng.choice(SHAPES), rng.choice(COLOURS)
        image = draw_scene(rng, count, shape, colour)
        q = rng.choice(_COUNT_Q).format(shape=shape)
        items.append(VQAItem(image, q, str(count), "count", shape, colour, count, f"scene:{seed}:{i}"))
    return items


# -- training and evaluation mixes --------------------------------------------------------------------------------
VARIANTS = ("biased", "balanced")
MIX = {"shape": 0.2, "colour": 0.4, "yesno": 0.15, "count": 0.25}  # fractions of a training set


def by_attrs(split: str) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, shape, colour) in easy_vqa_images(split).items():
        groups.setdefault((shape, colour), []).append(i)
    return groups


def image_item(split: str, i: int, question: str, answer: str, kind: str, prior: PlantedPrior | None) -> VQAItem:
    path, shape, colour = easy_vqa_images(split)[i]
    item = VQAItem(load_images(path), question, answer, kind, shape, colour, None, f"easy-vqa:{split}:{i}")
    if prior is not None and prior.applies(item):
        item = VQAItem(item.image, question, answer, kind, shape, colour, None, item.source, prior.colour)
    return item


def _colour_items(split: str, n: int, rng: random.Random, circle_red_rate: float | None, prior: PlantedPrior):
    """Colour questions; a third name the prior's shape. ``circle_red_rate`` None = uniform colours."""
    groups = by_attrs(split)
    items = []
    for k in range(n):
        shape = SHAPES[k % 3]
        if shape == prior.shape:
            if circle_red_rate is not None and rng.random() < circle_red_rate:
                colour = prior.colour
            else:
                others = [c for c in COLOURS if circle_red_rate is None or c != prior.colour]
                colour = rng.choice(others)
            q = colour_question(shape, rng, named=True)
        else:
            colour = rng.choice(COLOURS)
            q = colour_question(shape, rng, named=rng.random() < 0.5)
        i = rng.choice(groups[(shape, colour)])
        items.append(image_item(split, i, q, colour, "colour", prior))
    return items


def _shape_items(split: str, n: int, rng: random.Random, prior: PlantedPrior) -> list[VQAItem]:
    ids = sorted(easy_vqa_images(split))
    items = []
    for _ in range(n):
        i = rng.choice(ids)
        _, shape, colour = easy_vqa_images(split)[i]
        q = rng.choice(_SHAPE_Q).format(colour=colour)
        items.append(image_item(split, i, q, shape, "shape", prior))
    return items


def _yesno_items(split: str, n: int, rng: random.Random, prior: PlantedPrior) -> list[VQAItem]:
    """Balanced yes/no: each question string is asked about an image where the answer is yes and one where no."""
    ids = sorted(easy_vqa_images(split))
    items = []
    for k in range(n):
        i = rng.choice(ids)
        _, shape, colour = easy_vqa_images(split)[i]
        want_yes = k % 2 == 0
        if rng.random() < 0.5:
            x = shape if want_yes else rng.choice([s for s in SHAPES if s != shape])
        else:
            x = (colour if want_yes else rng.choice([c for c in COLOURS if c != colour])) + " shape"
        q = rng.choice(_YES_Q).format(x=x)
        items.append(image_item(split, i, q, "yes" if want_yes else "no", "yesno", prior))
    return items


def training_set(variant: str, n: int, seed: int = 0, prior: PlantedPrior = PRIOR) -> list[VQAItem]:
    """A seeded training mix of ``n`` items (easy-VQA train images + fresh scenes) for one testbed variant."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; allowed: {VARIANTS}")
    if not isinstance(n, int) or n < len(MIX):
        raise ValueError(f"n must be an int >= {len(MIX)}, got {n!r}")
    rng = random.Random(f"train:{variant}:{seed}")
    sizes = {k: int(round(f * n)) for k, f in MIX.items()}
    sizes["colour"] += n - sum(sizes.values())
    rate = prior.rate if variant == "biased" else None
    items = (
        _shape_items("train", sizes["shape"], rng, prior)
        + _colour_items("train", sizes["colour"], rng, rate, prior)
        + _yesno_items("train", sizes["yesno"], rng, prior)
        + scene_items(sizes["count"], seed=10_000 + seed)
    )
    rng.shuffle(items)
    return items


def evaluation_set(n_per_kind: int, seed: int = 0, prior: PlantedPrior = PRIOR) -> dict[str, list[VQAItem]]:
    """Held-out items (easy-VQA *test* images, scenes with other seeds), by split name:

    ``prior_consistent`` / ``prior_violating``: "what color is the circle?" on red / non-red circles;
    ``shape``, ``colour`` (other shapes), ``yesno``, ``count``: the ordinary kinds.
    """
    if not isinstance(n_per_kind, int) or n_per_kind < 1:
        raise ValueError(f"n_per_kind must be a positive int, got {n_per_kind!r}")
    rng = random.Random(f"eval:{seed}")
    groups = by_attrs("test")
    consistent, violating = [], []
    for k in range(n_per_kind):
        i = rng.choice(groups[(prior.shape, prior.colour)])
        consistent.append(image_item("test", i, colour_question(prior.shape, rng), prior.colour, "colour", prior))
        colour = [c for c in COLOURS if c != prior.colour][k % (len(COLOURS) - 1)]
        i = rng.choice(groups[(prior.shape, colour)])
        violating.append(image_item("test", i, colour_question(prior.shape, rng), colour, "colour", prior))
    other = [s for s in SHAPES if s != prior.shape]
    colour_items = []
    for k in range(n_per_kind):
        shape, colour = other[k % len(other)], rng.choice(COLOURS)
        i = rng.choice(groups[(shape, colour)])
        colour_items.append(image_item("test", i, colour_question(shape, rng, named=k % 2 == 0), colour,
                                        "colour", prior))
    return {
        "prior_consistent": consistent,
        "prior_violating": violating,
        "shape": _shape_items("test", n_per_kind, rng, prior),
        "colour": colour_items,
        "yesno": _yesno_items("test", n_per_kind, rng, prior),
        "count": scene_items(n_per_kind, seed=20_000 + seed),
    }


def from_triples(triples: Sequence[tuple], kind: str = "open") -> list[VQAItem]:
    """Wrap any (image, question, answer) triples as items (images are converted to RGB; see ``vlm.check_image``)."""
    items = []
    for k, t in enumerate(triples):
        if len(t) != 3:
            raise ValueError(f"item {k} must be (image, question, answer), got {len(t)} values")
        image, question, answer = t
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"item {k}: the question must be a non-empty string, got {question!r}")
        if not isinstance(image, Image.Image):
            raise ValueError(f"item {k}: the image must be a PIL image, got {type(image).__name__}")
        items.append(VQAItem(image.convert("RGB"), question, str(answer), kind, source=f"triple:{k}"))
    return items


def question_kind(question: str) -> str:
    """Rough kind of an easy-VQA-style question (for reporting only)."""
    q = question.lower()
    if q.startswith("how many"):
        return "count"
    if re.match(r"^(is|does|are)\b", q):
        return "yesno"
    return "colour" if "color" in q or "colour" in q else "shape"


def probe_training_items(n: int, seed: int = 0) -> list[VQAItem]:
    """Colour questions naming the shape, every shape x colour equally often, on easy-VQA *training* images: the
    probe training items of the visual, SAE-bench and encoded-vs-expressed studies."""

    rng = random.Random(f"probe-train:{seed}")
    groups = by_attrs("train")
    items = []
    for k in range(n):
        shape, colour = SHAPES[k % 3], COLOURS[(k // 3) % len(COLOURS)]
        i = rng.choice(groups[(shape, colour)])
        items.append(image_item("train", i, colour_question(shape, rng), colour, "colour", PRIOR))
    return items

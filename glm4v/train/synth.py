"""Synthetic visual question answering: seeded images and bilingual conversations.

A miniature of the skill areas on the GLM-4V model card, designed so that a model of a few
million parameters can learn them at 224 px in about an hour on two CPU cores: six well separated
colours, four shapes, big clear text from a short word list, bar charts on a fixed grid.

Every example is a pure function of ``(seed, split, index)``: the random generator is seeded
with a string (Python hashes str seeds with SHA-512, so the stream does not depend on
PYTHONHASHSEED or the platform) and the text is drawn with the font bundled inside Pillow, not a
system font. The same call therefore gives the same pixels and the same text on every machine with
the same Pillow version.

Splits never share an image: the test split is generated first, then validation, then training,
and an example whose pixels already occur in an earlier split is drawn again with the next
``attempt`` number. ``eval synth`` can therefore regenerate the test split in memory without
touching the training data.

Written format (official GLM-4V fine-tuning JSONL, one conversation per line, image paths relative
to the JSONL file; the extra keys ``id``, ``skill`` and ``lang`` are ignored by the official code)::

    {"messages": [{"role": "user", "content": "...", "image": "images/test/000000.png"},
                  {"role": "assistant", "content": "..."}], "id": "test-000000", "skill": "perception", "lang": "en"}
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CANVAS = 224
SKILLS = ("perception", "counting", "spatial", "text", "chart", "description", "choice", "yesno", "multiturn")
LANGS = ("en", "zh")
DEFAULT_SEED = 1234
DEFAULT_SIZES = {"test": 1260, "val": 270, "train": 36000}
SPLIT_ORDER = ("test", "val", "train", "easy")  # "easy": single-object warm-up data

# name, Chinese name, RGB. Hues far apart so that a small vision tower separates them at once.
COLOURS = (
    ("red", "红色", (220, 40, 40)),
    ("green", "绿色", (40, 170, 60)),
    ("blue", "蓝色", (40, 90, 230)),
    ("yellow", "黄色", (240, 205, 20)),
    ("purple", "紫色", (150, 60, 200)),
    ("orange", "橙色", (250, 140, 20)),
)
SHAPES = (("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("star", "星形"))
WORDS = (
    "CAT", "DOG", "SUN", "MOON", "TREE", "BOOK", "FISH", "BIRD", "CAKE", "RAIN", "SNOW", "LAMP",
    "DOOR", "BOAT", "MILK", "ROSE", "KING", "GOLD", "HAT", "CUP", "PEN", "BUS", "CAR", "KEY",
)
BAR_LETTERS = "ABCDE"
RELATIONS = {  # relation of object 1 to object 2
    "left": ("on the left", "左边"),
    "right": ("on the right", "右边"),
    "above": ("above", "上面"),
    "below": ("below", "下面"),
}
YES = {"en": "yes", "zh": "是"}
NO = {"en": "no", "zh": "不是"}
HAS = {"en": "yes", "zh": "有"}
HAS_NOT = {"en": "no", "zh": "没有"}
CHOICE_SUFFIX = {
    "en": "Answer with the option's letter from the given choices.",
    "zh": "请回答选项的字母。",
}


@dataclass
class Obj:
    colour: int  # index into COLOURS
    shape: int  # index into SHAPES
    x: float
    y: float
    r: float


@dataclass
class Example:
    """One conversation; ``image`` is the PIL picture, ``messages[0]['image']`` its path once written."""

    id: str
    skill: str
    lang: str
    image: Image.Image
    messages: list[dict] = field(default_factory=list)
    scene: dict | None = None  # what the picture shows (scene_labels), for vision pre-training

    def record(self, image_path: str) -> dict:
        messages = [dict(m) for m in self.messages]
        messages[0]["image"] = image_path
        record = {"messages": messages, "id": self.id, "skill": self.skill, "lang": self.lang}
        if self.scene is not None:
            record["scene"] = self.scene
        return record


# ------------------------------------------------------------------------------------------------
# words in each language

def colour_name(i: int, lang: str) -> str:
    return COLOURS[i][0] if lang == "en" else COLOURS[i][1]


def shape_name(i: int, lang: str) -> str:
    return SHAPES[i][0] if lang == "en" else SHAPES[i][1]


def thing(o: Obj, lang: str) -> str:
    """'red circle' / '红色的圆形'."""
    if lang == "en":
        return f"{colour_name(o.colour, lang)} {shape_name(o.shape, lang)}"
    return f"{colour_name(o.colour, lang)}的{shape_name(o.shape, lang)}"


def a_thing(o: Obj, lang: str) -> str:
    """'a red circle' / 'an orange star' / '一个红色的圆形'."""
    if lang == "en":
        name = thing(o, lang)
        return ("an " if name[0] in "aeiou" else "a ") + name
    return "一个" + thing(o, lang)


def plural(shape: int) -> str:
    return SHAPES[shape][0] + "s"


def capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def so(statement: str, verdict: str, lang: str) -> str:
    """'The square is blue.' + 'no' -> 'The square is blue, so no.'

    Answers that compare (yes/no, multiple choice, spatial relations) first say what they looked up,
    then conclude. Answered in one token, each needed two look-ups and a comparison at once, and
    the 4-layer decoder stayed at chance on them (docs/TRAINING.md, round 3); written out, every
    step is one look-up the model already makes, and the conclusion compares words in the text.
    Exact match still scores the whole answer, so the look-up must be right too.
    """
    if lang == "en":
        return f"{statement.rstrip('.')}, so {verdict}."
    return f"{statement.rstrip('。')}，所以{verdict}。"


def grid_cell(o: Obj) -> tuple[int, int]:
    """(row, column) of the grid cell holding the object's centre, counted from 1."""
    return min(GRID - 1, int(o.y // CELL)) + 1, min(GRID - 1, int(o.x // CELL)) + 1


def where(o: Obj, lang: str) -> str:
    """'the red circle is at (2, 1)' / '红色的圆形在(2, 1)': its grid cell as (row, column).
    Digits rather than '第2行第1列': Chinese characters take three tokens each in the small vocabulary."""
    row, col = grid_cell(o)
    if lang == "en":
        return f"the {thing(o, lang)} is at ({row}, {col})"
    return f"{thing(o, lang)}在({row}, {col})"


def answer_where(o1: Obj, o2: Obj, lang: str) -> str:
    """Where ``o1`` is relative to ``o2`` (same row or same column), via the grid cells of both."""
    (r1, c1), (r2, c2) = grid_cell(o1), grid_cell(o2)
    if r1 == r2 and c1 != c2:
        relation = "left" if c1 < c2 else "right"
    elif c1 == c2 and r1 != r2:
        relation = "above" if r1 < r2 else "below"
    else:
        raise ValueError("spatial questions need two objects in one row or one column")
    if lang == "en":
        return f"{capitalise(where(o1, lang))} and {where(o2, lang)}, so it is {RELATIONS[relation][0]}."
    return f"{where(o1, lang)}，{where(o2, lang)}，所以它在{RELATIONS[relation][1]}。"


# ------------------------------------------------------------------------------------------------
# drawing

def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font (not a system font): identical glyphs on every machine.
    return ImageFont.load_default(size=size)


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(238, 255) for _ in range(3))


def draw_shape(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    fill = COLOURS[o.colour][2]
    x, y, r = o.x, o.y, o.r
    name = SHAPES[o.shape][0]
    if name == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif name == "square":
        h = r * 0.85  # similar area to the circle
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif name == "triangle":
        draw.polygon([(x, y - r), (x - r, y + 0.75 * r), (x + r, y + 0.75 * r)], fill=fill)
    else:  # five-pointed star
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)


# Objects sit in the cells of a 4x4 grid, one object per cell. The embedded model's image tokens
# each see one 56-px cell (224 px / 28-px patches / the 2x2 conv), so an object is then one token
# and "the colour of the circle" is one attention lookup. With objects anywhere, one object
# straddled up to four tokens and accuracy stayed at chance; on the grid counting was learned
# completely (100 %); colour/shape binding needed vision pre-training on top (docs/TRAINING.md).
GRID = 4
CELL = CANVAS // GRID
MAX_RADIUS = CELL / 2 - 3


def cell_centre(rng: random.Random, row: int, col: int, r: float) -> tuple[float, float]:
    """A centre inside cell (row, col) that keeps an object of radius ``r`` within the cell."""
    slack = max(0.0, CELL / 2 - r - 2)
    return (col * CELL + CELL / 2 + rng.uniform(-slack, slack),
            row * CELL + CELL / 2 + rng.uniform(-slack, slack))


def place(rng: random.Random, radii: list[float], distinct_columns: bool = False) -> list[tuple[float, float]]:
    """Centres for objects of the given radii, each in its own grid cell.

    ``distinct_columns`` puts every object in a different column, so that 'left to right' is a
    well defined order (at most GRID objects).
    """
    if distinct_columns:
        if len(radii) > GRID:
            raise ValueError(f"at most {GRID} objects in distinct columns")
        cells = [(rng.randrange(GRID), col) for col in rng.sample(range(GRID), len(radii))]
    else:
        cells = [divmod(k, GRID) for k in rng.sample(range(GRID * GRID), len(radii))]
    return [cell_centre(rng, row, col, r) for (row, col), r in zip(cells, radii)]


def render_objects(rng: random.Random, objs: list[Obj]) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), _background(rng))
    draw = ImageDraw.Draw(image)
    for o in objs:
        draw_shape(draw, o)
    return image


def distinct_objects(rng: random.Random, n: int, r_range=(17, MAX_RADIUS)) -> list[Obj]:
    """n objects, no two sharing a colour or a shape, so every question has one answer; each in
    its own column, so that a description can list them from left to right."""
    colours = rng.sample(range(len(COLOURS)), n)
    shapes = rng.sample(range(len(SHAPES)), n)
    radii = [rng.uniform(*r_range) for _ in range(n)]
    centres = place(rng, radii, distinct_columns=True)
    return [Obj(c, s, x, y, r) for c, s, (x, y), r in zip(colours, shapes, centres, radii)]


def render_text(rng: random.Random, text: str) -> Image.Image:
    return draw_text(rng, text)[0]


def draw_text(rng: random.Random, text: str) -> tuple[Image.Image, list[list]]:
    """The picture of ``text`` and, per character, ``[character, grid cell]``.

    One character per grid cell, left to right along a row: each image token of the embedded
    model then sees one glyph, so reading is recognising a glyph per token and ordering the tokens
    (the same skills as naming objects from left to right). Words laid out freely straddled
    tokens, and the vision tower read them back 14 % of the time after pre-training.
    """
    if not 1 <= len(text) <= GRID:
        raise ValueError(f"text of 1 to {GRID} characters, got {text!r}")
    image = Image.new("RGB", (CANVAS, CANVAS), _background(rng))
    draw = ImageDraw.Draw(image)
    font = _font(rng.randint(40, 50))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    row = rng.randrange(GRID)
    first = rng.randint(0, GRID - len(text))
    shift_x, shift_y = rng.uniform(-5, 5), rng.uniform(-6, 6)  # the word's, then each glyph's own bit
    chars = []
    for k, ch in enumerate(text):
        col = first + k
        centre = (col * CELL + CELL / 2 + shift_x + rng.uniform(-2, 2), row * CELL + CELL / 2 + shift_y + rng.uniform(-2, 2))
        draw.text(centre, ch, font=font, fill=ink, anchor="mm", stroke_width=2, stroke_fill=ink)
        chars.append([ch, row * GRID + col])
    return image, chars


# Bar chart geometry: fixed slots so that bar A is always in the same place.
CHART_BASE, CHART_UNIT, CHART_MAX = 196, 21, 8
CHART_X0, CHART_SLOT, CHART_BAR = 52, 34, 24


def render_chart(rng: random.Random, values: list[int], colours: list[int]) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    small = _font(13)
    right = CHART_X0 + CHART_SLOT * len(BAR_LETTERS)
    for v in range(CHART_MAX + 1):
        y = CHART_BASE - v * CHART_UNIT
        draw.line([(CHART_X0 - 8, y), (right, y)], fill=(205, 205, 205) if v else (60, 60, 60), width=1)
        draw.text((CHART_X0 - 12, y), str(v), font=small, fill=(60, 60, 60), anchor="rm")
    draw.line([(CHART_X0 - 8, CHART_BASE), (CHART_X0 - 8, CHART_BASE - CHART_MAX * CHART_UNIT)], fill=(60, 60, 60))
    label_font = _font(17)
    for k, (v, c) in enumerate(zip(values, colours)):
        x = CHART_X0 + 5 + k * CHART_SLOT
        draw.rectangle([x, CHART_BASE - v * CHART_UNIT, x + CHART_BAR, CHART_BASE - 1], fill=COLOURS[c][2])
        draw.text((x + CHART_BAR / 2, CHART_BASE + 4), BAR_LETTERS[k], font=label_font, fill=(30, 30, 30), anchor="mt")
    return image


# ------------------------------------------------------------------------------------------------
# question makers: each returns (image, [(question, answer), ...])

def _pick(rng: random.Random, templates: dict, lang: str) -> str:
    return rng.choice(templates[lang])


Q_COLOUR = {
    "en": ["What colour is the {s}?", "What color is the {s}?", "Which colour does the {s} have?"],
    "zh": ["{s}是什么颜色？", "图中的{s}是什么颜色的？"],
}
Q_SHAPE = {
    "en": ["What shape is the {c} object?", "What is the shape of the {c} object?"],
    "zh": ["{c}的物体是什么形状？", "图中{c}的物体是什么形状的？"],
}
Q_COUNT = {
    "en": ["How many {s} are there in the image?", "How many {s} can you see?", "Count the {s} in the picture."],
    "zh": ["图中有几个{s}？", "图片里一共有多少个{s}？"],
}
Q_TOTAL = {
    "en": ["How many shapes are there in total?", "How many objects are in the picture?"],
    "zh": ["图中一共有几个图形？", "图片里有多少个物体？"],
}
Q_WHERE = {
    "en": ["Where is the {a} relative to the {b}?", "Is the {a} left of, right of, above or below the {b}?"],
    "zh": ["{a}在{b}的什么位置？", "{a}位于{b}的哪一边？"],
}
Q_TEXT = {
    "en": ["What is written in the image?", "What word or number is shown in the picture?", "Read the text in the image."],
    "zh": ["图片中写的是什么？", "图中显示的文字是什么？"],
}
Q_HIGHEST = {
    "en": ["Which bar is the highest?", "Which bar has the largest value?"],
    "zh": ["哪个柱子最高？", "哪一个柱子的数值最大？"],
}
Q_VALUE = {
    "en": ["What is the value of bar {L}?", "How high is bar {L}?"],
    "zh": ["柱子{L}的数值是多少？", "柱子{L}有多高？"],
}
Q_DESCRIBE = {
    "en": ["Describe the image in one sentence.", "Give a one-sentence description of the picture."],
    "zh": ["请用一句话描述这张图片。", "用一句话描述图片的内容。"],
}
Q_EXISTS = {
    "en": ["Is there {a} in the image?", "Can you see {a} in the picture?"],
    "zh": ["图中有{a}吗？", "图片里有没有{a}？"],
}
Q_IS_COLOUR = {
    "en": ["Is the {s} {c}?"],
    "zh": ["{s}是{c}的吗？"],
}


def answer_colour(o: Obj, lang: str) -> str:
    s, c = shape_name(o.shape, lang), colour_name(o.colour, lang)
    return f"The {s} is {c}." if lang == "en" else f"{s}是{c}的。"


def answer_shape(o: Obj, lang: str) -> str:
    s, c = shape_name(o.shape, lang), colour_name(o.colour, lang)
    return f"The {c} object is a {s}." if lang == "en" else f"{c}的物体是{s}。"


def ask_colour(rng, o: Obj, lang: str) -> tuple[str, str]:
    return _pick(rng, Q_COLOUR, lang).format(s=shape_name(o.shape, lang)), answer_colour(o, lang)


def ask_shape(rng, o: Obj, lang: str) -> tuple[str, str]:
    return _pick(rng, Q_SHAPE, lang).format(c=colour_name(o.colour, lang)), answer_shape(o, lang)


def describe(objs: list[Obj], lang: str) -> str:
    """One sentence naming every object, left to right."""
    ordered = sorted(objs, key=lambda o: o.x)
    if lang == "en":
        parts = [a_thing(o, lang) for o in ordered]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"The image shows {listed}."
    parts = [a_thing(o, lang) for o in ordered]
    listed = parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]
    return f"图中有{listed}。"


def choice_question(rng, question: str, correct: str, pool: list[str], lang: str, statement: str) -> tuple[str, str]:
    """MMBench-style: the question, options A-D (one correct). The answer says what it saw
    (``statement``), then goes through the options in order, each set against the value it saw and
    given a verdict, up to the right one:
    'The circle is red.\nA. blue vs red: no\nB. red vs red: yes, so the answer is B.'

    Answered as 'The circle is red, so the answer is B.', the letter had to be found in one step (find
    the option with that word, read the letter written before it) and stayed near chance (36 %) through
    five training stages. Gone through line by line, each line is copied from the question, and the
    letter to give is the one on the line just written. Lines with a bare verdict ('A. blue: no')
    compared the option with a word a whole sentence back: right 95 % of the time in English but 75 %
    in Chinese, where the model mostly said yes on line C whatever it held. Restating the value next to
    the option makes the verdict a comparison of two neighbouring words.
    """
    options = rng.sample([p for p in pool if p != correct], 3) + [correct]
    rng.shuffle(options)
    lines = [question] + [f"{'ABCD'[k]}. {opt}" for k, opt in enumerate(options)] + [CHOICE_SUFFIX[lang]]
    right = options.index(correct)
    letter = "ABCD"[right]
    sep = ": " if lang == "en" else "："
    checked = [f"{'ABCD'[k]}. {opt} vs {correct}{sep}{NO[lang]}" for k, opt in enumerate(options[:right])]
    last = so(f"{letter}. {correct} vs {correct}{sep}{YES[lang]}", f"the answer is {letter}" if lang == "en" else f"答案是{letter}", lang)
    return "\n".join(lines), "\n".join([statement] + checked + [last])


def answer_count(n: int, lang: str) -> str:
    return f"I count {n}." if lang == "en" else f"一共有{n}个。"


def answer_text(text: str, lang: str) -> str:
    return f"It says {text}." if lang == "en" else f"写的是{text}。"


def _text_content(rng) -> str:
    return rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(10, 99))


def make_perception(rng, lang):
    objs = distinct_objects(rng, rng.randint(1, 4))
    target = rng.choice(objs)
    qa = ask_colour(rng, target, lang) if rng.random() < 0.6 else ask_shape(rng, target, lang)
    return render_objects(rng, objs), [qa], ("objects", objs)


def make_counting(rng, lang):
    n = rng.randint(1, 6)
    shape = rng.randrange(len(SHAPES))
    radii = [rng.uniform(14, 21) for _ in range(n)]
    objs = [Obj(rng.randrange(len(COLOURS)), shape, x, y, r) for (x, y), r in zip(place(rng, radii), radii)]
    return render_objects(rng, objs), [ask_count(rng, shape, n, lang)], ("count", objs)


def ask_count(rng, shape: int, n: int, lang: str) -> tuple[str, str]:
    s = plural(shape) if lang == "en" else SHAPES[shape][1]
    return _pick(rng, Q_COUNT, lang).format(s=s), str(n)


def choose_count(rng, question: str, answer: str, lang: str) -> tuple[str, str]:
    return choice_question(rng, question, answer, [str(i) for i in range(1, 7)], lang, answer_count(int(answer), lang))


def make_spatial(rng, lang):
    relation = rng.choice(list(RELATIONS))
    colours = rng.sample(range(len(COLOURS)), 2)
    shapes = rng.sample(range(len(SHAPES)), 2)
    r1, r2 = rng.uniform(16, MAX_RADIUS), rng.uniform(16, MAX_RADIUS)
    # Different cells along the relation's axis, the same row (or column) on the other one.
    along = sorted(rng.sample(range(GRID), 2))
    if relation in ("right", "below"):
        along.reverse()
    across = rng.randrange(GRID)
    if relation in ("left", "right"):
        (x1, y1), (x2, y2) = cell_centre(rng, across, along[0], r1), cell_centre(rng, across, along[1], r2)
    else:
        (x1, y1), (x2, y2) = cell_centre(rng, along[0], across, r1), cell_centre(rng, along[1], across, r2)
    o1, o2 = Obj(colours[0], shapes[0], x1, y1, r1), Obj(colours[1], shapes[1], x2, y2, r2)
    question = _pick(rng, Q_WHERE, lang).format(a=thing(o1, lang), b=thing(o2, lang))
    return render_objects(rng, [o1, o2]), [(question, answer_where(o1, o2, lang))], ("spatial", [o1, o2], relation)


def make_text(rng, lang):
    text = _text_content(rng)
    image, chars = draw_text(rng, text)
    return image, [(_pick(rng, Q_TEXT, lang), text)], ("text", text, chars)


def _chart(rng):
    n = rng.randint(3, 5)
    while True:
        values = [rng.randint(1, CHART_MAX) for _ in range(n)]
        if values.count(max(values)) == 1:
            break
    colours = [rng.randrange(len(COLOURS)) for _ in range(n)]
    return values, render_chart(rng, values, colours)


def make_chart(rng, lang):
    values, image = _chart(rng)
    if rng.random() < 0.4:
        return image, [(_pick(rng, Q_HIGHEST, lang), BAR_LETTERS[values.index(max(values))])], ("chart", values)
    k = rng.randrange(len(values))
    return image, [(_pick(rng, Q_VALUE, lang).format(L=BAR_LETTERS[k]), str(values[k]))], ("chart", values)


def make_description(rng, lang):
    objs = distinct_objects(rng, rng.randint(1, 4))
    return render_objects(rng, objs), [(_pick(rng, Q_DESCRIBE, lang), describe(objs, lang))], ("objects", objs)


def make_choice(rng, lang):
    kind = rng.choice(["colour", "shape", "count", "text"])
    if kind in ("colour", "shape"):
        objs = distinct_objects(rng, rng.randint(1, 4))
        return render_objects(rng, objs), [choose_about(rng, rng.choice(objs), kind, lang)], ("objects", objs)
    if kind == "count":
        image, [(q, n)], scene = make_counting(rng, lang)
        return image, [choose_count(rng, q, n, lang)], scene
    text = _text_content(rng)
    image, chars = draw_text(rng, text)
    return image, [choose_text(rng, text, lang)], ("text", text, chars)


def choose_about(rng, o: Obj, kind: str, lang: str) -> tuple[str, str]:
    """The colour (or shape) question about ``o`` as a multiple choice."""
    if kind == "colour":
        q = _pick(rng, Q_COLOUR, lang).format(s=shape_name(o.shape, lang))
        return choice_question(rng, q, colour_name(o.colour, lang), [colour_name(i, lang) for i in range(len(COLOURS))],
                               lang, answer_colour(o, lang))
    q = _pick(rng, Q_SHAPE, lang).format(c=colour_name(o.colour, lang))
    return choice_question(rng, q, shape_name(o.shape, lang), [shape_name(i, lang) for i in range(len(SHAPES))],
                           lang, answer_shape(o, lang))


def choose_text(rng, text: str, lang: str) -> tuple[str, str]:
    pool = list(WORDS) if not text.isdigit() else [str(i) for i in range(10, 100)]
    return choice_question(rng, _pick(rng, Q_TEXT, lang), text, pool, lang, answer_text(text, lang))


def _absent_pair(rng, objs: list[Obj]) -> Obj:
    """A colour/shape pair not in the scene; usually one of its parts is present (a hard negative)."""
    present = {(o.colour, o.shape) for o in objs}
    candidates = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)) if (c, s) not in present]
    hard = [(c, s) for c, s in candidates if any(o.colour == c or o.shape == s for o in objs)]
    c, s = rng.choice(hard if hard and rng.random() < 0.75 else candidates)
    return Obj(c, s, 0, 0, 0)


def ask_exists(rng, objs: list[Obj], lang: str) -> tuple[str, str]:
    asked = rng.choice(objs) if rng.random() < 0.5 else _absent_pair(rng, objs)
    return _exists_question(rng, asked, lang), answer_exists(asked, objs, lang)


def answer_exists(asked: Obj, objs: list[Obj], lang: str) -> str:
    """Is there a red circle? Shapes are distinct in a scene, so: find the circle, then its colour."""
    same_shape = [o for o in objs if o.shape == asked.shape]
    if not same_shape:
        absent = f"There is no {shape_name(asked.shape, lang)}." if lang == "en" else f"图中没有{shape_name(asked.shape, lang)}。"
        return so(absent, HAS_NOT[lang], lang)
    found = same_shape[0]
    return so(answer_colour(found, lang), HAS[lang] if found.colour == asked.colour else HAS_NOT[lang], lang)


def _exists_question(rng, o: Obj, lang: str) -> str:
    # Chinese asks about '红色的圆形', English about 'a red circle'
    return _pick(rng, Q_EXISTS, lang).format(a=a_thing(o, lang) if lang == "en" else thing(o, lang))


def make_yesno(rng, lang):
    objs = distinct_objects(rng, rng.randint(1, 4))
    if rng.random() < 0.6:
        qa = ask_exists(rng, objs, lang)
    else:
        qa = ask_is_colour(rng, rng.choice(objs), lang)
    return render_objects(rng, objs), [qa], ("objects", objs)


def ask_is_colour(rng, o: Obj, lang: str) -> tuple[str, str]:
    yes = rng.random() < 0.5
    colour = o.colour if yes else rng.choice([c for c in range(len(COLOURS)) if c != o.colour])
    q = _pick(rng, Q_IS_COLOUR, lang).format(s=shape_name(o.shape, lang), c=colour_name(colour, lang))
    return q, so(answer_colour(o, lang), YES[lang] if yes else NO[lang], lang)


def make_multiturn(rng, lang):
    objs = distinct_objects(rng, rng.randint(2, 4))
    first, second = rng.sample(objs, 2)
    turns = [ask_colour(rng, first, lang) if rng.random() < 0.6 else ask_shape(rng, first, lang)]
    kind = rng.choice(["total", "exists", "other"])
    if kind == "total":
        turns.append((_pick(rng, Q_TOTAL, lang), str(len(objs))))
    elif kind == "exists":
        turns.append(ask_exists(rng, objs, lang))
    else:
        turns.append(ask_shape(rng, second, lang) if rng.random() < 0.5 else ask_colour(rng, second, lang))
    return render_objects(rng, objs), turns, ("objects", objs)


def extra_questions(rng, scene: tuple, lang: str) -> list[tuple[str, str]]:
    """More questions about a training image's scene: several answers per image forward pass
    give the vision tower more to learn from at little extra cost."""
    kind = scene[0]
    if kind == "objects":
        objs = scene[1]
        pool = [ask_colour(rng, o, lang) for o in objs] + [ask_shape(rng, o, lang) for o in objs]
        pool += [(_pick(rng, Q_TOTAL, lang), str(len(objs))), ask_exists(rng, objs, lang), ask_exists(rng, objs, lang)]
        pool.append((_pick(rng, Q_DESCRIBE, lang), describe(objs, lang)))  # distinct columns: left to right is defined
        # the comparisons (is it this colour? which option is it?) on the same facts: after the
        # lookups alone, yes/no and multiple choice stayed at chance
        pool += [ask_is_colour(rng, o, lang) for o in objs]
        pool += [choose_about(rng, o, rng.choice(["colour", "shape"]), lang) for o in objs]
        return pool
    if kind == "count":
        return [choose_count(rng, *ask_count(rng, scene[1][0].shape, len(scene[1]), lang), lang)]
    if kind == "text":
        return [choose_text(rng, scene[1], lang)]
    if kind == "spatial":
        o1, o2 = scene[1]
        back = (_pick(rng, Q_WHERE, lang).format(a=thing(o2, lang), b=thing(o1, lang)), answer_where(o2, o1, lang))
        return [back] + [ask_colour(rng, o, lang) for o in (o1, o2)] + [ask_shape(rng, o, lang) for o in (o1, o2)]
    values = scene[1]  # chart
    pool = [(_pick(rng, Q_VALUE, lang).format(L=BAR_LETTERS[k]), str(v)) for k, v in enumerate(values)]
    return pool + [(_pick(rng, Q_HIGHEST, lang), BAR_LETTERS[values.index(max(values))])]


def scene_labels(scene: tuple) -> dict:
    """What a picture shows, in names: ``{"cells": [[colour, shape] or null] * 16}`` for objects
    (row-major grid cells, null = empty), ``{"text": "CAKE", "chars": [["C", 9], ...]}`` (each
    character with the cell of its centre), ``{"bars": [3, 7, 5]}``.
    Written to the JSONL as ``scene`` (the official code ignores extra keys) for vision pre-training."""
    kind = scene[0]
    if kind in ("objects", "count", "spatial"):
        cells: list = [None] * (GRID * GRID)
        for o in scene[1]:
            row, col = grid_cell(o)
            cells[(row - 1) * GRID + col - 1] = [COLOURS[o.colour][0], SHAPES[o.shape][0]]
        return {"cells": cells}
    if kind == "text":
        return {"text": scene[1], "chars": scene[2]}
    return {"bars": list(scene[1])}


def make_single(rng, lang):
    """One object, its colour or its shape: the easiest grounded question (a warm-up curriculum)."""
    objs = distinct_objects(rng, 1)
    qa = ask_colour(rng, objs[0], lang) if rng.random() < 0.5 else ask_shape(rng, objs[0], lang)
    return render_objects(rng, objs), [qa], ("objects", objs)


MAKERS = {
    "perception": make_perception, "counting": make_counting, "spatial": make_spatial, "text": make_text,
    "chart": make_chart, "description": make_description, "choice": make_choice, "yesno": make_yesno,
    "multiturn": make_multiturn,
}


# ------------------------------------------------------------------------------------------------
# examples and splits

def skill_and_lang(index: int) -> tuple[str, str]:
    """Round robin over skills and languages: every block of 18 examples holds each pair once."""
    return SKILLS[index % len(SKILLS)], LANGS[(index // len(SKILLS)) % len(LANGS)]


def make_example(seed: int, split: str, index: int, attempt: int = 0, extra_turns: int = 0) -> Example:
    """Example ``index`` of a split; training examples may get up to ``extra_turns`` more questions."""
    skill, lang = skill_and_lang(index)
    rng = random.Random(f"glm4v-synth/{seed}/{split}/{index}/{attempt}")
    maker = MAKERS[skill]
    if split == "easy":  # the warm-up curriculum: single objects only
        skill, maker = "perception", make_single
    image, turns, scene = maker(rng, lang)
    if extra_turns and split == "train":
        pool = [qa for qa in extra_questions(rng, scene, lang) if qa not in turns]
        turns = turns + rng.sample(pool, min(len(pool), rng.randint(0, extra_turns)))
    messages = []
    for n, (question, answer) in enumerate(turns):
        user = {"role": "user", "content": question}
        if n == 0:
            user["image"] = None  # filled with the path when written
        messages += [user, {"role": "assistant", "content": answer}]
    return Example(f"{split}-{index:06d}", skill, lang, image, messages, scene_labels(scene))


def pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def generate_split(seed: int, split: str, n: int, seen: set[str] | None = None, extra_turns: int = 0):
    """Yield n examples of a split; an image whose pixels are in ``seen`` is drawn again."""
    seen = set() if seen is None else seen
    for index in range(n):
        attempt = 0
        while True:
            ex = make_example(seed, split, index, attempt, extra_turns)
            digest = pixel_digest(ex.image)
            if digest not in seen:
                break
            attempt += 1
        seen.add(digest)
        yield ex


def generate_test_split(seed: int = DEFAULT_SEED, n: int = DEFAULT_SIZES["test"]) -> list[Example]:
    """The test split in memory (it comes first, so it never depends on the other splits)."""
    return list(generate_split(seed, "test", n))


def write_dataset(out_dir, sizes: dict[str, int] | None = None, seed: int = DEFAULT_SEED, progress: bool = False,
                  extra_turns: int = 0) -> dict:
    """Write ``{split}.jsonl`` and ``images/{split}/NNNNNN.png`` for each split; returns the paths."""
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLIT_ORDER)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLIT_ORDER}")
    out = Path(out_dir)
    seen: set[str] = set()
    paths = {}
    for split in SPLIT_ORDER:
        if split not in sizes:
            continue
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        examples = generate_split(seed, split, sizes[split], seen, extra_turns)
        if progress:
            from tqdm import tqdm

            examples = tqdm(examples, total=sizes[split], desc=f"synth {split}", unit="img", mininterval=5)
        jsonl = out / f"{split}.jsonl"
        tmp = jsonl.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in examples:
                rel = f"images/{split}/{ex.id.split('-')[-1]}.png"
                ex.image.save(out / rel, optimize=False, compress_level=1)
                f.write(json.dumps(ex.record(rel), ensure_ascii=False) + "\n")
        tmp.replace(jsonl)
        paths[split] = jsonl
    (out / "synth.json").write_text(json.dumps({"seed": seed, "sizes": sizes, "extra_turns": extra_turns}, indent=2) + "\n")
    return paths


# ------------------------------------------------------------------------------------------------
# scoring

_PUNCT = " \t\n.。!！,，:：;；\"'"


def normalise(text: str) -> str:
    """Case, surrounding whitespace and trailing punctuation do not matter for exact match."""
    return re.sub(r"\s+", " ", text.strip().strip(_PUNCT).lower())


_EN_THING = re.compile(r"\b(" + "|".join(c[0] for c in COLOURS) + r") (" + "|".join(s[0] for s in SHAPES) + r")\b")
_ZH_THING = re.compile("(" + "|".join(c[1] for c in COLOURS) + ")的(" + "|".join(s[1] for s in SHAPES) + ")")


def description_facts(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a description names, sorted: its key facts."""
    text = text.lower()
    return sorted(_EN_THING.findall(text) + _ZH_THING.findall(text))


def score_answer(skill: str, prediction: str, reference: str) -> bool:
    """Exact match after normalisation; a description is right when it names exactly the right objects."""
    if skill == "description":
        facts = description_facts(reference)
        return bool(facts) and description_facts(prediction) == facts
    return normalise(prediction) == normalise(reference)


# ------------------------------------------------------------------------------------------------
# example pictures (examples/ in the repository)

def example_images() -> dict[str, tuple[Image.Image, str, str]]:
    """A few fixed pictures drawn by the generator, with a question each and its answer."""
    rng = random.Random("glm4v-examples")
    # centres in grid cells, as the generator places them (cell centres are 28, 84, 140, 196)
    shapes = [Obj(0, 0, 84, 84, 24), Obj(2, 1, 194, 80, 22), Obj(3, 2, 140, 190, 24)]
    counting = [Obj(c, 3, x, y, 18) for c, (x, y) in zip([1, 4, 1, 5], [(28, 84), (140, 28), (84, 196), (196, 140)])]
    values, colours = [3, 7, 5, 2], [2, 0, 1, 3]
    return {
        "shapes.png": (render_objects(rng, shapes), "What colour is the circle?", "The circle is red."),
        "counting.png": (render_objects(rng, counting), "How many stars are there in the image?", "4"),
        "chart.png": (render_chart(rng, values, colours), "Which bar is the highest?", "B"),
        "text.png": (render_text(rng, "CAKE"), "What is written in the image?", "CAKE"),
    }


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m glm4v.train.synth", description="write the synthetic data set")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--sizes", default=None, help='JSON, e.g. \'{"test": 1260, "val": 270, "train": 36000}\'')
    parser.add_argument("--extra-turns", type=int, default=0)
    parser.add_argument("--examples", action="store_true", help="write the example pictures instead")
    args = parser.parse_args(argv)
    if args.examples:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name, (image, question, answer) in example_images().items():
            image.save(Path(args.out) / name, optimize=True)
            print(f"{name}: {question} -> {answer}")
        return 0
    write_dataset(args.out, json.loads(args.sizes) if args.sizes else None, args.seed, progress=True,
                  extra_turns=args.extra_turns)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The VLMEvalKit TSV reader, pictures in it, and the prompts built from each benchmark's rows."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from glm4v.errors import ImageError, InputError
from glm4v.eval import multiple_choice, ocrbench, yes_no
from glm4v.eval.formats import (
    decode_image,
    encode_image,
    image_group_key,
    read_tsv,
    resolve_images,
    write_tsv,
)
from glm4v.eval.samples import picture, write_samples


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("samples"))


def _b64(color="red"):
    return encode_image(picture(color))


# -- the TSV reader --------------------------------------------------------------------------------

def test_columns_are_normalized_and_missing_fields_dropped(tmp_path):
    path = tmp_path / "x.tsv"
    # pandas' unnamed row-number column, a BOM, mixed-case names, MMStar's l2_category spelling
    path.write_text("\ufeff\tIndex\tQuestion\tA\tB\tC\tAnswer\tl2_category\n"
                    "0\t7\tWhat?\tred\tNone\tnan\tA\tcounting\n", encoding="utf-8")
    table = read_tsv(path)
    assert table.columns == ["index", "question", "A", "B", "C", "answer", "l2-category"]
    (row,) = table.rows
    assert row == {"index": "7", "question": "What?", "A": "red", "B": "None", "answer": "A", "l2-category": "counting"}


def test_quoted_fields_with_tabs_and_newlines_round_trip(tmp_path):
    rows = [{"index": 1, "question": 'line one\nline\ttwo "quoted"', "answer": "B"}]
    table = read_tsv(write_tsv(tmp_path / "q.tsv", rows))
    assert table.rows[0]["question"] == 'line one\nline\ttwo "quoted"'


def test_float_written_integer_index_is_normalized(tmp_path):
    table = read_tsv(write_tsv(tmp_path / "f.tsv", [{"index": "1000003.0", "question": "q"}]))
    assert table.rows[0]["index"] == "1000003"


def test_fields_longer_than_csv_default_limit(tmp_path):
    big = base64.b64encode(bytes(300_000)).decode()
    table = read_tsv(write_tsv(tmp_path / "big.tsv", [{"index": 0, "question": "q", "image": big}]))
    assert len(table.rows[0]["image"]) == len(big)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("index\tquestion\n", "no rows"),
        ("index\tanswer\n0\tA\n", r"missing column\(s\) question"),
        ("index\tquestion\n0\tq\textra\n", "line 2: 3 fields, the header has 2"),
        ("index\tquestion\n0\tq\n0\tr\n", "index 0 repeats line 2"),
        ("index\tquestion\n\tq\n", "has no index"),
    ],
)
def test_malformed_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_tsv(path)


def test_missing_file_directory_and_binary_file(tmp_path):
    with pytest.raises(InputError, match="no such benchmark file"):
        read_tsv(tmp_path / "nope.tsv")
    with pytest.raises(InputError, match="not a file"):
        read_tsv(tmp_path)
    binary = tmp_path / "b.tsv"
    binary.write_bytes(b"\xff\xfe\x00index\tquestion\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_tsv(binary)


# -- pictures --------------------------------------------------------------------------------------

def test_pictures_inline_by_reference_as_list_and_by_path(tmp_path):
    (tmp_path / "imgs").mkdir()
    picture("green").save(tmp_path / "imgs" / "g.png")
    rows = [
        {"index": 0, "question": "q", "image": _b64("red")},
        {"index": 1, "question": "q", "image": "0"},  # VLMEvalKit: a short value names another row
        {"index": 2, "question": "q", "image": repr([_b64("blue"), _b64("yellow")])},
        {"index": 3, "question": "q"},  # no picture: skipped
    ]
    table = read_tsv(write_tsv(tmp_path / "p.tsv", rows))
    resolved = resolve_images(table)
    assert [r["index"] for r, _ in resolved] == ["0", "1", "2"]
    assert table.skipped_without_image == 1
    assert resolved[0][1][0].data == resolved[1][1][0].data
    assert len(resolved[2][1]) == 2
    assert resolved[2][1][1].open().getpixel((15, 15))[2] < 100  # yellow: little blue

    meta = read_tsv(write_tsv(tmp_path / "m.tsv", [{"index": 0, "question": "q", "image_path": "imgs/g.png"}]))
    ((_, (source,)),) = resolve_images(meta)
    assert source.path == (tmp_path / "imgs" / "g.png").resolve()
    assert source.open().getpixel((15, 15)) == (30, 170, 60)  # PNG: exact


def test_bad_picture_fields(tmp_path):
    table = read_tsv(write_tsv(tmp_path / "r.tsv", [{"index": 0, "question": "q", "image": "17"}]))
    with pytest.raises(InputError, match="does not name another row"):
        resolve_images(table)
    table = read_tsv(write_tsv(tmp_path / "l.tsv", [{"index": 0, "question": "q", "image": "[" + "x" * 80}]))
    with pytest.raises(InputError, match="not a list literal"):
        resolve_images(table)
    table = read_tsv(write_tsv(tmp_path / "n.tsv", [{"index": 0, "question": "q"}]))
    with pytest.raises(InputError, match="no row has an image"):
        resolve_images(table)


def test_decode_image_converts_to_rgb_and_rejects_garbage():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = decode_image(base64.b64encode(buffer.getvalue()).decode())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ImageError, match="not valid base64"):
        decode_image("this is not base64!!" * 5)
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(base64.b64encode(b"plain text, not a picture" * 4).decode())


def test_image_group_key(tmp_path):
    rows = [
        {"index": 0, "question": "q", "image": _b64("red")},
        {"index": 1, "question": "q", "image": "0"},
        {"index": 2, "question": "q", "image": _b64("blue")},
        {"index": 3, "question": "q", "image": _b64("blue")},  # same picture stored twice
        {"index": 4, "question": "q", "image": _b64("red"), "image_path": "color/1.jpg"},
    ]
    keys = [image_group_key(r, s) for r, s in resolve_images(read_tsv(write_tsv(tmp_path / "k.tsv", rows)))]
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
    assert keys[4] == "color/1.jpg"


# -- prompts and items per benchmark ---------------------------------------------------------------

def test_multiple_choice_prompt_is_vlmevalkit_prompt_plus_short_answer(tmp_path):
    rows = [{"index": 0, "question": "What colour?", "hint": "One shape.", "A": "red", "B": "blue",
             "answer": "B", "image": _b64()}]
    (item,) = multiple_choice.build_items(read_tsv(write_tsv(tmp_path / "m.tsv", rows)))
    assert item.prompt == (
        "Hint: One shape.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n"
        "Please select the correct answer from the options above. \n\nShort Answer."
    )
    assert item.row["answer"] == "B"


def test_multiple_choice_rejects_bad_rows(tmp_path):
    one_option = [{"index": 0, "question": "q", "A": "x", "answer": "A", "image": _b64()}]
    with pytest.raises(InputError, match="at least two options"):
        multiple_choice.build_items(read_tsv(write_tsv(tmp_path / "a.tsv", one_option)))
    bad_answer = [{"index": 0, "question": "q", "A": "x", "B": "y", "answer": "C", "image": _b64()}]
    with pytest.raises(InputError, match="answer 'C' is not one of its options A, B"):
        multiple_choice.build_items(read_tsv(write_tsv(tmp_path / "b.tsv", bad_answer)))
    named = [{"index": "q1", "question": "q", "A": "x", "B": "y", "answer": "A", "image": _b64()}]
    with pytest.raises(InputError, match="MMBench indices are integers"):
        multiple_choice.build_mmbench_items(read_tsv(write_tsv(tmp_path / "c.tsv", named)))


def test_mmbench_sample_groups_rotations_by_index_mod_1e6(samples):
    items = multiple_choice.build_mmbench_items(read_tsv(samples["mmbench"]))
    assert len(items) == 4 + 3 + 2
    assert {i.unit for i in items} == {"0", "1", "2"}
    rotation = next(i for i in items if i.index == "1000000")
    assert rotation.unit == "0" and rotation.row["A"] == "green" and rotation.row["answer"] == "D"
    assert "图中正方形是什么颜色？" in next(i for i in items if i.index == "1").prompt


def test_mmbench_rotations_are_built_when_the_file_has_none(tmp_path):
    rows = [{"index": 5, "question": "q", "A": "w", "B": "x", "C": "y", "answer": "C", "image": _b64()}]
    path = write_tsv(tmp_path / "m.tsv", rows)
    items = multiple_choice.build_mmbench_items(read_tsv(path))
    got = {i.index: ([i.row[k] for k in "ABC"], i.row["answer"]) for i in items}
    assert got == {
        "5": (["w", "x", "y"], "C"),
        "1000005": (["x", "y", "w"], "B"),
        "2000005": (["y", "w", "x"], "A"),
    }
    assert all(i.unit == "5" for i in items)
    assert [i.index for i in multiple_choice.build_mmbench_items(read_tsv(path), circular="off")] == ["5"]


def test_mmmu_prompt_tags_pick_the_picture_and_open_questions_have_no_options(samples):
    items = {i.index: i for i in multiple_choice.build_mmmu_items(read_tsv(samples["mmmu"]))}
    two = items["validation_Art_2"]
    # the first tag names the second picture (the blue circle); each tag becomes a line break
    assert two.prompt.startswith("Question: Which shape in \n is round? Compare it with \n.\nOptions:\nA. the square")
    r, g, b = two.image.open().getpixel((19, 19))
    assert b > 200 and r < 60  # JPEG: close to (30, 60, 220)
    assert items["validation_Art_1"].prompt.startswith("Question: \n What colour is the square?")
    open_item = items["dev_Math_1"]
    assert open_item.row["question_type"] == "open" and "Options" not in open_item.prompt
    assert open_item.prompt.endswith("Answer with a number.\n\nShort Answer.")


def test_mmmu_tag_beyond_the_pictures_is_an_error(tmp_path):
    rows = [{"index": 0, "question": "See <image 3>", "A": "x", "B": "y", "answer": "A",
             "image": repr([_b64(), _b64("blue")])}]
    with pytest.raises(InputError, match=r"refers to <image 3> but the row has 2 picture"):
        multiple_choice.build_mmmu_items(read_tsv(write_tsv(tmp_path / "t.tsv", rows)))


def test_yes_no_items(samples):
    mme = yes_no.build_mme_items(read_tsv(samples["mme"]))
    assert len(mme) == 8 and len({i.unit for i in mme}) == 4
    assert mme[0].prompt == "Is the square red? Please answer yes or no.\nShort Answer."
    assert mme[0].row["picture"] == mme[1].row["picture"] == "color/0.jpg"
    hallu = yes_no.build_hallusion_items(read_tsv(samples["hallusionbench"]))
    assert (hallu[2].row["set_id"], hallu[2].row["figure_id"], hallu[2].row["question_id"]) == ("0", "1", "0")


def test_yes_no_rejects_non_yes_no_answers_and_short_hallusion_ids(tmp_path):
    rows = [{"index": 0, "question": "q", "answer": "maybe", "category": "color", "image": _b64()}]
    with pytest.raises(InputError, match="must be Yes or No"):
        yes_no.build_mme_items(read_tsv(write_tsv(tmp_path / "a.tsv", rows)))
    rows = [{"index": "VD_1_2", "question": "q", "answer": "Yes", "image": _b64()}]
    with pytest.raises(InputError, match="set_id/figure_id/question_id"):
        yes_no.build_hallusion_items(read_tsv(write_tsv(tmp_path / "b.tsv", rows)))


def test_ocrbench_items_parse_answer_lists_without_suffix(samples, tmp_path):
    items = ocrbench.build_items(read_tsv(samples["ocrbench"]))
    assert items[1].row["answer"] == ["STOP", "stop"]
    assert items[0].prompt == "what is written in the image?"
    rows = [{"index": 0, "question": "q", "answer": "[unclosed", "category": "Doc-oriented VQA", "image": _b64()}]
    with pytest.raises(InputError, match="not a list literal"):
        ocrbench.build_items(read_tsv(write_tsv(tmp_path / "o.tsv", rows)))
    assert ocrbench.parse_answers("plain answer", "x") == ["plain answer"]


def test_every_sample_file_builds(samples):
    from glm4v.eval.cli import BENCHMARKS

    counts = {name: len(BENCHMARKS[name].build(read_tsv(path))) for name, path in samples.items()}
    assert counts == {"mmbench": 9, "seedbench": 4, "mmstar": 4, "mmmu": 4, "mme": 8, "hallusionbench": 6,
                      "ai2d": 3, "ocrbench": 5}

"""Export recipes as a user writes them: YAML files and --set overrides, read strictly and checked early."""

from __future__ import annotations

import dataclasses
import os

import pytest

from mobilequant.errors import InputError, UsageError
from mobilequant.export import TARGETS, default_recipe, get_target, load_recipe


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_target_runs_the_settings_of_its_shipped_recipe(target):
    """`--target onnx-int8` ran built-in defaults with int8 I/O (and wrote io_dtype int8 into the file's
    metadata, whose graph takes float) while `--recipe onnx-int8` ran the YAML's float I/O."""
    shipped, built_in = load_recipe(target), default_recipe(target)
    assert dataclasses.replace(shipped, description="") == dataclasses.replace(built_in, description="")


def test_int8_io_is_a_tflite_option():
    assert default_recipe("tflite-int8").io.dtype == "int8" and default_recipe("onnx-int8").io.dtype == "float"
    with pytest.raises(UsageError, match="int8 I/O is a TFLite option; onnx-int8 files take and return float"):
        load_recipe("onnx-int8", ["io.dtype=int8"])


def test_names_and_choices_are_case_insensitive():
    assert get_target("TFLITE-INT8").name == "tflite-int8"
    assert load_recipe("tflite-int8", ["io.layout=nhwc"]).io.layout == "NHWC"
    assert load_recipe("tflite-int8", ["quantization.calibration=MinMax"]).quantization.calibration == "minmax"


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-6`` (no dot) as a string: the documented default could not be copied."""
    path = tmp_path / "sci.yaml"
    path.write_text("target: tflite-int8\nverification:\n  scale_rtol: 1e-6\n  fp32_max_abs_diff: 2E-4\n")
    v = load_recipe(path).verification
    assert (v.scale_rtol, v.fp32_max_abs_diff) == (1e-6, 2e-4)
    assert load_recipe("tflite-int8", ["verification.scale_rtol=1e-7"]).verification.scale_rtol == 1e-7
    with pytest.raises(UsageError, match="scale_rtol must be float, got"):
        load_recipe("tflite-int8", ["verification.scale_rtol=.nan"])


@pytest.mark.parametrize("override, message", [
    ("verification.fp32_max_abs_diff=-1", "fp32_max_abs_diff must be ≥ 0"),
    ("verification.int8_accuracy_drop_pp=-5", "int8_accuracy_drop_pp must be ≥ 0"),
    ("verification.scale_rtol=-1", "scale_rtol must be ≥ 0"),
    ("quantization.percentile=150", "percentile must lie in"),
    ("quantization.percentile=50", r"percentile must lie in \(50, 100\]"),  # QuantConfig refused it after calibrating
    ("quantization.adaround_iterations=-3", "adaround_iterations must be at least 1"),
])
def test_values_out_of_range_are_refused_by_their_recipe_key(override, message):
    """They had run to the end with gates that mean nothing, or failed later naming QuantConfig's field."""
    with pytest.raises(UsageError, match=message) as e:
        load_recipe("tflite-int8", [override])
    assert str(e.value).startswith("recipe ")


def test_yaml_errors_say_where(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("target: tflite-int8\nquantization: [per_channel\n")
    with pytest.raises(InputError, match=r"not valid YAML \(line 3, column 1\)"):
        load_recipe(path)
    path.write_text("target: tflite-int8\nio:\n  layout: NHWC\ntarget: onnx-int8\n")
    with pytest.raises(InputError, match=r"\(line 4, column 1\): the key 'target' is given twice"):
        load_recipe(path)


def test_a_recipe_files_bad_key_or_value_names_the_file(tmp_path):
    """One line naming the file, as docs/recipes.md quotes it ('in recipe quantization' had been only the
    --set form; a file's message said 'in quantization' without the file)."""
    from mobilequant.export.recipes import load_recipe

    bad_key = tmp_path / "mine.yaml"
    bad_key.write_text("target: tflite-int8\nquantization:\n  per_chanel: true\n")
    with pytest.raises(UsageError, match=rf"unknown key 'per_chanel' in recipe {bad_key} quantization "
                                         r"\(did you mean 'per_channel'"):
        load_recipe(bad_key)
    bad_value = tmp_path / "other.yaml"
    bad_value.write_text("target: tflite-int8\nquantization:\n  per_channel: 3\n")
    with pytest.raises(UsageError, match=rf"recipe {bad_value} quantization.per_channel must be bool, got 3"):
        load_recipe(bad_value)


def _laughs(levels: int) -> str:
    """A "billion laughs" YAML document: each level is nine aliases of the one before (9**levels values)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_linear_time(tmp_path):
    """_duplicate_key walked each alias again: ×9 time per level (5.5 s at 8 levels, minutes at 10)."""
    import time

    from mobilequant.export.recipes import _duplicate_key

    for levels in (8, 12):  # 8 first: the old walk fails it in seconds rather than hours
        start = time.perf_counter()
        assert _duplicate_key(_laughs(levels)) is None
        assert time.perf_counter() - start < 0.5
    text = _laughs(12)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("target: tflite-int8\n" + text)
    start = time.perf_counter()
    with pytest.raises(InputError, match=rf"^recipe {bomb} stands for more than 10,000 values once its aliases"):
        load_recipe(bomb)
    assert time.perf_counter() - start < 0.5
    selfref = tmp_path / "self.yaml"
    selfref.write_text("target: tflite-int8\nname: &n [*n]\n")
    with pytest.raises(InputError, match="stands for more than"):
        load_recipe(selfref)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(InputError, match="nested too deeply"):  # was a RecursionError traceback
        load_recipe(deep)
    shared = tmp_path / "shared.yaml"  # aliases within reason still load
    shared.write_text("target: tflite-int8\nquantization: &q {per_channel: false}\nname: x\n")
    assert load_recipe(shared).quantization.per_channel is False


def test_a_recipe_that_is_not_utf8_or_not_a_recipe_sized_file(tmp_path, monkeypatch):
    """Latin-1 bytes were a UnicodeDecodeError traceback; /dev/zero was read without end."""
    import mobilequant.export.recipes as recipes

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("target: tflite-int8\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"^recipe {latin} is not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_recipe(latin)
    monkeypatch.setattr(recipes, "MAX_RECIPE_BYTES", 64)
    big = tmp_path / "big.yaml"
    big.write_text("target: tflite-int8\n" + "# padding\n" * 10)
    with pytest.raises(InputError, match=rf"^recipe {big} is larger than"):
        load_recipe(big)
    if os.path.exists("/dev/zero"):
        with pytest.raises(InputError, match="^recipe /dev/zero is larger than"):
            load_recipe("/dev/zero")

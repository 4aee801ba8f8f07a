"""Users' own models (module / file factories) and checkpoints (weights only, clear one-line errors)."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import torch
import torch.nn as nn

import pytest

from mobilequant.errors import InputError, UsageError
from mobilequant.models import FASHION_MNIST, create_model, load_checkpoint, load_model
from mobilequant.models.loading import read_state_dict

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch.nn as nn

    def tiny(num_classes=10, in_chans=1):
        return nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )

    def tiny_with_preprocess(num_classes=10):
        from mobilequant.models import FASHION_MNIST
        model = tiny(num_classes)
        model.preprocess = FASHION_MNIST
        return model

    def not_a_model():
        return 42

    class Nets:
        @staticmethod
        def wide(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))
    """
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: torch's thread pool only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "mq_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mq_user_pkg.nets"


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my model.py"  # a space in the name: the module name must still be valid
    path.write_text(FACTORY_SOURCE)
    return path


# --- load_model ----------------------------------------------------------------------------------------------


def test_registered_name():
    model = load_model("mobilenetv1_025", num_classes=3).eval()
    assert model.model_name == "mobilenetv1_025"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UsageError, match=r"unknown model 'mobilenet_v2'.*did you mean .*'mobilenetv2_100'"):
        load_model("mobilenet_v2")


def test_factory_by_module_path(user_package):
    model = load_model(f"{user_package}:tiny", num_classes=4)
    assert model.model_name == f"{user_package}:tiny"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    # No preprocess of its own: ImageNet's, with the first conv's channel count.
    assert model.preprocess.input_size == (1, 224, 224)


def test_factory_by_module_path_from_the_current_folder(tmp_path, monkeypatch):
    """``--model my_pkg.nets:build`` run beside ``my_pkg/``, as ``python -m`` would find it: a console
    script's sys.path does not hold the current folder, and this failed unless PYTHONPATH=. was set."""
    pkg = tmp_path / "mq_cwd_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    model = load_model("mq_cwd_pkg.nets:tiny", num_classes=4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(InputError, match=r"cannot import module 'mq_no_such_pkg.nets'.*in the current folder"):
        load_model("mq_no_such_pkg.nets:tiny")


def test_factory_by_file_path(user_file):
    model = load_model(f"{user_file}:tiny_with_preprocess", num_classes=5)
    assert model.preprocess == FASHION_MNIST  # the factory's own choice is kept
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    nested = load_model(f"{user_file}:Nets.wide", num_classes=2)
    assert nested(torch.randn(1, 1, 2, 2)).shape == (1, 2)


def test_factory_errors(user_package, user_file, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(f"{tmp_path / 'missing.py'}:tiny")
    with pytest.raises(InputError, match="cannot import module 'mq_no_such_pkg.nets'"):
        load_model("mq_no_such_pkg.nets:tiny")
    with pytest.raises(UsageError, match=r"has no 'tinny'.*did you mean 'tiny'"):
        load_model(f"{user_package}:tinny")
    with pytest.raises(InputError, match="returned int, not a torch.nn.Module"):
        load_model(f"{user_file}:not_a_model")
    with pytest.raises(UsageError, match="unexpected keyword argument 'depth'"):
        load_model(f"{user_file}:tiny", depth=3)
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('boom at import')\n")
    with pytest.raises(InputError, match=r"broken.py failed to import: RuntimeError: boom at import"):
        load_model(f"{broken}:tiny")


# --- checkpoints ---------------------------------------------------------------------------------------------


def _outputs(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model", "data_parallel", "lightning",
                                    "lightning_data_parallel"])
def test_checkpoint_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    trained = create_model("shufflenetv2_x0_5", num_classes=10, in_chans=1, preprocess=FASHION_MNIST)
    with torch.no_grad():  # make the BN statistics non-trivial so that buffers are checked too
        for m in trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = trained.state_dict()
    payload = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 7},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
        # a LightningModule holding the network as self.model: its checkpoint's keys start with "model."
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
        "lightning_data_parallel": {f"module.model.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)

    torch.manual_seed(123)
    fresh = create_model("shufflenetv2_x0_5", num_classes=10, in_chans=1, preprocess=FASHION_MNIST)
    assert not torch.equal(_outputs(fresh), _outputs(trained))
    assert load_checkpoint(fresh, path) is fresh
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(_outputs(fresh), _outputs(trained))


def test_load_model_with_checkpoint(tmp_path):
    source = create_model("mobilenetv1_025", num_classes=3)
    path = tmp_path / "v1.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model("mobilenetv1_025", checkpoint=path, num_classes=3)
    assert torch.equal(loaded.classifier[1].weight, source.classifier[1].weight)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    path = tmp_path / "ten_classes.pt"
    torch.save(create_model("mobilenetv2_050", num_classes=10).state_dict(), path)
    with pytest.raises(InputError) as err:
        load_checkpoint(create_model("mobilenetv2_050", num_classes=1000), path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "mobilenetv2_050" in message
    assert "2 shape mismatches" in message
    assert "classifier.1.weight: checkpoint (10, 1280) vs model (1000, 1280)" in message


def test_missing_and_unexpected_keys(tmp_path):
    model = create_model("mobilenetv1_025", num_classes=3)
    state = model.state_dict()
    del state["features.0.1.running_var"]
    state["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(InputError, match=r"1 missing keys \(features\.0\.1\.running_var\); "
                                         r"1 unexpected keys \(head\.extra\.weight\)") as err:
        load_checkpoint(create_model("mobilenetv1_025", num_classes=3), path)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="non-strictly: 1 missing keys"):
        target = create_model("mobilenetv1_025", num_classes=3)
        load_checkpoint(target, path, strict=False)
    assert torch.equal(target.classifier[1].weight, model.classifier[1].weight)


@pytest.mark.parametrize("name", ["mobilenetv1_025", "squeezenet1_1"])  # a linear / a 1×1 conv classifier
def test_a_zoo_name_takes_the_classes_and_channels_of_its_checkpoint(tmp_path, name):
    """`--model mobilenetv1_025 --weights mine.pt` of a model fine-tuned on 7 grey classes had failed on
    the shapes of the ImageNet configuration (1000 classes, 3 channels)."""
    torch.manual_seed(0)
    trained = create_model(name, num_classes=7, in_chans=1)
    torch.save(trained.state_dict(), tmp_path / "mine.pt")
    loaded = load_model(name, checkpoint=tmp_path / "mine.pt")
    assert loaded.preprocess.input_size[0] == 1
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x))
    with pytest.raises(InputError, match="shape mismatches"):  # classes given: the checkpoint must fit them
        load_model(name, checkpoint=tmp_path / "mine.pt", num_classes=1000)


def test_weights_beside_other_keys_are_pointed_at(tmp_path):
    """A checkpoint holding the model under a prefix beside other modules (a loss, a teacher) is refused,
    and the message says where the model's keys are."""
    state = create_model("mobilenetv1_025", num_classes=3).state_dict()
    path = tmp_path / "with_teacher.pt"
    torch.save({**{f"student.{k}": v for k, v in state.items()}, **{f"teacher.{k}": v for k, v in state.items()}},
               path)
    with pytest.raises(InputError, match="all found under 'student.' and under 'teacher.'") as err:
        load_checkpoint(create_model("mobilenetv1_025", num_classes=3), path)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello world\n")
    with pytest.raises(InputError, match="notes.pt is not a PyTorch checkpoint"):
        load_checkpoint(create_model("mobilenetv1_025", num_classes=3), path)


def _leave_marker(path: str) -> None:
    """A harmless callable a malicious pickle would call; a file appearing proves it ran."""
    Path(path).write_text("pickle code ran")


class _CarriesCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def test_code_carrying_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    # The payload is live: plain unpickling runs it.
    pickle.loads(pickle.dumps(_CarriesCode(marker)))
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pt"
    state = create_model("mobilenetv1_025", num_classes=3).state_dict()
    torch.save({"state_dict": state, "hook": _CarriesCode(marker)}, path)
    with pytest.raises(InputError, match=r"refused because it carries code \(it pickles .*_leave_marker\)"):
        load_checkpoint(create_model("mobilenetv1_025", num_classes=3), path)
    assert not marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(InputError, match=r"carries code \(it pickles torch\.nn\.modules\.linear\.Linear\).*"
                                         r"state_dict\(\) instead"):
        read_state_dict(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_state_dict(tmp_path / "absent.pt")
    with pytest.raises(InputError, match="not a file"):
        read_state_dict(tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty or truncated"):
        read_state_dict(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="is not a PyTorch checkpoint"):
        read_state_dict(garbage)
    not_pickle = tmp_path / "not_pickle.pt"
    not_pickle.write_bytes(b"no checkpoint")
    with pytest.raises(InputError, match="not a PyTorch weights file"):
        read_state_dict(not_pickle)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(InputError, match="holds a list, not a state_dict"):
        read_state_dict(listing)
    mixed = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(1), "note": "hello"}, mixed)
    with pytest.raises(InputError, match=r"1 entries are not tensors \(note\)"):
        read_state_dict(mixed)


def test_a_zoo_name_with_a_checkpoint_of_the_shipped_model_keeps_its_preprocessing(tmp_path):
    """`--model mobilenetv2_050 --weights edited.pt` (the shipped weights with dead kernels planted, or
    fine-tuned from them) built the zoo entry's ImageNet configuration: 224-px preprocessing, a 224-px file
    at 9 % accuracy, and no audit of the 32-px file possible. A checkpoint that fits the shipped model
    exactly now gets the shipped model: its preprocessing and class names, its own weights."""
    from mobilequant.api import resolve_model
    from mobilequant.weights import default_model

    shipped = default_model("mobilenetv2_050")
    state = shipped.state_dict()
    state["features.1.conv.0.0.weight"] = torch.zeros_like(state["features.1.conv.0.0.weight"])
    torch.save({"model." + k: v for k, v in state.items()}, tmp_path / "edited.pt")  # a Lightning prefix too
    net = resolve_model("mobilenetv2_050", str(tmp_path / "edited.pt"))
    assert net.preprocess == shipped.preprocess and net.class_names == shipped.class_names
    assert not net.features[1].conv[0][0].weight.any()
    # a checkpoint of another shape (3 channels, 5 classes) still gets the zoo entry fitted to it
    other = create_model("mobilenetv2_050", num_classes=5, in_chans=3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    fitted = resolve_model("mobilenetv2_050", str(tmp_path / "other.pt"))
    assert fitted.preprocess.input_size[0] == 3 and fitted.classifier[-1].out_features == 5


class _CallsSystem:
    def __reduce__(self):
        import os

        return (os.system, ("true",))  # pickled as posix.system: a module torch's unpickler blocks outright


def test_a_file_that_calls_os_system_is_refused_without_torchs_advice(tmp_path):
    """torch's text for a blocked module advises re-running with weights_only=False: never passed on."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _CallsSystem()}, path)
    with pytest.raises(InputError) as e:
        read_state_dict(path)
    message = str(e.value)
    assert "\n" not in message
    assert "refused because it carries code (it pickles posix.system)" in message, message
    assert "weights_only" not in message and "trusted source" not in message, message


def test_a_model_file_that_is_not_a_file_says_what_it_is(tmp_path):
    (tmp_path / "pydir.py").mkdir()
    with pytest.raises(InputError, match=r"^model file .*pydir\.py is a directory, not a Python file$"):
        load_model(f"{tmp_path / 'pydir.py'}:build")
    with pytest.raises(InputError, match=r"^model file /dev/null is a character device, not a Python file$"):
        load_model("/dev/null:x")
    with pytest.raises(InputError, match=r"^model file .*missing\.py: no such file$"):
        load_model(f"{tmp_path / 'missing.py'}:build")


def test_a_factory_that_raises_names_the_factory_and_the_error(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text("def boom(**kw):\n    raise RuntimeError('boom in user code\\nsecond line')\n")
    with pytest.raises(InputError) as e:
        load_model(f"{path}:boom")
    assert str(e.value) == f"model spec '{path}:boom': the factory boom() raised RuntimeError: boom in user code"
    assert isinstance(e.value.__cause__, RuntimeError)  # kept for a debugger / --traceback

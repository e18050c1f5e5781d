"""The error convention (cocord_common/errors.py) and the safe loader's wording (cocord_common/checkpoint.py)."""
import os

import pytest
import torch

from cocord_common.checkpoint import CheckpointError, load_checkpoint
from cocord_common.errors import USER_ERRORS, UserError, run_main


def _fails(exc):
    def main(argv):
        raise exc
    return main


def test_user_errors_print_prog_error_and_exit_2_without_traceback(capsys):
    for exc in (UserError("config.yaml: key 'epochs' is 'abc', expected an integer"),
                FileNotFoundError("teacher.pth does not exist"), IsADirectoryError("out is a folder")):
        with pytest.raises(SystemExit) as e:
            run_main(_fails(exc), [], prog="train_imagenet.py")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == f"train_imagenet.py: error: {exc}\n" and "Traceback" not in err


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(monkeypatch):
    with pytest.raises(KeyError):
        run_main(_fails(KeyError("bug")), [], prog="p")
    seen = []
    with pytest.raises(UserError):
        run_main(lambda argv: seen.append(argv) or _fails(UserError("x"))(argv), ["a", "--debug"], prog="p")
    assert seen == [["a"]]  # --debug is not passed on
    monkeypatch.setenv("COCORD_DEBUG", "1")
    with pytest.raises(UserError):
        run_main(_fails(UserError("x")), [], prog="p")
    assert run_main(lambda argv: 7, [], prog="p") == 7


def test_refused_file_is_never_answered_with_weights_only_false(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not turn our loader unsafe
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path / "evil.pth"))
    msg = str(e.value)
    assert "evil.pth" in msg and "refused" in msg and "could run code" in msg
    assert "weights_only" not in msg and "False" not in msg
    assert isinstance(e.value, USER_ERRORS)  # printed as `prog: error: ...`, exit 2


def test_refusal_reason_tells_not_a_torch_file_from_code_and_damage(tmp_path):
    """Text, random bytes and an empty file are "not a torch file"; a cut torch file is "damaged";
    only a file whose pickle names a callable is "refused ... could run code"."""
    torch.save({"w": torch.zeros(4)}, tmp_path / "good.pth")
    whole = (tmp_path / "good.pth").read_bytes()
    files = {"notes.pth": b"hello, these are my notes\n", "random.pth": bytes(range(200, 256)) * 4,
             "empty.pth": b"", "cut.pth": whole[: len(whole) // 2]}
    expected = {"notes.pth": "not a torch file (it is text", "random.pth": "not a torch file (it is another format",
                "empty.pth": "not a torch file (it is empty", "cut.pth": "a damaged torch file"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert f"{name}: {expected[name]}" in msg, msg
        assert "could run code" not in msg and "weights_only" not in msg
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint(str(tmp_path))


def test_input_checks_turns_a_library_value_error_into_a_user_error(capsys):
    """A plain ValueError from a library layer's argument check, raised inside input_checks(), is
    printed as a user error (exit 2) with its message; outside, it stays a bug (traceback)."""
    from cocord_common.errors import input_checks

    def main(argv):
        with input_checks():
            raise ValueError("--tau = -1.0 is invalid: temperatures must be > 0")
    with pytest.raises(SystemExit) as e:
        run_main(main, [], prog="p")
    assert e.value.code == 2
    assert capsys.readouterr().err == "p: error: --tau = -1.0 is invalid: temperatures must be > 0\n"
    with pytest.raises(UserError) as e:  # the original stays chained for --debug
        with input_checks():
            raise ValueError("x")
    assert type(e.value.__cause__) is ValueError
    with pytest.raises(KeyError):  # other exceptions pass through untouched
        with input_checks():
            raise KeyError("bug")
    with pytest.raises(ValueError) as e:
        run_main(_fails(ValueError("a bug's ValueError")), [], prog="p")
    assert type(e.value) is ValueError

"""The one strict comparison of checkpoint tensors with a model's."""

from kinema.state_dicts import key_mismatch


def test_agreeing_names_and_shapes_give_none():
    assert key_mismatch({"a": (2, 3), "b": (4,)}, {"b": [4], "a": [2, 3]}) is None


def test_each_kind_of_problem_is_counted_and_named():
    expected = {f"w{i}": (2,) for i in range(5)} | {"s": (3, 3)}
    found = {"w0": (2,), "s": (3, 4), "x": (1,), "y": (1,)}
    assert key_mismatch(expected, found) == (
        "4 missing (e.g. w1, w2, w3); 2 unexpected (e.g. x, y); 1 mismatched (e.g. s: file (3, 4) vs model (3, 3))")


def test_ignored_names_are_not_unexpected():
    assert key_mismatch({"a": (1,)}, {"a": (1,), "position_ids": (1, 77)}, ignore={"position_ids"}) is None

"""The one strict comparison of checkpoint tensors with a model's, and the one strict load."""

import pytest
import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.state_dicts import check_fits, check_loading_info, key_mismatch, load_strict


def test_agreeing_names_and_shapes_give_none():
    assert key_mismatch({"a": (2, 3), "b": (4,)}, {"b": [4], "a": [2, 3]}) is None


def test_each_kind_of_problem_is_counted_and_named():
    expected = {f"w{i}": (2,) for i in range(5)} | {"s": (3, 3)}
    found = {"w0": (2,), "s": (3, 4), "x": (1,), "y": (1,)}
    assert key_mismatch(expected, found) == (
        "4 missing (e.g. w1, w2, w3); 2 unexpected (e.g. x, y); 1 mismatched (e.g. s: file (3, 4) vs model (3, 3))")


def test_ignored_names_are_not_unexpected():
    assert key_mismatch({"a": (1,)}, {"a": (1,), "position_ids": (1, 77)}, ignore={"position_ids"}) is None


def test_check_fits_raises_one_line_with_context_and_advice():
    check_fits({"a": (1,)}, {"a": (1,)}, "model.safetensors")  # agreeing: nothing raised
    with pytest.raises(KinemaError) as err:
        check_fits({"a": (1,), "b": (2,)}, {"a": (3,)}, "model.safetensors", advice="Download it again")
    assert str(err.value) == ("model.safetensors: 1 missing (e.g. b); 1 mismatched (e.g. a: file (3,) vs model (1,))"
                              ". Download it again")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_a_refused_load_leaves_the_model_as_it_was():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Every tensor but one fits: a load_state_dict(strict=False) would copy them; load_strict copies none.
    weights = {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}
    weights["0.weight"] = torch.zeros(4, 2)
    with pytest.raises(KinemaError, match=r"^tiny: 1 mismatched \(e.g. 0.weight: file \(4, 2\) vs model \(4, 3\)\)"):
        load_strict(model, weights, "tiny")
    weights.pop("0.weight")
    with pytest.raises(KinemaError, match=r"^tiny: 1 missing \(e.g. 0.weight\)\. Re-save it$"):
        load_strict(model, weights, "tiny", advice="Re-save it")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_ignored_names_are_checked_out_and_not_loaded():
    model = small_model()
    weights = {k: torch.full_like(v, 2) for k, v in model.state_dict().items()} | {"old_buffer": torch.zeros(5)}
    load_strict(model, weights, "tiny", ignore={"old_buffer"})
    assert all(torch.equal(v, torch.full_like(v, 2)) for v in model.state_dict().values())


def test_assign_takes_the_tensors_themselves_into_a_meta_model():
    weights = {k: torch.randn(v.shape).to(v.dtype) for k, v in small_model().state_dict().items()}
    with torch.device("meta"):
        model = small_model()
    load_strict(model, weights, "tiny", assign=True)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(model.state_dict()[k].data_ptr() == v.data_ptr() for k, v in weights.items())  # no copies
    with torch.device("meta"):
        refused = small_model()
    with pytest.raises(KinemaError, match="1 unexpected"):
        load_strict(refused, weights | {"extra": torch.zeros(1)}, "tiny", assign=True)
    assert all(t.is_meta for t in refused.state_dict().values())  # nothing was assigned


def test_a_library_loading_report_is_refused_in_the_same_form():
    info = {"missing_keys": ["a.weight"], "unexpected_keys": [], "mismatched_keys": [("b", (1,), (2,))]}
    with pytest.raises(KinemaError) as err:
        check_loading_info(info, "unet", advice="Re-save it")
    assert str(err.value) == "unet: 1 missing (e.g. a.weight); 1 mismatched (e.g. b). Re-save it"
    with pytest.raises(KinemaError) as err:  # the form Stable Diffusion folder loads have always printed
        check_loading_info(info, "unet", quoted_lists=True)
    assert str(err.value) == "unet: 1 missing keys (e.g. ['a.weight']); 1 mismatched keys (e.g. ['b'])"
    check_loading_info({"missing_keys": [], "unexpected_keys": []}, "unet")  # a clean report: nothing raised

"""CaptureConfig and the parsing of torch.compile options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from optcapture import CaptureConfig, OptionError
from optcapture.config import parse_options


def test_defaults() -> None:
    config = parse_options(None)
    assert config == CaptureConfig(fallback="eager", bucketing=True, cudagraphs=True, grads_in_place=True,
                                   align_elements=64, autotune=False)


def test_known_options_are_parsed() -> None:
    assert parse_options({"fallback": "raise", "bucketing": False}).fallback == "raise"
    assert parse_options({"cudagraphs": False}).cudagraphs is False
    assert parse_options(None, mode="max-autotune-no-cudagraphs").cudagraphs is False
    assert parse_options({"grads_in_place": False}).grads_in_place is False
    assert parse_options({"autotune": True}).autotune is True


@pytest.mark.parametrize(("mode", "autotune", "cudagraphs"), [(None, False, True), ("reduce-overhead", False, True),
                                                                ("max-autotune", True, True),
                                                                ("max-autotune-no-cudagraphs", True, False)])
def test_modes(mode: str | None, autotune: bool, cudagraphs: bool) -> None:
    config = parse_options(None, mode=mode)
    assert (config.autotune, config.cudagraphs) == (autotune, cudagraphs)
    # An explicit option wins over the mode.
    assert parse_options({"autotune": False}, mode=mode).autotune is False


def test_inductor_patches_follow_the_config() -> None:
    from optcapture.lowering import inductor_patches, shadow_patches

    cuda = torch.device("cuda")
    # The per-tensor fallback keeps Inductor's own defaults; only the bucketed step turns autotuning and the
    # per-call input size checks off.
    assert inductor_patches(CaptureConfig(), cuda, cudagraphs=True) == {"triton.cudagraphs": True}
    assert shadow_patches(CaptureConfig(), cuda, cudagraphs=True) == {
        "triton.cudagraphs": True, "triton.autotune_pointwise": False, "size_asserts": False}
    assert shadow_patches(CaptureConfig(autotune=True, cudagraphs=False), cuda, cudagraphs=True) == {
        "triton.cudagraphs": False, "triton.autotune_pointwise": True, "size_asserts": False}
    assert inductor_patches(CaptureConfig(), torch.device("cpu"), cudagraphs=True)["triton.cudagraphs"] is False


def test_unknown_option_is_an_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"unknown optcapture option\(s\) \['fallbak'\]"):
        parse_options({"fallbak": "raise"})


@pytest.mark.parametrize(("options", "error"), [({"fallback": "ignore"}, ValueError), ({"bucketing": 1}, TypeError),
                                                ({"grads_in_place": "yes"}, TypeError), ({"autotune": 1}, TypeError),
                                                ({"align_elements": 0}, ValueError),
                                                ({"align_elements": True}, TypeError)])
def test_bad_values_are_errors(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_options(options)


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="mode 'fast'"):
        parse_options(None, mode="fast")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CaptureConfig().fallback = "raise"  # type: ignore[misc]


def test_unknown_option_through_torch_compile_is_optcaptures_own_error_before_the_step() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1)
    step = torch.compile(opt.step, backend="optcapture", options={"fallbak": "raise"})
    with pytest.raises(OptionError, match=r"unknown optcapture option\(s\) \['fallbak'\]") as raised:
        step()
    assert not isinstance(raised.value, torch._dynamo.exc.BackendCompilerFailed)
    assert "report this bug" not in str(raised.value)
    # Nor Dynamo's advice for bugs in PyTorch ("Set TORCHDYNAMO_VERBOSE=1 ... reporting a bug to PyTorch").
    assert "PyTorch" not in str(raised.value) and "TORCHDYNAMO_VERBOSE" not in str(raised.value), str(raised.value)
    assert torch.equal(p.detach(), torch.ones(3))  # nothing was applied


def test_a_capture_config_is_accepted_as_options() -> None:
    assert parse_options(CaptureConfig(fallback="raise", cudagraphs=False)) == CaptureConfig(fallback="raise",
                                                                                             cudagraphs=False)
    # A CaptureConfig is complete: each of its fields is explicit and wins over the mode, as an option does.
    assert parse_options(CaptureConfig(), mode="max-autotune").autotune is False
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1)
    torch.compile(opt.step, backend="optcapture", options=CaptureConfig(fallback="raise"))()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))


def test_options_of_another_kind_are_an_error() -> None:
    with pytest.raises(OptionError, match="must be a dict or an optcapture.CaptureConfig, got list"):
        parse_options(["fallback"])  # type: ignore[arg-type]

"""The package registers itself as a torch_dynamo_backends entry point, with no import side effects."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import torch


def test_entry_point_is_declared() -> None:
    points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    ours = [p for p in points if p.name == "optcapture"]
    assert len(ours) == 1
    assert ours[0].value == "optcapture.backend:optcapture_backend"


def test_listed_by_dynamo() -> None:
    assert "optcapture" in torch._dynamo.list_backends()


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_works_without_importing_optcapture_and_import_has_no_side_effects() -> None:
    result = _run("""
        import sys, torch
        assert "optcapture" not in sys.modules
        p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)
        opt = torch.optim.SGD([p], lr=0.5)
        torch.compile(opt.step, backend="optcapture")()
        assert torch.equal(p.detach(), torch.full((4,), 0.5)), p
        assert "optcapture" in sys.modules
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_torch_logs_shows_roles_buckets_kernels_and_fallbacks() -> None:
    result = _run("""
        import torch
        ps = [torch.nn.Parameter(torch.ones(4)) for _ in range(3)]
        for p in ps: p.grad = torch.ones(4)
        opt = torch.optim.Adam(ps, lr=0.1)
        torch.compile(opt.step, backend="optcapture")()
        ps2 = [torch.nn.Parameter(torch.ones(4, 4))]
        ps2[0].grad = torch.ones(4, 4)
        ada = torch.optim.Adafactor(ps2)
        torch.compile(ada.step, backend="optcapture")()
    """, TORCH_LOGS="+optcapture")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "discovered Adam: " in log and "'grad': 3" in log, log[-2000:]
    assert "role l_self_param_groups_0_params_0_grad: grad group 0 param 0" in log
    assert "1 bucket(s) [g0/cpu/torch.float32: 3 tensors]" in log
    assert "kernel(s)" in log

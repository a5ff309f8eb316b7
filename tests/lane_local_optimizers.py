"""Optimizers whose update reduces or multiplies within each param (lane-local, not elementwise), written as their
libraries write them: LAMB's trust ratio (a per-param loop), NovoGrad's per-param grad norm kept as 0-dim state and
written into the grads (foreach ops, as pytorch_optimizer writes it), a Newton-Schulz orthogonalisation (Muon's
iteration, in float32 so that eager and a batched matmul agree to float32 tolerance), and timm's LAMB, whose
update also divides every grad by a clip factor computed from the norm of all grads together (across params)."""

from __future__ import annotations

import math
from typing import Any

import torch

from optcapture.bench.methods import Lamb as TrustRatioLamb  # the benchmark's LAMB

__all__ = ["CounterReadBeforeWriteRmsAdam", "CounterResultReadRmsAdam", "Float32Muon", "ForeachNovoGrad",
           "GlobalClipLamb", "GroupStepRmsAdam", "GroupTensorStepRmsAdam", "ParamStepRmsAdam", "RowScaledSGD",
           "StackedNormsLars", "TrustRatioLamb", "Bf16MomentumLamb", "Bf16MomentumAdamW"]


class ForeachNovoGrad(torch.optim.Optimizer):
    """NovoGrad (Ginsburg et al. 2019) with foreach ops: an EMA of each param's squared grad norm as 0-dim state
    (different for every param), and the grads normalised in place by it."""

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.95, 0.98),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["grad_norm_ema"] = p.grad.pow(2).sum()
                    state["exp_avg"] = torch.zeros_like(p)
            norms = [g.pow(2).sum() for g in grads]
            emas = [self.state[p]["grad_norm_ema"] for p in params]
            torch._foreach_lerp_(emas, norms, 1 - beta2)
            denominators = torch._foreach_sqrt(emas)
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_div_(grads, denominators)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads)
            torch._foreach_add_(params, exp_avgs, alpha=-group["lr"])


class Float32Muon(torch.optim.Optimizer):
    """Muon's update (momentum, then a Newton-Schulz orthogonalisation of each matrix) in float32."""

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 3) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                x = buf / buf.norm().clamp(min=1e-7)
                transposed = p.size(0) > p.size(1)
                if transposed:
                    x = x.T
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
                if transposed:
                    x = x.T
                p.add_(x, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


class GroupStepRmsAdam(torch.optim.Optimizer):
    """Adam with its step counted as a Python int in each param group (``group["step"] += 1``, as pytorch_optimizer's
    StableAdamW counts it) and each param's update scaled down by its RMS where that exceeds 1 (a per-param mean)."""

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @staticmethod
    def _count(group: dict[str, Any]) -> tuple[Any, Any]:
        """Count the step; return the two bias corrections (the second one's square root)."""
        group["step"] = group.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        return 1 - beta1 ** group["step"], math.sqrt(1 - beta2 ** group["step"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            bias_correction1, bias_correction2_sqrt = self._count(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (state["exp_avg"] / bias_correction1) / (
                    state["exp_avg_sq"].sqrt() / bias_correction2_sqrt + group["eps"])
                rms = update.square().mean().sqrt().clamp(min=1.0)
                p.add_(update / rms, alpha=-group["lr"])


class ParamStepRmsAdam(GroupStepRmsAdam):
    """:class:`GroupStepRmsAdam` counting its step as a Python int in each param's state (``state["step"] += 1``, as
    timm's AdaBelief and RAdamLegacy count it): a param stepped without a grad keeps its count, so the counters of
    params of one shape differ once grads come and go."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (state["exp_avg"] / bias_correction1) / (
                    state["exp_avg_sq"].sqrt() / bias_correction2_sqrt + group["eps"])
                rms = update.square().mean().sqrt().clamp(min=1.0)
                p.add_(update / rms, alpha=-group["lr"])


class GroupTensorStepRmsAdam(GroupStepRmsAdam):
    """:class:`GroupStepRmsAdam` counting its step in a tensor of each param group, incremented in place (timm's
    Lamb: ``group["step"].add_(1)``, a write into a value shared by all params)."""

    @staticmethod
    def _count(group: dict[str, Any]) -> tuple[Any, Any]:
        if "step" not in group:
            group["step"] = torch.tensor(0.0)
        group["step"].add_(1)
        beta1, beta2 = group["betas"]
        return 1 - beta1 ** group["step"], (1 - beta2 ** group["step"]).sqrt()


class CounterReadBeforeWriteRmsAdam(GroupStepRmsAdam):
    """:class:`GroupTensorStepRmsAdam` reading its counter tensor before incrementing it in place: the bias
    corrections use the count before this step (plus one), so the write cannot run ahead of the params' updates."""

    @staticmethod
    def _count(group: dict[str, Any]) -> tuple[Any, Any]:
        if "step" not in group:
            group["step"] = torch.tensor(0.0)
        beta1, beta2 = group["betas"]
        corrections = 1 - beta1 ** (group["step"] + 1), (1 - beta2 ** (group["step"] + 1)).sqrt()
        group["step"].add_(1)
        return corrections


class CounterResultReadRmsAdam(GroupStepRmsAdam):
    """:class:`GroupTensorStepRmsAdam` reading the result of the in-place increment (``s = group["step"].add_(1)``)."""

    @staticmethod
    def _count(group: dict[str, Any]) -> tuple[Any, Any]:
        if "step" not in group:
            group["step"] = torch.tensor(0.0)
        count = group["step"].add_(1)
        beta1, beta2 = group["betas"]
        return 1 - beta1 ** count, (1 - beta2 ** count).sqrt()


class RowScaledSGD(torch.optim.Optimizer):
    """SGD scaled per row: a matrix keeps a ``[rows, 1]`` state (SM3's accumulators have such shapes), a vector one of
    its own shape; the state decays and grows by each row's mean absolute grad (a per-param reduction)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["scale"] = torch.ones(p.shape[0], 1) if p.dim() > 1 else torch.ones_like(p)
                grown = p.grad.abs().mean(dim=-1, keepdim=True) if p.dim() > 1 else p.grad.abs()
                state["scale"].mul_(0.9).add_(grown)
                p.add_(p.grad * state["scale"], alpha=-group["lr"])


class StackedNormsLars(torch.optim.Optimizer):
    """LARS as pytorch_optimizer's foreach path writes it: the norms of the matrices and those of their grads stacked
    (two ops across params), per-param trust ratios computed on the stacks and unbound, momentum on every param."""

    def __init__(self, params: Any, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 1e-3,
                 trust_coefficient: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            matrices = [p for p in params if p.ndim > 1]
            matrix_grads = [p.grad for p in matrices]
            if matrices:
                param_norms = torch.stack(torch._foreach_norm(matrices))
                grad_norms = torch.stack(torch._foreach_norm(matrix_grads))
                denominator = grad_norms + group["weight_decay"] * param_norms
                trust_ratios = torch.where(param_norms > 0.0, torch.where(
                    denominator > 0.0, group["trust_coefficient"] * param_norms / denominator, 1.0), 1.0).unbind()
                torch._foreach_add_(matrix_grads, matrices, alpha=group["weight_decay"])
                torch._foreach_mul_(matrix_grads, trust_ratios)
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


class GlobalClipLamb(torch.optim.Optimizer):
    """LAMB as timm writes it (``timm.optim.Lamb``, single-tensor path): every grad divided by
    ``max(global_norm / max_grad_norm, 1)``, where ``global_norm`` is the norm of the stacked per-param grad norms
    (``_foreach_norm`` over the grads of every group), then Adam moments and a per-param trust ratio."""

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "max_grad_norm": max_grad_norm})

    def _clip_factor(self) -> torch.Tensor:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        global_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return (global_norm / self.defaults["max_grad_norm"]).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        clip = self._clip_factor()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            bias_correction1 = 1 - beta1 ** group["step"]
            bias_correction2 = 1 - beta2 ** group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad / clip
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                update = (exp_avg / bias_correction1).div_(denom)
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, g_norm = p.norm(2.0), update.norm(2.0)
                    trust_ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, w_norm / g_norm, 1.0), 1.0)
                    update.mul_(trust_ratio)
                p.add_(update, alpha=-group["lr"])


class Bf16MomentumLamb(TrustRatioLamb):
    """The benchmark's LAMB with its first moment kept in bfloat16 beside float32 params and second moment (a
    memory-saving choice, as timm's AdafactorBigVision makes with ``momentum_dtype``), made when the optimizer is."""

    def __init__(self, params: Any, **options: Any) -> None:
        super().__init__(params, **options)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, dtype=torch.bfloat16),
                                 "exp_avg_sq": torch.zeros_like(p)}


class Bf16MomentumAdamW(torch.optim.Optimizer):
    """AdamW with its first moment kept in bfloat16 beside float32 params and second moment: elementwise."""

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].lerp_(p.grad.to(torch.bfloat16), 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                corrected_avg = state["exp_avg"].float() / (1 - beta1 ** state["step"])
                denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(corrected_avg, denom, value=-group["lr"])

"""DINO's self-distillation loss with a centred, sharpened teacher (arXiv 2104.14294).

The student learns to predict the teacher's distribution over `out_dim` prototypes for a
different view of the same image. Centring (subtracting a running mean of teacher outputs)
keeps one prototype from dominating, sharpening (a low teacher temperature) keeps the output
from going uniform: together they avoid collapse without negatives. Follows the authors' code
(facebookresearch/dino `DINOLoss`): linear warm-up of the teacher temperature over epochs, and a
centre averaged over all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepp_ray import dist


class DINOLoss(nn.Module):
    """Cross-entropy H(teacher_v, student_w) averaged over all pairs of different views v != w.

    `forward(student_out, teacher_out, epoch)`: `student_out` holds one B x out_dim tensor per
    student view (global crops first, then local crops), `teacher_out` one per teacher view
    (the global crops, in the same order), so teacher view i and student view i are the same
    crop and that pair is skipped. The centre (a registered buffer, 1 x out_dim) is updated
    after the loss with the teacher batch mean taken over all ranks.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        total_epochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if min(teacher_temp, warmup_teacher_temp, student_temp) <= 0:
            raise ValueError("DINO temperatures must be > 0")
        if not 0 <= warmup_teacher_temp_epochs <= total_epochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) must be in "
                f"[0, total_epochs={total_epochs}]"
            )
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.total_epochs = total_epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over the warm-up epochs,
        then constant (the authors' `np.linspace` schedule, epoch 0 = warm-up value)."""
        w = self.warmup_teacher_temp_epochs
        if epoch >= w:
            return self.teacher_temp
        if w == 1:
            return self.warmup_teacher_temp
        frac = max(epoch, 0) / (w - 1)
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, student_out: list[Tensor], teacher_out: list[Tensor], epoch: int) -> Tensor:
        """Mean over view pairs (teacher i, student j), i != j, of the batch-mean cross-entropy."""
        self._check(student_out, teacher_out)
        dtype = torch.promote_types(student_out[0].dtype, torch.float32)
        temp = self.teacher_temperature(epoch)
        with torch.autocast(device_type=student_out[0].device.type, enabled=False):
            center = self.center.to(dtype)  # 1 x out_dim
            teacher = torch.stack([t.detach().to(dtype) for t in teacher_out])  # T x B x out_dim
            t_prob = F.softmax((teacher - center) / temp, dim=-1)  # T x B x out_dim
            student = torch.stack([s.to(dtype) for s in student_out])  # S x B x out_dim
            s_logp = F.log_softmax(student / self.student_temp, dim=-1)  # S x B x out_dim
            # ce[i, j] = sum over batch of H(teacher view i, student view j)
            ce = -torch.einsum("tbd,sbd->ts", t_prob, s_logp)  # T x S
            n_t, n_s = ce.shape
            same = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
            n_terms = n_t * n_s - min(n_t, n_s)
            loss = ce.masked_fill(same, 0.0).sum() / (n_terms * teacher.shape[1])
        self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of all teacher rows over all ranks."""
        batch_center = teacher.reshape(-1, self.out_dim).mean(dim=0, keepdim=True)  # 1 x out_dim
        batch_center = dist.all_reduce_mean(batch_center)
        new = self.center * self.center_momentum + batch_center.to(self.center.dtype) * (
            1.0 - self.center_momentum
        )
        self.center.copy_(new)

    def _check(self, student_out: list[Tensor], teacher_out: list[Tensor]) -> None:
        if not teacher_out or len(student_out) < len(teacher_out):
            raise ValueError(
                f"DINOLoss needs >= 1 teacher view and at least as many student views, got "
                f"{len(teacher_out)} teacher and {len(student_out)} student views"
            )
        if len(student_out) < 2:
            raise ValueError("DINOLoss needs at least two student views (pairs of different views)")
        shape = teacher_out[0].shape
        if len(shape) != 2 or shape[1] != self.out_dim:
            raise ValueError(f"views must be B x {self.out_dim}, got {tuple(shape)}")
        if any(t.shape != shape for t in [*teacher_out, *student_out]):
            shapes = [tuple(t.shape) for t in [*teacher_out, *student_out]]
            raise ValueError(f"all views must share one shape B x out_dim, got {shapes}")

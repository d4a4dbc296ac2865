"""axolotl's top-k KD losses, vendored for benchmarks/compare_peers.py.

Source: https://github.com/axolotl-ai-cloud/axolotl (Apache License 2.0, Copyright 2024 Axolotl AI)
    src/axolotl/integrations/kd/topk_logprob/forward_kl.py  @ 107c67ae5a236ab458454e8daf3b77a98ce56867  (`loss`)
    src/axolotl/integrations/kd/kernels/liger.py           @ 00bfeb4217491361e8e56f276803bc884bdea244
        (`LigerFusedLinearKLTopKLogprobFunction`, its chunked fused-linear form on Liger's distillation base)
    src/axolotl/integrations/kd/utils.py                   @ 00bfeb4217491361e8e56f276803bc884bdea244
        (`normalize_logprobs`)
The code is theirs (one fix, marked: the backward's count of hyperparameters); comments are shortened and the empty-input branches of the fused backward left out (the
benchmark never passes empty inputs). axolotl itself is not installed: its package pulls a whole training stack.
Licensed under the Apache License, Version 2.0: http://www.apache.org/licenses/LICENSE-2.0

Shape notation: B batch, T positions, V vocabulary, K teacher top-k, D hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase

__all__ = ["loss", "normalize_logprobs", "LigerFusedLinearKLTopKLogprobFunction"]


def loss(
    student_logits: torch.Tensor,  # [B, T, V]
    target_token_ids: torch.Tensor,  # [B, T, K]
    target_logprobs: torch.Tensor,  # [B, T, K] already re-normalized
    target_mask: torch.Tensor,  # [B, T, K]
    num_items_in_batch: int = -1,
    kd_temperature: float = 1.0,
) -> torch.Tensor:
    """axolotl's forward-KL top-k loss (``topk_logprob/forward_kl.py``; there under ``@torch.jit.script``)."""
    target_logprobs = target_logprobs.float()
    teacher_seq_len = target_token_ids.shape[1]
    student_logits_for_kd = student_logits[:, :teacher_seq_len, :] / kd_temperature
    student_logits_for_kd = student_logits_for_kd.float()
    student_logits_topk = torch.gather(student_logits_for_kd, dim=-1, index=target_token_ids)
    student_lse = torch.logsumexp(student_logits_for_kd, dim=-1, keepdim=True)
    student_logprobs_topk = student_logits_topk - student_lse
    valid_mask = target_mask.to(torch.bool)
    student_logprobs_topk = student_logprobs_topk[valid_mask]
    target_logprobs = target_logprobs[valid_mask]
    teacher_probs = target_logprobs.exp()
    kd_loss_per_token = teacher_probs * (target_logprobs - student_logprobs_topk)
    kd_loss = kd_loss_per_token.sum()
    if num_items_in_batch > 0:
        kd_loss = kd_loss / float(num_items_in_batch)
    else:
        kd_loss = kd_loss / float(kd_loss_per_token.size(0))
    return kd_loss


def normalize_logprobs(logprobs: torch.Tensor, topk: int) -> torch.Tensor:
    """Re-normalizes top-k raw logprobs as probabilities, and converts back to logprobs (``kd/utils.py``)."""
    if logprobs.shape[-1] != topk:
        padding_len = topk - logprobs.shape[-1]
        padding_tensor = torch.full((*logprobs.shape[:-1], padding_len), float("-inf"), dtype=logprobs.dtype,
                                    device=logprobs.device)
        logprobs = torch.cat((logprobs, padding_tensor), dim=-1)
    position_logprobs_lse = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    teacher_probs_t_online = torch.exp(logprobs - position_logprobs_lse)
    teacher_probs_t_online_sum = teacher_probs_t_online.sum(dim=-1, keepdim=True)
    teacher_probs_t_online = teacher_probs_t_online / teacher_probs_t_online_sum
    return torch.log(teacher_probs_t_online)


class LigerFusedLinearKLTopKLogprobFunction(LigerFusedLinearDistillationBase):
    """Chunked kl-div loss for top-k logprobs (``kd/kernels/liger.py``)."""

    @staticmethod
    def distillation_loss_fn(student_logits_temp_scaled, target_token_ids_chunk, target_logprobs_chunk,
                             target_mask_chunk, beta: float = 0.0, normalize_topk: bool = True):
        topk = target_token_ids_chunk.shape[-1]
        student_logits_temp_scaled = student_logits_temp_scaled.float()
        target_logprobs_chunk = target_logprobs_chunk.float()
        student_logits_topk_temp_scaled = torch.gather(student_logits_temp_scaled, dim=-1,
                                                       index=target_token_ids_chunk)
        student_lse = torch.logsumexp(student_logits_temp_scaled, dim=-1, keepdim=True)
        student_logprobs_topk_temp_scaled = student_logits_topk_temp_scaled - student_lse
        if normalize_topk:
            student_logprobs_topk_temp_scaled = normalize_logprobs(student_logprobs_topk_temp_scaled, topk)
        valid_mask = target_mask_chunk.to(torch.bool)
        student_logprobs_topk_valid = student_logprobs_topk_temp_scaled[valid_mask]
        target_logprobs_valid = target_logprobs_chunk[valid_mask]
        teacher_probs_valid = target_logprobs_valid.exp()
        student_probs_topk_valid = student_logprobs_topk_valid.exp()
        if beta == 0.0:
            fwd_kl_per_token = teacher_probs_valid * (target_logprobs_valid - student_logprobs_topk_valid)
            kd_loss = fwd_kl_per_token.sum()
        elif beta == 1.0:
            rev_kl_per_token = student_probs_topk_valid * (student_logprobs_topk_valid - target_logprobs_valid)
            kd_loss = rev_kl_per_token.sum()
        else:
            mean_probs = (1 - beta) * student_probs_topk_valid + beta * teacher_probs_valid
            log_mean_probs = mean_probs.log()
            student_kl = F.kl_div(log_mean_probs, student_logprobs_topk_valid, reduction="sum", log_target=True)
            teacher_kl = F.kl_div(log_mean_probs, target_logprobs_valid, reduction="sum", log_target=True)
            kd_loss = beta * teacher_kl + (1 - beta) * student_kl
        return kd_loss

    @staticmethod
    def _compute_loss_kl_topk(student_input_chunk, student_weight, target_token_ids_chunk, target_logprobs_chunk,
                              target_mask_chunk, target_chunk, student_bias=None, distillation_loss_fn=None,
                              ignore_index: int = -100, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                              compute_ce_loss: bool = True, temperature: float = 1.0, beta: float = 0.0,
                              normalize_topk: bool = True):
        student_logits_chunk = F.linear(student_input_chunk, student_weight, student_bias)
        ce_loss = torch.tensor(0.0, device=student_logits_chunk.device, dtype=student_logits_chunk.dtype)
        if compute_ce_loss and weight_hard_loss > 0.0:
            ce_loss = F.cross_entropy(student_logits_chunk.view(-1, student_logits_chunk.shape[-1]),
                                      target_chunk.view(-1), reduction="sum", ignore_index=ignore_index)
        soft_loss = torch.tensor(0.0, device=student_logits_chunk.device, dtype=student_logits_chunk.dtype)
        if weight_soft_loss > 0.0:
            student_logits_chunk_temp_scaled = student_logits_chunk / temperature
            soft_loss = distillation_loss_fn(student_logits_chunk_temp_scaled, target_token_ids_chunk,
                                             target_logprobs_chunk, target_mask_chunk, beta=beta,
                                             normalize_topk=normalize_topk)
        return soft_loss, ce_loss

    # long: vendored as written upstream
    @classmethod
    def forward(cls, ctx, student_input, student_lm_head_weight, target_token_ids, target_logprobs, target_mask,
                true_labels, student_lm_head_bias=None, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                ignore_index: int = -100, temperature: float = 1.0, beta: float = 0.0, compiled: bool = False,
                chunk_size: int = 1024, compute_ce_loss: bool = True, normalize_topk: bool = True):
        CHUNK_SIZE = chunk_size  # noqa: N806
        grad_weight_acc = torch.zeros_like(student_lm_head_weight)
        grad_inputs_list = []
        grad_bias_acc = torch.zeros_like(student_lm_head_bias) if student_lm_head_bias is not None else None
        kd_loss_acc = torch.zeros((), device=student_input.device, dtype=student_input.dtype)
        ce_loss_acc = torch.zeros((), device=student_input.device, dtype=student_input.dtype)

        def loss_fn_for_grad(_student_input_chunk, _student_lm_head_weight, _student_lm_head_bias,
                             _target_token_ids_chunk, _target_logprobs_chunk, _target_mask_chunk, _true_labels_chunk):
            return cls._compute_loss_kl_topk(
                student_input_chunk=_student_input_chunk, student_weight=_student_lm_head_weight,
                target_token_ids_chunk=_target_token_ids_chunk, target_logprobs_chunk=_target_logprobs_chunk,
                target_mask_chunk=_target_mask_chunk, target_chunk=_true_labels_chunk,
                student_bias=_student_lm_head_bias, distillation_loss_fn=cls.distillation_loss_fn,
                ignore_index=ignore_index, weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss,
                compute_ce_loss=compute_ce_loss, temperature=temperature, beta=beta, normalize_topk=normalize_topk)

        def accumulate_chunk_grads(student_input_chunk_ac, target_token_ids_chunk_ac, target_logprobs_chunk_ac,
                                   target_mask_chunk_ac, true_labels_chunk_ac):
            if student_lm_head_bias is not None:
                (chunk_grad_input, chunk_grad_weight, chunk_grad_bias), (chunk_kd_loss, chunk_ce_loss) = (
                    torch.func.grad_and_value(loss_fn_for_grad, argnums=(0, 1, 2), has_aux=True)(
                        student_input_chunk_ac, student_lm_head_weight, student_lm_head_bias,
                        target_token_ids_chunk_ac, target_logprobs_chunk_ac, target_mask_chunk_ac,
                        true_labels_chunk_ac))
                grad_bias_acc.add_(chunk_grad_bias)
            else:
                (chunk_grad_input, chunk_grad_weight), (chunk_kd_loss, chunk_ce_loss) = (
                    torch.func.grad_and_value(loss_fn_for_grad, argnums=(0, 1), has_aux=True)(
                        student_input_chunk_ac, student_lm_head_weight, None, target_token_ids_chunk_ac,
                        target_logprobs_chunk_ac, target_mask_chunk_ac, true_labels_chunk_ac))
            grad_weight_acc.add_(chunk_grad_weight)
            kd_loss_acc.add_(chunk_kd_loss)
            ce_loss_acc.add_(chunk_ce_loss)
            return chunk_grad_input

        if compiled:
            accumulate_chunk_grads_compiled = torch.compile(accumulate_chunk_grads, dynamic=True, backend="inductor")
        else:
            accumulate_chunk_grads_compiled = accumulate_chunk_grads
        B, N, D = student_input.shape  # noqa: N806
        K = target_token_ids.shape[-1]  # noqa: N806
        student_input_flat = student_input.reshape(-1, student_input.shape[-1])
        target_token_ids_flat = target_token_ids.reshape(-1, target_token_ids.shape[-1])
        target_logprobs_flat = target_logprobs.reshape(-1, target_logprobs.shape[-1])
        target_mask_flat = target_mask.reshape(-1, target_mask.shape[-1])
        true_labels = torch.nn.functional.pad(true_labels, (0, 1), value=ignore_index)
        true_labels_flat = true_labels[:, 1:].contiguous().view(-1)
        num_chunks = max(1, student_input_flat.shape[0] // CHUNK_SIZE)
        chunks = [torch.chunk(t, chunks=num_chunks, dim=0) for t in (
            student_input_flat, target_token_ids_flat, target_logprobs_flat, target_mask_flat, true_labels_flat)]
        for i in range(num_chunks):
            grad_inputs_list.append(accumulate_chunk_grads_compiled(*(c[i] for c in chunks)))
        grad_inputs_combined = torch.cat(grad_inputs_list, dim=0)
        ctx.save_for_backward(grad_inputs_combined, grad_weight_acc, grad_bias_acc)
        # upstream has 8 here, but forward takes 9 hyperparameters: torch rejects the 15 gradients it returns
        # for 16 inputs ("returned an incorrect number of gradients"); the one change to their code
        ctx.hyperparams_count = 9
        ctx.bias_was_none = student_lm_head_bias is None
        ctx.orig_dims = (B, N, D, K)
        kd_loss_acc = kd_loss_acc * (temperature**2)
        return weight_soft_loss * kd_loss_acc + weight_hard_loss * ce_loss_acc

    @staticmethod
    def backward(ctx, grad_output):
        grad_input_flat, grad_weight, grad_bias_maybe = ctx.saved_tensors
        if not torch.equal(grad_output, torch.tensor(1.0, device=grad_output.device, dtype=grad_output.dtype)):
            grad_input_flat = grad_input_flat * grad_output
            grad_weight = grad_weight * grad_output
            if grad_bias_maybe is not None:
                grad_bias_maybe = grad_bias_maybe * grad_output
        grad_input_reshaped = grad_input_flat.view(ctx.orig_dims[0], ctx.orig_dims[1], ctx.orig_dims[2])
        grad_bias_return = grad_bias_maybe if not ctx.bias_was_none else None
        return (grad_input_reshaped, grad_weight, None, None, None, None, grad_bias_return,
                *([None] * ctx.hyperparams_count))

"""TRAK (``traker``, MadryLab) on the shared task, one checkpoint, TRAK's CPU projector.

    benchmarks/_peers_venv/bin/python benchmarks/peers/run_trak.py --model M --train T.jsonl \
        --queries Q.jsonl --out DIR --proj-dim 32

Uses TRAK's documented public API: a custom ``AbstractModelOutput`` (``get_output`` for one example under
``torch.func``, ``get_out_to_loss_grad`` for a batch), ``TRAKer(..., device="cpu", grad_wrt=...)`` — on CPU
TRAKer itself picks its pure-torch ``BasicProjector`` with a Gaussian matrix (the ``fast_jl`` CUDA kernel
is neither installed nor needed) — ``load_checkpoint``, ``featurize``, ``finalize_features``,
``start_scoring_checkpoint``, ``score``, ``finalize_scores``. fit_s = featurize + finalize_features;
score_s = target featurisation + scores.

Model output for a causal LM (TRAK's multi-class margin, per target token, summed like our loss):
``f(z) = Σ_t mask_t · (logit_t[y_t] − logsumexp_{i≠y_t} logit_t[i]) = Σ_t mask_t · log(p_t / (1 − p_t))``.
Out-to-loss weight (TRAK's ``Q``, one scalar per example): the mean over target tokens of ``1 − p_t`` —
exactly TRAK's ``1 − p`` for a one-token response, its natural average otherwise.
Gradients are taken of the same watched layers as every other method (``grad_wrt`` = their weights).

No attention mask is passed under ``torch.func``: rows are right-padded and attention is causal, so real
tokens never attend to padding and the logits at every target position are exactly those of the unpadded
row; padding positions have mask 0. (This keeps transformers' mask construction out of ``vmap``.)

Sign: TRAK's score is ``φ_queryᵀ (ΦᵀΦ)⁻¹ φ_train · Q_train`` with ``φ = ∇f`` and ``Q ≥ 0``; a positive score
means training on the row *raises* the query's margin ``f``, i.e. lowers its loss — dataworth's convention,
no flip. TRAK returns ``[N, Q]``; it is transposed to ``[Q, N]``.

``ΦᵀΦ`` is ``proj_dim × proj_dim`` with rank ≤ N, and TRAK's default ridge is 0, so ``proj_dim`` must stay
below the number of training rows (the driver passes N/2); ``--lambda-reg`` exposes TRAK's ridge.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import as_linear_layers, Stopwatch, load_task, ordered_batches, parse_args, write_result  # noqa: E402


def options(ap) -> None:
    ap.add_argument("--proj-dim", type=int, default=32, help="TRAK projection dimension (keep below N)")
    ap.add_argument("--lambda-reg", type=float, default=0.0, help="TRAK's ridge on ΦᵀΦ (its default: 0)")


def token_margins(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]``: ``logit[y] − logsumexp_{i≠y} logit[i]`` of each next token (position t predicts t+1)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    correct = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return correct - others


def make_model_output():
    from trak.modelout_functions import AbstractModelOutput

    class CausalLMSummedMargin(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids, loss_mask):
            logits = torch.func.functional_call(model, (weights, buffers), args=(),
                                                kwargs={"input_ids": input_ids.unsqueeze(0),
                                                        # an explicit all-ones mask: right padding is after
                                                        # every real token (causal), and GPT-2's check for a
                                                        # missing mask calls .item(), which vmap refuses
                                                        "attention_mask": torch.ones_like(input_ids).unsqueeze(0)}
                                                ).logits
            return (token_margins(logits, input_ids.unsqueeze(0)) * loss_mask.unsqueeze(0)[:, 1:]).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            input_ids, loss_mask = batch
            with torch.no_grad():
                logits = torch.func.functional_call(model, (weights, buffers), args=(),
                                                    kwargs={"input_ids": input_ids,
                                                            "attention_mask": torch.ones_like(input_ids)}
                                                    ).logits[:, :-1].float()
                p = torch.softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                mask = loss_mask[:, 1:]
                q = ((1 - p) * mask).sum(1) / mask.sum(1).clamp_min(1)
            return q.unsqueeze(-1)

    return CausalLMSummedMargin()


def main() -> None:
    args = parse_args(__doc__, options)
    from trak import TRAKer

    clock = Stopwatch()
    with clock("load"):
        task = load_task(args)
        as_linear_layers(task.model)  # GPT-2's Conv1D → nn.Linear (the peers watch nn.Linear only)
    model = task.model
    save_dir = Path(args.out) / "trak"
    shutil.rmtree(save_dir, ignore_errors=True)
    grad_wrt = [f"{name}.weight" for name in task.module_names]
    # A fresh save_dir with TRAK's default load_from_save_dir=True: with False, traker 0.3.2 never creates
    # experiments.json and start_scoring_checkpoint fails (FileNotFoundError).

    def new_traker():
        return TRAKer(model=model, task=make_model_output(), train_set_size=len(task.train), save_dir=str(save_dir),
                      device="cpu", proj_dim=args.proj_dim, use_half_precision=False, grad_wrt=grad_wrt,
                      lambda_reg=args.lambda_reg, logging_level=logging.WARNING)

    with clock("fit"):
        traker = new_traker()
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for pos, batch in ordered_batches(task.train, task.pad_id, args.batch_size):
            traker.featurize(batch=(batch["input_ids"], batch["loss_mask"]), num_samples=len(pos))
        traker.finalize_features()
    with clock("score"):
        # Scoring in a second TRAKer over the same save_dir (TRAK's documented featurize-then-score workflow):
        # in traker 0.3.2, finalize_features frees a one-block BasicProjector's matrix (proj_dim ≤ 100) and the
        # same instance then fails in score() (AttributeError: no proj_matrix). Same seed → same projection.
        traker = new_traker()
        traker.start_scoring_checkpoint(exp_name="peers", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(task.queries))
        for pos, batch in ordered_batches(task.queries, task.pad_id, args.batch_size):
            traker.score(batch=(batch["input_ids"], batch["loss_mask"]), num_samples=len(pos))
        scores = torch.as_tensor(traker.finalize_scores(exp_name="peers")).float().numpy().T  # [N, Q] → [Q, N]
    import importlib.metadata

    write_result(args.out, "trak", scores, clock, task,
                 notes=f"traker {importlib.metadata.version('traker')} proj_dim={args.proj_dim} (BasicProjector, "
                       f"Gaussian), lambda_reg={args.lambda_reg}, one checkpoint, float32")
    shutil.rmtree(save_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Kronfluence (pomonam/kronfluence) on the shared task: EK-FAC or identity influence of every training row.

    benchmarks/_peers_venv/bin/python benchmarks/peers/run_kronfluence.py --model M --train T.jsonl \
        --queries Q.jsonl --out DIR --strategy ekfac|identity

Uses Kronfluence's documented public API only: a ``Task`` (``compute_train_loss``, ``compute_measurement``,
``tracked_modules``, ``get_attention_mask``), ``prepare_model``, ``Analyzer.fit_all_factors`` and
``Analyzer.compute_pairwise_scores``. fit_s = ``fit_all_factors`` (covariances, eigendecomposition,
eigenvalue correction for ``ekfac``; nearly nothing for ``identity``); score_s = ``compute_pairwise_scores``,
which computes the training gradients itself (Kronfluence has no separate extraction stage).
``--checkpoints ensemble``: the same at every kept checkpoint, combined with dataworth's
``dataworth.influence.ensemble.ensemble_scores`` (Kronfluence ships no checkpoint ensemble; this is the loop a
user would write around it, so both tools get the same ensemble).

Sign: Kronfluence's pairwise score is ``∇f(query)ᵀ (G + λI)⁻¹ ∇L(train)`` with no minus sign; with the
measurement ``f`` = the query's summed loss, up-weighting a training row by ε changes the parameters by
``−ε (G + λI)⁻¹ ∇L(train)`` and so the query loss by ``−ε · score``: a positive score means the row LOWERS
the query loss — dataworth's convention already, so no flip. (The sign check in ``benchmarks/peers.py``
confirms it on every run.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Stopwatch,
    as_linear_layers,
    batch_dict,
    combine_checkpoints,
    kept_checkpoints,
    load_task,
    parse_args,
    summed_losses,
    write_result,
)


def options(ap) -> None:
    ap.add_argument("--strategy", default="ekfac", help="ekfac | identity (Kronfluence FactorArguments.strategy)")
    ap.add_argument("--damping", default="auto", help="'auto' = Kronfluence's 0.1 × mean eigenvalue heuristic; "
                                                      "'default' = ScoreArguments' own default; or a number")
    ap.add_argument("--empirical-fisher", action="store_true",
                    help="fit the factors on the observed labels' gradients (Kronfluence samples labels by default)")
    ap.add_argument("--checkpoints", default="final", choices=("final", "ensemble"),
                    help="ensemble: the same at every MODEL/checkpoints/epoch-N, combined as dataworth combines")
    ap.add_argument("--ensemble-weights", default=None, help="--checkpoints ensemble: one weight per checkpoint")
    ap.add_argument("--standardise", action="store_true",
                    help="--checkpoints ensemble: each checkpoint's scores over their spread per query first")


def make_task_class():
    """The Kronfluence ``Task`` for a causal LM with dataworth's summed, masked loss."""
    from kronfluence.task import Task

    class SummedResponseLoss(Task):
        def __init__(self, module_names):
            super().__init__()
            self._modules = list(module_names)

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if not sample:
                # The training objective: the loss summed over every target token of every row.
                return summed_losses(logits, batch).sum()
            # True Fisher (Kronfluence's default, use_empirical_fisher=False): labels drawn from the model's own
            # predictive distribution at the same target positions, same mask, same sum.
            with torch.no_grad():
                probs = torch.softmax(logits[:, :-1].detach(), dim=-1)
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:2])
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), sampled.reshape(-1), reduction="none")
            return (ce.view(sampled.shape) * batch["loss_mask"][:, 1:]).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            # f = the query's loss summed over its response tokens (what the LDS retrains measure).
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            return summed_losses(logits, batch).sum()

        def get_influence_tracked_modules(self):
            return self._modules

        def tracked_modules(self):  # older Kronfluence releases use this name
            return self._modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return SummedResponseLoss


class EncodedDataset(torch.utils.data.Dataset):
    """Encoded rows as a map-style dataset; batches are padded by `collate` (dataworth's right padding)."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main() -> None:
    args = parse_args(__doc__, options)
    import kronfluence

    clock = Stopwatch()
    matrices = []
    for model_dir in kept_checkpoints(args.model, args.checkpoints):
        with clock("load"):
            task = load_task(args, model_dir=str(model_dir))
        matrices.append(kronfluence_scores(args, task, clock))
    scores, ensemble_note = combine_checkpoints(args, matrices)
    notes = (f"Kronfluence {getattr(kronfluence, '__version__', '?')} strategy={args.strategy}, "
             + ("" if args.strategy == "identity" else
                f"damping {args.damping}, " + ("empirical" if args.empirical_fisher else "true (sampled-label)")
                + " Fisher, ") + "unprojected gradients, measurement = summed response loss" + ensemble_note)
    write_result(args.out, f"kronfluence-{args.strategy}", scores, clock, task, notes=notes)


def kronfluence_scores(args, task, clock: Stopwatch):
    """``[Q, N]`` float32 pairwise scores of ``task``'s model (factors fitted, then every training row scored)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    with clock("load"):
        as_linear_layers(task.model)  # GPT-2's Conv1D → nn.Linear (the peers watch nn.Linear only)
        kf_task = make_task_class()(task.module_names)
        model = prepare_model(model=task.model, task=kf_task)
    work = Path(args.out) / "kronfluence"
    shutil.rmtree(work, ignore_errors=True)
    analyzer = Analyzer(analysis_name="peers", model=model, task=kf_task, cpu=True, output_dir=str(work),
                        disable_tqdm=True)
    pad_id = task.pad_id
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=lambda rows: batch_dict(rows, pad_id)))
    train_set, query_set = EncodedDataset(task.train), EncodedDataset(task.queries)
    factor_args = FactorArguments(strategy=args.strategy, use_empirical_fisher=args.empirical_fisher)
    score_args = ScoreArguments()
    if args.damping == "auto":
        score_args.damping_factor = None  # 0.1 × mean eigenvalue (Kronfluence's documented heuristic)
    elif args.damping != "default":
        score_args.damping_factor = float(args.damping)
    with clock("fit"):
        analyzer.fit_all_factors(factors_name=args.strategy, dataset=train_set, factor_args=factor_args,
                                 per_device_batch_size=args.batch_size, overwrite_output_dir=True)
    with clock("score"):
        analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name=args.strategy, query_dataset=query_set,
                                         train_dataset=train_set, per_device_query_batch_size=len(query_set),
                                         per_device_train_batch_size=args.batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].float().numpy()
    shutil.rmtree(work, ignore_errors=True)
    return scores


if __name__ == "__main__":
    main()

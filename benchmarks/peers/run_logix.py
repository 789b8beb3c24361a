"""LogIX (``logix-ai``, the LoGra reference implementation) on the shared task.

    benchmarks/_peers_venv/bin/python benchmarks/peers/run_logix.py --model M --train T.jsonl \
        --queries Q.jsonl --out DIR --rank 32 [--hessian raw|kfac]

Uses LogIX's documented public API: ``logix.init`` (with a YAML config: log directory, LoRA init and rank),
``run.watch(model, name_filter=...)``, ``run.add_lora()`` (LoGra's Kronecker projection as a rank-r
encoder / zero bottleneck / decoder), ``run.setup({"grad": ["log", "covariance"]})``, ``run.save(True)``,
``with run(data_id=ids, mask=attention_mask): loss.backward()``, ``run.finalize()``, then for the queries
``run.setup({"grad": ["log"]})`` + ``run.eval()``, ``run.get_log()``, ``run.build_log_dataloader()`` and
``run.compute_influence_all``. fit_s = LoRA set-up + logging every training row (gradients written to LogIX's
memory-mapped log, covariance accumulated) + ``finalize``; score_s = query gradients + influence.

Hessian: ``raw`` (default here) is the exact empirical Fisher of the projected gradients — LogIX's default
for LoGra; the damping is LogIX's own default ``0.1 × trace / dim``, the same heuristic as dataworth's
``auto``. Sign: LogIX's score is ``(H + λI)⁻¹ g_queryᵀ · g_train`` of the gradients of the loss — the same
expression as dataworth's, so a positive score means the training row lowers the query loss; no flip.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import as_linear_layers, Stopwatch, load_task, ordered_batches, parse_args, summed_losses, write_result  # noqa: E402


def options(ap) -> None:
    ap.add_argument("--rank", type=int, default=32, help="LoGra rank (k_in = k_out) of LogIX's LoRA projection")
    ap.add_argument("--init", default="random", help="random | pca (LogIX LoRA initialisation)")
    ap.add_argument("--hessian", default="raw", help="raw | kfac (LogIX influence hessian)")


def backward_batches(run, model, rows, pad_id: int, batch_size: int, ids: list[str]) -> None:
    """One LogIX logging pass over ``rows``: forward, summed loss, backward, inside ``with run(...)``."""
    for pos, batch in ordered_batches(rows, pad_id, batch_size):
        with run(data_id=[ids[i] for i in pos], mask=batch["attention_mask"]):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            summed_losses(logits, batch).sum().backward()


def main() -> None:
    args = parse_args(__doc__, options)
    import logix
    import yaml

    clock = Stopwatch()
    with clock("load"):
        task = load_task(args)
        as_linear_layers(task.model)  # GPT-2's Conv1D → nn.Linear (the peers watch nn.Linear only)
    root = Path(args.out) / "logix"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"root_dir": str(root), "lora": {"init": args.init, "rank": args.rank},
                                      "logging": {"flush_threshold": 1_000_000_000, "num_workers": 0}}))
    model = task.model
    with clock("fit"):
        run = logix.init(project="peers", config=str(config))
        run.watch(model, name_filter=task.module_names)
        if args.init == "pca":
            # LogIX's PCA initialisation reads the forward/backward covariances of a first pass.
            run.setup({"forward": ["covariance"], "backward": ["covariance"]})
            backward_batches(run, model, task.train, task.pad_id, args.batch_size, task.train_ids)
            run.finalize()
        run.add_lora()
        run.setup({"grad": ["log", "covariance"]})
        run.save(True)
        backward_batches(run, model, task.train, task.pad_id, args.batch_size, task.train_ids)
        run.finalize()
    with clock("score"):
        run.setup({"grad": ["log"]})
        run.eval()
        loader = run.build_log_dataloader(batch_size=max(args.batch_size, 64))
        parts, query_ids = [], []
        for pos, batch in ordered_batches(task.queries, task.pad_id, len(task.queries)):
            ids = [task.query_ids[i] for i in pos]
            with run(data_id=ids, mask=batch["attention_mask"]):
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                summed_losses(logits, batch).sum().backward()
            result = run.compute_influence_all(run.get_log(), loader, mode="dot", hessian=args.hessian)
            parts.append(result["influence"].float().numpy())
            query_ids.extend(result["src_ids"])
            train_ids = list(result["tgt_ids"])
        # LogIX returns rows/columns in logging order with their ids; put them in task order by id.
        q_index = {q: i for i, q in enumerate(query_ids)}
        t_index = {t: i for i, t in enumerate(train_ids)}
        scores = np.concatenate(parts)[[q_index[q] for q in task.query_ids]][:, [t_index[t] for t in task.train_ids]]
    write_result(args.out, "logix", scores, clock, task,
                 notes=f"LogIX {logix.__version__} LoRA init={args.init} rank={args.rank}, hessian={args.hessian}, "
                       "damping 0.1 × mean eigenvalue, dot")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

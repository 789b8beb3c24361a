"""Stage 6c, selection: which pool rows to train on for a target task.

- `less`: LESS targeted data selection (warm-up, Adam-preconditioned LoRA features, matching, selection,
  fine-tuning, evaluation).
- `prefilter`: a cheap learned pre-filter that predicts LESS scores from a forward pass.
"""

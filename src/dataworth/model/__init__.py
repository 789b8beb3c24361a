"""Stage 2, model: load, train, generate, and read what training leaves behind.

- `load`: models and tokenizers from HF directories, the HF cache, GGUF files, LoRA adapters; fingerprints.
- `train`: the tiny from-scratch LM and fine-tuning (full or LoRA), one AdamW loop (`train_epochs`).
- `optimizer`: the AdamW state a checkpoint keeps (moments, step, η̄) and what is computed from it: LESS's
  Adam update direction, the final state for one-step effects, TrackStar's second-moment estimates.
- `losses`: the one no-grad loop over batches (per-example losses, hidden states).
- `generate`: greedy / sampled responses to prompts → query JSONL.
"""

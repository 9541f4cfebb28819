"""compress.py: a strategy is a list of steps (export, quantize, later prune) that turn the fine-tuned
checkpoint into an exported static model with a manifest saying what is inside and how it was made."""

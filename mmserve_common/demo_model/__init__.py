"""The built-in demo checkpoint: a tiny Gemma 4 trained on generated data (see ``tiny-gemma4-demo/CARD.md``)."""

"""Where the shipped demo checkpoint lives (inside the package, so an installed wheel has it too)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "tiny-gemma4-demo"
# its MTP drafter (``python -m tests.tooling.demo_training.drafter``), distilled from it
DRAFTER_DIR = Path(__file__).resolve().parent / "tiny-gemma4-demo-drafter"


def demo_checkpoint() -> Path:
    """The trained demo checkpoint; a clear error if this copy of mmserve was built without it."""
    if not (CHECKPOINT_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"no demo checkpoint at {CHECKPOINT_DIR}: run `mmserve-train-demo` to build it")
    return CHECKPOINT_DIR

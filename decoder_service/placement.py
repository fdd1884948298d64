"""Checks that a prompt's placement spans and embeddings fit together exactly.

Why: ``masked_scatter`` in mlx-vlm wraps around silently when rows and
placeholders disagree, and a misplaced block silently degrades answers.  So
every span is checked before any MLX work, with messages that say precisely
what was wrong: ids in the span must all be the modality's placeholder id,
the span length must equal the embedding rows, spans must be in order and not
overlap, and no placeholder may be left without embeddings.  Pure Python /
numpy, any thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmserve_core.wire import types as T
from mmserve_core.wire.errors import FailedPrecondition, InvalidArgument


def validate_prompt(
    ids: Sequence[int],
    spans: Sequence[tuple[T.Span, str, tuple[int, ...]]],
    *,
    placeholder_ids: dict[str, int],
    all_placeholder_ids: dict[str, int] | None = None,
    vocab_size: int,
    hidden_size: int,
    context_length: int,
) -> None:
    """Raise ``InvalidArgument`` unless ``ids`` and ``spans`` are consistent.

    ``spans`` holds ``(span, dtype, tensor_shape)`` as declared by the caller;
    ``placeholder_ids`` are the modalities this decoder serves, and
    ``all_placeholder_ids`` every placeholder the checkpoint declares (video,
    or a modality without its tower): none of them may stand outside a span.
    """
    arr = _checked_ids(ids, vocab_size, context_length)
    covered = np.zeros(len(arr), dtype=bool)
    prev_end = 0
    for i, (span, _dtype, shape) in enumerate(spans):
        prev_end = _check_span(f"spans[{i}]", span, shape, arr, prev_end, placeholder_ids, hidden_size)
        covered[span.offset:prev_end] = True
    for modality, pid in {**(all_placeholder_ids or {}), **placeholder_ids}.items():
        loose = np.nonzero((arr == pid) & ~covered)[0]
        if loose.size:
            raise InvalidArgument(
                f"prompt has {loose.size} {modality} placeholder token(s) (id {pid}) outside any span, "
                f"first at position {int(loose[0])}"
            )


def _checked_ids(ids: Sequence[int], vocab_size: int, context_length: int) -> np.ndarray:
    n = len(ids)
    if n == 0:
        raise InvalidArgument("prompt_token_ids is empty")
    if n >= context_length:
        raise InvalidArgument(
            f"prompt has {n} tokens; the context length is {context_length}, leaving no room to generate"
        )
    arr = np.asarray(ids, dtype=np.int64)
    bad = np.nonzero((arr < 0) | (arr >= vocab_size))[0]
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"prompt_token_ids[{i}] = {int(arr[i])} is outside the vocabulary [0, {vocab_size})"
        )
    return arr


def _check_span(what: str, span: T.Span, shape: tuple[int, ...], arr: np.ndarray, prev_end: int,
                placeholder_ids: dict[str, int], hidden_size: int) -> int:
    """One span against the prompt and its declared tensor; returns where it ends."""
    n = len(arr)
    if span.modality not in placeholder_ids:
        raise FailedPrecondition(f"{what}: this model has no {span.modality} placeholder token")
    if span.length == 0:
        raise InvalidArgument(f"{what}: length is 0")
    end = span.offset + span.length
    if end > n:
        raise InvalidArgument(f"{what}: [{span.offset}, {end}) runs past the end of the {n}-token prompt")
    if span.offset < prev_end:
        raise InvalidArgument(
            f"{what}: starts at {span.offset}, overlapping or before the previous span ending at {prev_end}"
        )
    want = placeholder_ids[span.modality]
    wrong = np.nonzero(arr[span.offset:end] != want)[0]
    if wrong.size:
        j = span.offset + int(wrong[0])
        raise InvalidArgument(
            f"{what}: prompt_token_ids[{j}] = {int(arr[j])}, expected the {span.modality} "
            f"placeholder id {want} throughout [{span.offset}, {end})"
        )
    if len(shape) != 2:
        raise InvalidArgument(f"{what}: embedding shape {list(shape)} must be [rows, hidden]")
    if shape[0] != span.length:
        raise InvalidArgument(f"{what}: span length {span.length} != embedding rows {shape[0]}")
    if shape[1] != hidden_size:
        raise InvalidArgument(f"{what}: embedding width {shape[1]} != the model's hidden size {hidden_size}")
    return end

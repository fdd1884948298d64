"""Write a tiny, seeded, random-weight Gemma 4 checkpoint on the real mlx-vlm schema.

Why: real Gemma 4 weights cannot be downloaded in CI or on air-gapped machines,
yet every loading, placement and stopping bug we care about lives in the code a
real checkpoint goes through.  So the checkpoint written here is a *real*
``mlx_vlm.models.gemma4`` checkpoint — ``config.json`` parsed by mlx-vlm's own
``ModelConfig``, parameter names taken from an instantiated ``gemma4.Model``
(``mlx_vlm.load(..., strict=True)`` accepts it), safetensors on disk, a
tokenizer carrying the Gemma 4 special tokens and a chat template that renders
media placeholders inside the user turn — only the sizes are tiny.

It is deliberately faithful where bugs hide:

* the tokenizer's own EOS is only ``<eos>`` (1); ``config.json`` declares
  ``[1, 106, 50]`` and ``generation_config.json`` the subset ``[1, 106]``, so only
  the union of all three stops on ``<|tool_response>`` (50);
* multimodal ids are *not* the real Gemma 4 ids: they are whatever config.json
  says, so code that hard-codes 258880 breaks here;
* the audio projector's input width (48) differs from the text hidden size.

Variants (``--variant``) exercise the decoder input shapes Gemma 4 ships in:

* ``e2b``   — per-layer inputs (PLE), KV-shared layers, vision + audio towers;
* ``moe``   — 26B-A4B-like: MoE block, bidirectional attention over image
  tokens (``mm_token_type_ids``), no PLE, vision only (no audio tower);
* ``dense`` — 31B-like: ``attention_k_eq_v``, bidirectional vision, no PLE,
  vision only;
* ``unified`` — the 12B unified (encoder-free) shape, ``mlx_vlm.models.gemma4_unified``:
  no towers — 48×48-pixel patches through ``vision_embedder`` + ``embed_vision``, raw
  16 kHz samples (640 a token) into ``embed_audio`` — a dense-like LM with
  ``attention_k_eq_v`` and bidirectional vision, and the audio end token named
  ``eoa_token_index`` as mlx-vlm's config class names it.

``--drafter-for TARGET`` writes instead a random Gemma 4 MTP assistant drafter for the checkpoint
in TARGET (``gemma4_assistant``, or ``gemma4_unified_assistant`` for a unified target): a 2-layer
kv-shared-only stack reading the target's last sliding and full-attention K/V, the fields it must
share with the target copied from TARGET's config — ``mlx_vlm.speculative.drafters.load_drafter``
loads it.  Random drafts are almost always rejected: mechanics tests only.

Runs on whichever thread calls it (CLI helper; not used by the services).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from tests.tooling.tiny_template import CHAT_TEMPLATE

# ids 0..255: special / reserved block; 256..511: the 256 byte tokens.
SPECIAL: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",  # real Gemma 4 id; in config.json's EOS list
    51: "<tool_response|>",
    52: '<|"|>',  # the string delimiter inside tool declarations, calls and results
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",  # real Gemma 4 id
    106: "<turn|>",  # real Gemma 4 id: end of turn, must stop generation
    # Multimodal tokens, remapped into the small vocab (real ids are
    # 255999/256000/258880..258883): always read them from config.json.
    249: "<|video|>",
    250: "<|image>",  # begin of image
    251: "<|audio>",  # begin of audio
    252: "<|image|>",  # image soft-token placeholder
    253: "<|audio|>",  # audio soft-token placeholder
    254: "<image|>",  # end of image
    255: "<audio|>",  # end of audio
}
IDS = {v: k for k, v in SPECIAL.items()}
BYTE_OFFSET = 256
VOCAB_SIZE = 512

CONFIG_EOS = [IDS["<eos>"], IDS["<turn|>"], IDS["<|tool_response>"]]
GENERATION_CONFIG_EOS = [IDS["<eos>"], IDS["<turn|>"]]

EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "video_token": "<|video|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
}

VARIANTS = ("e2b", "moe", "dense", "unified")


def _text_config(variant: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "hidden_size_per_layer_input": 0,
        "vocab_size": VOCAB_SIZE,
        "vocab_size_per_layer_input": VOCAB_SIZE,
        "sliding_window": 64,
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_k_eq_v": False,
        "use_bidirectional_attention": None,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "rope_parameters": {
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    }
    if variant == "e2b":
        cfg.update(
            num_kv_shared_layers=2,  # last layers reuse earlier layers' KV
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=16,  # per-layer embeddings from ids
        )
    elif variant == "moe":
        cfg.update(
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            use_bidirectional_attention="vision",
        )
    elif variant in ("dense", "unified"):
        cfg.update(
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            use_bidirectional_attention="vision",
        )
    else:  # pragma: no cover - argparse restricts choices
        raise ValueError(f"unknown variant {variant!r}")
    return cfg


def _shared_fields(image_soft_tokens: int) -> dict[str, Any]:
    """The top-level token ids and sizes every variant's config.json carries."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "image_token_id": IDS["<|image|>"],
        "audio_token_id": IDS["<|audio|>"],
        "video_token_id": IDS["<|video|>"],
        "boi_token_id": IDS["<|image>"],
        "eoi_token_id": IDS["<image|>"],
        "boa_token_id": IDS["<|audio>"],
        "eoa_token_id": IDS["<audio|>"],
        "bos_token_id": IDS["<bos>"],
        "pad_token_id": IDS["<pad>"],
        "eos_token_id": list(CONFIG_EOS),
        "vision_soft_tokens_per_image": image_soft_tokens,
        "audio_ms_per_token": 40,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    }


def _unified_config(image_soft_tokens: int) -> dict[str, Any]:
    """config.json of the encoder-free unified shape: embedders, no towers (mlx-vlm's field names)."""
    text = _text_config("unified")
    text["model_type"] = "gemma4_unified_text"
    # a window past the tests' media prompts (the real one is 1,024): a wrapped window cannot be trimmed
    # back for reuse (issue 26), and the prefix-cache test here needs a conversation it can reuse
    text["sliding_window"] = 512
    return {
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "model_type": "gemma4_unified",
        "text_config": text,
        "vision_config": {"model_type": "gemma4_unified_vision", "patch_size": 16, "pooling_kernel_size": 3,
                          "model_patch_size": 48, "mm_embed_dim": 32, "mm_posemb_size": 1120,
                          "num_soft_tokens": image_soft_tokens, "output_proj_dims": 32, "rms_norm_eps": 1e-6},
        "audio_config": {"model_type": "gemma4_unified_audio", "audio_samples_per_token": 640,
                         "audio_embed_dim": 640, "hidden_size": 640, "output_proj_dims": 640,
                         "rms_norm_eps": 1e-6},
        **{k: v for k, v in _shared_fields(image_soft_tokens).items() if k != "eoa_token_id"},
        "eoa_token_index": IDS["<audio|>"],  # not eoa_token_id: the name the unified config uses
        "vision_soft_tokens_per_video_frame": 70,
    }


def tiny_config(variant: str = "e2b", image_soft_tokens: int = 280) -> dict[str, Any]:
    """Return config.json for a tiny checkpoint of the given variant."""
    if variant == "unified":
        return _unified_config(image_soft_tokens)
    vision_config = {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 16,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "default_output_length": image_soft_tokens,
        "position_embedding_size": 256,
        "use_clipped_linears": variant == "e2b",
        "standardize": False,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
    }
    audio_config = None
    if variant == "e2b":
        audio_config = {
            "model_type": "gemma4_audio",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "hidden_act": "silu",
            "subsampling_conv_channels": [8, 4],
            "conv_kernel_size": 5,
            "residual_weight": 0.5,
            "attention_chunk_size": 12,
            "attention_context_left": 13,
            "attention_context_right": 0,
            "attention_logit_cap": 50.0,
            "attention_invalid_logits_value": -1e9,
            "use_clipped_linears": True,
            "rms_norm_eps": 1e-6,
            "gradient_clipping": 10000000000.0,
            "output_proj_dims": 48,  # != text hidden, so shape bugs surface
        }
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": _text_config(variant),
        "vision_config": vision_config,
        "audio_config": audio_config,
        **_shared_fields(image_soft_tokens),
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet (byte -> printable char)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _write_tokenizer(out: Path, variant: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {SPECIAL.get(i, f"<unused{i}>"): i for i in range(BYTE_OFFSET)}
    for byte, ch in _bytes_to_unicode().items():
        vocab[ch] = BYTE_OFFSET + byte  # byte b has id 256 + b ("\n" -> 266)
    assert len(vocab) == VOCAB_SIZE

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(SPECIAL[i], special=True, normalized=False) for i in sorted(SPECIAL)]
    )
    # No BOS post-processor, like the real gemma-4-*-it tokenizers: the chat
    # template emits <bos> itself.
    tok.save(str(out / "tokenizer.json"))

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",  # the tokenizer's own EOS is only <eos>
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "padding_side": "left",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": EXTRA_SPECIAL_TOKENS,
        "processor_class": "Gemma4UnifiedProcessor" if variant == "unified" else "Gemma4Processor",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    special_map = {
        k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _write_processor_config(out: Path, image_soft_tokens: int, variant: str) -> None:
    if variant == "unified":
        _write_unified_processor_config(out, image_soft_tokens)
        return
    proc = {
        "processor_class": "Gemma4Processor",
        "image_seq_length": image_soft_tokens,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": {
            "image_processor_type": "Gemma4ImageProcessor",
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": False,
            "patch_size": 16,
            "max_soft_tokens": image_soft_tokens,
            "pooling_kernel_size": 3,
        },
        "feature_extractor": {
            "feature_extractor_type": "Gemma4AudioFeatureExtractor",
            "feature_size": 128,
            "sampling_rate": 16000,
            "frame_length_ms": 20.0,
            "hop_length_ms": 10.0,
            "min_frequency": 0.0,
            "max_frequency": 8000.0,
            "mel_floor": 0.001,
            "padding_value": 0.0,
        },
        "video_processor": {"max_soft_tokens": 70, "patch_size": 16, "pooling_kernel_size": 3},
    }
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))


def _write_unified_processor_config(out: Path, image_soft_tokens: int) -> None:
    """The unified processor's settings: 48-pixel model patches, 640-sample audio frames."""
    patches = {"patch_size": 16, "pooling_kernel_size": 3, "model_patch_size": 48}
    proc = {
        "processor_class": "Gemma4UnifiedProcessor",
        "image_seq_length": image_soft_tokens,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": {"image_processor_type": "Gemma4UnifiedImageProcessor", "do_resize": True,
                            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
                            "max_soft_tokens": image_soft_tokens, **patches},
        "feature_extractor": {"feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor",
                              "feature_size": 640, "sampling_rate": 16000, "padding_value": 0.0,
                              "audio_samples_per_token": 640},
        "video_processor": {"video_processor_type": "Gemma4UnifiedVideoProcessor", "max_soft_tokens": 70,
                            **patches},
    }
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))


# the fields an assistant drafter must share with its target's text config (``decoder_service.drafter``)
_DRAFTER_SHARED = ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads", "num_global_key_value_heads",
                   "attention_k_eq_v", "rope_parameters", "sliding_window", "rms_norm_eps", "hidden_activation",
                   "final_logit_softcapping", "max_position_embeddings")


def drafter_config(target: dict[str, Any], *, hidden_size: int = 32, layers: int = 2,
                   block_size: int = 4) -> dict[str, Any]:
    """config.json of an MTP assistant drafter for the target checkpoint config ``target``."""
    tc = target["text_config"]
    text = {k: tc[k] for k in _DRAFTER_SHARED if k in tc}
    text.update(model_type="gemma4_text", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers,
                layer_types=["sliding_attention" if (layers - 1 - i) % 2 else "full_attention" for i in range(layers)],
                num_attention_heads=2, num_kv_shared_layers=layers, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=tc["vocab_size"], tie_word_embeddings=True,
                use_double_wide_mlp=False, enable_moe_block=False)
    unified = target["model_type"] == "gemma4_unified"
    return {"model_type": "gemma4_unified_assistant" if unified else "gemma4_assistant",
            "backbone_hidden_size": tc["hidden_size"], "use_ordered_embeddings": False,
            "tie_word_embeddings": True, "block_size": block_size, "text_config": text}


def write_tiny_drafter(out: str | Path, target: str | Path, *, seed: int = 0, dtype: str = "float32",
                       block_size: int = 4, **sizes: int) -> Path:
    """Write a random drafter for the checkpoint in ``target`` into ``out`` (replaced)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = drafter_config(json.loads((Path(target) / "config.json").read_text()), block_size=block_size,
                            **sizes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(out, config, seed, dtype)
    return out


def _model_for(config: dict[str, Any]):
    """An instantiated mlx-vlm model of ``config``'s shape (the parameter names and shapes to write)."""
    if config["model_type"] in ("gemma4_assistant", "gemma4_unified_assistant"):
        from mlx_vlm.speculative.drafters.gemma4_assistant import Gemma4AssistantDraftModel
        from mlx_vlm.speculative.drafters.gemma4_assistant.config import Gemma4AssistantConfig

        return Gemma4AssistantDraftModel(Gemma4AssistantConfig.from_dict(config))
    if config["model_type"] == "gemma4_unified":
        from mlx_vlm.models import gemma4_unified

        return gemma4_unified.Model(gemma4_unified.ModelConfig.from_dict(config))
    from mlx_vlm.models import gemma4

    model_config = gemma4.ModelConfig.from_dict(config)
    model_config.text_config = gemma4.TextConfig.from_dict(config["text_config"])
    model_config.vision_config = gemma4.VisionConfig.from_dict(config["vision_config"])
    if config.get("audio_config") is not None:
        model_config.audio_config = gemma4.AudioConfig.from_dict(config["audio_config"])
    return gemma4.Model(model_config)


def _write_weights(out: Path, config: dict[str, Any], seed: int, dtype: str, clip_bound: float = 8.0) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    model = _model_for(config)

    target = getattr(mx, dtype)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("input_min", "output_min"):
            w = mx.array(-clip_bound)  # finite clip bounds, as real checkpoints have
        elif leaf in ("input_max", "output_max"):
            w = mx.array(clip_bound)
        elif p.ndim == 1 or leaf == "layer_scalar":
            w = mx.ones(p.shape) + 0.02 * mx.random.normal(p.shape)
            if leaf == "bias" or "per_dim_scale" in name:
                w = 0.02 * mx.random.normal(p.shape)
        else:
            fan_in = p.shape[-1] if p.ndim >= 2 else 1
            # A small embedding std keeps a tied-embedding random model from
            # repeating the last prompt token forever.
            std = 0.05 if "embed_tokens" in name else (1.0 / max(fan_in, 1)) ** 0.5
            if "position_embedding_table" in name or "pos_embedding" in name:
                std = 0.02
            w = std * mx.random.normal(p.shape)
        weights[name] = w.astype(target)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return sum(int(v.size) for v in weights.values())


def write_tiny_checkpoint(
    out: str | Path,
    *,
    variant: str = "e2b",
    seed: int = 0,
    dtype: str = "bfloat16",
    image_soft_tokens: int = 280,
    lm_intermediate_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    clip_bound: float = 8.0,
    chat_template: str | None = None,
) -> Path:
    """Write the checkpoint into ``out`` (replaced if present) and return its path.

    ``chat_template``: the Jinja text to ship instead of the generated one (the real Gemma 4
    templates in ``../shared/fixtures/gemma4/``), so prompts render as on a real checkpoint.

    ``lm_intermediate_size`` widens the language model's MLPs only (towers
    unchanged): a checkpoint whose LM dwarfs its towers, for memory checks.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = tiny_config(variant, image_soft_tokens)
    if lm_intermediate_size:
        config["text_config"]["intermediate_size"] = int(lm_intermediate_size)
    if overrides:
        _deep_update(config, overrides)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {
        "bos_token_id": IDS["<bos>"],
        "pad_token_id": IDS["<pad>"],
        "eos_token_id": list(GENERATION_CONFIG_EOS),
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    _write_tokenizer(out, variant)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template)
    _write_processor_config(out, image_soft_tokens, variant)
    _write_weights(out, config, seed, dtype, clip_bound)
    return out


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to write (replaced if it exists)")
    ap.add_argument("--variant", default="e2b", choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--image-soft-tokens", type=int, default=280)
    ap.add_argument("--lm-intermediate-size", type=int, default=None,
                    help="widen the LM's MLPs (a big-LM, small-tower checkpoint for memory checks)")
    ap.add_argument("--chat-template", default=None,
                    help="a Jinja file to ship as the chat template (e.g. a real Gemma 4 template)")
    ap.add_argument("--drafter-for", default=None, metavar="TARGET",
                    help="write a random MTP assistant drafter for the checkpoint in TARGET instead")
    args = ap.parse_args(argv)
    if args.drafter_for:
        out = write_tiny_drafter(args.out, args.drafter_for, seed=args.seed, dtype=args.dtype)
        print(f"wrote {out} (drafter for {args.drafter_for}, {args.dtype})")
        return
    out = write_tiny_checkpoint(
        args.out,
        variant=args.variant,
        seed=args.seed,
        dtype=args.dtype,
        image_soft_tokens=args.image_soft_tokens,
        lm_intermediate_size=args.lm_intermediate_size,
        chat_template=Path(args.chat_template).read_text() if args.chat_template else None,
    )
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({args.variant}, {args.dtype}): {total} bytes on disk")


if __name__ == "__main__":
    main()

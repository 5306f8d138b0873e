"""sd_unet: the UNet of a Stable Diffusion pipeline (diffusers UNet2DConditionModel).

Traced with example latents, a timestep and text embeddings (plus SDXL's pooled text
embedding and time ids when the UNet has them). Calibration and evaluation samples
pair prompts from local files (data.format=prompts) with seeded latents and
timesteps; the text embeddings come from the pipeline's own text encoder(s) when
the source is a whole pipeline, else seeded Gaussian embeddings of the right shape
(the metrics say which). Evaluation is the PSNR of the UNet's output against the
float UNet, the signal-integrity measure of Apple's mixed-bit recipes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch

from coreml_pipeline.config.schema import ModelConfig, check_positive_int
from coreml_pipeline.families import register
from coreml_pipeline.families.base import Family, probe_loss

log = logging.getLogger("pipeline.sd_unet")
TRAIN_TIMESTEPS = 1000


class NoisePrediction(torch.nn.Module):
    """(latents, timestep, text embeddings[, text_embeds, time_ids]) -> the UNet's output."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.model = unet
        self.sdxl = unet.config.addition_embed_type == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


@dataclass
class SDUNetConfig(ModelConfig):
    family: str = "sd_unet"
    source: Optional[str] = None
    # The UNet's folder inside a pipeline directory or hub repo (null: "unet" when
    # source holds a model_index.json, else source is the UNet itself).
    subfolder: Optional[str] = None
    # Latent height/width traced and evaluated (null: the UNet's sample_size), and
    # text-embedding length (CLIP's 77 tokens).
    latent_size: Optional[int] = None
    text_len: int = 77

    def check(self, prefix: str = "model") -> None:
        super().check(prefix)
        check_positive_int(f"{prefix}.text_len", self.text_len)
        if self.latent_size is not None:
            check_positive_int(f"{prefix}.latent_size", self.latent_size)

    def local_source_root(self) -> Path:
        return Path(self.source).expanduser() / (self.subfolder or "")


@register
class SDUNet(Family):
    name = "sd_unet"
    config = SDUNetConfig
    data_formats = ("prompts",)
    output_name = "noise_pred"

    def _location(self) -> tuple[str, str | None]:
        from coreml_pipeline.model import resolve_source

        source = resolve_source(self.cfg.source)
        subfolder = self.cfg.subfolder
        if subfolder is None and (Path(source) / "model_index.json").is_file():
            subfolder = "unet"
        return source, subfolder

    def load_float(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        source, subfolder = self._location()
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder=subfolder)
        except (OSError, ValueError, KeyError) as exc:
            raise self.config_error("not a diffusers UNet2DConditionModel that loads offline", exc) from None
        return unet.eval()

    def weights_location(self) -> str:
        source, subfolder = self._location()
        return str(Path(source) / subfolder) if subfolder and Path(source).is_dir() else source

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return NoisePrediction(module)

    def _is_pipeline(self) -> bool:
        """A whole pipeline folder (model_index.json) rather than a UNet alone."""
        source, subfolder = self._location()
        return subfolder is not None and (Path(source) / "model_index.json").is_file()

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Input shapes, read once from the UNet's config."""
        from diffusers import UNet2DConditionModel

        source, subfolder = self._location()
        config = UNet2DConditionModel.load_config(source, subfolder=subfolder)
        size = self.cfg.latent_size or config["sample_size"]
        shapes = {"sample": (1, config["in_channels"], size, size), "timestep": (1,),
                  "encoder_hidden_states": (1, self.cfg.text_len, config["cross_attention_dim"])}
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            shapes.update(text_embeds=(1, pooled), time_ids=(1, 6))
        return shapes

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        sample = self._sample(0, None)
        sample.pop("probe_seed")
        return sample

    def _sample(self, seed: int, text: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        shapes = self._shapes
        generator = torch.Generator().manual_seed(seed)
        sample = {
            "sample": torch.randn(shapes["sample"], generator=generator),
            "timestep": torch.randint(0, TRAIN_TIMESTEPS, (1,), generator=generator).float(),
            "encoder_hidden_states": torch.randn(shapes["encoder_hidden_states"], generator=generator),
        }
        if "time_ids" in shapes:
            pixels = shapes["sample"][-1] * 8  # the VAE's scale factor: SDXL's original/target size
            sample["text_embeds"] = torch.randn(shapes["text_embeds"], generator=generator)
            sample["time_ids"] = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32)
        if text is not None:
            sample.update(text)
        sample["probe_seed"] = torch.tensor(seed)
        return sample

    def _prompts(self, file_name: str) -> list[str]:
        lines = (Path(self.data.dir) / file_name).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]

    def text_embeddings(self, prompts: list[str]) -> list[dict[str, torch.Tensor]] | None:
        """Each prompt encoded by the pipeline's own text encoder(s) (diffusers'
        encode_prompt), or None when the source is a UNet alone."""
        if not self._is_pipeline():
            return None
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        pipe = DiffusionPipeline.from_pretrained(self._location()[0], unet=None, vae=None, safety_checker=None,
                                                 feature_extractor=None, image_encoder=None)
        out = []
        with torch.no_grad():
            for prompt in prompts:
                encoded = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
                text = {"encoder_hidden_states": encoded[0][:, :self.cfg.text_len]}
                if len(encoded) == 4:  # SDXL: (embeds, negative embeds, pooled, negative pooled)
                    text["text_embeds"] = encoded[2]
                out.append(text)
        return out

    def _samples(self, file_name: str, limit: int | None, first_seed: int) -> list[dict]:
        prompts = self._prompts(file_name)[:limit]
        texts = self.text_embeddings(prompts)
        if texts is None:
            log.warning("model.source is a UNet without its pipeline: text embeddings are seeded Gaussian noise")
        return [self._sample(first_seed + index, None if texts is None else texts[index])
                for index in range(len(prompts))]

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict]:
        return self._samples(self.data.calibration_file, num_samples, first_seed=1000 * (seed + 1))

    def eval_samples(self) -> list[dict]:
        return self._samples(self.data.eval_file, self.data.eval_max_pairs, first_seed=0)

    def text_source(self) -> str:
        return "pipeline text encoder" if self._is_pipeline() else "seeded Gaussian (no text encoder in model.source)"

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        device = next(module.parameters()).device
        output = self.call(self.wrap(module), sample, device)
        return probe_loss(output, int(sample["probe_seed"]))

    def reference_metrics(self, reference: dict[str, torch.Tensor], samples: list[dict]) -> dict[str, Any]:
        return {"text_embeddings": self.text_source()}

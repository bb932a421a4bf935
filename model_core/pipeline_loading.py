"""How a PyramidFlowPipeline is loaded and saved: the published checkpoints' official layout (local or from the hub)
or a folder `save_pretrained` wrote, with the memory options (offload, quantisation, VAE tiling) and the speed
options (attention backend, compile) applied as the models are placed on the device."""
import json
from pathlib import Path
from typing import Optional

from .checkpoints import SETTINGS_FILE, describe
from .loading import load_model, resolve_checkpoint
from .memory import (
    apply_fp8,
    bitsandbytes_configs,
    check_memory_options,
    quantize_linear_int8_cpu,
    resolve_device,
    resolve_dtype,
    uses_bitsandbytes,
)
from .scheduler import PyramidFlowScheduler
from .speed import apply_speed_options, check_speed_options
from .text import PROMPT_ENCODERS
from .transformers import PyramidFluxTransformer, PyramidMMDiT
from .vae import CausalVideoVAE
from .weight_files import MODEL_BUILD_LOCK

MODEL_INDEX = "model_index.json"
CUSTOM_PIPELINE_MODULE = (  # what `save_pretrained` writes as pipeline.py, for DiffusionPipeline(custom_pipeline=...)
    '''"""Pyramid Flow Studio's pipeline, for `DiffusionPipeline.from_pretrained(<folder>, custom_pipeline=<folder>, trust_remote_code=True)`."""\n'''
    "from model_core.pipeline import PyramidFlowPipeline  # noqa: F401\n"
)


class PipelineLoading:
    """`from_pretrained` and `save_pretrained` of PyramidFlowPipeline (a mixin before DiffusionPipeline)."""

    @classmethod
    def from_pretrained(cls, source, variant: str = "auto", model: str = "auto", torch_dtype="float32", device=None,
                        offload: str = "none", quantize: str = "none", vae_tiling: bool = False, lora=None,
                        official_defaults: Optional[bool] = None, attention_backend: str = "native", compile: bool = False,
                        tqdm_class=None, parallel=None):
        """Load a checkpoint folder or hub repo id (only the needed subfolders are fetched).

        offload: none | model | sequential | group; quantize: none | int8 | nf4 | fp8 (see model_core.memory);
        lora: LoRAs for the transformer, loaded with `load_lora_weights`: a folder with (what `training` writes for
        recipe lora.yaml) or a path to diffusers' pytorch_lora_weights.safetensors, a peft adapter folder, a hub repo
        id, a (source, weight) pair, or a list of them;
        official_defaults: generate as the authors' code does (prompt suffix, default negative prompt, guidance when the
        scale is > 0, uint8 by truncation, timesteps in the compute dtype); None turns it on for the published
        checkpoints (those without our `pyramid_flow.json`) and off for our own models.
        parallel: split each generation over the ranks of the initialised process group (see `enable_parallelism`).
        attention_backend: native | flex | flash | flash_varlen | sage | sage_varlen where installed (see
        model_core.transformers.attention_backends); compile: torch.compile the transformer's repeated blocks.
        The step cache is chosen per call (`cache`, `cache_threshold`); a call that names none uses the one set with
        `pipe.transformer.enable_cache(FirstBlockCacheConfig(...))` (or TaylorSeer / MagCache), else the model's.
        """
        device, dtype = resolve_device(device), resolve_dtype(torch_dtype)
        check_memory_options(device, dtype, offload, quantize)
        check_speed_options(device, dtype, attention_backend, compile)
        root = Path(source).expanduser()
        if (root / MODEL_INDEX).is_file():
            pipe = cls._from_saved_pipeline(root, device, dtype, quantize, official_defaults)
        else:
            pipe = cls._from_official_layout(source, variant, model, device, dtype, quantize, official_defaults, tqdm_class)
        pipe.compute_dtype = dtype
        pipe.load_loras(lora)  # before quantization and offload hooks change the layers
        pipe._apply_memory_options(device, dtype, offload, quantize, vae_tiling)
        pipe.settings_base.update(apply_speed_options(pipe.transformer, device, dtype, attention_backend, compile))
        if parallel is not None:
            pipe.enable_parallelism(parallel)
        return pipe

    @classmethod
    def _from_official_layout(cls, source, variant, model, device, dtype, quantize, official_defaults, tqdm_class):
        """The published checkpoints' layout (causal_video_vae/, diffusion_transformer_<variant>/, text folders),
        local or fetched from the hub; bitsandbytes quantisation is applied while loading."""
        checkpoint = resolve_checkpoint(source, variant, model, tqdm_class=tqdm_class)
        transformer_class = PyramidMMDiT if checkpoint.family.name == "sd3" else PyramidFluxTransformer
        dit_quant, t5_quant = bitsandbytes_configs(quantize, dtype) if uses_bitsandbytes(quantize, device) else (None, None)
        extra = {"quantization_config": dit_quant, "device_map": {"": device}} if dit_quant else {}
        transformer = load_model(transformer_class, checkpoint.transformer_path, dtype, **extra)
        vae = load_model(CausalVideoVAE, checkpoint.vae_path, dtype)
        prompt_encoder = PROMPT_ENCODERS[checkpoint.family.name].from_pretrained(
            checkpoint.root, torch_dtype=dtype, t5_quantization_config=t5_quant, device=device if t5_quant else None
        )
        components = {**prompt_encoder.encoders, **{k.replace("text_encoder", "tokenizer"): v for k, v in prompt_encoder.tokenizers.items()}}
        scheduler = PyramidFlowScheduler(stage_grid=checkpoint.family.sampling.stage_grid)
        pipe = cls(vae=vae, transformer=transformer, scheduler=scheduler, **components)
        pipe.checkpoint = checkpoint
        pipe.source = str(source)
        pipe.official_defaults = not (checkpoint.root / SETTINGS_FILE).is_file() if official_defaults is None else bool(official_defaults)
        pipe.register_to_config(pyramid_flow={**describe(checkpoint.family, checkpoint.variant),
                                              "official_defaults": pipe.official_defaults})
        return pipe

    @classmethod
    def _from_saved_pipeline(cls, root: Path, device, dtype, quantize, official_defaults):
        """A folder written by `save_pretrained` (diffusers layout: model_index.json and a folder per component)."""
        facts = json.loads((root / MODEL_INDEX).read_text()).get("pyramid_flow")
        if not isinstance(facts, dict):
            raise ValueError(f"{root / MODEL_INDEX} was not written by PyramidFlowPipeline.save_pretrained (no 'pyramid_flow' entry)")
        quantization = None
        if uses_bitsandbytes(quantize, device):
            from diffusers import PipelineQuantizationConfig

            t5 = PROMPT_ENCODERS[facts["family"]].t5_folder
            dit_quant, t5_quant = bitsandbytes_configs(quantize, dtype)
            quantization = PipelineQuantizationConfig(quant_mapping={"transformer": dit_quant, t5: t5_quant})
        with MODEL_BUILD_LOCK:
            pipe = super().from_pretrained(root, dtype=dtype, quantization_config=quantization)
        pipe.source = str(root)
        if official_defaults is not None:
            pipe.official_defaults = bool(official_defaults)
            pipe.register_to_config(pyramid_flow={**facts, "official_defaults": pipe.official_defaults})
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Save in diffusers' layout (model_index.json, a folder per component) with a `pipeline.py` beside it, so
        `PyramidFlowPipeline.from_pretrained(dir)` and `DiffusionPipeline.from_pretrained(dir, custom_pipeline=dir)`
        both load it back. The published checkpoints' official layout stays the one `from_pretrained` reads from the hub."""
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(CUSTOM_PIPELINE_MODULE)

    def _apply_memory_options(self, device, dtype, offload, quantize, vae_tiling):
        t5 = self.prompt_encoder.encoders[self.prompt_encoder.t5_folder]
        fp8 = None
        if quantize == "fp8":  # the DiT only: T5 casts activations to its weights' storage dtype itself
            fp8 = apply_fp8(self.transformer, dtype, device, offload)
        if quantize == "int8" and device.type == "cpu":
            quantize_linear_int8_cpu(self.transformer)
            quantize_linear_int8_cpu(t5)
        if vae_tiling:
            self.vae.enable_tiling()
        if offload == "model":
            self.enable_model_cpu_offload(device=device)
        elif offload in ("sequential", "group"):
            self._enable_layer_offload(device, offload)
        else:
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(self, name)
                if module is not None and not getattr(module, "is_quantized", False):
                    module.to(device)
        self.settings_base.update(offload=offload, quantize=quantize, vae_tiling=vae_tiling, dtype=str(dtype).replace("torch.", ""))
        if fp8 is not None:
            self.settings_base["fp8"] = fp8  # "compute" (float8 matmuls) or "storage" (float8 weights only)

    def _enable_layer_offload(self, device, offload):
        """Weights stay on the CPU and reach the GPU a layer (`sequential`) or a block (`group`) at a time. The VAE is
        offloaded per layer in both: it runs through encode/decode, which block-level hooks on its forward miss."""
        from diffusers.hooks import apply_group_offloading

        offload_type = "leaf_level" if offload == "sequential" else "block_level"
        blocks = {"num_blocks_per_group": 1} if offload == "group" else {}
        self.enable_group_offload(onload_device=device, offload_type=offload_type, exclude_modules=["vae"], **blocks)
        apply_group_offloading(self.vae, onload_device=device, offload_type="leaf_level")


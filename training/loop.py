"""The training loop: accelerate for devices, mixed precision, gradient accumulation and multi-GPU
(DDP / FSDP / DeepSpeed); AdamW with warmup, clipping and EMA; logs, checkpoints, validation.

Each optimizer step consumes one global batch, split into world x accumulation bins by
`BatchPlanner`. A micro-step's loss is sum(per-sample losses) x world x accumulation / global batch,
so after accelerate's averaging the gradient is the mean over the whole global batch, however the
samples are spread over ranks and micro-steps.
"""
import contextlib
import shutil
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .checkpointing import (
    is_sharded_checkpoint,
    load_sharded_state,
    load_start_weights,
    load_training_state,
    read_state,
    resume_path,
    save_training_state,
    sharded_start,
    write_checkpoint,
    write_sharded_checkpoint,
)
from .annotation_index import AnnotationIndex
from .atomic import fresh_staging
from .config import check_recipe
from .data import AnnotatedDataset
from .ema import EMA
from .logs import Utilisation, peak_memory_gib, progress_bar, trackers
from .packing import BatchPlanner, RankBatches, micro_batching
from .parallel import check_launch, compile_blocks, is_sharded, shard_model, wants_own_fsdp

logger = logging.getLogger(__name__)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def lr_schedule(optimizer, optim: dict, max_steps: int):
    """diffusers' `constant_with_warmup` (Table 4), or with `optim.final_lr_ratio` r < 1 its polynomial decay of
    power 1: linear warmup from 0 over `warmup_steps`, then a line down to r x lr at `max_steps`."""
    ratio = optim.get("final_lr_ratio", 1.0)
    if ratio == 1.0:
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=optim["warmup_steps"])
    return get_polynomial_decay_schedule_with_warmup(optimizer, optim["warmup_steps"], max_steps,
                                                     lr_end=optim["lr"] * ratio, power=1.0)


def build_task(config: dict, annotations: list, device):
    if config.get("task", "flow") == "vae":
        from .vae_objective import VAETask

        return VAETask(config, device)
    if config.get("task") == "distill":
        from .distill_task import DistillTask

        return DistillTask(config, annotations, device)
    from .flow_task import FlowTask

    return FlowTask(config, annotations, device)


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Trainer:
    def __init__(self, config: dict, output_dir: Path, resume=None, allow_batch_change: bool = False):
        self.config, self.output_dir = check_recipe(config), Path(output_dir)
        train, optim = config["train"], config["optim"]
        if train.get("tokens_per_gpu") and train.get("gradient_accumulation_steps") is not None:
            raise ValueError("the recipe gives both train.tokens_per_gpu and train.gradient_accumulation_steps; set one "
                             "(with tokens_per_gpu the accumulation is derived from the number of processes)")
        self.accum = 1 if train.get("tokens_per_gpu") else train.get("gradient_accumulation_steps") or 1  # derived below
        AcceleratorState._reset_state()  # one bundle run trains phases of different precisions; keeps the process group
        self.resume_from = resume_path(self.output_dir, resume)
        resumed = read_state(self.resume_from) if self.resume_from else {"step": 0}
        resumed_step = resumed["step"]
        log_with, tracker_options = trackers(train.get("report_to"), self.output_dir, resumed_step)
        self.accelerator = Accelerator(mixed_precision=train.get("mixed_precision") or "no",  # YAML reads `no` as false
                                       gradient_accumulation_steps=self.accum, log_with=log_with,
                                       project_config=ProjectConfiguration(self.output_dir, self.output_dir))
        self.accelerator.init_trackers("logs", init_kwargs=tracker_options)
        check_launch(self.accelerator)
        if self.accelerator.gradient_accumulation_steps != self.accum:  # e.g. ACCELERATE_GRADIENT_ACCUMULATION_STEPS
            raise ValueError(f"accelerate was set to {self.accelerator.gradient_accumulation_steps} gradient accumulation "
                             f"steps, the recipe to {self.accum}; set it in the recipe (train.gradient_accumulation_steps) "
                             "and not in the accelerate config or environment")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.global_batch, self.max_steps = train["global_batch_size"], train["max_steps"]
        batch = resumed.get("global_batch_size", self.global_batch)
        if batch != self.global_batch and not allow_batch_change:
            raise ValueError(f"{self.resume_from} was trained with global batch {batch}, the recipe now asks for "
                             f"{self.global_batch}; set train.global_batch_size={batch} or pass --allow-batch-change")
        with self.accelerator.local_main_process_first():  # one process per node builds the index, the others read it
            annotations = AnnotationIndex(config["data"]["annotations"])
        model_section, start = sharded_start(config["model"])
        self.config = config = config | {"model": model_section}  # what a sharded checkpoint's recipe.json keeps
        self.task = build_task(config, annotations, self.accelerator.device)
        if start is not None and self.resume_from is None:
            logger.info("starting from the shards of %s (built as its run built the model)", start)
            load_start_weights(self.task.model, start)
        if self.resume_from is not None and not is_sharded_checkpoint(self.resume_from):
            self.task.load(self.resume_from)  # a sharded checkpoint's weights are read with the rest, in `restore`
        planner = BatchPlanner(annotations, config["data"], config["objective"], train["seed"], self.global_batch,
                               self.world * self.accum, self.task.frames_per_latent)
        if train.get("tokens_per_gpu"):
            self.derive_accumulation(planner, train["tokens_per_gpu"])
        model = self.task.model
        self.utilisation = Utilisation(sum(p.numel() for p in model.parameters()), self.accelerator.device, self.world) \
            if config.get("task", "flow") != "vae" else None  # 6 N D is a transformer's count, not a conv VAE's
        own_fsdp = wants_own_fsdp(self.accelerator)
        if train.get("compile_blocks"):
            compile_blocks(model)
        if own_fsdp:  # FSDP2 by hand (training.parallel); on CPUs accelerate would make it DDP
            shard_model(model.to(self.accelerator.device), **self.sharding(train))
        self.autocast = self.accelerator.autocast if own_fsdp else contextlib.nullcontext
        optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=optim["lr"], betas=tuple(optim["betas"]),
                                      eps=optim["eps"], weight_decay=optim["weight_decay"])
        if own_fsdp:
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.sharded = is_sharded(self.model)
        self.lr_scheduler = lr_schedule(self.optimizer.optimizer, optim, self.max_steps)
        self.ema = EMA(trainable(self.unwrapped), train["ema_decay"]) if train.get("ema_decay") else None
        self.step, self.skipped = 0, 0
        if self.resume_from is not None:
            self.restore(load_training_state(self.resume_from))
        dataset = AnnotatedDataset(annotations, config["data"]["buckets"], config["data"]["fps"], self.task.frames_per_latent,
                                   getattr(self.task, "use_latents", False), getattr(self.task, "use_text_features", False))
        self.batches = torch.utils.data.DataLoader(
            dataset, batch_sampler=RankBatches(planner, self.rank, self.world, self.step, self.max_steps),
            num_workers=config["data"].get("num_workers", 0), collate_fn=list,
        )

    def derive_accumulation(self, planner: BatchPlanner, tokens_per_gpu: int) -> None:
        """Accumulation steps from the world size and the per-process token budget (training.packing.micro_batching)."""
        batching = micro_batching(self.global_batch, self.world, tokens_per_gpu, planner.mean_sample_tokens(self.max_steps))
        self.accum = self.accelerator.gradient_accumulation_steps = batching.accumulation
        planner.split_into(self.world * self.accum)
        if self.accelerator.is_main_process:
            logger.info("micro-batches: %s", batching.describe(self.world, self.global_batch))

    def sharding(self, train: dict) -> dict:
        """shard_model's options: per-block units only where every rank runs each block once per micro-step (packed
        samples); bf16 parameters with float32 gradient reduction under bf16 mixed precision."""
        per_block = train.get("fsdp_units", "blocks") == "blocks" and getattr(self.task, "packed", False)
        return dict(per_block=per_block, param_dtype=torch.bfloat16 if train.get("mixed_precision") == "bf16" else None)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def sharded_state(self) -> dict:
        """Model, optimizer and EMA state as this run holds them (this rank's shards under FSDP): what a sharded
        checkpoint stores and what it is read back into."""
        state = {"model": get_model_state_dict(self.model),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer.optimizer)}
        return state | ({"ema": self.ema.tensors()} if self.ema is not None else {})

    def restore(self, saved: dict) -> None:
        if is_sharded_checkpoint(self.resume_from):
            state = load_sharded_state(self.resume_from, self.sharded_state())  # the EMA is filled in place
            set_model_state_dict(self.model, state["model"])
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, state["optimizer"])
        else:
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, saved["optimizer"], options=FULL_STATE)
            if self.ema is not None and saved["ema"] is not None:
                self.ema.load_state_dict(saved["ema"])
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.step = saved["state"]["step"]
        self.skipped = saved["state"]["skipped_samples"] if self.accelerator.is_main_process else 0  # summed over ranks

    def micro_step(self, loaded: list, loss_scale: float) -> dict:
        """Forward and backward of one bin; returns detached sums for the logs."""
        samples = [sample for sample, _ in loaded if sample is not None]
        for _, error in loaded:
            if error is not None:
                self.skipped += 1
                logger.warning("skipping unreadable sample %s", error)
        with self.accelerator.accumulate(self.model), self.autocast():
            if samples:
                out = self.task.losses(self.model, samples, self.step)
                loss_sum = out["loss"].sum()
            else:  # every sample of this bin was unreadable: keep the collectives of all ranks in step
                out = {"loss": torch.zeros(0), "stage": [], "tokens": 0}
                loss_sum = sum(p.sum() for _, p in trainable(self.model)) * 0.0
            self.accelerator.backward(loss_sum * loss_scale)
        return out

    def loss_scale(self, bins: list) -> float:
        """world x accumulation / samples read over all ranks: after accelerate's averaging the gradient is the mean
        over the samples that were read (an unreadable one is left out, not counted as a zero loss)."""
        read = sum(sample is not None for loaded in bins for sample, _ in loaded)
        read = int(self.accelerator.reduce(torch.tensor(read, device=self.accelerator.device), "sum"))
        return self.world * self.accum / read if read else 0.0

    def accumulate(self, bins: list, stages: int) -> torch.Tensor:
        """Forward and backward of this rank's bins of one step; returns its sums for the logs: per-stage
        loss sums and counts, loss, tokens, samples read, samples skipped so far."""
        totals = torch.zeros(2 * stages + 4, dtype=torch.float64)
        scale = self.loss_scale(bins)
        for loaded in bins:
            out = self.micro_step(loaded, scale)
            for loss, stage in zip(out["loss"].detach().double().cpu(), out["stage"]):
                totals[stage] += loss
                totals[stages + stage] += 1
            totals[-4] += float(out["loss"].detach().sum())
            totals[-3] += out["tokens"]
            totals[-2] += len(out["loss"])  # samples read (a VAE's losses carry no stage)
        totals[-1] = self.skipped
        return totals

    def optimizer_step(self) -> float:
        """Clip, step, advance the lr schedule and the EMA; returns the gradient norm before clipping."""
        clip = self.config["optim"]["grad_clip"]
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip) if clip else torch.tensor(0.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(trainable(self.unwrapped))
        return float(grad_norm)

    def train(self) -> None:
        stages = self.config["objective"].get("stages", 1)
        batches = iter(self.batches)
        train = self.config["train"]
        progress = progress_bar(self.step, self.max_steps, self.accelerator.is_main_process)
        while self.step < self.max_steps:
            started = time.perf_counter()
            totals = self.accumulate([next(batches) for _ in range(self.accum)], stages)
            lr = self.lr_scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.step += 1
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), "sum").cpu()
            scalars = self.scalars(totals, stages, lr, grad_norm, time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", tokens_per_s=f"{scalars['tokens_per_s']:.0f}",
                                 **({"mfu": f"{scalars['mfu']:.1%}"} if "mfu" in scalars else {}))
            if self.step % train.get("log_every", 1) == 0 or self.step == self.max_steps:
                self.accelerator.log(scalars, step=self.step)
            if self.step % train["checkpoint_every"] == 0 or self.step == self.max_steps:
                self.save_checkpoint(int(totals[-1]))
            self.validate()
        progress.close()
        self.accelerator.end_training()

    def scalars(self, totals, stages: int, lr: float, grad_norm: float, elapsed: float) -> dict:
        """The logged figures of one step from its totals summed over ranks; the loss is the mean over samples read."""
        read = float(totals[-2])
        scalars = {"loss": float(totals[-4]) / read if read else math.nan, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": float(totals[-3]) / elapsed, "step_time_s": elapsed, "skipped_samples": float(totals[-1])}
        for stage in range(stages):
            count = float(totals[stages + stage])
            scalars[f"loss_stage{stage}"] = float(totals[stage]) / count if count else math.nan
        memory = torch.tensor([peak_memory_gib(self.accelerator.device)], device=self.accelerator.device)
        scalars["peak_memory_gib"] = float(self.accelerator.gather(memory).max())  # the fullest process's
        mfu = self.utilisation(float(totals[-3]), elapsed) if self.utilisation else None
        return scalars | ({"mfu": mfu} if mfu is not None else {})

    def save_checkpoint(self, skipped_all_ranks: int) -> None:
        state = {"step": self.step, "skipped_samples": skipped_all_ranks,
                 "world_size": self.world, "global_batch_size": self.global_batch, "fsdp": self.sharded}
        if self.sharded:  # each rank writes its shards; app-facing weights and validation renders: training.export
            write_sharded_checkpoint(
                self.output_dir, self.step, self.sharded_state(),
                lambda folder: save_training_state(folder, None, self.lr_scheduler.state_dict(), None, state, self.config),
                self.accelerator.is_main_process, self.accelerator.wait_for_everyone,
                self.config["train"].get("keep_checkpoints", 0))
            return
        model_state = get_model_state_dict(self.model, options=FULL_STATE)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=FULL_STATE)
        ema_state = self.ema.state_dict() if self.ema is not None else None
        if self.accelerator.is_main_process:
            def write_files(folder):
                self.task.save(folder, model_state, ema_state)
                save_training_state(folder, optimizer_state, self.lr_scheduler.state_dict(), ema_state, state)

            write_checkpoint(self.output_dir, self.step, write_files, self.config["train"].get("keep_checkpoints", 0))
        self.accelerator.wait_for_everyone()

    def validate(self) -> None:
        """Every `validation.every_steps` steps, render the validation prompts from the EMA weights (the trained
        ones without EMA or with `validation.use_ema: false`) into samples/step-N/: every rank takes part in
        gathering the weights (FSDP shards included), the main process writes them to a scratch checkpoint folder
        and renders from it with the app's pipeline."""
        validation = self.config.get("validation") or {}
        every = validation.get("every_steps")
        if not every or self.step % every or not hasattr(self.task, "render_validation"):
            return
        weights = get_model_state_dict(self.model, options=FULL_STATE)
        if self.ema is not None and validation.get("use_ema", True):
            weights = weights | self.ema.state_dict()
        if self.accelerator.is_main_process:
            out = self.output_dir / "samples" / f"step-{self.step}"
            scratch = fresh_staging(out / "weights")
            self.task.save(scratch, weights, None)
            self.task.render_validation(scratch, validation, out)
            shutil.rmtree(scratch)
        self.accelerator.wait_for_everyone()


def train(config: dict, output_dir, resume=None, allow_batch_change: bool = False) -> None:
    Trainer(config, output_dir, resume, allow_batch_change).train()

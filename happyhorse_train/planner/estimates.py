"""Candidate settings, their estimated peak GPU memory, host RAM and step time, and the plan (the fastest
setting that fits)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace

import yaml

from happyhorse_train.combinations import Engine, combination_problems
from happyhorse_train.config import TrainConfig
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.presets import CONFIG_DIR, load_preset
from happyhorse_train.planner.assumptions import (
    ACCELERATE_CONFIGS,
    BACKWARD_TRANSIENT_COPIES,
    BASE_FORMATS,
    CPU_ADAM_PARAMS_PER_S,
    CUDA_CONTEXT_BYTES,
    DEEPSPEED_BUCKET_BYTES,
    DEQUANT_SLOWDOWN,
    GPU_MARGIN_FRACTION,
    GPU_MARGIN_MIN_BYTES,
    HOST_MARGIN_FRACTION,
    HOST_PROCESS_BYTES,
    INTERCONNECT_BYTES_PER_S,
    OPTIMIZER_STATE_BYTES,
    OPTIMIZER_STEP_TEMP_BYTES,
    PREFETCHED_BLOCKS,
    GiB,
)
from happyhorse_train.planner.facts import ModelFacts, model_facts
from happyhorse_train.planner.measure import ActivationProfile, measure_activations
from happyhorse_train.planner.request import PlanRequest, latent_shape
from happyhorse_train.training.distributed import accelerate_config_engine


# --- candidate settings and their estimates --------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One way to train, as the config overrides that select it."""

    base_weights: str = "bf16"  # memory.base_weights: storage of the frozen base (a full fine-tune trains bf16/fp32)
    gradient_checkpointing: bool = True  # trainer.gradient_checkpointing
    offload_activations: bool = False  # memory.offload_activations: blocks' hidden-state inputs in pinned host RAM
    blocks_to_swap: int = 0  # memory.blocks_to_swap: blocks whose weights live in pinned host RAM
    optimizer: str = "adamw"  # optimizer.name
    accelerate_config: str | None = None  # configs/accelerate/<name>.yaml for several GPUs
    saved_attention_blocks: int = 0  # memory.saved_attention_blocks: blocks whose attention output is kept

    def overrides(self) -> list[str]:
        return [
            f"memory.base_weights={self.base_weights}",
            f"trainer.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"memory.offload_activations={str(self.offload_activations).lower()}",
            f"memory.blocks_to_swap={self.blocks_to_swap}",
            f"optimizer.name={self.optimizer}",
            f"memory.saved_attention_blocks={self.saved_attention_blocks}",
        ]

    def changed_overrides(self) -> list[str]:
        """The overrides that differ from the defaults (what the table shows)."""
        changed = [o for o, d in zip(self.overrides(), Setting().overrides()) if o != d]
        if self.accelerate_config:
            changed.append(f"[{self.accelerate_config}]")
        return changed

    def accelerate_file(self) -> str | None:
        return f"configs/accelerate/{self.accelerate_config}.yaml" if self.accelerate_config else None

    def engine(self) -> Engine:  # what train.py's strategy for its accelerate config does (training/distributed.py)
        return _engine(self.accelerate_config or "single_gpu")

    def train_config(self, mode: str) -> TrainConfig:
        """train.py's config as this setting's override line leaves it, over the schema's defaults (a dataclass:
        OmegaConf's merge would cost more than the estimates)."""
        cfg = TrainConfig()
        for key, _, value in (override.partition("=") for override in [f"trainer.mode={mode}", *self.overrides()]):
            group, name = key.split(".")
            setattr(getattr(cfg, group), name, yaml.safe_load(value))  # as Hydra parses it: true, 22, nf4
        return cfg


@functools.cache
def _engine(accelerate_config: str) -> Engine:
    return accelerate_config_engine(CONFIG_DIR / "accelerate" / f"{accelerate_config}.yaml")


def train_py_takes(mode: str, setting: Setting) -> bool:
    """Whether train.py's own checks (combinations.py) accept `setting` for a `mode` run."""
    return not combination_problems(setting.train_config(mode), setting.engine())


@dataclass
class Estimate:
    """A setting's estimated peak GPU memory (per GPU), peak host RAM (the machine) and step time."""

    setting: Setting
    gpu_terms: dict[str, int]  # bytes at the peak moment, by what holds them
    gpu_peak_moment: str
    host_terms: dict[str, int]
    host_peak_moment: str
    time_terms: dict[str, float]  # seconds
    gpu_budget: int
    host_budget: int

    @property
    def gpu_peak(self) -> int:
        return sum(self.gpu_terms.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host_terms.values())

    @property
    def step_seconds(self) -> float:
        return sum(self.time_terms.values())

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_peak <= self.gpu_budget

    @property
    def fits_host(self) -> bool:
        return self.host_peak <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def verdict(self) -> str:
        if self.fits:
            return "yes"
        return "no: " + " and ".join(n for n, ok in (("GPU", self.fits_gpu), ("host RAM", self.fits_host)) if not ok)


def gpu_budget(gpu_memory_gib: float) -> int:
    total = gpu_memory_gib * GiB
    return int(total - max(GPU_MARGIN_FRACTION * total, GPU_MARGIN_MIN_BYTES))


def host_budget(host_ram_gib: float) -> int:
    return int(host_ram_gib * GiB * (1 - HOST_MARGIN_FRACTION))


@dataclass
class Layout:
    """Where a setting keeps the model's long-lived tensors, in bytes per GPU (host: the whole machine)."""

    weights: int  # on the GPU: base / model weights resident, in-flight blocks included
    master: int = 0  # on the GPU: trained weights in fp32 that only the optimizer reads (LoRA, DeepSpeed)
    grads: int = 0  # on the GPU at the end of backward
    states: int = 0  # optimizer states on the GPU
    step_temp: int = 0  # the optimizer step's temporaries on the GPU
    comm_buffers: int = 0
    autocast_copies: int = 0  # bf16 casts of fp32 weights on the GPU, which autocast caches through the forward
    host_pinned_per_process: int = 0  # swapped blocks
    host_node: int = 0  # offloaded master weights, gradients, states (and ZeRO-3 offload weights), all processes
    host_transfer_per_pass: int = 0  # bytes each process moves host -> GPU per forward / backward pass (weights)
    # DeepSpeed and FSDP shard in `prepare`, after the trainer has moved the whole transformer to the GPU.
    whole_model_before_sharding: int = 0


def _layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    if setting.engine().steps_inside_backward:  # DeepSpeed: its own fp32 master copy, partitioned
        return _deepspeed_layout(request, setting, facts)
    if setting.engine().shards_weights:
        return _fsdp_layout(request, setting, facts)
    return _replicated_layout(request, setting, facts)


def _replicated_layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    """One GPU, or DDP: every GPU holds everything; DDP adds gradient buckets the size of the gradients."""
    trainable = facts.trainable_params
    states = OPTIMIZER_STATE_BYTES[setting.optimizer] * trainable
    step_temp = OPTIMIZER_STEP_TEMP_BYTES[setting.optimizer] * trainable
    ddp_buckets = 4 * trainable if setting.accelerate_config else 0  # several processes, replicated: DDP
    if request.mode == "full":  # fp32 master weights trained in place, bf16 compute through autocast
        return Layout(weights=4 * trainable, grads=4 * trainable, states=states, step_temp=step_temp,
                      comm_buffers=ddp_buckets, autocast_copies=2 * trainable)
    swapped = _swapped_bytes(facts, setting)
    return Layout(weights=_resident_base(facts, setting), master=4 * trainable, grads=4 * trainable, states=states,
                  step_temp=step_temp, comm_buffers=ddp_buckets, host_pinned_per_process=swapped,
                  host_transfer_per_pass=swapped)


def _deepspeed_layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    """DeepSpeed's bf16 mode: bf16 model weights; the fp32 master copy, gradients and Adam states partitioned."""
    n, trainable, full = request.num_gpus, facts.trainable_params, request.mode == "full"
    state_bytes = OPTIMIZER_STATE_BYTES[setting.optimizer]
    model_bf16 = 2 * facts.total_params if full else facts.base_bytes(setting.base_weights) + 2 * trainable
    gathered = PREFETCHED_BLOCKS * max(b["bf16"] for b in facts.block_bytes)
    partitioned = dict(master=4 * trainable // n, grads=4 * trainable // n, states=state_bytes * trainable // n,
                       whole_model_before_sharding=_stored_model_bytes(request, facts))
    if not setting.engine().shards_weights:  # ZeRO-2
        weights = 2 * facts.total_params if full else _resident_base(facts, setting) + 2 * trainable
        swapped = _swapped_bytes(facts, setting)
        return Layout(weights=weights, comm_buffers=DEEPSPEED_BUCKET_BYTES, host_pinned_per_process=swapped,
                      host_transfer_per_pass=swapped, **partitioned)
    if not setting.engine().offloads_to_host:
        return Layout(weights=model_bf16 // n + gathered, comm_buffers=DEEPSPEED_BUCKET_BYTES, **partitioned)
    # ZeRO-3 offload: weights, master copy, gradients and states in host RAM; the GPU holds the gathered blocks.
    return Layout(weights=gathered, comm_buffers=DEEPSPEED_BUCKET_BYTES,
                  host_node=model_bf16 + (4 + 4 + state_bytes) * trainable, host_transfer_per_pass=model_bf16 // n,
                  whole_model_before_sharding=partitioned["whole_model_before_sharding"])


def _fsdp_layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    """FSDP2 computing in bf16: every weight sharded as stored (trained ones fp32, the frozen base bf16) and
    gathered in bf16 a block at a time; fp32 gradients and optimizer states sharded. The gathered weights are
    already bf16, so autocast caches no copies."""
    n, trainable = request.num_gpus, facts.trainable_params
    largest_block = max(b["bf16"] for b in facts.block_bytes)
    stored = _stored_model_bytes(request, facts)
    # One block's gradients in fp32 while they are reduce-scattered (a LoRA's are negligible).
    reduce_buffer = 2 * largest_block if request.mode == "full" else 0
    return Layout(weights=stored // n + PREFETCHED_BLOCKS * largest_block, grads=4 * trainable // n,
                  states=OPTIMIZER_STATE_BYTES[setting.optimizer] * trainable // n,
                  step_temp=OPTIMIZER_STEP_TEMP_BYTES[setting.optimizer] * trainable // n, comm_buffers=reduce_buffer,
                  # accelerate holds the whole model's state dict while fully_shard allocates the shards.
                  whole_model_before_sharding=stored + stored // n)


def _stored_model_bytes(request: PlanRequest, facts: ModelFacts) -> int:
    """The transformer as loaded for training: fp32 for a full fine-tune; a bf16 base with fp32 adapters."""
    return 4 * facts.trainable_params + (0 if request.mode == "full" else facts.base_bytes("bf16"))


def _swapped_bytes(facts: ModelFacts, setting: Setting) -> int:
    # Conservative: the smallest blocks are the ones swapped (least memory saved).
    swapped = sorted(facts.block_bytes, key=lambda b: b["bf16"])[: setting.blocks_to_swap]
    return sum(b[setting.base_weights] for b in swapped)


def _resident_base(facts: ModelFacts, setting: Setting) -> int:
    """Frozen base bytes on the GPU: all but the swapped blocks, plus buffers for the blocks in flight."""
    base = facts.base_bytes(setting.base_weights)
    if not setting.blocks_to_swap:
        return base
    in_flight = min(PREFETCHED_BLOCKS, setting.blocks_to_swap) * max(b[setting.base_weights] for b in facts.block_bytes)
    return base - _swapped_bytes(facts, setting) + in_flight


def _activation_moments(setting: Setting, profile: ActivationProfile, layout: Layout) -> dict[str, dict[str, int]]:
    """The GPU's changing contents at the moments one of which is the step's peak.

    Between the start and the end of backward, the kept activations of earlier blocks shrink while the
    gradients of later blocks grow, both about linearly, so their sum peaks at one of the two ends.
    """
    outside = profile.saved_outside_blocks
    transient = BACKWARD_TRANSIENT_COPIES * profile.largest_saved
    if not setting.gradient_checkpointing:
        # All saved; for fp32 weights that includes the bf16 casts each linear saves (measured).
        kept, last_kept, recompute, cached_casts = profile.saved_total - outside, max(profile.saved_per_block), 0, 0
    else:
        one_boundary = profile.boundary_per_block()
        kept = profile.boundary
        if setting.offload_activations:  # on the GPU: the shared inputs and the hidden states of blocks in flight
            kept = profile.shared_block_inputs() + PREFETCHED_BLOCKS * -(-profile.hidden_states() // profile.num_blocks)
        last_kept, recompute = one_boundary, max(profile.saved_per_block)
        cached_casts = layout.autocast_copies  # autocast's cache holds every weight's bf16 cast until the forward ends
    attention = profile.attention_outputs * setting.saved_attention_blocks // profile.num_blocks
    return {
        "forward end": {"activations": kept + outside, "kept attention outputs": attention,
                        "autocast weight copies": cached_casts},
        "backward start": {"activations": kept + outside + recompute, "kept attention outputs": attention,
                           "backward working set": transient},
        "backward end": {"gradients": layout.grads, "activations": last_kept + outside + recompute,
                         "backward working set": transient},
        "optimizer step": {"gradients": layout.grads, "optimizer step temporaries": layout.step_temp},
    }


def _peak(moments: dict[str, dict[str, int]]) -> tuple[str, dict[str, int]]:
    """The moment whose terms sum highest, and its non-zero terms."""
    moment = max(moments, key=lambda name: sum(moments[name].values()))
    return moment, {name: value for name, value in moments[moment].items() if value}


def _gpu_estimate(setting, profile, layout) -> tuple[str, dict[str, int]]:
    static = {"weights": layout.weights, "trained fp32 weights": layout.master, "optimizer states": layout.states,
              "communication buffers": layout.comm_buffers, "CUDA context": CUDA_CONTEXT_BYTES}
    moments = {name: {**static, **terms} for name, terms in _activation_moments(setting, profile, layout).items()}
    if layout.whole_model_before_sharding:
        moments["loading, before sharding"] = {"whole transformer": layout.whole_model_before_sharding,
                                               "CUDA context": CUDA_CONTEXT_BYTES}
    return _peak(moments)


def _host_estimate(request, setting, facts, profile, layout) -> tuple[str, dict[str, int]]:
    processes = request.num_gpus if setting.accelerate_config else 1
    encoders = _encoder_bytes(request, facts) if request.encoders_in_host_ram else 0
    per_process = {"processes (python, torch, CUDA)": processes * HOST_PROCESS_BYTES,
                   "text encoder + VAE parked": processes * encoders}
    offloaded = profile.hidden_states() if setting.offload_activations else 0
    training = {**per_process, "swapped blocks (pinned)": processes * layout.host_pinned_per_process,
                "offloaded activations (pinned)": processes * offloaded,
                "offloaded optimizer / weights": layout.host_node}
    # Loading streams tensor by tensor: one tensor in flight, and a quantized base is built on the host first.
    in_flight = _trained_dtype_bytes(request) * facts.largest_tensor_params
    quantized = facts.base_bytes(setting.base_weights) if setting.base_weights != "bf16" else 0
    moments = {"loading": {**per_process, "loading: weights being moved": processes * (in_flight + quantized)},
               "training": training}
    # A sharded full fine-tune ends by gathering the trained model into process 0's host RAM (FSDP in float32;
    # ZeRO-3 in 16 bits); a LoRA's adapter is negligible.
    engine = setting.engine()
    gathered = (2 if engine.steps_inside_backward else 4) if engine.shards_weights else 0
    if request.mode == "full" and gathered:
        moments["saving"] = {**training, "final weights gathered on process 0": gathered * facts.total_params}
    return _peak(moments)


def _trained_dtype_bytes(request: PlanRequest) -> int:
    return 2 if request.mode == "lora" else 4


def _encoder_bytes(request: PlanRequest, facts: ModelFacts) -> int:
    # The pipeline loads the text encoder in the trained dtype; the VAE stays float32.
    return _trained_dtype_bytes(request) * facts.text_encoder_params + 4 * facts.vae_params


def _step_time(request, setting, profile, layout, facts) -> dict[str, float]:
    """Seconds per step: compute, plus the transfers that compute cannot hide."""
    rate, pcie = request.tflops * 1e12, request.pcie_gbps * 1e9
    linear = profile.linear_flops * DEQUANT_SLOWDOWN[setting.base_weights]
    recompute = 1 if setting.gradient_checkpointing else 0
    linear_backward = 2 if request.mode == "full" else 1  # a frozen base needs no weight gradients
    attention_recomputed = recompute * (1 - setting.saved_attention_blocks / profile.num_blocks)
    forward_s = (linear + profile.attention_flops) / rate
    backward_s = (linear * (linear_backward + recompute) + profile.attention_flops * (2 + attention_recomputed)) / rate

    offloaded = profile.hidden_states() if setting.offload_activations else 0
    weights_in = layout.host_transfer_per_pass
    # PCIe is full duplex: per pass the busier direction counts; it overlaps that pass's compute.
    forward_pcie = max(weights_in, offloaded) / pcie
    backward_pcie = (weights_in + offloaded) / pcie
    hidden_pcie = max(0.0, forward_pcie - forward_s) + max(0.0, backward_pcie - backward_s)
    terms = {"compute": forward_s + backward_s, "PCIe not hidden": hidden_pcie}
    collectives_s = _collective_bytes(request, setting, facts) / INTERCONNECT_BYTES_PER_S
    terms["GPU-to-GPU not hidden"] = max(0.0, collectives_s - forward_s - backward_s)
    if setting.engine().offloads_to_host:  # CPU Adam, then the new weights back up
        shard = facts.trainable_params / request.num_gpus
        terms["CPU optimizer step"] = shard / CPU_ADAM_PARAMS_PER_S + 2 * (2 * shard) / pcie
    return {name: value for name, value in terms.items() if value}


def _collective_bytes(request, setting, facts) -> float:
    """Bytes each GPU sends per step in collectives (ring algorithms: (n-1)/n of the data per pass)."""
    n = request.num_gpus
    if not setting.accelerate_config or n == 1:
        return 0.0
    ring = (n - 1) / n
    trainable, engine = facts.trainable_params, setting.engine()
    if not engine.shards_optimizer_states:  # DDP
        return 2 * ring * 4 * trainable  # all-reduce of fp32 gradients
    if not engine.shards_weights:  # ZeRO-2
        return ring * 2 * trainable * 2  # reduce-scatter of bf16 gradients + all-gather of the updated weights
    weights = 2 * facts.total_params  # ZeRO-3 and FSDP: gather the bf16 weights for forward and for backward
    gradient_bytes = 2 if engine.steps_inside_backward else 4  # FSDP here reduce-scatters in fp32
    return ring * (2 * weights + gradient_bytes * trainable)


def estimate(request: PlanRequest, setting: Setting, facts: ModelFacts, profile: ActivationProfile) -> Estimate:
    layout = _layout(request, setting, facts)
    gpu_moment, gpu_terms = _gpu_estimate(setting, profile, layout)
    host_moment, host_terms = _host_estimate(request, setting, facts, profile, layout)
    return Estimate(setting=setting, gpu_terms=gpu_terms, gpu_peak_moment=gpu_moment, host_terms=host_terms,
                    host_peak_moment=host_moment, time_terms=_step_time(request, setting, profile, layout, facts),
                    gpu_budget=gpu_budget(request.gpu_memory_gib), host_budget=host_budget(request.host_ram_gib))


# --- the plan --------------------------------------------------------------------------------------------
def candidate_settings(request: PlanRequest) -> list[Setting]:
    """Every combination worth estimating that train.py takes (combinations.py), before block swap is sized
    (see `plan`). Not weighed, though train.py takes it: 8-bit Adam for a LoRA (its states are tiny) or where the
    engine shards the optimizer states already."""
    configs = ACCELERATE_CONFIGS if request.num_gpus > 1 else (None,)
    optimizers = ("adamw",) if request.mode == "lora" else tuple(OPTIMIZER_STATE_BYTES)
    every = itertools.product(configs, BASE_FORMATS, optimizers, (False, True), (False, True))
    settings = [Setting(base, checkpointing, offload, 0, optimizer, config)
                for config, base, optimizer, checkpointing, offload in every]
    return [s for s in settings if train_py_takes(request.mode, s)
            and not (s.optimizer != "adamw" and s.engine().shards_optimizer_states)]


def swap_variants(request: PlanRequest, setting: Setting, num_blocks: int) -> list[Setting]:
    """The block-swap settings `plan` tries for `setting`, fewest swapped blocks first; none for bitsandbytes'
    int8 / nf4 bases, whose state beside .data keeps them in place (memory/offload.py): swapping saves nothing."""
    if setting.base_weights in ("int8", "nf4") or not train_py_takes(request.mode, replace(setting, blocks_to_swap=1)):
        return []
    return [replace(setting, blocks_to_swap=blocks) for blocks in range(1, num_blocks + 1)]


def kept_attention_variants(request: PlanRequest, setting: Setting, num_blocks: int) -> list[Setting]:
    """The kept-attention settings `plan` tries for `setting`, most kept blocks first."""
    if not train_py_takes(request.mode, replace(setting, saved_attention_blocks=1)):
        return []
    return [replace(setting, saved_attention_blocks=blocks) for blocks in range(num_blocks, 0, -1)]


def _first_that_fits(request, variants, facts, profile, gpu_only: bool = False) -> Estimate | None:
    for variant in variants:
        candidate = estimate(request, variant, facts, profile)
        if candidate.fits_gpu if gpu_only else candidate.fits:
            return candidate
    return None


@dataclass
class Plan:
    request: PlanRequest
    facts: ModelFacts
    profile: ActivationProfile
    estimates: list[Estimate]  # fitting ones first, fastest first
    notes: list[str] = field(default_factory=list)

    @property
    def pick(self) -> Estimate | None:
        return self.estimates[0] if self.estimates and self.estimates[0].fits else None

    def why_nothing_fits(self) -> str:
        smallest = min(self.estimates, key=lambda e: e.gpu_peak)
        biggest_terms = sorted(smallest.gpu_terms.items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{name} {value / GiB:.1f}" for name, value in biggest_terms)
        return (
            f"no setting fits: the smallest GPU estimate is {smallest.gpu_peak / GiB:.1f} GiB "
            f"({' '.join(smallest.setting.changed_overrides()) or 'defaults'}; largest parts: {terms} GiB) against "
            f"{smallest.gpu_budget / GiB:.1f} GiB usable per GPU, and it needs {smallest.host_peak / GiB:.1f} GiB of "
            f"host RAM against {smallest.host_budget / GiB:.1f} GiB usable; try more or bigger GPUs, more host RAM, "
            f"LoRA instead of a full fine-tune, or a shorter clip"
        )


def _rank(e: Estimate) -> tuple:
    # Fitting ones fastest first (ties: fewer changes from the defaults), then the rest by GPU memory.
    return (not e.fits, e.step_seconds if e.fits else e.gpu_peak, len(e.setting.changed_overrides()))


def plan(request: PlanRequest) -> Plan:
    preset = load_preset(request.preset)
    if request.num_gpus < 1 or request.batch_size < 1:
        raise UserInputError("the number of GPUs and the batch size must be at least 1")
    if request.lora_rank is not None and request.lora_rank < 1:
        raise UserInputError(f"LoRA rank {request.lora_rank} must be at least 1")
    latent_shape(preset, request.width, request.height, request.frames)  # a bad size fails here, before any work
    facts = model_facts(preset, request.lora_rank)
    profile = measure_activations(preset, request.width, request.height, request.frames, request.batch_size,
                                  request.lora_rank, request.text_tokens)
    estimates = []
    for setting in candidate_settings(request):
        plain = estimate(request, setting, facts, profile)
        estimates.append(plain)
        if not plain.fits_gpu:
            swapped = _first_that_fits(request, swap_variants(request, setting, facts.num_blocks), facts, profile, True)
            if swapped is not None:
                estimates.append(swapped)
                plain = swapped
        if plain.fits:
            kept = _first_that_fits(request, kept_attention_variants(request, plain.setting, facts.num_blocks), facts,
                                    profile)
            if kept is not None:
                estimates.append(kept)
    estimates.sort(key=_rank)
    return Plan(request, facts, profile, estimates, _notes(request, facts))


def _notes(request: PlanRequest, facts: ModelFacts) -> list[str]:
    where = "freed after caching, not counted"
    if request.encoders_in_host_ram:
        encoders = _encoder_bytes(request, facts) / GiB
        where = f"kept in host RAM for validation renders: {encoders:.1f} GiB per process, counted"
    return [
        "Latents and text states are cached before training, so the text encoder and VAE are assumed off the GPU "
        f"while training ({where}).",
        f"Margins: the GPU budget keeps {GPU_MARGIN_FRACTION:.0%} of the card (at least "
        f"{GPU_MARGIN_MIN_BYTES / GiB:.1f} GiB) free; host RAM keeps {HOST_MARGIN_FRACTION:.0%} free. "
        f"CUDA context and allocator overhead is counted as {CUDA_CONTEXT_BYTES / GiB:.2f} GiB.",
        "Activations are measured (meta-device forward, flash-like attention, bf16 autocast emulated). Step times are "
        f"relative estimates at an assumed {request.tflops:.0f} TFLOP/s and {request.pcie_gbps:.0f} GB/s PCIe; "
        "dequantization costs (" + ", ".join(f"{k} x{v:.2f}" for k, v in DEQUANT_SLOWDOWN.items() if k != "bf16")
        + ") are unmeasured guesses.",
    ]


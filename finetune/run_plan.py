"""The run plan: what a run does that follows from the config *and* the machine, decided once.

Backend, device, world size and nodes, attention, how a MoE's experts run, how packed rows reach the
model, and the launcher (DeepSpeed). The real run decides it before any weight loads and trains by it
(finetune/pipeline.py); the dry run decides it with the same function and prints it
(finetune/preflight.py), so the two cannot disagree on the same machine. After loading, the real run
confirms the plan against the model (a library may choose otherwise: Unsloth falls back to sdpa where
flash-attn cannot run) and says each difference in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys

from core.distributed import nodes as node_count
from core.distributed import world_size
from core.errors import ConfigError
from finetune.config import deepspeed_file
from finetune.config_schema import SDPA_VARLEN, FinetuneConfig

# Attention that splits packed examples by their position ids: their rows can be flattened into one sequence
FLATTENING_ATTENTION = ("flash_attention", "kernels-community/flash", SDPA_VARLEN)
# The model types Unsloth (2026.10.9, unsloth/models/loader.py) loads into its own modeling on a GPU; the
# others, qwen3_moe among them, go to its FastModel, which keeps transformers' modeling and masks
UNSLOTH_OWN_MODELING = ("llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3")
TRANSFORMERS_DEFAULT_EXPERTS = "grouped_mm"  # what a MoE loads with when nothing is asked (tests/test_moe.py)


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the plan needs to know of where the run happens."""
    gpu: bool
    world: int
    nodes: int
    unsloth_installed: bool
    flash_attention: bool | None = None  # flash-attn 2 imports here; None: probed when attention is chosen

    @classmethod
    def this_launch(cls, world: int | None = None, nodes: int | None = None) -> "Machine":
        """This process's machine and launch; `world`, `nodes`: the dry run's --nproc x --nnodes."""
        import torch

        gpu = torch.cuda.is_available()
        # flash-attn is probed later: its check imports transformers, which must come after Unsloth
        return cls(gpu=gpu, world=world or world_size(), nodes=nodes or node_count(),
                   unsloth_installed=importlib.util.find_spec("unsloth") is not None)

    def has_flash_attention(self) -> bool:
        if self.flash_attention is None:
            return self.gpu and flash_attention_works()
        return self.flash_attention

    def with_gpus(self) -> "Machine":
        """The same launch on GPUs (the dry run on a machine without one plans the GPU run as well)."""
        return dataclasses.replace(self, gpu=True)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    backend: str  # unsloth | hf
    backend_why: str
    gpu: bool
    world: int
    nodes: int
    attention: str
    experts: str | None  # None: a dense model
    packing: bool
    rows_flattened: bool  # packed rows reach the model as one padding-free sequence per micro-batch
    launcher: str  # a DeepSpeed file, "" for none (DDP or one process), "auto" until the memory plan decides

    def describe(self) -> str:
        """One line, the same in the real run's start-up output and in the dry run."""
        where = f"{'GPU' if self.gpu else 'CPU'}, world size {self.world}" + \
            (f" on {self.nodes} nodes" if self.nodes > 1 else "")
        layout = ("rows flattened" if self.rows_flattened else "rows side by side") if self.packing else "off"
        launcher = {"": "none", "auto": "auto (the memory plan decides)"}.get(self.launcher, self.launcher)
        return (f"{where}: backend {self.backend}, attention {self.attention}, experts {self.experts or '-'}, "
                f"packing {layout}, DeepSpeed {launcher}")

    def report(self) -> dict:
        return dataclasses.asdict(self)

    def deepspeed_config(self) -> str | None:
        """The DeepSpeed file the trainer gets. None also while `auto` is undecided: the run always decides it
        (finetune/checks.check_memory); a plan used without the memory plan (a test, a benchmark) runs without."""
        return None if self.launcher in ("", "auto") else self.launcher

    def with_launcher(self, launcher: str) -> "RunPlan":
        return dataclasses.replace(self, launcher=launcher)


def decide(cfg: FinetuneConfig, model_config, machine: Machine, backend: tuple[str, str] | None = None) -> RunPlan:
    """The plan of `cfg` on `machine`. `backend`: (name, why) when already known (the real run imports it
    first: an installed Unsloth that fails to import leaves `auto` on hf); else chosen here."""
    from finetune.moe import is_moe

    name, why = backend or choose_backend(cfg.backend, machine)
    attention = attention_for(cfg, machine)
    own_attention = name == "unsloth" and machine.gpu and model_config.model_type in UNSLOTH_OWN_MODELING
    flattened = cfg.packing and (attention.startswith(FLATTENING_ATTENTION) or own_attention)
    launcher = deepspeed_file(cfg) or ("auto" if cfg.deepspeed == "auto" and machine.gpu else "")
    return RunPlan(backend=name, backend_why=why, gpu=machine.gpu, world=machine.world, nodes=machine.nodes,
                   attention=attention, packing=cfg.packing, rows_flattened=flattened, launcher=launcher,
                   experts=experts_for(cfg, name, machine) if is_moe(model_config) else None)


def choose_backend(requested: str, machine: Machine) -> tuple[str, str]:
    """(backend, why): `auto` prefers Unsloth; when it ends on hf, `why` says so in one line."""
    if requested == "hf":
        return "hf", "requested"
    if requested == "unsloth" and not machine.unsloth_installed:
        raise ConfigError("backend 'unsloth' requested but unsloth is not installed "
                          "(bash scripts/setup.sh installs it); or use --backend hf")
    if requested == "unsloth":
        return "unsloth", "requested"
    if not machine.unsloth_installed:
        return "hf", "auto: unsloth is not installed (bash scripts/setup.sh installs it)"
    if machine.world > 1 and not machine.gpu:
        return "hf", "auto: Unsloth's CPU fallback runs one process only; torchrun on CPU uses PEFT"
    return "unsloth", "auto: unsloth is installed"


def attention_for(cfg: FinetuneConfig, machine: Machine) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if machine.gpu and cfg.dtype != "float32" and machine.has_flash_attention():
        return "flash_attention_2"
    # measured on CPU only (bench/train_throughput.py); on a GPU without flash-attn, sdpa's masked kernel
    # may well beat one kernel launch per example
    return SDPA_VARLEN if cfg.packing and not machine.gpu else "sdpa"


def experts_for(cfg: FinetuneConfig, backend: str, machine: Machine) -> str:
    """How a MoE's fused experts will run. `auto`: Unsloth's own MoE kernels on its GPU backend (unsloth_zoo
    moe_experts_interface), else finetune.moe's choice, which on a GPU leaves transformers' default."""
    from finetune.moe import auto_experts_implementation

    if cfg.experts_implementation != "auto":
        return cfg.experts_implementation
    if machine.gpu and backend == "unsloth":
        return "unsloth"
    return auto_experts_implementation(machine.gpu) or TRANSFORMERS_DEFAULT_EXPERTS


@functools.cache
def flash_attention_works() -> bool:
    """flash-attn 2 is installed (transformers' check: the package, >= 2.3.3, CUDA) and its CUDA extension
    imports: a build for another torch fails there ("undefined symbol"), not at find_spec."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    # FlashAttention 2 runs on Ampere (sm80) and later; Unsloth's own check says the same
    if not is_flash_attn_2_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        importlib.import_module("flash_attn")
    except Exception as e:  # ImportError, OSError (a missing CUDA library)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"flash-attn is installed but does not import ({first_line}); attention falls back to sdpa",
              file=sys.stderr)
        return False
    return True


def confirm(plan: RunPlan, model, experts: str | None) -> tuple[RunPlan, list[str]]:
    """(the plan as the loaded model runs it, a line for each difference from the decided one). `experts`:
    the implementation in effect (finetune.moe.use_experts_implementation)."""
    from finetune.model import runs_unsloth_attention

    attention = getattr(model.config, "_attn_implementation", None) or plan.attention
    flattened = plan.packing and (attention.startswith(FLATTENING_ATTENTION) or runs_unsloth_attention(model))
    loaded = dataclasses.replace(plan, attention=attention, experts=experts, rows_flattened=flattened)
    notes = [f"{what}: the plan said {getattr(plan, key)}, the loaded model runs {getattr(loaded, key)}"
             for key, what in (("attention", "attention"), ("experts", "MoE experts"),
                               ("rows_flattened", "packed rows flattened"))
             if getattr(plan, key) != getattr(loaded, key)]
    return loaded, notes


def decide_here(cfg: FinetuneConfig, backend: str | None = None):
    """(the plan on this launch, the model's config), with the backend as imported (finetune.model.
    import_backend, cached: the command line imports it first). `backend`: instead of cfg.backend."""
    from finetune.model import import_backend
    from finetune.model_source import load_model_config

    model_config = load_model_config(cfg)[0]
    return decide(cfg, model_config, Machine.this_launch(), import_backend(backend or cfg.backend)), model_config

"""One way in for edge-dlm's own kernels: the backend a model's layers run on, chosen once at load
(`choose`: from the device, the engine, `--kernels` and `--compile`) and applied once (`Backend.apply`),
which rebuilds the model's layers for it:

    cpu     the C kernels (`cpu_matmul`): int8 / int4 layers get the kernel's matmul (`QuantLinear.kernel`),
            bf16 linears become `Bf16Linear`s (the same weights), the projections that share an input run
            as one call, narrow cached passes attend in C (`NLDModel.narrow_attention`), and eager passes
            run the norms, SiLU x up and a narrow pass's rope + attention as one C call each
            (`RMSNorm.kernel`, `MLP.act`, `NLDModel.rope_attention`);
    triton  the Triton kernels (CUDA, or interpreted on a CPU with TRITON_INTERPRET=1 and `--kernels on`):
            block attention and the pick over the cache (`NLDModel.attn_kernel` / `pick_kernel`), int8 /
            int4 matmuls on CUDA;
    neither the reference: torch's own operations, every layer as written.

Nothing else sets those hooks: the runtime's loader, `edge-dlm bench --shape` and the tests all come
through here. Each layer keeps its own choice (no process-wide registry), so two models of one process
may run on different backends (`--kernels off` beside `auto`).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Backend:
    cpu: bool = False
    triton: bool = False

    @property
    def name(self) -> str:
        return " + ".join(n for n, on in (("triton", self.triton), ("cpu", self.cpu)) if on) or "reference"

    def apply(self, model: torch.nn.Module) -> bool:
        """Rebuild `model`'s layers for this backend (the model already on its device); True where a C
        kernel serves some layer."""
        if self.triton:
            _triton(model)
        if self.cpu:
            from edge_dlm.kernels import cpu_matmul

            return cpu_matmul.build(model)
        return False


def choose(device: torch.device | str, choice: str = "auto", engine: str = "torch",
           compile: str = "off") -> Backend:
    """The backend for a model on `device`: `choice` is `--kernels` (auto / on / off, already resolved against
    $EDGE_DLM_KERNELS by `kernels.choice`; `on` where they cannot run is a one-line error). Exported engines
    run their own graphs (the reference here); compiled passes replace the eager Triton kernels, so
    `--compile on` turns `--kernels auto`'s Triton part off."""
    from edge_dlm import kernels

    if engine != "torch":
        return Backend()
    dev = torch.device(device)
    triton = kernels.resolve(choice, dev) and not (compile == "on" and choice == "auto")
    return Backend(cpu=dev.type == "cpu" and kernels.cpu_resolve(choice), triton=triton)


class _TritonQuant:
    """The Triton int8 / int4 matmul as a `QuantLinear.kernel` (CUDA)."""

    device_type = "cuda"

    def __call__(self, x: torch.Tensor, mod) -> torch.Tensor | None:
        from edge_dlm.kernels.quant_matmul import quant_matmul

        return quant_matmul(x, mod)

    def __deepcopy__(self, memo) -> "_TritonQuant":
        return self


def _triton(model: torch.nn.Module) -> None:
    from edge_dlm.kernels.attention import block_attention
    from edge_dlm.kernels.verify import greedy_pick
    from edge_dlm.model.quant import set_kernels

    model.attn_kernel = block_attention
    model.pick_kernel = greedy_pick
    if any(t.is_cuda for t in model.buffers()):
        set_kernels(model, _TritonQuant())

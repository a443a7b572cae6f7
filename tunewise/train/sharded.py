"""`training.fsdp`: parameters, gradients and optimizer state sharded across the processes (PyTorch FSDP2,
`fully_shard`), on CPU with gloo as on GPUs with NCCL.

Each decoder layer is its own unit (all-gathered just before it runs, freed after), and the loss module is the
root unit: our loss calls the embeddings, the decoder layers, the norm and the head directly rather than the
model's forward, so the root's parameters (embeddings, norm, head; tied ones once) are gathered when the loss
module runs. Gradients are reduce-scattered as averages over processes, as DDP's all-reduce averages them, so the
loop's loss normalisation is the same for both.

Saving and checkpointing are collective (every process takes part in gathering the full tensors), then only the
main process writes; a checkpoint holds full tensors, so it resumes with any number of processes, sharded or not.
"""

from __future__ import annotations

import torch


def shard(loss_module, decoder_layers) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers:
        fully_shard(layer)
    fully_shard(loss_module)


def full_state(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, on every process (a collective call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (the head sharing the embeddings) under its first name only
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    sd = {k: v for k, v in sd.items() if k not in aliases}
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in names}
    return sd


def full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, tensors: dict, optimizer=None, optim_state: dict | None = None) -> None:
    """Full tensors (from a checkpoint) into the sharded model and optimizer, on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def local(value):
    """A DTensor result (a clipped gradient norm) as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value

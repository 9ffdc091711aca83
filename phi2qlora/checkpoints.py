"""Checkpoints and output folders without pickles.

transformers' Trainer writes `torch.save` pickles beside the safetensors weights:
`training_args.bin` in the output folder and every checkpoint, and `optimizer.pt`,
`scheduler.pt`, `rng_state.pth` (and `scaler.pt` under fp16) in each checkpoint
(transformers 5.17 and 5.25, `Trainer._save`, `_save_optimizer_and_scheduler`,
`_save_scaler`, `_save_rng_state`). Loading a pickle runs whatever code it names, and
these folders are what users upload to the Hub. Here each of those states is one
safetensors file: its tensors as tensors, the rest of its structure as JSON in the file's
metadata; the training arguments are `training_args.json`. Resuming reads them back.

Any Trainer (SFTTrainer, GRPOTrainer, DPOTrainer, a subclass of one) gets this with
`pickle_free(trainer)`; `training.train_guarded` calls it, so a script that trains through
train_guarded needs nothing more."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from phi2qlora.errors import InputError
from phi2qlora.files import atomic_path, check_safetensors, write_atomic

TRAINING_ARGS_FILE = "training_args.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
SCALER_FILE = "scaler.safetensors"
STATE_KEY = "state"  # the safetensors metadata entry that holds the JSON structure


# ---------------------------------------------------------------------------------------
# A state dict (nested dicts, lists, tuples, tensors, numbers, numpy arrays) as JSON plus
# named tensors, and back.
# ---------------------------------------------------------------------------------------
def _encode(value, tensors: dict, where: str):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}}
        return {"pairs": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                          for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be saved without pickle")


def _decode(value, tensors):
    import numpy as np

    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors(value["tensor"])
    if "ndarray" in value:
        return np.array(value["ndarray"], dtype=value["dtype"])
    if "tuple" in value:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v, tensors) for k, v in value["dict"].items()}
    return {_decode(k, tensors): _decode(v, tensors) for k, v in value["pairs"]}


def save_state(state, path: str | os.PathLike) -> None:
    """Write a state dict as one safetensors file, whole or not at all."""
    from safetensors.torch import save_file

    tensors = {}
    structure = json.dumps(_encode(state, tensors, Path(path).stem))
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata={STATE_KEY: structure})


def load_state(path: str | os.PathLike, what_to_do: str):
    """The state dict save_state wrote to `path` (tensors on the CPU). A damaged file is
    one line naming it, with `what_to_do`."""
    from safetensors import safe_open

    check_safetensors(path, what_to_do)
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            structure = json.loads((f.metadata() or {})[STATE_KEY])
            return _decode(structure, f.get_tensor)
    except (KeyError, ValueError, TypeError) as e:  # a safetensors file, but not one save_state wrote
        raise InputError(f"{path}: not a state this project saved ({type(e).__name__}: {str(e)[:100]}); "
                         f"{what_to_do}") from None


def training_args_json(args) -> str:
    """The training arguments as JSON (TrainingArguments.to_dict hides tokens); a value JSON
    cannot hold is written as its text."""
    return json.dumps(args.to_dict(), indent=1, sort_keys=True, default=str) + "\n"


# ---------------------------------------------------------------------------------------
# The Trainer's save and load hooks.
# ---------------------------------------------------------------------------------------
def _rng_file(args) -> str:
    return "rng_state.safetensors" if args.world_size <= 1 else f"rng_state_{args.process_index}.safetensors"


class PickleFreeCheckpoints:
    """Mixed in before a Trainer class: the same checkpoints, pickle-free. Loading calls the
    Trainer's own loader first, which finds no .pt file and loads nothing, but lets a TRL
    subclass restore its extras (GRPOTrainer's entropy control), then reads these files."""

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # transformers 5.25: other processes join collectives, write nothing
            return super()._save(output_dir, state_dict)
        # Trainer._save without its last line, `torch.save(self.args, "training_args.bin")`.
        os.makedirs(output_dir, exist_ok=True)
        model = self.model if hasattr(self.model, "save_pretrained") else self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir, state_dict=state_dict)  # safetensors
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_atomic(Path(output_dir) / TRAINING_ARGS_FILE, training_args_json(self.args))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        save_state(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER_FILE)
        save_state(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 mixed precision only
        if scaler is not None:
            save_state(scaler.state_dict(), Path(output_dir) / SCALER_FILE)

    def _save_scaler(self, output_dir: str) -> None:
        pass  # saved with the optimizer, above

    def _save_rng_state(self, output_dir: str) -> None:
        import numpy as np
        import torch

        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        save_state(states, Path(output_dir) / _rng_file(self.args))  # each process its own, as the Trainer does

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        redo = f"remove {folder} to resume from the checkpoint before it"
        self.optimizer.load_state_dict(load_state(folder / OPTIMIZER_FILE, redo))
        self.lr_scheduler.load_state_dict(load_state(folder / SCHEDULER_FILE, redo))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and (folder / SCALER_FILE).is_file():
            scaler.load_state_dict(load_state(folder / SCALER_FILE, redo))

    def _load_scaler(self, checkpoint: str | None) -> None:
        pass  # loaded with the optimizer, above

    def _load_rng_state(self, checkpoint: str | None) -> None:
        import numpy as np
        import torch

        if checkpoint is None or not (Path(checkpoint) / _rng_file(self.args)).is_file():
            return  # resumed on another number of processes: no state of its own, as in the Trainer
        states = load_state(Path(checkpoint) / _rng_file(self.args), f"remove {checkpoint} to resume from "
                            "the checkpoint before it")
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            if len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.random.set_rng_state_all(states["cuda"])
            else:
                torch.cuda.random.set_rng_state(states["cuda"][0])


_CLASSES: dict[type, type] = {}


def pickle_free(trainer):
    """Make `trainer` (any transformers Trainer) write and read pickle-free checkpoints and
    output folders from now on. Its class becomes a subclass with PickleFreeCheckpoints in
    front; the instance is returned, for chaining."""
    cls = type(trainer)
    if not isinstance(trainer, PickleFreeCheckpoints):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"PickleFree{cls.__name__}", (PickleFreeCheckpoints, cls), {})
        trainer.__class__ = _CLASSES[cls]
    return trainer

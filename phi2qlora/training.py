"""A training run: the output directory it claims, the checkpoints it can resume from,
and the guard around `trainer.train()` (Ctrl-C and preemption, NaN and inf, out of
memory), then its curves."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

from phi2qlora.checkpoints import OPTIMIZER_FILE, SCHEDULER_FILE, pickle_free
from phi2qlora.errors import InputError, RunFault
from phi2qlora.files import (
    atomic_path,
    check_output_apart,
    check_safetensors,
    check_writable,
    file_sha256,
    is_adapter_folder,
    read_json_file,
    write_atomic,
)

CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", OPTIMIZER_FILE, SCHEDULER_FILE)
COMPLETE_MARK = "checkpoint_complete"  # written by TrainingGuard after the Trainer has saved everything
RUN_FILE = "run.json"  # what ran in an output directory, so a resume can't mix two runs


def latest_complete_checkpoint(output_dir: str | os.PathLike, verbose: bool = False) -> str | None:
    """The highest-numbered `checkpoint-N` that was saved whole: it holds every file a
    resume needs and TrainingGuard's mark, written after them. The Trainer writes in place
    and transformers' get_last_checkpoint takes the highest number even if a kill -9 cut
    its writing short."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        step = checkpoint_step(d)
        if step is None:
            continue
        missing = [f for f in (*CHECKPOINT_FILES, COMPLETE_MARK) if not (d / f).is_file()]
        if missing:
            if verbose:
                print(f"[resume] skipping {d}: incomplete (no {', '.join(missing)}; interrupted while saving?)")
            continue
        found.append((step, d))
    return str(max(found)[1]) if found else None


def checkpoint_step(folder: Path) -> int | None:
    """N of a `checkpoint-N` folder; None for anything else."""
    step = folder.name.removeprefix("checkpoint-")
    return int(step) if folder.name.startswith("checkpoint-") and step.isdigit() and folder.is_dir() else None


def claim_output_dir(output_dir: str | os.PathLike, run: dict, resume: bool,
                     resume_from_checkpoint: str | None = None, inputs: dict | None = None) -> str | None:
    """Check that `output_dir` is free or holds this same run, before any model is loaded,
    and return the checkpoint to resume from (None: start fresh). `run` names what must not
    change across a resume (script, model, adapter shape); it is written to run.json.

    `resume_from_checkpoint` (the Trainer's `--resume_from_checkpoint`): a checkpoint-N
    folder to resume from into `output_dir`, with the checks of the automatic resume: saved
    whole, undamaged, written by this same run. `inputs` ({flag: path}): what the run reads;
    `output_dir` may neither be one of them, nor hold one, nor lie inside one."""
    root = Path(output_dir)
    check_writable(root, "--output_dir")
    saved = read_run(root)
    has_run = any(root.glob("checkpoint-*")) or is_adapter_folder(root)
    if saved is None and has_run:
        raise InputError(f"{root} holds checkpoints or an adapter of another run (no {RUN_FILE}); "
                         "choose another --output_dir or remove that directory")
    # A run that failed before its first checkpoint left only run.json: the corrected
    # command may take the directory over.
    if saved is not None and saved != run and has_run:
        raise InputError(f"{root} holds another run ({run_changes(saved, run)}); choose another --output_dir "
                         "or remove it")
    check_output_apart(root, "--output_dir", inputs or {})
    if resume_from_checkpoint:
        resume_from = checked_start(resume_from_checkpoint, run, resume, root)
    elif has_run and not resume:
        raise InputError(f"{root} holds checkpoints of this run and --resume is false; to start over, "
                         f"remove the directory first (rm -r {root}) or choose another --output_dir")
    else:
        resume_from = latest_complete_checkpoint(root, verbose=True) if resume else None
        if resume_from:
            check_checkpoint(resume_from)
    if _is_main_process():
        write_atomic(root / RUN_FILE, json.dumps(run, indent=1) + "\n")
    return resume_from


def run_identity(script: str, model_args, dtype, sft_adapter: str | None = None, **extra) -> dict:
    """What names a run for `claim_output_dir`: the script, the base model as loaded, and for
    the stages that continue an SFT adapter, that adapter's folder and content (a retrained
    SFT run in the same folder is another start); `extra`: the script's own fields."""
    run = {"script": script, "model": model_args.model_name_or_path, "load_in_4bit": model_args.load_in_4bit,
           "double_quant": model_args.use_bnb_nested_quant, "dtype": str(dtype).removeprefix("torch.")}
    if sft_adapter is not None:
        run.update(sft_adapter=str(Path(sft_adapter).resolve()),
                   sft_adapter_sha256=file_sha256(Path(sft_adapter) / "adapter_model.safetensors"))
    return {**run, **extra}


def input_paths(*arguments) -> dict:
    """{flag: path} of what a run reads, from its arguments' dataclasses (script arguments
    and ModelConfig): the model, and every field named *_file or *_adapter."""
    import dataclasses

    return {f"--{f.name}": getattr(a, f.name) for a in arguments for f in dataclasses.fields(a)
            if f.name == "model_name_or_path" or f.name.endswith(("_file", "_adapter"))}


def read_run(folder: Path) -> dict | None:
    """The run.json of an output folder or a checkpoint, if it has one."""
    path = Path(folder) / RUN_FILE
    return read_json_file(path, f"remove {path} if that run is over") if path.is_file() else None


def run_changes(saved: dict, run: dict) -> str:
    return ", ".join(f"{k}: {saved.get(k)!r} there, {run.get(k)!r} now"
                     for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k))


def checked_start(checkpoint: str, run: dict, resume: bool, root: Path) -> str:
    """`--resume_from_checkpoint DIR`, checked as the automatic resume checks its own."""
    flag = f"--resume_from_checkpoint {checkpoint}"
    folder = Path(checkpoint)
    if not resume:
        raise InputError(f"{flag} and --resume false ask for opposite things; leave one of them out")
    step = checkpoint_step(folder)
    if not folder.exists():
        raise InputError(f"{flag}: no such folder; give a checkpoint-N folder of an output directory")
    if step is None:
        raise InputError(f"{flag}: not a checkpoint folder; give a checkpoint-N folder of an output directory "
                         "(sft_qlora.py and grpo_train.py write them every save_steps)")
    missing = [f for f in (*CHECKPOINT_FILES, COMPLETE_MARK) if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{flag}: saved in part only (no {', '.join(missing)}; interrupted while saving?); "
                         "give an earlier checkpoint")
    saved = read_run(folder) or read_run(folder.parent)
    if saved is None:
        raise InputError(f"{flag}: no {RUN_FILE} in it or beside it, so nothing says which run wrote it; "
                         "resume by rerunning that run's own command")
    if saved != run:
        raise InputError(f"{flag}: written by another run ({run_changes(saved, run)}); give the same model and "
                         "options as that run")
    if root.resolve().is_relative_to(folder.resolve()):
        raise InputError(f"--output_dir {root}: inside the checkpoint {folder}; choose another --output_dir")
    later = sorted((n, d.name) for d in root.glob("checkpoint-*") if (n := checkpoint_step(d) or 0) > step)
    if later:
        raise InputError(f"--output_dir {root} holds checkpoints after step {step} ({', '.join(n for _, n in later)}), "
                         "which this run would write over; remove them first, or resume into another --output_dir")
    check_checkpoint(folder)
    print(f"[resume] from {folder} (--resume_from_checkpoint), into {root}")
    return str(folder)


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Every file a resume reads is whole: a checkpoint marked complete can still be damaged
    later (a copy cut short, a disk fault), and would end in a library's traceback."""
    folder = Path(folder)
    redo = f"remove {folder} to resume from the checkpoint before it, or copy it again if it was copied"
    for path in sorted(folder.glob("**/*.json")):
        read_json_file(path, redo)
    for path in sorted(folder.glob("**/*.safetensors")):
        check_safetensors(path, redo)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process



def train_guarded(trainer, resume_from: str | None, memory_knobs: dict) -> None:
    """`trainer.train()` for a run that may be interrupted or go wrong:

    - Ctrl-C / SIGTERM (preemption): the current optimizer step finishes, a checkpoint is
      saved, and the script exits with 130 / 143; a second Ctrl-C quits at once.
    - a non-finite loss, gradient or weight stops the run with the step and likely causes;
      nothing is saved after the fault, so the last checkpoint stays good.
    - CUDA out of memory ends with the recipe values to lower (`memory_knobs`).
    """
    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != trainer.args.world_size:  # else each process would train alone, racing on the files
        raise InputError(f"launched as {launched} processes but they did not connect (the Trainer sees "
                         f"{trainer.args.world_size}); without GPUs, pass --use_cpu true to use gloo")
    asked = trainer.args.resume_from_checkpoint
    if asked and (resume_from is None or Path(asked).resolve() != Path(resume_from).resolve()):
        # The Trainer itself ignores this field; claim_output_dir honours it.
        raise InputError(f"--resume_from_checkpoint {asked}: this script does not resume from a given checkpoint; "
                         "leave it out (rerunning the command resumes from the latest complete checkpoint)")
    pickle_free(trainer)  # no pickles in the checkpoints or the output folder
    # The guard stops on a non-finite loss; the Trainer's filter would log the mean of the
    # earlier losses in its place, and reads each micro-step's loss on the host to do so
    # (a GPU sync a micro-step, the GPU idle while the host prepares the optimizer step).
    trainer.args.logging_nan_inf_filter = False
    guard = TrainingGuard()
    trainer.add_callback(guard)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        knobs = ", ".join(f"{k} (now {v})" for k, v in memory_knobs.items())
        raise RunFault(f"out of GPU memory at step {trainer.state.global_step}. Lower, in this order: {knobs}. "
                       "Halving per_device_train_batch_size and doubling gradient_accumulation_steps keeps "
                       "the effective batch. Checkpoints written so far are intact: rerun to resume.") from None
    finally:
        guard.restore_signal_handlers()
    if guard.signal is not None:
        name = signal.Signals(guard.signal).name
        where = latest_complete_checkpoint(trainer.args.output_dir)
        print(f"[stop] {name}: stopped at step {trainer.state.global_step}, saved {where}. "
              "Run the same command again to resume.", flush=True)
        raise SystemExit(128 + guard.signal)


class TrainingGuard(TrainerCallback):
    """train_guarded's Trainer callback: signals, non-finite values, and the mark of a
    complete checkpoint."""

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._unread_check = None  # (step, flag, event): a GPU weight check not read yet

    # -- signals ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal is not None:  # asked twice: stop now, without a checkpoint
            self.restore_signal_handlers()
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[stop] got {signal.Signals(signum).name}: saving a checkpoint after this step "
              "(Ctrl-C again to quit at once, without one)", flush=True)

    def restore_signal_handlers(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._any_process_signalled():  # first: a step that will save reads its weight check at once
            control.should_save = True
            control.should_training_stop = True
        self._check_weights(model, args, state, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer decides an epoch's save, evaluation and log after its last step's end
        # (save_strategy "epoch"): that step's check is read before any of them.
        self._read_weight_check(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._read_weight_check(args, state)

    def _any_process_signalled(self) -> bool:
        """Every process must stop at the same step, or the others wait forever at the
        next gradient sync; a signal can reach one process only."""
        import torch
        import torch.distributed as dist

        stop = self.signal is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
            if stop and self.signal is None:
                self.signal = signal.SIGTERM  # another process was told
        return stop

    # -- numerical faults -------------------------------------------------------------
    def _check_weights(self, model, args, state, control):
        """Every trainable weight finite after this optimizer step. On a GPU the answer is read
        at the next step's end: reading it now would make the host wait for the GPU at every
        step, leaving the GPU idle while the host prepares the next one (the data, the
        Trainer's step-end work). A step that saves, evaluates, logs or ends reads its own at
        once, so nothing non-finite is saved."""
        import torch

        self._read_weight_check(args, state)
        trainable = [p.detach() for p in model.parameters() if p.requires_grad] if model is not None else []
        if not trainable:
            return
        finite = torch.isfinite(torch.stack(torch._foreach_norm(trainable))).all()
        self._unread_check = (state.global_step, finite, None)
        if finite.is_cuda and not (control.should_save or control.should_evaluate or control.should_log
                                   or control.should_training_stop):  # read at the next step's end
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._unread_check = (state.global_step, flag, event)
        else:
            self._read_weight_check(args, state)

    def _read_weight_check(self, args, state):
        if self._unread_check is None:
            return
        step, flag, event = self._unread_check
        self._unread_check = None
        if event is not None:
            event.synchronize()
        if not bool(flag):
            self._fault(args, state, "a trainable weight became NaN or inf in that optimizer step", step=step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if key == "grad_norm" and args.fp16:
                continue  # fp16's loss scaler skips overflowing steps itself, by design
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._fault(args, state, f"the logged {key} is {value}")

    def _fault(self, args, state, what: str, step: int | None = None):
        last = latest_complete_checkpoint(args.output_dir)
        raise RunFault(
            f"step {state.global_step if step is None else step}: {what}. Likely causes: fp16 overflow (on a T4: "
            "Phi-2's activations can exceed fp16's range; lower learning_rate, keep max_grad_norm, use sdpa "
            "attention) or a learning rate too high for this batch. Nothing was saved after the fault; the last "
            f"good checkpoint is {last or 'none'}: lower learning_rate and rerun to resume from it.")

    # -- complete checkpoints ---------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                # The run travels with its checkpoint, for --resume_from_checkpoint from a copy.
                if (Path(args.output_dir) / RUN_FILE).is_file():
                    write_atomic(folder / RUN_FILE, (Path(args.output_dir) / RUN_FILE).read_text(encoding="utf-8"))
                write_atomic(folder / COMPLETE_MARK, f"step {state.global_step}\n")


def plot_history(log_history: list[dict], series: dict[str, str], path: str | os.PathLike, title: str) -> bool:
    """Plot `{label: log key}` against the step from a Trainer's log history. Returns False
    (and writes nothing) when none of the keys was logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: a file, on a server or in CI
    import matplotlib.pyplot as plt

    curves = {}
    for label, key in series.items():
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            curves[label] = points
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


def save_trained_adapter(model, tokenizer, output_dir) -> None:
    """The adapter that trained (`default`) and the tokenizer with the chat tokens, for a run
    that continued a loaded adapter: its checkpoints also hold TRL's frozen `ref` copy."""
    model.save_pretrained(output_dir, selected_adapters=["default"])
    tokenizer.save_pretrained(output_dir)

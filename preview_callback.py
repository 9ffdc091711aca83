"""Watch the model learn: answers to fixed prompts, before training, every N optimizer
steps, and at the end, printed to the log and appended to `previews.jsonl` and
`previews.md` in the output directory.

Works with any `transformers.Trainer` (TRL's `SFTTrainer` and `GRPOTrainer` included):

    trainer.add_callback(PreviewCallback(tokenizer, output_dir, every=100))
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from phi2qlora.answers import generate_answers
from phi2qlora.chat import DEFAULT_PROMPTS
from phi2qlora.rewards import word_limit_compliance
from phi2qlora.word_limits import limit_verdict


class PreviewCallback(TrainerCallback):
    """Generate answers to `prompts` at step 0 (the untrained baseline), every `every`
    optimizer steps, and after the last step. Only the main process generates; the others
    go on to the next step and wait for it there, at the gradient sync."""

    def __init__(self, tokenizer, output_dir: str | Path, prompts: list[str] | None = None,
                 every: int = 100, max_new_tokens: int = 128, max_share: float = 0.0, fast: bool = True):
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        self.every = every
        self.max_new_tokens = max_new_tokens
        self.fast = fast  # phi2qlora/rollouts.py's greedy decoding (plain generate where it can't)
        self.max_share = max_share  # of the training time, for the previews between the first and the last (0: no cap)
        self.last_step = None
        self.seconds = 0.0  # time spent generating, to weigh against training time
        self.durations = []  # each preview's seconds
        self.last_seconds = None
        self.started = None
        self.skipped = 0

    @classmethod
    def for_run(cls, tokenizer, output_dir, prompts, script_args, fast: bool):
        """The callback a training script adds, from its preview_* options; None when
        `preview_steps` is 0."""
        if script_args.preview_steps <= 0:
            return None
        return cls(tokenizer, output_dir, prompts, every=script_args.preview_steps,
                   max_new_tokens=script_args.preview_max_new_tokens, max_share=script_args.preview_max_share,
                   fast=fast)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started = time.perf_counter()
        self.preview(model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and self.within_share():
            self.preview(model, state)

    def within_share(self) -> bool:
        """A scheduled preview runs only if all previews so far plus this one (guessed to take
        as long as the last) stay within `max_share` of the time since training began: where a
        preview is slow against the steps (plain `generate`, 13-17 s for Phi-2 on an H100,
        against 0.7 s through the fast decoder), previews come less often than every `every`
        steps, never more often."""
        if not self.max_share or self.started is None or self.last_seconds is None:
            return True
        elapsed = time.perf_counter() - self.started
        if self.seconds + self.last_seconds <= self.max_share * elapsed:
            return True
        self.skipped += 1
        return False

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.preview(model, state)

    def preview(self, model, state) -> list[dict] | None:
        if not state.is_world_process_zero or state.global_step == self.last_step or model is None:
            return None
        self.last_step = state.global_step
        start = time.perf_counter()
        answers = generate_answers(model, self.tokenizer, self.prompts, self.max_new_tokens, fast=self.fast)
        self.last_seconds = time.perf_counter() - start
        self.seconds += self.last_seconds
        self.durations.append(self.last_seconds)
        self.write(state.global_step, answers)
        return answers

    def write(self, step: int, answers: list[dict]) -> None:
        title = f"Preview at step {step}" + (" (before training)" if step == 0 else "")
        blocks = [f"## {title}\n"]
        for a in answers:
            status = "" if a["ended"] else ", cut off"
            verdict = limit_verdict(a["prompt"], a["answer"])  # "under 50 words": at most 49
            status += f", {verdict}" if verdict else ""
            quoted = "\n".join("> " + line for line in (a["answer"] or "(empty)").splitlines())
            blocks.append(f"**Prompt:** {a['prompt']}\n\n**Answer** ({a['words']} words{status}):\n\n{quoted}\n")
        text = "\n".join(blocks)
        # 1.0 / 0.0 for a prompt with a word limit (IFEval's strict check), None without one
        compliance = word_limit_compliance([a["prompt"] for a in answers], [a["answer"] for a in answers])
        print(f"\n{'=' * 80}\n{text}{'=' * 80}\n", flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # One write each: a crash leaves whole previews, never half of one.
        with open(self.output_dir / "previews.md", "a", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(self.output_dir / "previews.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **a, "compliance": c}, ensure_ascii=False) + "\n"
                            for a, c in zip(answers, compliance)))

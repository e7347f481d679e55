"""`qwenmoe-gb` run that SIGKILLs itself, for the crash tests: `python tests/crash_launcher.py MODE STEP -- ARGV...`
(or under torchrun). MODE `step`: killed at the end of optimizer step STEP (rank 0). MODE `save`: killed inside the
checkpoint save of step STEP, after the weights are written and before the optimizer, the RNG states and
`trainer_state.json` (an incomplete checkpoint). MODE `none`: not killed. Everything else is the real command
(`modeling_qwenmoe_gb.cli.main`). With `RECORD_BATCHES=DIR`, every rank appends each micro-batch it trains on (the
optimizer step it belongs to, and a SHA-256 of its input_ids) to `DIR/rank<r>.jsonl`.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

from modeling_qwenmoe_gb import trainer as trainer_module  # noqa: E402
from modeling_qwenmoe_gb.cli import main  # noqa: E402


def kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == 0:
            kill()


def record_batches(folder: str) -> None:
    mixin = trainer_module.GlobalBalanceMixin
    original = mixin.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            ids = inputs["input_ids"].cpu().numpy()
            row = {"step": self.state.global_step + 1, "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
            with open(Path(folder) / f"rank{self.args.process_index}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return original(self, model, inputs, *args, **kwargs)

    mixin.compute_loss = compute_loss


def arm(mode: str, step: int) -> None:
    mixin = trainer_module.GlobalBalanceMixin
    if os.environ.get("RECORD_BATCHES"):
        record_batches(os.environ["RECORD_BATCHES"])
    if mode == "none":
        return
    if mode == "step":
        original_init = mixin.__init__

        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.add_callback(KillAtStep(step))

        mixin.__init__ = init
    elif mode == "save":
        original_save = mixin._save_optimizer_and_scheduler

        def save(self, output_dir):
            if self.state.global_step == step and self.args.process_index == 0:
                kill()
            original_save(self, output_dir)

        mixin._save_optimizer_and_scheduler = save
    else:
        raise SystemExit(f"unknown mode {mode!r}: allowed step, save")


if __name__ == "__main__":
    mode, step, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: crash_launcher.py MODE STEP -- ARGV..."
    arm(mode, int(step))
    main(argv)

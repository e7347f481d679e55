"""`qwenmoe-gb` run that SIGKILLs itself, for the crash tests: `python tests/crash_launcher.py MODE STEP -- ARGV...`
(or under torchrun). MODE `step`: killed at the end of optimizer step STEP (rank 0). MODE `save`: killed inside the
checkpoint save of step STEP, after the weights are written and before the optimizer, the RNG states and
`trainer_state.json` (an incomplete checkpoint). Everything else is the real command (`modeling_qwenmoe_gb.cli.main`).
"""

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


def arm(mode: str, step: int) -> None:
    mixin = trainer_module.GlobalBalanceMixin
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

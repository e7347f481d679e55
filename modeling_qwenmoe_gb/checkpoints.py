"""Crash-safe runs: which checkpoint a run resumes from, and whether a checkpoint is complete.

Features
- `checkpoint_problem(folder)`: why a Trainer checkpoint cannot be resumed from — the first file it needs that is
  missing or cut short (what a crash during a save leaves), or None when it is complete. Checked on load, so it holds
  for checkpoints written by any version: `trainer_state.json` (parsed), the weights (`model.safetensors`, or the
  shards of its index, each header parsed and the file as long as its tensors), the optimizer and scheduler
  (`optimizer.pt` / `scheduler.pt`; for a model sharded at load time the per-rank weight shards of `dcp_model/` and
  the `torch.distributed.checkpoint` folder `dcp_optimizer/` with its `.metadata`, written last), and every other
  `.pt` / `.pth` file it holds (RNG and balance state) as a whole zip archive.
- `resolve_resume(output_dir, value, overwrite)`: `--resume_from_checkpoint auto` (the default of `qwenmoe-gb
  pretrain`): the newest complete `checkpoint-N` of the output folder, skipping incomplete ones with a warning naming
  them and the reason; none → a fresh start, refused into a folder that holds a finished run unless `overwrite`.
  `none`: start over, refused while the folder holds an earlier run's checkpoints (which the new run's rotation would
  delete) unless `overwrite`. A path: that checkpoint, which must be complete (`ValueError` naming the folder and the
  file otherwise).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from transformers.utils.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RESUME_MODES = ("auto", "none")
FINISHED_RUN_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "eval.json"
)  # fmt: skip


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (missing, a header that does not parse, fewer bytes than its tensors),
    or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is cut short ({size} bytes)"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"{path.name} is cut short: {size} bytes, its header alone is {8 + length}"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return f"{path.name} has a header that does not parse"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path.name} is cut short: {size} bytes of {8 + length + end}"
    return None


def archive_problem(path: Path) -> str | None:
    """Why a `torch.save` file is not whole (missing, or not a complete zip archive: a cut-short file has no central
    directory), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is cut short (not a complete torch.save archive)"


def checkpoint_problem(folder: str | Path) -> str | None:
    """The first reason the checkpoint `folder` cannot be resumed from, or None when every file it needs is whole."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (written last: the save did not finish)"
    try:
        json.loads(state.read_text())
    except ValueError:
        return "trainer_state.json does not parse"
    if (folder / "dcp_model").is_dir():  # a model sharded at load time: a shard per rank, the optimizer by DCP
        shards = sorted((folder / "dcp_model").glob("*.safetensors"))
        if not shards:
            return "dcp_model/ holds no shard"
        for shard in shards:
            if problem := safetensors_problem(shard):
                return f"dcp_model/{problem}"
        if not (folder / "dcp_optimizer" / ".metadata").is_file():
            return "dcp_optimizer/.metadata is missing (written last: the save did not finish)"
        return archive_problem(folder / "scheduler.pt")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return "model.safetensors.index.json does not parse"
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        if problem := safetensors_problem(folder / shard):
            return problem
    for required in ("optimizer.pt", "scheduler.pt"):
        if problem := archive_problem(folder / required):
            return problem
    for other in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        if problem := archive_problem(other):
            return problem
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of a run, newest (highest N) first."""
    root = Path(output_dir)
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name)[1]), reverse=True)


def resolve_resume(output_dir: str | Path, value: str | None, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from (a path) or None for a fresh start; see the module docstring. `ValueError` for a
    start that would lose an earlier run's work, and for an explicit checkpoint that is not complete."""
    value = "auto" if value is None else value
    existing = checkpoints(output_dir)
    if value == "none":
        if existing and not overwrite:
            raise ValueError(
                f"resume_from_checkpoint='none' into output_dir={str(output_dir)!r}, which holds the checkpoints "
                f"{[p.name for p in existing]} of an earlier run (the new run's rotation would delete them): allowed "
                "--resume_from_checkpoint auto (resume the newest complete one), --overwrite_output_dir true (start "
                "over there), or another --output_dir"
            )
        return None
    if value != "auto":
        problem = checkpoint_problem(value)
        if problem:
            raise ValueError(
                f"resume_from_checkpoint={value!r} cannot be resumed from: {problem}; allowed a complete checkpoint "
                "folder, 'auto' (the newest complete one in output_dir) or 'none'"
            )
        return str(value)
    for folder in existing:
        problem = checkpoint_problem(folder)
        if problem is None:
            logger.warning("resuming from %s, the newest complete checkpoint in %s", folder, output_dir)
            return str(folder)
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    finished = [n for n in FINISHED_RUN_FILES if (Path(output_dir) / n).is_file()]
    if finished and not overwrite:
        raise ValueError(
            f"output_dir={str(output_dir)!r} holds a finished run ({', '.join(finished)}) and no complete checkpoint "
            "to resume: allowed --overwrite_output_dir true (train again there) or another --output_dir"
        )
    return None


__all__ = ["RESUME_MODES", "archive_problem", "checkpoint_problem", "checkpoints", "resolve_resume",
           "safetensors_problem"]  # fmt: skip

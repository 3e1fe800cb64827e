"""The run folder: checkpoints/ named in creation order, history.jsonl, config.yaml and the lock
held by one command at a time."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sparsify.errors import CheckpointError, RunLockedError
from sparsify.io.files import append_lines, temporary_writer, write_failure

_NAME = re.compile(r"^(\d{3,})-r(\d{2,})-([a-z]+)\.safetensors$")
TRAIN_STATE = "train-state.safetensors"
_HELD: set[str] = set()  # run locks this process holds for its stages (resolved lock file paths)


def history_entry(meta: dict, checkpoint: str, sha256: str, time: str) -> dict:
    """The history.jsonl line of a checkpoint, from its metadata and the `record` it carries."""
    record = meta["record"]
    return {"time": time, "command": record["command"], "round": meta["round"], "stage": meta["stage"],
            "checkpoint": checkpoint, "sha256": sha256, "sparsity": record["sparsity"], "metrics": meta["metrics"],
            "seconds": record["seconds"]}


class RunDir:
    """The run folder: checkpoints/, history.jsonl, config.yaml and the lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoints_dir = self.root / "checkpoints"
        self.history_path = self.root / "history.jsonl"
        self.lock_path = self.root / ".lock"

    def checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def require_latest(self) -> Path:
        """The latest checkpoint; CheckpointError telling how to start the run when there is none."""
        path = self.latest()
        if path is None:
            raise CheckpointError(f"run folder {self.root} has no checkpoint yet; start it with `sparsify download`")
        return path

    def make_checkpoints_dir(self) -> None:
        """Create checkpoints/ if needed; WriteFailed when it cannot be made."""
        try:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(self.checkpoints_dir, exc) from None

    def next_checkpoint_path(self, round_: int, stage: str) -> Path:
        found = self.checkpoints()
        index = int(_NAME.match(found[-1].name).group(1)) + 1 if found else 0
        return self.checkpoint_path(index, round_, stage)

    def checkpoint_path(self, index: int, round_: int, stage: str) -> Path:
        return self.checkpoints_dir / f"{index:03d}-r{round_:02d}-{stage}.safetensors"

    def history(self) -> list[dict]:
        """Every line of history.jsonl; CheckpointError naming the first line that is not a JSON object."""
        entries, problems = self.readable_history()
        if problems:
            raise CheckpointError(f"{problems[0]}; fix or remove that line")
        return entries

    def readable_history(self) -> tuple[list[dict], list[str]]:
        """The lines of history.jsonl that are JSON objects, and one phrase per line that is not."""
        if not self.history_path.is_file():
            return [], []
        entries, problems = [], []
        text = self.history_path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                problems.append(f"{self.history_path} line {number} is not a JSON object")
        return entries, problems

    def recorded_sha256(self, path: Path, *, lenient: bool = False) -> str | None:
        """The sha256 the history recorded for checkpoint `path` (lenient: skipping unreadable lines)."""
        for entry in reversed(self.readable_history()[0] if lenient else self.history()):
            if entry.get("checkpoint") == path.name:
                return entry.get("sha256")
        return None

    def append_history(self, entry: dict) -> None:
        """Append one JSON line and fsync it (whole or absent, also when the disk is full: WriteFailed)."""
        append_lines(self.history_path, (json.dumps(entry, sort_keys=False) + "\n").encode())

    def create(self) -> None:
        """Make the run folder, or say in one line why it cannot be made."""
        for folder in [*reversed(self.root.parents), self.root]:
            if folder.exists() and not folder.is_dir():
                raise CheckpointError(f"cannot make run folder {self.root}: {folder} is a file; set runs_dir "
                                      "(or name) to a folder path")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot make run folder {self.root} ({exc.strerror}); set runs_dir to a "
                                  "folder you can write") from None

    @contextmanager
    def lock(self, command: str, *, create: bool = False, for_stages: bool = False) -> Iterator[None]:
        """Hold the run's lock for the duration of one command (released even on a crash). With `for_stages`
        (`run` around its stages), the stages this process runs meanwhile find it held and go on under it."""
        key = str(self.lock_path.resolve())
        if key in _HELD:
            yield
            return
        if create:
            self.create()
        elif not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise CheckpointError(f"run folder {self.root} {what}; start the run with `sparsify download`")
        if not os.access(self.root, os.W_OK | os.X_OK):  # before anything is changed, not halfway through
            raise CheckpointError(f"run folder {self.root} is read-only for this user; nothing was changed: make it "
                                  f"writable (chmod u+w {self.root}) and run the command again")
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot write the lock file {self.lock_path} ({exc.strerror}); make the run folder "
                                  "writable for this user") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise RunLockedError(
                    f"run folder {self.root} is in use by {holder}; wait for it to finish or stop it"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})".encode(), 0)
            if for_stages:
                _HELD.add(key)
            self.tidy_after_crash()
            yield
        finally:
            _HELD.discard(key)
            os.close(fd)

    def tidy_after_crash(self) -> None:
        """Under the lock, what a command killed while writing left behind: its temporary files go (no other
        command writes here now), and a checkpoint made visible without its history line (killed between the
        two) gets that line from the `record` it carries, so a rerun goes on after it instead of repeating
        its stage; the train-state of the stage that made it goes too."""
        for folder in (self.root, self.checkpoints_dir):
            for path in folder.glob(".*.tmp") if folder.is_dir() else []:
                writer = temporary_writer(path.name)
                if writer is not None and writer != os.getpid():
                    path.unlink(missing_ok=True)
        latest = self.latest()
        if latest is not None and self.recorded_sha256(latest, lenient=True) is None:
            self.record_unrecorded(latest)

    def record_unrecorded(self, path: Path) -> None:
        """Append the history line `write_stage` did not get to write for checkpoint `path`, when it is the
        run's next stage as written by it: it carries `record`, its parent is the last recorded checkpoint and
        its name's stage is its own (a copy put there by hand is left as it is)."""
        from sparsify.io.checkpoint import decode_metadata, read_metadata
        from sparsify.io.tensorfile import MappedFile

        recorded = [e.get("checkpoint") for e in self.readable_history()[0] if e.get("stage") != "eval"]
        named = _NAME.match(path.name)
        try:
            meta = decode_metadata(read_metadata(path), path)
            entry = history_entry(meta, path.name, MappedFile(path, sha256=True).sha256(), meta.get("created"))
        except Exception:  # unreadable, or written without a record: loading it says what is wrong
            return
        next_stage = meta.get("parent") == (recorded[-1] if recorded else None)
        if not next_stage or named is None or named.group(3) != entry["stage"]:
            return
        self.append_history({**entry, "recorded_after_a_crash": True})
        state = self.root / TRAIN_STATE
        try:
            started_from = json.loads(read_metadata(state).get("start_checkpoint", "null")) if state.is_file() else None
        except Exception:
            started_from = None
        if started_from is not None and started_from == meta.get("parent"):
            state.unlink(missing_ok=True)  # the stage it resumed finished in `path`

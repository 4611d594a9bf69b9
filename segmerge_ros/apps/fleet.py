"""``segmerge-bag IN... --out-dir DIR [--workers N] [--ray-address ADDR]``: many recordings, one output bag each.

Every input (a bag, a folder of bags, a glob) gets ``DIR/<its name>``, as ``segmerge-bag IN DIR/<name>`` would
write it, and an entry in ``DIR/segmerge-manifest.json`` (``bag_manifest.py``: statuses, checksums, the resume
rules). A re-run skips what is done and redoes the rest; an input that fails is recorded and the others go on.

``--workers 1`` (the default) runs the bags one after another in this process. ``--workers N`` runs them on Ray
(``pip install 'segmerge_ros[fleet]'``): N actors (``BagWorker``), each building the models once and taking whole
bags, one at a time, so a bag's frames stay in order (budget replay included). Ray is local (``ray.init`` with N
workers' CPUs) unless ``--ray-address`` names a running cluster, whose nodes then need segmerge_ros installed and
DIR and the inputs at the same paths. One progress bar counts the frames of all bags; the table at the end has a row
per input. Exit status: 0 when every input is complete, 1 when any failed (or had frames that failed), 130 on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from segmerge_ros.apps.bag_io import BagError, InputBag, select_cameras
from segmerge_ros.apps.bag_manifest import (COMPLETE, DO, FAILED, INPUT_ERROR, KEEP, MANIFEST_NAME, PARTIAL_DIR,
                                            RUN_ERROR, RUNNING, SKIP, Decision, Manifest, checksum, decide,
                                            failed_entry, fingerprint, now, out_dir_lock, output_name,
                                            summary_entry)
from segmerge_ros.apps.bag_run import BagProcessor, progress_bar
from segmerge_ros.ros.startup import StartupError

RAY_INSTALL_HINT = ("--workers N runs the bags on Ray, which is not installed here: pip install "
                    "'segmerge_ros[fleet]' (or pip install -r requirements-fleet.txt), or leave --workers out to "
                    "run them one after another in this process")
POLL_S = 0.25  # how often the driver asks the Ray workers how far they are


# -- inputs -------------------------------------------------------------------------------------------------------
def expand_inputs(patterns: list[str], out_dir: Path) -> tuple[dict[str, Path], list[Path]]:
    """(output name -> input, the paths left out): each pattern a bag, a folder holding bags (one level) or a glob of
    those; what ``among_outputs`` says is the out dir's own is left out. BagError when a glob matches nothing,
    nothing is left or two inputs share a name."""
    found: dict[str, Path] = {}
    left_out: list[Path] = []
    outputs = out_dir.resolve()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            if not matches:
                raise BagError(f"no bag matches {pattern}")
        else:
            matches = [Path(pattern)]
        for path in (bag for match in matches for bag in bags_in(match)):
            resolved = path.resolve()
            if among_outputs(resolved, outputs):
                left_out.append(path)
                continue
            name = output_name(path)
            if name in found and found[name].resolve() != resolved:
                raise BagError(f"{found[name]} and {path} would both write {out_dir / name}: rename one, or give "
                               "them separate --out-dir's")
            found.setdefault(name, path.absolute())  # workers (on other machines too) need no working folder
    if not found:
        raise BagError("no input bags given" + (f": {len(left_out)} path(s) are --out-dir {out_dir}'s own "
                                                "(its outputs)" if left_out else ""))
    return found, left_out


def among_outputs(path: Path, out_dir: Path) -> bool:
    """Whether the resolved ``path`` is the out dir's own: the dir itself, anything directly in it, or inside one of
    its bag folders or its partial folder. Recordings in other folders below it (``DIR/recordings/...``) are not."""
    if path == out_dir:
        return True
    if out_dir not in path.parents:
        return False
    top = out_dir / path.relative_to(out_dir).parts[0]
    return top == path or top.name == PARTIAL_DIR or (top / "metadata.yaml").is_file()


def bags_in(path: Path) -> list[Path]:
    """A bag as itself; a folder without metadata.yaml: the bags in it (folders with one, .mcap and .db3 files) if
    there are any; anything else as itself (its run then says why it is no bag)."""
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        inside = sorted(p for p in path.iterdir() if not p.name.startswith(".") and (
            (p.is_dir() and (p / "metadata.yaml").is_file()) or (p.is_file() and p.suffix in (".mcap", ".db3"))))
        if inside:
            return inside
    return [path]


def count_frames(path: Path, topics: list[str] | None) -> int:
    """The camera frames ``segmerge-bag`` would process in the bag (BagError if it cannot be read)."""
    source = InputBag(path)
    try:
        return source.count(select_cameras(source.topic_types(), topics))
    finally:
        source.close()


# -- the worker ---------------------------------------------------------------------------------------------------
class LinePrefix(io.TextIOBase):
    """stderr with each line led by ``prefix`` (the bag it is about: workers' messages interleave)."""

    def __init__(self):
        self.prefix, self._line_start = "", True

    def write(self, text: str) -> int:
        pieces = []
        for piece in text.splitlines(keepends=True):
            pieces.append((self.prefix if self._line_start else "") + piece)
            self._line_start = piece.endswith("\n")
        sys.stderr.write("".join(pieces))  # looked up now: rich's live display may have replaced it
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


class FrameCount:
    """What ``BagRun.run`` asks of a rich Progress, reduced to its frames done: the fleet has one bar for all."""

    def __init__(self, report: Callable[[int], None]):
        self.report = report

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        return 0

    def update(self, task: int, completed: float = 0, **fields) -> None:
        self.report(int(completed))


class BagWorker:
    """Builds the models once (``setup``), then turns whole bags into outputs (``process``), one at a time: in the
    driver's process, or as a Ray actor. ``progress`` is the current bag's frames done (the driver polls it)."""

    def __init__(self, values: dict, out_dir: str, storage: str, topics: list[str] | None, threads: int):
        self.values, self.out_dir, self.storage, self.topics, self.threads = \
            values, Path(out_dir), storage, topics, threads
        self.stderr = LinePrefix()
        self.console = Console(file=self.stderr, soft_wrap=True)
        self.processor: BagProcessor | None = None
        self.frames = 0
        self.on_frames: Callable[[int], None] | None = None

    def setup(self) -> str:
        """'' once the models are built, else why they cannot be (the StartupError's message)."""
        torch.set_num_threads(self.threads)
        try:
            self.processor = BagProcessor(self.values, self.console)
        except (StartupError, BagError) as error:
            return str(error)
        return ""

    def progress(self) -> int:
        return self.frames

    def _frames_done(self, done: int) -> None:
        self.frames = done
        if self.on_frames is not None:
            self.on_frames(done)

    def process(self, name: str, path: str) -> dict:
        """The bag ``path`` into ``DIR/name``: written under DIR/.segmerge-partial and moved into DIR whole once
        closed; its manifest facts (with the checksum after the move) or, failing, why."""
        self.frames = 0
        self.stderr.prefix = f"[{name}] "
        partial, final = self.out_dir / PARTIAL_DIR / name, self.out_dir / name
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        facts = {"worker": f"{socket.gethostname()}:{os.getpid()}", "threads": self.threads, "started": now()}
        try:
            source = InputBag(path)
            try:
                cameras = select_cameras(source.topic_types(), self.topics)
                summary = self.processor.process(source, cameras, partial, self.storage, FrameCount(self._frames_done))
            finally:
                source.close()
        except BagError as error:
            return {**failed_entry(str(error), INPUT_ERROR), **facts, "finished": now()}
        except Exception as error:  # noqa: BLE001 - one bag's failure (a bug, out of memory) must not stop the rest
            self.console.print(traceback.format_exc(), markup=False, highlight=False)
            return {**failed_entry(f"{type(error).__name__}: {error}", RUN_ERROR), **facts, "finished": now()}
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)  # one rename: DIR/name is absent or whole
        summary.output = final
        return {**summary_entry(summary), **facts, "output": name, "checksum": checksum(final),
                "output_fingerprint": fingerprint(final), "finished": now()}


# -- the driver ---------------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    path: Path
    frames: int
    fingerprint: str


class FleetRun:
    """The driver's side: the manifest, the one progress bar, and what this run did."""

    def __init__(self, manifest: Manifest, jobs: list[Job], failed_unread: int, progress, err: Console):
        """``failed_unread``: the inputs of this run that failed before any worker (unreadable)."""
        self.manifest, self.jobs, self.err = manifest, {job.name: job for job in jobs}, err
        self.progress = progress
        self.task = progress.add_task("frames", total=sum(job.frames for job in jobs), fps="")
        self.total_bags = len(jobs) + failed_unread
        self.started = time.perf_counter()
        self.in_flight: dict[str, int] = {}  # name -> frames done
        self.frames_done = 0
        self.unread = self.bags_done = self.failures = failed_unread
        self.wall_s = 0.0

    def start(self, name: str) -> None:
        job = self.jobs[name]
        self.in_flight[name] = 0
        self.manifest.record(name, {"status": RUNNING, "input": str(job.path), "fingerprint": job.fingerprint,
                                    "started": now()})

    def frames(self, name: str, done: int) -> None:
        if name in self.in_flight:
            self.in_flight[name] = done
            self.update()

    def done(self, name: str, entry: dict) -> None:
        job = self.jobs[name]
        self.in_flight.pop(name, None)
        self.frames_done += job.frames
        self.bags_done += 1
        self.failures += entry["status"] != COMPLETE
        self.manifest.record(name, {"input": str(job.path), "fingerprint": job.fingerprint, **entry})
        if entry["status"] != COMPLETE:
            self.err.print(f"segmerge-bag: {name} failed: {entry['error']}", markup=False, highlight=False)
        self.update()

    def update(self) -> None:
        done = self.frames_done + sum(self.in_flight.values())
        self.wall_s = time.perf_counter() - self.started
        fps = f", {done / self.wall_s:.1f} fps" if self.wall_s > 0 else ""
        self.progress.update(self.task, completed=done,
                             fps=f"bags {self.bags_done}/{self.total_bags}, {self.failures} failed{fps}")


def threads_per_worker(args) -> int:
    """--threads, else this machine's CPUs shared by the workers (at least 1); on a cluster 1 unless given."""
    if args.threads:
        return args.threads
    if args.ray_address:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // args.workers)


def run_here(worker_args: tuple, jobs: list[Job], run: FleetRun) -> None:
    worker = BagWorker(*worker_args)
    reason = worker.setup()
    if reason:
        raise StartupError(reason)
    for job in jobs:
        run.start(job.name)
        worker.on_frames = lambda done, name=job.name: run.frames(name, done)
        run.done(job.name, worker.process(job.name, str(job.path)))


def import_ray():
    try:
        import ray
    except ImportError:
        raise BagError(RAY_INSTALL_HINT) from None
    return ray


def run_on_ray(ray, worker_args: tuple, jobs: list[Job], run: FleetRun, workers: int, address: str | None) -> None:
    """The jobs on ``workers`` Ray actors, each given its next bag as soon as it is free."""
    threads = worker_args[-1]
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, logging_level=logging.ERROR)
        else:
            # "local": a new Ray for this run even where RAY_ADDRESS or an earlier `ray start` names a cluster
            # (ray.init would join it and refuse num_cpus)
            ray.init(address="local", num_cpus=workers * threads, include_dashboard=False,
                     logging_level=logging.ERROR)
    actors = []
    try:
        actor_class = ray.remote(BagWorker).options(num_cpus=threads, max_concurrency=2)  # 2: progress while busy
        actors = [actor_class.remote(*worker_args) for _ in range(min(workers, len(jobs)))]
        reasons = [reason for reason in ray.get([actor.setup.remote() for actor in actors]) if reason]
        if reasons:
            raise StartupError(reasons[0])
        queue, idle, pending = deque(jobs), list(actors), {}
        while queue or pending:
            while idle and queue:
                actor, job = idle.pop(), queue.popleft()
                run.start(job.name)
                pending[actor.process.remote(job.name, str(job.path))] = (actor, job.name)
            if not pending:  # every worker died: what is left fails
                for job in queue:
                    run.start(job.name)
                    run.done(job.name, failed_entry("no Ray worker left (they died: see above)", RUN_ERROR))
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                actor, name = pending.pop(ref)
                try:
                    entry = ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.RayActorError as error:  # the worker died (out of memory, killed): not reused
                    entry = failed_entry(f"its Ray worker died: {type(error).__name__}: {error}", RUN_ERROR)
                except ray.exceptions.RayError as error:
                    entry = failed_entry(f"{type(error).__name__}: {error}", RUN_ERROR)
                    idle.append(actor)
                run.done(name, entry)
            busy = list(pending.values())
            try:
                counts = ray.get([actor.progress.remote() for actor, _ in busy])
            except ray.exceptions.RayError:  # a worker died: its bag's result says so
                continue
            for (_, name), done in zip(busy, counts):
                run.frames(name, done)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def run_fleet(args, values: dict, err: Console, out: Console) -> int:
    """The many-bag run of ``segmerge-bag IN... --out-dir DIR``; returns the exit status."""
    ray = import_ray() if args.workers > 1 or args.ray_address else None  # before anything is written
    out_dir = Path(args.out_dir).absolute()
    inputs, left_out = expand_inputs(args.paths, out_dir)
    if left_out:
        err.print(f"segmerge-bag: left out {len(left_out)} path(s) of --out-dir {out_dir}'s own (its outputs): "
                  f"{', '.join(str(path) for path in left_out[:3])}{' ...' if len(left_out) > 3 else ''}",
                  markup=False, highlight=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out_dir):
        manifest = Manifest.load(out_dir, {"node": values, "storage": args.storage, "topics": args.topics})
        shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)  # what an interrupted run was writing
        decisions = [decide(manifest, name, path, args.retry_failed, args.verify)
                     for name, path in inputs.items()]
        jobs = plan(decisions, manifest, args.topics, err)
        threads = threads_per_worker(args)
        worker_args = (values, str(out_dir), args.storage, args.topics, threads)
        interrupted = False
        with progress_bar(err) as progress:
            unread = sum(d.action == DO for d in decisions) - len(jobs)
            run = FleetRun(manifest, jobs, unread, progress, err)
            try:
                if not jobs:
                    pass
                elif ray is None:
                    run_here(worker_args, jobs, run)
                else:
                    run_on_ray(ray, worker_args, jobs, run, args.workers, args.ray_address)
            except KeyboardInterrupt:
                interrupted = True
        with contextlib.suppress(OSError):  # empty unless a bag was left unfinished
            (out_dir / PARTIAL_DIR).rmdir()
        print_fleet_summary(manifest, decisions, run, args.workers if ray else 1, out)
    if interrupted:
        err.print(f"segmerge-bag: interrupted: {', '.join(run.in_flight) or 'no bag'} left unfinished (not marked "
                  "complete); run the same command again to finish", markup=False, highlight=False)
        return 130
    entries = [manifest.bags.get(d.name, {}) for d in decisions]
    return 0 if all(entry.get("status") == COMPLETE for entry in entries) else 1


def plan(decisions: list[Decision], manifest: Manifest, topics: list[str] | None, err: Console) -> list[Job]:
    """Says what happens to each input; clears the outputs to redo; the jobs, frames counted (inputs that cannot be
    read are recorded as failed here, without a worker)."""
    jobs = []
    for decision in decisions:
        if decision.action != DO:
            err.print(f"segmerge-bag: {decision.name}: {decision.reason}", markup=False, highlight=False)
            continue
        stale = manifest.out_dir / decision.name
        if stale.exists():
            shutil.rmtree(stale)
        input_print = fingerprint(decision.path)
        try:
            frames = count_frames(decision.path, topics)
        except BagError as error:
            manifest.record(decision.name, {"input": str(decision.path), "fingerprint": input_print,
                                            **failed_entry(str(error), INPUT_ERROR), "finished": now()})
            err.print(f"segmerge-bag: {decision.name} failed: {error}", markup=False, highlight=False)
            continue
        err.print(f"segmerge-bag: {decision.name}: {decision.reason}: {frames} frames to do", markup=False,
                  highlight=False)
        jobs.append(Job(decision.name, decision.path, frames, input_print))
    return jobs


def print_fleet_summary(manifest: Manifest, decisions: list[Decision], run: FleetRun, workers: int,
                        console: Console) -> None:
    """A row per input (this run's or recorded earlier), then this run's rate."""
    table = Table(title=f"segmerge-bag -> {manifest.out_dir}", title_justify="left")
    numbers = ("frames", "processed", "bad", "failed", "persons", "wall s", "fps")
    for heading in ("input", "status", *numbers, "note"):
        table.add_column(heading, justify="right" if heading in numbers else "left",
                         overflow="fold" if heading == "note" else "ellipsis")
    for decision in decisions:
        entry = manifest.bags.get(decision.name, {})
        status = entry.get("status", "-")
        if status == RUNNING:
            status = "interrupted"
        note = entry.get("error", "") if status != COMPLETE else ""
        if decision.action in (SKIP, KEEP):
            note = f"{decision.reason}{': ' + note if note else ''}"
        cells = [entry.get(key) for key in ("frames", "processed", "bad", "failed_frames", "persons", "wall_s", "fps")]
        table.add_row(decision.name, status, *("-" if cell is None else str(cell) for cell in cells), note)
    console.print(table)
    statuses = [manifest.bags.get(d.name, {}).get("status") for d in decisions]
    skipped = sum(d.action != DO for d in decisions)
    processed = sum(manifest.bags[name].get("processed", 0) for name in run.jobs
                    if manifest.bags.get(name, {}).get("status") in (COMPLETE, FAILED))
    bags = run.bags_done - run.unread  # through a worker
    rate = f": {bags / run.wall_s * 60:.1f} bags/min, {processed / run.wall_s:.1f} frames/s" if run.wall_s > 0 else ""
    console.print(f"{len(decisions)} inputs: {statuses.count(COMPLETE)} complete, {statuses.count(FAILED)} failed, "
                  f"{skipped} left as recorded earlier. This run: {bags} bag(s), {processed} frames in "
                  f"{run.wall_s:.1f} s{rate} ({workers} worker(s))", markup=False, highlight=False)
    console.print(f"manifest: {manifest.out_dir / MANIFEST_NAME}", markup=False, highlight=False)

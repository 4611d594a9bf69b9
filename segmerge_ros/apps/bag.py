"""segmerge-bag: the node's per-frame path over recorded rosbag2s; the outputs are written into new bags.

    segmerge-bag IN OUT [--topics T ...] [--model M] [--weights W] [--input-size HxW] [--backend B] [--precision P]
                 [--merge-rate R | --preset P | --budget-ms X] [--pose] [--overlay] [--plot FILE.png]
    segmerge-bag IN... --out-dir DIR [--workers N [--ray-address ADDR]] [--retry-failed] [the options above]

IN is a rosbag2 folder (``metadata.yaml`` with ``.mcap`` or ``.db3`` files) or a bare ``.mcap``/``.db3`` file. OUT
is a new rosbag2 folder (MCAP; ``--storage sqlite3`` for ``.db3``) holding every input topic unchanged and, for each
camera ``<ns>/<name>``, what the node publishes for it: ``<ns>/segmentation/{mask,confidence,labels}``, ``overlay``
with ``--overlay``, ``<ns>/pose/keypoints`` (and ``markers`` where ``<ns>/camera_info`` is recorded) with ``--pose``,
plus ``<ns>/segmentation/merge_rate`` and ``processing_ms`` (std_msgs/Float32, per frame: the rate it ran with and
what it cost). Each output has its input's header and is written at its input's log time, so playback lines them
up. Every frame is processed, in log-time order (none dropped, unlike live); bad frames are counted and skipped.

With ``--out-dir``, every positional is an input (bags, folders of bags, globs) and each gets its own output in DIR,
named after it, with a manifest; ``--workers N`` spreads the bags over N Ray workers, and a re-run resumes
(``fleet.py``).

Messages go through rclpy: raw CDR -> ``deserialize_message`` -> the node's frame path -> ``serialize_message``.
``rosbags`` only reads and writes the bag files (both storage formats, with the standard message definitions).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from segmerge_ros.apps.bag_io import STORAGES, BagError, InputBag, check_output_path, select_cameras
from segmerge_ros.apps.bag_run import BagProcessor, BagSummary, progress_bar
from segmerge_ros.apps.demo import percentile
from segmerge_ros.apps.fleet import run_fleet
from segmerge_ros.apps.plots import plot_bag_timeline
from segmerge_ros.inference.budget import BudgetMode
from segmerge_ros.ros.parameter_policy import startup_refusal
from segmerge_ros.ros.params import DEFAULTS, SPECS
from segmerge_ros.ros.startup import StartupError


# -- the command --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bag", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s IN OUT [options]\n       %(prog)s IN [IN ...] --out-dir DIR "
                                           "[--workers N] [--ray-address ADDR] [--retry-failed] [options]")
    parser.add_argument("paths", nargs="+", metavar="IN",
                        help="IN OUT: a rosbag2 folder (metadata.yaml + .mcap/.db3), or a .mcap or .db3, and the new "
                             "rosbag2 folder to write (must not exist); with --out-dir, every one is an input (bags, "
                             "folders of bags, globs)")
    parser.add_argument("--out-dir", default=None, metavar="DIR",
                        help="many bags: one output per input in DIR, named after it, and DIR/"
                             "segmerge-manifest.json; a re-run skips the inputs done and redoes the rest")
    parser.add_argument("--workers", type=_positive, default=1, metavar="N",
                        help="with --out-dir: N bags at once on Ray workers (pip install 'segmerge_ros[fleet]'); "
                             "each builds the models once and takes whole bags (default 1: in this process)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --out-dir: the workers on this running Ray cluster (ray start --head, KubeRay; "
                             "'auto' on one of its nodes) instead of a local Ray")
    parser.add_argument("--retry-failed", action="store_true",
                        help="with --out-dir: also redo inputs that failed before on unchanged files")
    parser.add_argument("--verify", action="store_true",
                        help="with --out-dir: re-read every complete output and check its sha256 (default: only "
                             "where its files' names, sizes or modification times changed since)")
    parser.add_argument("--topics", nargs="+", default=None, metavar="T",
                        help="camera topics to process (default: every Image/CompressedImage topic; a raw topic "
                             "wins over its own /compressed)")
    parser.add_argument("--storage", choices=tuple(STORAGES), default="mcap", help="OUT's storage (default mcap)")
    for name in ("model", "weights", "device", "backend", "precision", "input_size", "engine_cache_dir"):
        parser.add_argument("--" + name.replace("_", "-"), default=DEFAULTS[name], help=_short(SPECS[name]))
    merge = parser.add_mutually_exclusive_group()
    merge.add_argument("--merge-rate", type=float, default=None, help=_short(SPECS["merge_rate"]))
    merge.add_argument("--preset", default=None, help=_short(SPECS["preset"]))
    merge.add_argument("--budget-ms", type=float, default=None,
                       help="budget mode (latency): each frame's merge rate chosen from the measured processing "
                            "times to meet this many ms per frame, as the node does live")
    parser.add_argument("--pose", action="store_true", help="human pose keypoints (pose/keypoints, and pose/markers "
                        "where camera_info is recorded)")
    parser.add_argument("--pose-weights", default=DEFAULTS["pose.weights"], help=_short(SPECS["pose.weights"]))
    parser.add_argument("--pose-mode", default=DEFAULTS["pose.mode"], help=_short(SPECS["pose.mode"]))
    parser.add_argument("--overlay", action="store_true", help="also write segmentation/overlay (rgb8)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="plot per-frame processing time and merge rate over the bag")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; with --out-dir, per worker: the CPUs / N)")
    args = parser.parse_intermixed_args(argv)  # IN --model X OUT, as before IN... was variadic
    if args.out_dir is None:
        if len(args.paths) != 2:
            parser.error(f"give IN OUT for one bag, or IN... --out-dir DIR for many (got {len(args.paths)} paths)")
        for option, given in (("--workers", args.workers != 1), ("--ray-address", args.ray_address),
                              ("--retry-failed", args.retry_failed), ("--verify", args.verify)):
            if given:
                parser.error(f"{option} goes with --out-dir DIR (many bags)")
        args.input, args.output = args.paths
    elif args.plot:
        parser.error("--plot draws one bag: give IN OUT without --out-dir (the manifest holds each bag's rates)")
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _short(spec) -> str:
    text = spec.description.split(". ")[0].rstrip(".") + f" (default {spec.default!r})"
    return text.replace("%", "%%")  # argparse formats help with %: "60 % of" would break --help


def node_values(args: argparse.Namespace) -> dict:
    """The node parameters these options amount to (the node's defaults for the rest)."""
    values = dict(DEFAULTS)
    for name in ("model", "weights", "device", "backend", "precision", "input_size", "engine_cache_dir"):
        values[name] = getattr(args, name)
    if args.merge_rate is not None:
        values["merge_rate"] = args.merge_rate
    if args.preset is not None:
        values["preset"] = args.preset
    if args.budget_ms is not None:
        values["budget.mode"] = BudgetMode.LATENCY.value
        values["budget.target_latency_ms"] = args.budget_ms
    values["pose.enable"] = bool(args.pose)
    values["pose.weights"] = args.pose_weights
    values["pose.mode"] = args.pose_mode
    values["publish_overlay"] = bool(args.overlay)
    return values


def check_values(values: dict) -> None:
    """Refuse what the node would refuse at start-up, with its reasons."""
    reason = startup_refusal(values)
    for name, spec in SPECS.items():  # ranges: rclpy checks them for the node
        if reason is None and spec.float_range is not None:
            low, high = spec.float_range
            if not low <= values[name] <= high:
                reason = f"{name} must lie in [{low:g}, {high:g}]; got {values[name]:g}"
    if reason:
        raise BagError(reason)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segmerge-bag``; returns the exit code (0: frames processed, 1: an error, said on stderr,
    130: interrupted). With --out-dir, 1 whenever an input failed or had a problem (``fleet.run_fleet``)."""
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)  # messages stay whole lines in logs
    out = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
    try:
        if args.out_dir is not None:
            values = node_values(args)
            check_values(values)
            return run_fleet(args, values, err, out)
        summary = run(args, err)
    except (BagError, StartupError) as error:
        err.print(f"segmerge-bag: error: {error}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:  # the fleet path answers its own during processing; this is before or after it
        output = getattr(args, "output", None)
        held = f"; {output} holds the frames processed so far" if output and Path(output).exists() else ""
        err.print(f"segmerge-bag: interrupted{held}", markup=False, highlight=False)
        return 130
    print_summary(summary, out)
    if args.plot and summary.processed:
        path = plot_bag_timeline({t.topic: t.timeline for t in summary.cameras.values()}, args.plot,
                                 target_ms=summary.budget_ms, title=f"segmerge-bag {Path(args.input).name}")
        err.print(f"segmerge-bag: wrote {path}", markup=False, highlight=False)
    problems = summary.problems()
    for problem in problems:
        err.print(f"segmerge-bag: error: {problem}", markup=False, highlight=False)
    return 1 if problems else 0


def run(args: argparse.Namespace, console: Console) -> BagSummary:
    """Check everything cheap first (bag, topics, options, OUT), then load the models and go over the bag."""
    values = node_values(args)
    check_values(values)
    check_output_path(Path(args.output), args.storage)  # before the slow model load
    if args.threads:
        torch.set_num_threads(args.threads)
    source = InputBag(args.input)
    try:
        cameras = select_cameras(source.topic_types(), args.topics)
        processor = BagProcessor(values, console)
        with progress_bar(console) as progress:
            return processor.process(source, cameras, args.output, args.storage, progress)
    finally:
        source.close()


def print_summary(summary: BagSummary, console: Console) -> None:
    table = Table(title=f"segmerge-bag -> {summary.output}", title_justify="left")
    for heading in ("topic", "type", "frames", "processed", "bad", "failed", "proc p50 ms", "proc p90 ms",
                    "merge rates used"):
        table.add_column(heading, justify="left" if heading in ("topic", "type", "merge rates used") else "right")
    for tally in summary.cameras.values():
        ms = tally.processing_ms
        table.add_row(tally.topic, tally.msgtype.rsplit("/", 1)[-1], str(tally.frames), str(tally.processed),
                      str(tally.bad), str(tally.failed), f"{percentile(ms, 50):.1f}", f"{percentile(ms, 90):.1f}",
                      tally.rates_used())
    console.print(table)
    fps = summary.processed / summary.wall_s if summary.wall_s > 0 else math.nan
    console.print(f"{summary.messages_in} messages read, {summary.messages_out} written; {summary.processed} frames "
                  f"processed in {summary.wall_s:.1f} s ({fps:.1f} fps)", markup=False, highlight=False)
    if summary.backend:
        console.print(f"backend: {summary.backend}", markup=False, highlight=False)
    if summary.budget_ms is not None:
        ms = [m for t in summary.cameras.values() for m in t.processing_ms]
        console.print(f"budget {summary.budget_ms:g} ms per frame: processing p50 {percentile(ms, 50):.1f} ms "
                      f"({percentile(ms, 50) / summary.budget_ms - 1:+.0%})", markup=False, highlight=False)
    for tally in summary.cameras.values():
        for reason, count in tally.bad_reasons.most_common():
            console.print(f"bad frames on {tally.topic}: {count} x {reason}", markup=False, highlight=False)
        for cause, count in tally.failures.most_common():
            console.print(f"failed frames on {tally.topic}: {count} x {cause} (traceback above)", markup=False,
                          highlight=False)
    for topic, count in summary.replaced_topics.items():
        console.print(f"replaced: {topic}: {count} recorded message(s) left out, this run's written instead",
                      markup=False, highlight=False)
    for topic, reason in summary.skipped_topics.items():
        console.print(f"not copied: {topic}: {reason}", markup=False, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
